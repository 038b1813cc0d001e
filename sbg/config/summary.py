"""The one-screen summary `sbg check-config` prints for a valid configuration."""

from __future__ import annotations

import textwrap
from collections.abc import Iterable

from sbg.config.model import Config, HostPattern, Listener, RoomSettings
from sbg.config.units import format_duration, format_size
from sbg.hosts import format_authority
from sbg.matrix.groups import GROUPS


def _hosts(patterns: Iterable[HostPattern]) -> str:
    return ", ".join(format_authority(p.host, p.port) for p in patterns) or "none"


def _groups(groups: frozenset[str]) -> str:
    if not groups:
        return "nothing"
    if groups == GROUPS:
        return "every group"
    return ", ".join(sorted(groups))


_INVITES = {
    "open_rooms": "invited into open rooms",
    "private_rooms": "invited into any non-public room",
    "none": "never invited",
}


def _rooms(rooms: RoomSettings) -> str:
    public = "joins public rooms" if rooms.join_public else "no public rooms"
    level = f"power level <= {rooms.max_power_level}"
    return f"    rooms:    {_INVITES[rooms.invite]}, {public}, {level}"


def _wrap(line: str) -> list[str]:
    return textwrap.wrap(line, width=79, subsequent_indent=" " * 14, break_on_hyphens=False)


def _listener(listener: Listener, config: Config) -> str:
    addresses = ", ".join(format_authority(a, listener.port) for a in listener.bind_addresses)
    notes = []
    if listener.tls:
        notes.append("TLS")
    if listener.x_forwarded:
        notes.append("X-Forwarded-For trusted")
    if listener.type == "admin":
        notes.append("token required" if config.admin_token_file else "no token")
    suffix = f" ({', '.join(notes)})" if notes else ""
    return f"  {listener.type:<8} {addresses}{suffix}"


def format_summary(config: Config) -> str:
    """Listeners, servers with their trust levels and keys, and trust levels."""
    lines = [f"{config.path}: OK", "listeners:"]
    lines += [_listener(listener, config) for listener in config.listeners]

    lines.append("internal homeservers:")
    for hs in config.internal_homeservers:
        tls = "TLS certificate set" if hs.tls else "no TLS certificate"
        lines.append(f"  {hs.server_name} -> {hs.upstream} ({tls})")
        lines.append(f"    hosts: {_hosts(hs.federation_hosts)}")

    lines.append(
        "external homeservers:" if config.external_homeservers else "external homeservers: none"
    )
    for ext in config.external_homeservers:
        state = "" if ext.enabled else ", DISABLED"
        lines.append(f"  {ext.server_name} (trust level {ext.trust_level}{state})")
        keys = ", ".join(key_id for key_id, _ in ext.verify_keys) or "none"
        lines.append(f"    keys: {keys} ({ext.key_fetch})")
        hosts = f"    hosts: {_hosts(ext.federation_hosts)}"
        if ext.client_hosts:
            hosts += f"; client hosts: {_hosts(ext.client_hosts)}"
        lines.append(hosts)

    lines.append("trust levels:")
    for level in config.trust_levels:
        lines.append(f"  {level.name}:")
        lines += _wrap(f"    inbound:  {_groups(level.inbound)}")
        if level.outbound == level.inbound:
            lines.append("    outbound: the same")
        else:
            lines += _wrap(f"    outbound: {_groups(level.outbound)}")
        lines += _wrap(_rooms(level.rooms))

    inbound, outbound = config.inbound, config.outbound
    lines.append(
        f"inbound: max body {format_size(inbound.max_body_size)}, "
        f"timeouts {format_duration(inbound.request_timeout)}"
        f"/{format_duration(inbound.idle_timeout)} (request/idle), "
        f"strict origin checks {'on' if inbound.strict_origin_checks else 'OFF'}"
    )
    proxy = f", via {format_authority(*outbound.upstream_proxy)}" if outbound.upstream_proxy else ""
    lines.append(
        f"outbound: default trust {outbound.default_trust}, "
        f"proxy auth {'on' if outbound.proxy_auth else 'off'}{proxy}, "
        f"{len(outbound.allowed_non_matrix_urls)} non-Matrix URL(s)"
    )
    cluster = config.cluster
    if cluster is None:
        lines.append("cluster: none (this node alone)")
    else:
        password = "password set" if cluster.password_file else "no password"
        lines.append(f"cluster: node {cluster.node_name}, Redis {cluster.redis} ({password})")
    return "\n".join(lines) + "\n"
