"""The admin listener: `/health`, `/metrics`, the kill-switch API, the status
and, on a node of a cluster, `/_sbg/cluster`.

`/_sbg/*` needs the bearer token from `admin_token_file` when one is set;
`/health` and `/metrics` stay open (bind the listener to loopback or a
monitoring network). Nobody unauthenticated can make it hold much: a body
above 64 KiB is refused before it is read, a connection idle for 60 s is
closed, and a request must arrive whole within that time too.
"""

from __future__ import annotations

import hmac
import io
import json
import logging
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.http import Request

from sbg.killswitch.control import Outcome, SwitchControl
from sbg.policy.snapshot import Policy

logger = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
IDLE_TIMEOUT = 60.0
MAX_REASON = 500


def _json(request: Request, status: int, body: object) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(body).encode()


def _error(request: Request, status: int, errcode: str, text: str) -> bytes:
    return _json(request, status, {"errcode": errcode, "error": text})


class _Health(resource.Resource):
    isLeaf = True

    def __init__(self, health: Callable[[], tuple[int, dict[str, Any]]]) -> None:
        super().__init__()
        self._health = health

    def render_GET(self, request: Request) -> bytes:
        status, body = self._health()
        return _json(request, status, body)


class _Metrics(resource.Resource):
    isLeaf = True

    def __init__(self, render: Callable[[], bytes]) -> None:
        super().__init__()
        self._render = render

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; version=0.0.4; charset=utf-8")
        return self._render()


def authorised(request: Request, token: str | None) -> bool:
    """Whether the request carries `Authorization: Bearer TOKEN` (any token
    when none is configured)."""
    if token is None:
        return True
    values = request.requestHeaders.getRawHeaders(b"authorization") or []
    if len(values) != 1:
        return False
    # The scheme is case-insensitive (RFC 7235); the token is compared in
    # constant time.
    scheme, _, credentials = values[0].strip(b" ").partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    return hmac.compare_digest(credentials.lstrip(b" "), token.encode())


def _read_change(raw: bytes) -> tuple[str | None, str, str | None] | str:
    """(server, direction, reason) from a kill/unkill body, or what is wrong."""
    try:
        body: Any = json.loads(raw or b"{}")
    except (ValueError, RecursionError):
        return "body is not JSON"
    if not isinstance(body, dict) or set(body) - {"server", "direction", "reason"}:
        return "expected {server?, direction?, reason?}"
    server_name = body.get("server")
    direction = body.get("direction", "both")
    reason = body.get("reason")
    if server_name is not None and not isinstance(server_name, str):
        return "server must be a string or null"
    if direction not in ("inbound", "outbound", "both"):
        return "direction: inbound, outbound or both"
    if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_REASON):
        return f"reason must be a string of at most {MAX_REASON} characters, or null"
    return server_name, direction, reason


class KillSwitchResource(resource.Resource):
    """`GET /_sbg/kill`, `POST /_sbg/kill`, `POST /_sbg/unkill`."""

    isLeaf = True

    def __init__(
        self,
        control: SwitchControl,
        policy: Callable[[], Policy],
        token: Callable[[], str | None],
        engage: bool,
    ) -> None:
        super().__init__()
        self._control = control
        self._policy = policy
        self._token = token
        self._engage = engage

    def render_GET(self, request: Request) -> bytes:
        if not authorised(request, self._token()):
            return _error(request, 401, "M_UNAUTHORIZED", "admin token required")
        return _json(request, 200, self._control.state())

    def render_POST(self, request: Request) -> bytes | int:
        if not authorised(request, self._token()):
            return _error(request, 401, "M_UNAUTHORIZED", "admin token required")
        raw = request.content.read() if request.content is not None else b""
        change = _read_change(raw)
        if isinstance(change, str):
            return _error(request, 400, "M_BAD_JSON", change)
        server_name, direction, reason = change
        # A switch left engaged for a server since removed from the
        # configuration can still be lifted.
        known = server_name in self._policy().external_by_name or (
            not self._engage and any(s == server_name for s, _d in self._control.killswitch.engaged)
        )
        if server_name is not None and not known:
            return _error(request, 404, "M_NOT_FOUND", f"no external server {server_name}")
        who = str(getattr(request.getClientAddress(), "host", "-"))
        what = f"server={server_name or '(global)'} direction={direction}"
        if self._engage:
            done = self._control.engage(server_name, direction, reason, who)
        else:
            done = self._control.lift(server_name, direction, who)

        def answer(outcome: Outcome) -> None:
            cluster = outcome.body.get("cluster")
            done = f"{what} cluster={cluster}" if cluster else what
            if outcome.applied and self._engage:
                logger.warning("kill switch engaged by %s: %s reason=%r", who, done, reason)
            elif outcome.applied:
                logger.warning("kill switch lifted by %s: %s", who, done)
            if not request.finished and not getattr(request, "_disconnected", False):
                request.write(_json(request, outcome.status, outcome.body))
                request.finish()

        def failed(failure: Failure) -> None:
            logger.error("kill switch change failed: %s", failure.getTraceback())
            if not request.finished and not getattr(request, "_disconnected", False):
                request.write(_error(request, 500, "M_UNKNOWN", "internal error"))
                request.finish()

        done.addCallbacks(answer, failed)
        return server.NOT_DONE_YET


class StatusResource(resource.Resource):
    """A view for the admin token's holder: `GET /_sbg/status` (the body
    `sbg.status.build_status` makes) and `GET /_sbg/cluster` (the nodes of
    a cluster)."""

    isLeaf = True

    def __init__(
        self, status: Callable[[], dict[str, Any]], token: Callable[[], str | None]
    ) -> None:
        super().__init__()
        self._status = status
        self._token = token

    def render_GET(self, request: Request) -> bytes:
        if not authorised(request, self._token()):
            return _error(request, 401, "M_UNAUTHORIZED", "admin token required")
        return _json(request, 200, self._status())


class _AdminRequest(server.Request):
    """A request whose body is capped at `MAX_BODY` and never spooled to
    disk, and that must arrive whole within `IDLE_TIMEOUT`."""

    def __init__(self, channel: Any, queued: object = None) -> None:
        super().__init__(channel)
        call_later = getattr(channel, "callLater", None)
        self._read_timer: IDelayedCall | None = (
            call_later(IDLE_TIMEOUT, self._too_slow) if call_later is not None else None
        )

    def _too_slow(self) -> None:
        self._read_timer = None
        transport = self.channel.transport if self.channel is not None else None
        if transport is not None:
            transport.abortConnection()  # type: ignore[attr-defined]

    def _stop_timer(self) -> None:
        if self._read_timer is not None and self._read_timer.active():
            self._read_timer.cancel()
        self._read_timer = None

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self._stop_timer()
        super().requestReceived(command, path, version)

    def connectionLost(self, reason: Any) -> None:
        self._stop_timer()
        super().connectionLost(reason)

    def gotLength(self, length: int | None) -> None:
        self._too_large = length is not None and length > MAX_BODY
        self._size = 0
        # In memory, whatever the length (twisted.web spools large bodies to
        # a temporary file).
        self.content = io.BytesIO()
        if self._too_large:
            self.requestHeaders.removeHeader(b"expect")
            self._refuse()

    def handleContentChunk(self, data: bytes) -> None:
        self._size += len(data)
        if self._too_large:
            return
        if self._size > MAX_BODY:
            self._too_large = True
            self._refuse()
            return
        assert self.content is not None
        self.content.write(data)

    def _refuse(self) -> None:
        channel = self.channel
        if channel is None or channel.transport is None:
            return
        body = b'{"errcode": "M_TOO_LARGE", "error": "admin request body above 64 KiB"}'
        channel.transport.write(
            b"HTTP/1.1 413 Content Too Large\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
        )
        channel.transport.loseConnection()

    def process(self) -> None:
        if getattr(self, "_too_large", False):
            return
        super().process()


class AdminSite(server.Site):
    """The admin listener's site: no access log (changes are logged by the
    resources), connections idle for 60 s closed, and every request whole
    within 60 s."""

    requestFactory = _AdminRequest  # type: ignore[assignment]

    def __init__(self, root: resource.Resource, reactor: Any = None) -> None:
        super().__init__(root, timeout=IDLE_TIMEOUT, reactor=reactor)
        self.displayTracebacks = False
        self.noisy = False

    def log(self, request: Request) -> None:
        pass


def admin_site(
    control: SwitchControl,
    policy: Callable[[], Policy],
    token: Callable[[], str | None],
    metrics: Callable[[], bytes],
    health: Callable[[], tuple[int, dict[str, Any]]] | None = None,
    reactor: Any = None,
    cluster_status: Callable[[], dict[str, Any]] | None = None,
    status: Callable[[], dict[str, Any]] | None = None,
) -> AdminSite:
    """The admin listener's site; `status` adds `GET /_sbg/status`,
    `cluster_status` (a node of a cluster) `GET /_sbg/cluster`."""
    root = resource.Resource()
    root.putChild(b"health", _Health(health or (lambda: (200, {"status": "ok"}))))
    root.putChild(b"metrics", _Metrics(metrics))
    sbg = resource.Resource()
    sbg.putChild(b"kill", KillSwitchResource(control, policy, token, engage=True))
    sbg.putChild(b"unkill", KillSwitchResource(control, policy, token, engage=False))
    if cluster_status is not None:
        sbg.putChild(b"cluster", StatusResource(cluster_status, token))
    if status is not None:
        sbg.putChild(b"status", StatusResource(status, token))
    root.putChild(b"_sbg", sbg)
    return AdminSite(root, reactor)
