"""`sbg kill` / `sbg unkill`: the kill switch through the admin listener."""

from __future__ import annotations

from typing import Any, TextIO

from sbg.commands.adminclient import AdminClientError, call, resolve


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
        base, token = resolve(config_path, admin, token_file)
        path = "/_sbg/kill" if engage else "/_sbg/unkill"
        body: dict[str, Any] = {"server": server, "direction": direction}
        if engage and reason is not None:
            body["reason"] = reason
        state = call(base + path, token, body)
    except AdminClientError as e:
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
