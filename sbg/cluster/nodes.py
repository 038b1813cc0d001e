"""The nodes of a cluster as they announce themselves (pure).

Every node writes its own entry in the hash `sbg:nodes` (field: its node
name) every few seconds: its name, the SHA-256 of the configuration file it
runs, its sbg version, its worker count, when it started and when it was
last seen (Redis's clock). A status view lists the nodes seen in the last
30 s, so that a node that stopped, or a node running another configuration,
shows.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

SEEN_WINDOW_MS = 30_000
# Entries of nodes not seen for this long are removed from the hash.
FORGET_AFTER_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class NodeInfo:
    """One node's announcement.

    Attributes:
        instance: random, new at each start: two processes announcing
            the same node name are told apart by it.
    """

    node: str
    config_sha256: str
    version: str
    workers: int
    started_ts: int
    last_seen_ts: int
    instance: str

    def as_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "config_sha256": self.config_sha256,
            "version": self.version,
            "workers": self.workers,
            "started_ts": self.started_ts,
            "last_seen_ts": self.last_seen_ts,
            "instance": self.instance,
        }

    def encode(self) -> str:
        return json.dumps(self.as_json(), separators=(",", ":"), sort_keys=True)


def decode_node(field: bytes | str, value: bytes | str) -> NodeInfo | None:
    """The announcement in one field of the hash; None if it is not one."""
    try:
        item = json.loads(value)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(item, dict):
        return None
    name = field.decode("utf-8", "replace") if isinstance(field, bytes) else field
    texts = [item.get(k) for k in ("node", "config_sha256", "version", "instance")]
    numbers = [item.get(k) for k in ("workers", "started_ts", "last_seen_ts")]
    if not all(isinstance(t, str) and len(t) <= 200 for t in texts):
        return None
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers):
        return None
    if item["node"] != name:
        return None
    return NodeInfo(
        node=item["node"],
        config_sha256=item["config_sha256"],
        version=item["version"],
        workers=item["workers"],
        started_ts=item["started_ts"],
        last_seen_ts=item["last_seen_ts"],
        instance=item["instance"],
    )


def decode_nodes(raw: Mapping[bytes, bytes]) -> list[NodeInfo]:
    """Every announcement of the hash that parses, by node name."""
    nodes = [decode_node(field, value) for field, value in raw.items()]
    return sorted((n for n in nodes if n is not None), key=lambda n: n.node)


def recent(
    nodes: Iterable[NodeInfo], now_ms: int, window_ms: int = SEEN_WINDOW_MS
) -> list[NodeInfo]:
    """The nodes seen within `window_ms` of `now_ms`."""
    return [n for n in nodes if now_ms - n.last_seen_ts <= window_ms]


def forgotten(nodes: Iterable[NodeInfo], now_ms: int) -> list[str]:
    """The names of the nodes not seen for `FORGET_AFTER_MS`."""
    return [n.node for n in nodes if now_ms - n.last_seen_ts > FORGET_AFTER_MS]
