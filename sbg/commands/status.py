"""`sbg status [-c FILE] [--admin URL] [--token-file FILE] [--json]`.

Asks the admin API for `GET /_sbg/status` and prints it: for a person by
default, as one JSON object (one line) with `--json`. Exit 0, or 1 when
the admin API cannot be reached (or refuses the call).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping
from typing import Any, TextIO

from sbg.commands.adminclient import AdminClientError, call, resolve

# The entries `format_status` knows; any other is printed as JSON.
_KNOWN = {
    "version",
    "now_ts",
    "started_ts",
    "uptime_seconds",
    "config",
    "workers",
    "kill_switches",
    "certificates",
    "external_servers",
    "unattributed",
    "cluster",
}


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def _when(ts: Any, now_ts: int) -> str:
    """A time in ms since the epoch, in UTC and relative to the gateway's now."""
    if not isinstance(ts, int) or isinstance(ts, bool) or ts <= 0:
        return "never"
    text = datetime.datetime.fromtimestamp(ts / 1000, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
    delta = (ts - now_ts) / 1000
    relative = f"in {_duration(delta)}" if delta > 0 else f"{_duration(-delta)} ago"
    return f"{text} UTC ({relative})"


def _last(entry: Mapping[str, Any], now: int) -> str:
    text = (
        f"last allowed {_when(entry.get('last_allowed_ts'), now)}, "
        f"last refused {_when(entry.get('last_refused_ts'), now)}"
    )
    if entry.get("last_would_deny_ts"):
        text += f", last would_deny {_when(entry['last_would_deny_ts'], now)}"
    return text


def _switches(body: Mapping[str, Any], now: int) -> list[str]:
    engaged = body.get("kill_switches") or []
    if not engaged:
        return ["kill switches: none engaged"]
    lines = ["kill switches engaged:"]
    for e in engaged:
        line = f"  {e.get('server') or '(global)'} {e.get('direction')}"
        line += f" since {_when(e.get('since_ts'), now)}"
        if e.get("by"):
            line += f" by {e['by']}"
        if e.get("reason"):
            line += f": {e['reason']}"
        lines.append(line)
    return lines


def _server(s: Mapping[str, Any], now: int) -> list[str]:
    state = "enabled" if s.get("enabled") else "DISABLED"
    lines = [
        f"  {s.get('server_name')}: {state}, trust level {s.get('trust_level')} ({s.get('mode')})"
    ]
    killed = [d for d, on in (s.get("killed") or {}).items() if on]
    if killed:
        lines.append(f"    KILLED: {', '.join(killed)}")
    keys = ", ".join(s.get("pinned_keys") or []) or "none"
    lines.append(f"    pinned keys: {keys} (key_fetch: {s.get('key_fetch')})")
    for key in s.get("fetched_keys") or []:
        lines.append(
            f"    fetched key {key.get('key_id')}: until {_when(key.get('valid_until_ts'), now)}"
        )
    ca = s.get("tls_ca")
    if ca:
        lines.append(f"    tls_ca {ca.get('path')}: expires {_when(ca.get('expires_ts'), now)}")
    for direction in ("inbound", "outbound"):
        lines.append(f"    {direction + ':':<9} {_last(s.get(direction) or {}, now)}")
    return lines


def _cluster(cluster: Any, own_sha256: Any, now: int) -> list[str]:
    """The cluster section: this node, Redis, and the nodes seen lately, a
    node whose configuration differs from this one's marked."""
    if not isinstance(cluster, Mapping):
        return [f"cluster: {json.dumps(cluster, sort_keys=True)}"]
    lines = [
        f"cluster: node {cluster.get('node')}, Redis {cluster.get('redis')} "
        f"{cluster.get('cluster')}"
    ]
    for p in cluster.get("pending") or []:
        if isinstance(p, Mapping):
            server = p.get("server") or "(global)"
            lines.append(f"  not yet in Redis: {server} {p.get('direction')}")
    nodes = [n for n in cluster.get("nodes") or [] if isinstance(n, Mapping)]
    lines.append(
        "  nodes seen in the last 30 s:" if nodes else "  nodes seen in the last 30 s: none"
    )
    for n in nodes:
        sha = n.get("config_sha256")
        differs = "" if sha == own_sha256 else " (CONFIGURATION DIFFERS FROM THIS NODE'S)"
        lines.append(
            f"    {n.get('node')}: sbg {n.get('version')}, {n.get('workers')} workers, "
            f"last seen {_when(n.get('last_seen_ts'), now)}"
        )
        lines.append(f"      config sha256 {sha}{differs}")
    return lines


def format_status(body: Mapping[str, Any]) -> str:
    """The status for a person, one screen per few partners."""
    now = int(body.get("now_ts") or 0)
    config = body.get("config") or {}
    workers = body.get("workers") or {}
    lines = [
        f"sbg {body.get('version')}, up {_duration(float(body.get('uptime_seconds') or 0))} "
        f"(started {_when(body.get('started_ts'), now)})",
        f"config: {config.get('path')} (mode {config.get('mode')})",
        f"  sha256 {config.get('sha256')}",
        f"  loaded {_when(config.get('loaded_ts'), now)}",
        f"workers: {workers.get('alive')} of {workers.get('configured')} alive",
        *_switches(body, now),
        "certificates:",
    ]
    for c in body.get("certificates") or []:
        lines.append(
            f"  {c.get('kind')} {c.get('name')} {c.get('path')}: "
            f"expires {_when(c.get('expires_ts'), now)}"
        )
    servers = body.get("external_servers") or []
    lines.append("external servers:" if servers else "external servers: none")
    for s in servers:
        lines += _server(s, now)
    lines.append("requests not attributed to an external server:")
    for direction, entry in (body.get("unattributed") or {}).items():
        lines.append(f"  {direction + ':':<9} {_last(entry, now)}")
    if "cluster" in body:
        lines += _cluster(body["cluster"], config.get("sha256"), now)
    for name, value in body.items():
        if name not in _KNOWN:
            lines.append(f"{name}: {json.dumps(value, sort_keys=True)}")
    return "\n".join(lines) + "\n"


def run(
    *,
    config_path: str,
    admin: str | None,
    token_file: str | None,
    as_json: bool,
    out: TextIO,
    err: TextIO,
) -> int:
    try:
        base, token = resolve(config_path, admin, token_file)
        body = call(base + "/_sbg/status", token)
    except AdminClientError as e:
        print(f"sbg: {e}", file=err)
        return 1
    if not isinstance(body, dict):
        print("sbg: the admin listener did not answer a status object", file=err)
        return 1
    if as_json:
        out.write(json.dumps(body, sort_keys=True) + "\n")
    else:
        out.write(format_status(body))
    return 0
