"""`sbg kill` / `sbg unkill`: the kill switch through the admin listener."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any, TextIO

from sbg.config.load import load_config
from sbg.errors import ConfigErrors
from sbg.hosts import format_authority


class KillCommandError(Exception):
    pass


def _read_token(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().rstrip("\r\n")
    except OSError as e:
        raise KillCommandError(f"{path}: cannot read the admin token: {e.strerror or e}") from None


def admin_from_config(config_path: str) -> tuple[str, str | None]:
    """(admin base URL, token) from the configuration's first admin listener.

    The file is read without opening certificate files: an emergency stop
    must not depend on a certificate being readable.
    """
    try:
        config = load_config(config_path, skip_files=True)
    except ConfigErrors as e:
        raise KillCommandError(
            "; ".join(e.lines()) or f"{config_path}: invalid configuration"
        ) from None
    admin = next((lst for lst in config.listeners if lst.type == "admin"), None)
    if admin is None:
        raise KillCommandError(f"{config_path}: no admin listener configured (use --admin)")
    address = admin.bind_addresses[0] if admin.bind_addresses else "127.0.0.1"
    if address in ("0.0.0.0", ""):
        address = "127.0.0.1"
    elif address == "::":
        address = "::1"
    token = _read_token(config.admin_token_file) if config.admin_token_file else None
    return f"http://{format_authority(address, admin.port)}", token


# The admin listener is reached directly, never through a proxy named in
# the environment (`http_proxy`, ...): the bearer token goes to sbg only.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _call(url: str, token: str | None, body: dict[str, Any] | None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with _OPENER.open(req, timeout=10) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        try:
            detail = json.loads(e.read()).get("error", "")
        except (ValueError, AttributeError):
            detail = ""
        raise KillCommandError(f"admin API answered {e.code}: {detail or e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise KillCommandError(f"cannot reach the admin listener at {url}: {reason}") from None
    except ValueError:
        raise KillCommandError(f"the admin listener at {url} did not answer JSON") from None


def run(
    *,
    engage: bool,
    config_path: str,
    admin: str | None,
    token_file: str | None,
    server: str | None,
    direction: str,
    out: TextIO,
    err: TextIO,
    reason: str | None = None,
) -> int:
    try:
        if admin is not None:
            base = admin.rstrip("/")
            if token_file:
                token: str | None = _read_token(token_file)
            elif os.path.exists(config_path):
                token = admin_from_config(config_path)[1]
            else:
                token = None
        else:
            base, token = admin_from_config(config_path)
            if token_file:
                token = _read_token(token_file)
        path = "/_sbg/kill" if engage else "/_sbg/unkill"
        body: dict[str, Any] = {"server": server, "direction": direction}
        if engage and reason is not None:
            body["reason"] = reason
        state = _call(base + path, token, body)
    except KillCommandError as e:
        print(f"sbg: {e}", file=err)
        return 1
    engaged = state.get("engaged", []) if isinstance(state, dict) else []
    if not engaged:
        print("no kill switch engaged", file=out)
    else:
        print("engaged kill switches:", file=out)
        for item in engaged:
            line = f"  {item.get('server') or '(global)'} {item.get('direction')}"
            if item.get("reason"):
                line += f" (reason: {item['reason']})"
            print(line, file=out)
    cluster = state.get("cluster") if isinstance(state, dict) else None
    if cluster == "connected":
        print("cluster: Redis took the change: it holds on every node within a second", file=out)
    elif cluster == "unreachable":
        print(
            "cluster: Redis is unreachable: the switch holds on this node only, and reaches "
            "the other nodes when Redis answers again",
            file=out,
        )
    return 0
