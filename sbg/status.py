"""`GET /_sbg/status` (and `sbg status`): what the gateway is doing, at a glance.

`build_status` makes the whole body, one JSON object, from `StatusFacts`:
version, uptime, the configuration in service (path, SHA-256, when it was
loaded), workers, engaged kill switches, every configured certificate's
expiry and, per external server, its settings, keys and the time of the
last request of each decision in each direction. Further sections (e.g. a
cluster's nodes) are added by name through `StatusFacts.sections`; each is
called when the status is asked for and its result put under its name.

The times of the last requests and the certificates' expiries are read
from the metrics (`sbg_last_request_timestamp_seconds`,
`sbg_certificate_expiry_timestamp_seconds`), which with `workers: N` is how
they reach the supervisor from every worker. The workers' fetched keys
reach it through one small JSON file per worker (`publish_fetched_keys`),
written when a worker's key cache changes.

Times are milliseconds since the epoch (`*_ts`), as in `GET /_sbg/kill`,
or null for never.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.metrics_core import Metric

from sbg import __version__
from sbg.config.model import Config, ExternalHomeserver
from sbg.killswitch.state import Switches, render
from sbg.metrics import UNKNOWN

_DECISIONS = (("allow", "last_allowed_ts"), ("deny", "last_refused_ts"))
_WOULD_DENY = ("would_deny", "last_would_deny_ts")
_KEYS_FILE = "fetched-keys-{pid}.json"

# (direction, server, decision) -> seconds since the epoch
LastRequests = dict[tuple[str, str, str], float]
# server name -> key id -> usable until (ms since the epoch)
FetchedKeys = Mapping[str, Mapping[str, int]]


@dataclass
class StatusFacts:
    """Everything the status body is made of, gathered by the serving process.

    Attributes:
        now, started, config_loaded: seconds since the epoch.
        workers: (alive, configured) with `workers: N`; None for one process.
        metrics: the metric families `/metrics` exports.
        sections: further entries of the body, by name, each called once.
    """

    now: float
    started: float
    config: Config
    config_loaded: float
    killswitch: Switches
    workers: tuple[int, int] | None
    metrics: Iterable[Metric]
    fetched_keys: FetchedKeys
    sections: Mapping[str, Callable[[], object]] = field(default_factory=dict)


class StatusState:
    """When a process started and when its configuration was last put into
    service; the named `sections` other components add to its status."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.started = clock()
        self.config_loaded = self.started
        self.sections: dict[str, Callable[[], object]] = {}

    def now(self) -> float:
        return self._clock()

    def config_reloaded(self) -> None:
        self.config_loaded = self._clock()


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else int(seconds * 1000)


def _samples(families: Iterable[Metric], wanted: set[str]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {name: [] for name in wanted}
    for family in families:
        if family.name in wanted:
            out[family.name].extend(family.samples)
    return out


def _last_requests(samples: list[Any]) -> LastRequests:
    last: LastRequests = {}
    for s in samples:
        key = (s.labels.get("direction", ""), s.labels.get("server", ""), s.labels.get("decision"))
        if s.value > 0:
            last[key] = max(s.value, last.get(key, 0.0))
    return last


def _last(last: LastRequests, direction: str, server: str) -> dict[str, int | None]:
    out = {}
    for decision, name in (*_DECISIONS, _WOULD_DENY):
        out[name] = _ms(last.get((direction, server, decision)))
    return out


def _certificates(samples: list[Any]) -> list[dict[str, Any]]:
    certs = [
        {
            "kind": s.labels.get("kind"),
            "name": s.labels.get("name"),
            "path": s.labels.get("path"),
            "expires_ts": _ms(s.value),
        }
        for s in samples
    ]
    return sorted(certs, key=lambda c: (str(c["kind"]), str(c["name"]), str(c["path"])))


def _server(
    ext: ExternalHomeserver,
    facts: StatusFacts,
    last: LastRequests,
    certs: list[dict[str, Any]],
) -> dict[str, Any]:
    engaged = facts.killswitch
    fetched = facts.fetched_keys.get(ext.server_name, {})
    tls_ca = None
    if ext.tls_ca is not None:
        expiry = next(
            (
                c["expires_ts"]
                for c in certs
                if c["kind"] == "tls_ca" and c["name"] == ext.server_name
            ),
            None,
        )
        tls_ca = {"path": ext.tls_ca, "expires_ts": expiry}
    level = next((t for t in facts.config.trust_levels if t.name == ext.trust_level), None)
    return {
        "server_name": ext.server_name,
        "enabled": ext.enabled,
        "trust_level": ext.trust_level,
        "mode": (level.mode if level is not None else None) or facts.config.mode,
        "key_fetch": ext.key_fetch,
        "pinned_keys": [key_id for key_id, _ in ext.verify_keys],
        "fetched_keys": [
            {"key_id": key_id, "valid_until_ts": until} for key_id, until in sorted(fetched.items())
        ],
        "tls_ca": tls_ca,
        "killed": {
            d: (None, d) in engaged or (ext.server_name, d) in engaged
            for d in ("inbound", "outbound")
        },
        "inbound": _last(last, "inbound", ext.server_name),
        "outbound": _last(last, "outbound", ext.server_name),
    }


def build_status(facts: StatusFacts) -> dict[str, Any]:
    """The body of `GET /_sbg/status` (see the module docstring)."""
    wanted = {"sbg_last_request_timestamp_seconds", "sbg_certificate_expiry_timestamp_seconds"}
    samples = _samples(facts.metrics, wanted)
    last = _last_requests(samples["sbg_last_request_timestamp_seconds"])
    certs = _certificates(samples["sbg_certificate_expiry_timestamp_seconds"])
    config = facts.config
    alive, configured = facts.workers if facts.workers is not None else (1, 1)
    body: dict[str, Any] = {
        "version": __version__,
        "now_ts": _ms(facts.now),
        "started_ts": _ms(facts.started),
        "uptime_seconds": round(max(0.0, facts.now - facts.started), 3),
        "config": {
            "path": config.path,
            "sha256": config.sha256,
            "loaded_ts": _ms(facts.config_loaded),
            "mode": config.mode,
        },
        "workers": {"alive": alive, "configured": configured},
        "kill_switches": render(facts.killswitch)["engaged"],
        "certificates": certs,
        "external_servers": [
            _server(ext, facts, last, certs) for ext in config.external_homeservers
        ],
        # Requests no configured external server could be named for.
        "unattributed": {d: _last(last, d, UNKNOWN) for d in ("inbound", "outbound")},
    }
    for name, section in facts.sections.items():
        body[name] = section()
    return body


# -- the workers' fetched keys ----------------------------------------------


def publish_fetched_keys(directory: str, pid: int, keys: FetchedKeys) -> None:
    """Write a worker's fetched keys for its supervisor (atomically)."""
    path = os.path.join(directory, _KEYS_FILE.format(pid=pid))
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({name: dict(keys) for name, keys in keys.items()}, f)
    os.replace(tmp, path)


def forget_fetched_keys(directory: str, pid: int) -> None:
    """A worker is gone: its cache with it."""
    try:
        os.unlink(os.path.join(directory, _KEYS_FILE.format(pid=pid)))
    except FileNotFoundError:
        pass


def gather_fetched_keys(directory: str, pids: Iterable[int]) -> dict[str, dict[str, int]]:
    """The union of the live workers' fetched keys (the latest expiry of a
    key two workers fetched at different times)."""
    merged: dict[str, dict[str, int]] = {}
    for pid in pids:
        try:
            with open(os.path.join(directory, _KEYS_FILE.format(pid=pid)), encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        for name, keys in data.items():
            if not isinstance(keys, dict):
                continue
            into = merged.setdefault(str(name), {})
            for key_id, until in keys.items():
                if isinstance(until, int) and not isinstance(until, bool):
                    into[str(key_id)] = max(until, into.get(str(key_id), 0))
    return merged
