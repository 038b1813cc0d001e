"""Several sbg nodes of one cluster behind a TCP load balancer, for the
end-to-end suite.

The homeservers know sbg at one address (``SBG_ADDRESS``: hs-ext's hosts
file maps hs-int.test there, hs-int's ``https_proxy`` points there). Here
that address is a load balancer (``testbed.tcpproxy``, round robin per
connection, skipping a node that refuses connections) in front of the
nodes at ``E2E_NET.11``, ``.12``, ...: inbound TLS and outbound CONNECT
pass through it untouched. The nodes share their kill switch through a
real Redis; each has its own listeners, admin listener and state_dir, and
otherwise the same configuration.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from testbed.e2e.harness import (
    E2E_NET,
    SBG_ADDRESS,
    SBG_INBOUND_PORT,
    SBG_OUTBOUND_PORT,
    Cluster,
    Sbg,
)
from testbed.tcpproxy import TCPProxy


def node_address(index: int) -> str:
    return f"{E2E_NET}.{11 + index}"


class Gateways:
    """The nodes and their load balancer (nothing starts yet)."""

    def __init__(self, cluster: Cluster, redis_url: str, count: int = 2) -> None:
        base = cluster.write_sbg()  # the one-node configuration, written, never started
        with open(base.config_path, encoding="utf-8") as f:
            config: dict[str, Any] = yaml.safe_load(f)
        cluster.sbg = None
        self.nodes: list[Sbg] = []
        for index in range(count):
            name = f"gw-{chr(ord('a') + index)}"
            self.nodes.append(
                Sbg(cluster.sbg_dir, _node_config(config, index, name, redis_url), name=name)
            )
        self.balancers: list[TCPProxy] = []

    def start(self) -> None:
        """Every node (until healthy), then the load balancer in front."""
        for node in self.nodes:
            node.start()
        for port in (SBG_INBOUND_PORT, SBG_OUTBOUND_PORT):
            backends = [(node_address(i), port) for i in range(len(self.nodes))]
            self.balancers.append(TCPProxy((SBG_ADDRESS, port), backends).start())

    def stop(self) -> dict[str, int | None]:
        for balancer in self.balancers:
            balancer.stop()
        return {os.path.basename(n.config_path): n.stop() for n in self.nodes}

    def describe_logs(self) -> str:
        return "\n".join(node.describe_logs() for node in self.nodes)

    def connections(self) -> list[list[int]]:
        """Per balancer (inbound, outbound): connections handed to each node."""
        return [list(b.connections) for b in self.balancers]


def _node_config(base: Mapping[str, Any], index: int, name: str, redis_url: str) -> dict[str, Any]:
    config = dict(base)
    config["listeners"] = [_bound(li, node_address(index)) for li in base["listeners"]]
    config["state_dir"] = f"state-{name}"
    config["cluster"] = {"redis": redis_url, "node_name": name}
    return config


def _bound(listener: Mapping[str, Any], address: str) -> dict[str, Any]:
    return {**listener, "bind_addresses": [address]}


def engaged(node: Sbg) -> set[tuple[Any, Any]]:
    return {(e["server"], e["direction"]) for e in node.kill_state()["engaged"]}


def records_of(nodes: Iterable[Sbg], since: Mapping[str, int]) -> list[dict[str, Any]]:
    """The audit records every node wrote since its mark (by config path)."""
    out: list[dict[str, Any]] = []
    for node in nodes:
        out += node.audit.records(since.get(node.config_path, 0))
    return out
