"""The admin listener: `/health`, `/metrics` and the kill-switch API (contract 6).

`/_sbg/*` needs the bearer token from `admin_token_file` when one is set;
`/health` and `/metrics` stay open (bind the listener to loopback or a
monitoring network).
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable
from typing import Any

from twisted.web import resource, server
from twisted.web.http import Request

from sbg.policy.killswitch import KillSwitch
from sbg.policy.snapshot import Policy

logger = logging.getLogger(__name__)


def _json(request: Request, status: int, body: object) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(body).encode()


def _error(request: Request, status: int, errcode: str, text: str) -> bytes:
    return _json(request, status, {"errcode": errcode, "error": text})


class _Health(resource.Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return _json(request, 200, {"status": "ok"})


class _Metrics(resource.Resource):
    isLeaf = True

    def __init__(self, render: Callable[[], bytes]) -> None:
        super().__init__()
        self._render = render

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; version=0.0.4; charset=utf-8")
        return self._render()


class KillSwitchResource(resource.Resource):
    """`GET /_sbg/kill`, `POST /_sbg/kill`, `POST /_sbg/unkill`."""

    isLeaf = True

    def __init__(
        self,
        killswitch: KillSwitch,
        policy: Callable[[], Policy],
        token: Callable[[], str | None],
        engage: bool,
    ) -> None:
        super().__init__()
        self._ks = killswitch
        self._policy = policy
        self._token = token
        self._engage = engage

    def _authorised(self, request: Request) -> bool:
        token = self._token()
        if token is None:
            return True
        values = request.requestHeaders.getRawHeaders(b"authorization") or []
        if len(values) != 1:
            return False
        # The scheme is case-insensitive (RFC 7235); the token is compared
        # in constant time.
        scheme, _, credentials = values[0].strip(b" ").partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(credentials.lstrip(b" "), token.encode())

    def render_GET(self, request: Request) -> bytes:
        if not self._authorised(request):
            return _error(request, 401, "M_UNAUTHORIZED", "admin token required")
        return _json(request, 200, self._ks.as_json())

    def render_POST(self, request: Request) -> bytes:
        if not self._authorised(request):
            return _error(request, 401, "M_UNAUTHORIZED", "admin token required")
        raw = request.content.read() if request.content is not None else b""
        try:
            body: Any = json.loads(raw or b"{}")
        except (ValueError, RecursionError):
            return _error(request, 400, "M_BAD_JSON", "body is not JSON")
        if not isinstance(body, dict) or set(body) - {"server", "direction"}:
            return _error(request, 400, "M_BAD_JSON", "expected {server?, direction?}")
        server_name = body.get("server")
        direction = body.get("direction", "both")
        if server_name is not None and not isinstance(server_name, str):
            return _error(request, 400, "M_BAD_JSON", "server must be a string or null")
        if direction not in ("inbound", "outbound", "both"):
            return _error(request, 400, "M_BAD_JSON", "direction: inbound, outbound or both")
        # A switch left engaged for a server since removed from the
        # configuration can still be lifted.
        known = server_name in self._policy().external_by_name or (
            not self._engage and any(s == server_name for s, _d in self._ks.engaged)
        )
        if server_name is not None and not known:
            return _error(request, 404, "M_NOT_FOUND", f"no external server {server_name}")
        try:
            if self._engage:
                self._ks.engage(server_name, direction)
            else:
                self._ks.lift(server_name, direction)
        except OSError as e:
            logger.error("cannot persist the kill switch: %s", e)
            return _error(request, 500, "M_UNKNOWN", "cannot persist the kill-switch state")
        logger.warning(
            "kill switch %s: server=%s direction=%s",
            "engaged" if self._engage else "lifted",
            server_name or "(global)",
            direction,
        )
        return _json(request, 200, self._ks.as_json())


def admin_site(
    killswitch: KillSwitch,
    policy: Callable[[], Policy],
    token: Callable[[], str | None],
    metrics: Callable[[], bytes],
) -> server.Site:
    root = resource.Resource()
    root.putChild(b"health", _Health())
    root.putChild(b"metrics", _Metrics(metrics))
    sbg = resource.Resource()
    sbg.putChild(b"kill", KillSwitchResource(killswitch, policy, token, engage=True))
    sbg.putChild(b"unkill", KillSwitchResource(killswitch, policy, token, engage=False))
    root.putChild(b"_sbg", sbg)
    site = _QuietSite(root)
    site.displayTracebacks = False
    site.noisy = False
    return site


class _QuietSite(server.Site):
    """No access log: kill-switch changes are logged by the resource itself."""

    def log(self, request: Request) -> None:
        pass
