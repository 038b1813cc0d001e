"""The HTTP server side shared by the inbound listener and the intercepted
outbound tunnels.

A request is decided in two steps. As soon as its head is in
(`gotLength`), the handler decides everything the head can tell
(`RequestHandler.head`): a refusal there is answered at once, before a byte
of the body is kept, and the rest of the body is read and dropped (up to
`max_body_size`, within `header_timeout`) so the client sees the answer
instead of a reset. An accepted head says how much body may be held; the
body is then read into a `BodyBuffer`, within the process's body budget,
and the whole request goes to `RequestHandler.handle`.

twisted.web's `Resource` tree is not used: a border gateway has exactly one
thing to do with every request, and the handler does it.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any, Protocol

from twisted.internet.interfaces import IAddress
from twisted.web import http

from sbg import reasons
from sbg.hosts import parse_sni
from sbg.http.body import BodyBuffer
from sbg.http.budgets import BodyBudget
from sbg.reasons import Direction, Refusal
from sbg.tls.server import sni_of

logger = logging.getLogger(__name__)

# Control bytes (HTAB is legal in a field value) and DEL.
_BAD_HEADER_BYTES = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_REQUEST_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) ([\x21-\x7e\x80-\xff]+) (HTTP/1\.[01])")
_PHRASES = {
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    413: b"Content Too Large",
    429: b"Too Many Requests",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}
# Seconds a client is told to wait when the body budget is full.
RETRY_AFTER = 5
# After a refusal, the body still coming is read and dropped up to this
# many bytes (within `header_timeout`), so the client reads the answer
# rather than a reset; nothing of it is kept.
DISCARD_MAX = 64 * 1024 * 1024


class RequestHandler(Protocol):
    """What a listener's requests are handed to (`sbg.http.pipeline.Pipeline`)."""

    direction: Direction

    def head(self, request: BorderRequest) -> None:
        """Decide on the request head; refuse with `request.refuse_early`,
        or accept the body with `request.accept_body`."""

    def handle(self, request: BorderRequest) -> None:
        """The whole request is in and its head was accepted."""

    def refused(self, request: BorderRequest | None, peer: str, refusal: Refusal) -> None:
        """Audit and count a refusal answered outside `head` and `handle`."""

    def header_timeout(self) -> float: ...


class BorderRequest(http.Request):
    """A request whose head is decided before its body is read.

    Attributes:
        head_method, head_target: the request line's method and raw target,
            known from the head on (`method` and `uri` only once the body
            is in, as twisted.web sets them).
        declared_length: the Content-Length, None for a chunked body.
        body_chunked: whether the request body is chunked (`chunked` is
            twisted.web's own, for the response).
        bad_framing: a Transfer-Encoding other than one `chunked`.
        state: the handler's own, from `head` to `handle`.
        answered: a refusal was answered before the body was read.
        body: the body read so far (None when the head accepted none).
    """

    # Never add a Content-Type the upstream did not send.
    defaultContentType = None

    def __init__(self, channel: http.HTTPChannel, queued: object = None) -> None:
        super().__init__(channel)
        self.started = time.monotonic()
        self.bytes_in = 0
        self.bad_framing = False
        self.declared_length: int | None = None
        self.body_chunked = False
        self.state: Any = None
        self.answered = False
        self.body: BodyBuffer | None = None
        self._cap = 0
        self._discard_limit = DISCARD_MAX
        self._budget: BodyBudget | None = None
        self._reserved = 0
        self._early: tuple[int, bytes, bool] | None = None
        line: tuple[bytes, bytes, bytes] = getattr(channel, "request_line", (b"", b"", b""))
        self.head_method, self.head_target, self.head_version = line
        factory = channel.factory if channel is not None else None
        self.handler: RequestHandler | None = getattr(factory, "handler", None)
        # The whole request (head and body) must arrive within the header
        # timeout: the channel's idle timeout alone lets a client that sends
        # a byte now and then hold a connection forever.
        self._read_timer: Any = None
        call_later = getattr(channel, "callLater", None)
        if self.handler is not None and call_later is not None:
            self._read_timer = call_later(self.handler.header_timeout(), self._too_slow)

    # -- timers --------------------------------------------------------------

    def _too_slow(self) -> None:
        self._read_timer = None
        peer = self.peer_host()
        logger.info("request from %s not received in time: closing", peer)
        if self.handler is not None and not self.answered:
            self.handler.refused(
                self, peer, Refusal(reasons.HEADER_TIMEOUT, "request not received in time")
            )
        self.abort()

    def _cancel_read_timer(self) -> None:
        if self._read_timer is not None and self._read_timer.active():
            self._read_timer.cancel()
        self._read_timer = None

    def abort(self) -> None:
        transport = self.channel.transport if self.channel is not None else None
        if transport is not None:
            transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Any) -> None:
        self._cancel_read_timer()
        self.release_body()
        super().connectionLost(reason)

    # -- the head ------------------------------------------------------------

    def gotLength(self, length: int | None) -> None:
        self.declared_length = length
        # One framing, unambiguous: Transfer-Encoding, if present, is one
        # header line saying exactly "chunked" (RFC 9112 6.1); anything else
        # is refused with 400 and the connection closed.
        te = self.requestHeaders.getRawHeaders(b"transfer-encoding")
        if te is not None:
            if len(te) == 1 and te[0].strip().lower() == b"chunked":
                self.body_chunked = True
            else:
                self.bad_framing = True
        if self.handler is not None:
            self.handler.head(self)
        if self.answered:
            # Twisted would invite the body with `100 Continue` right after
            # this: never invite a body that is refused already.
            self.requestHeaders.removeHeader(b"expect")

    def has_body(self) -> bool:
        """Whether the head announces a body (a length above 0, or chunked)."""
        return self.body_chunked or (self.declared_length or 0) > 0

    def accept_body(self, cap: int, budget: BodyBudget, prefix: bytes = b"") -> bool:
        """Read the body (at most `cap` bytes) into `self.body`, after `prefix`.

        The declared length is reserved from `budget` now, a chunked body's
        bytes as they come. False, with nothing reserved, when the budget
        cannot hold the declared length.
        """
        self._cap = cap
        self._budget = budget
        if self.declared_length:
            if not budget.reserve(self.declared_length):
                return False
            self._reserved = self.declared_length
        self.body = BodyBuffer(prefix)
        return True

    def release_body(self) -> None:
        """Give the body's memory and its budget back (idempotent)."""
        if self._budget is not None and self._reserved:
            self._budget.release(self._reserved)
        self._reserved = 0
        if self.body is not None:
            self.body.clear()

    def refuse_early(self, status: int, errcode: str, text: str, retry_after: bool = False) -> int:
        """Refuse before the body: answer now, and never keep a body byte.

        A request without a body is answered as usual once Twisted hands it
        over (right after its head), on a connection kept alive. One with a
        body is answered now; the body still coming is read and dropped (up
        to the body cap, so the client reads this answer instead of a
        reset) and the connection then closed; beyond the cap, or after
        `header_timeout`, it is cut. Returns the bytes of the answer's body.
        """
        self.answered = True
        self.release_body()
        self.body = None
        data = json.dumps({"errcode": errcode, "error": text}).encode()
        if not self.has_body() and not self.bad_framing:
            self._early = (status, data, retry_after)
            return len(data)
        self._discard_limit = DISCARD_MAX
        channel = self.channel
        if channel is None or channel.transport is None:
            return 0
        channel.persistent = False
        head = [
            b"HTTP/1.1 %d %s" % (status, _PHRASES.get(status, b"Error")),
            b"Content-Type: application/json",
            b"Content-Length: %d" % len(data),
            b"Connection: close",
        ]
        if retry_after:
            head.append(b"Retry-After: %d" % RETRY_AFTER)
        channel.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + data)
        if self.bad_framing:
            # Where this body ends is not known: nothing after it is read.
            self._cancel_read_timer()
            channel.loseConnection()
        # Otherwise the connection ends in `process`, once the body is read.
        return len(data)

    # -- the body ------------------------------------------------------------

    def handleContentChunk(self, data: bytes) -> None:
        n = len(data)
        self.bytes_in += n
        if self.answered:
            if self.bytes_in > self._discard_limit:
                self._cancel_read_timer()
                self.abort()
            return
        body = self.body
        if body is None:
            self._refuse_body(Refusal(reasons.UNEXPECTED_BODY, "this request takes no body"))
            return
        if len(body) + n > self._cap:
            self._refuse_body(Refusal(reasons.BODY_TOO_LARGE, "request body too large"))
            return
        if self.declared_length is None and self._budget is not None:
            if not self._budget.reserve(n):
                self._refuse_body(
                    Refusal(reasons.BUFFER_FULL, "too many request bodies held: retry later")
                )
                return
            self._reserved += n
        body.append(data)

    def _refuse_body(self, refusal: Refusal) -> None:
        if self.handler is not None:
            self.handler.refused(self, self.peer_host(), refusal)
            direction = self.handler.direction
        else:
            direction = "inbound"
        status, errcode = refusal.answer(direction)
        self.refuse_early(status, errcode, refusal.reason, refusal.kind is reasons.BUFFER_FULL)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        # twisted.web's own would parse form bodies and the query string:
        # nothing of that is needed, and nothing is parsed before a decision.
        self._cancel_read_timer()
        self.method, self.uri = command, path
        self.clientproto = version
        self.path = path.split(b"?", 1)[0]
        self.args = {}
        self.process()

    def process(self) -> None:
        if self._early is not None:
            # Refused from a head without a body: an ordinary answer.
            status, data, retry_after = self._early
            self.setResponseCode(status)
            self.responseHeaders.setRawHeaders(b"Content-Type", [b"application/json"])
            self.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % len(data)])
            if retry_after:
                self.responseHeaders.setRawHeaders(b"Retry-After", [b"%d" % RETRY_AFTER])
            if self.channel is not None and not self.channel.persistent:
                self.responseHeaders.setRawHeaders(b"Connection", [b"close"])
            if self.method != b"HEAD":
                self.write(data)
            self.finish()
            return
        if self.answered:
            # Refused before the body, which is now read: close cleanly.
            if self.channel is not None:
                self.channel.loseConnection()
            return
        if self.handler is None:
            self.setResponseCode(500)
            self.finish()
            return
        self.handler.handle(self)

    # -- facts ---------------------------------------------------------------

    def body_bytes(self) -> bytes:
        return self.body.bytes() if self.body is not None else b""

    def sni(self) -> str | None:
        """The normalised TLS server name the client sent, None without TLS/SNI."""
        transport = self.channel.transport if self.channel is not None else None
        name = sni_of(transport) if transport is not None else None
        return parse_sni(name.encode("ascii", "replace")) if name else None

    def peer_host(self) -> str:
        peer: IAddress = self.getClientAddress()
        host = getattr(peer, "host", None)
        return str(host) if host is not None else "-"

    def elapsed_ms(self) -> float:
        return (time.monotonic() - self.started) * 1000.0


def send_json(request: http.Request, status: int, body: object) -> int:
    """Answer `request` with a JSON body; returns the bytes written."""
    data = json.dumps(body).encode()
    if request.finished or request._disconnected:
        return 0
    if request.startedWriting:
        # Too late for a status: cut the connection so the client sees a
        # truncated response rather than a silently wrong one.
        transport = request.channel.transport if request.channel is not None else None
        if transport is not None:
            transport.abortConnection()  # type: ignore[attr-defined]
        return 0
    request.setResponseCode(status)
    if request.channel is not None and not request.channel.persistent:
        request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
    request.responseHeaders.setRawHeaders(b"Content-Type", [b"application/json"])
    request.responseHeaders.setRawHeaders(b"Content-Length", [str(len(data)).encode()])
    if request.method != b"HEAD":
        request.write(data)
    request.finish()
    return len(data)


class BorderHTTPChannel(http.HTTPChannel):
    """HTTP/1.1 only (never h2), with refusals that really end the connection.

    Twisted answers some malformed requests by closing the transport
    directly; over TLS that waits for the channel, still registered as the
    transport's producer, so the client hung until the idle timeout. These
    go through the channel's own `loseConnection`, which unregisters first,
    and are audited and counted like every other refusal.
    """

    requestFactory = BorderRequest  # type: ignore[assignment]

    def connectionMade(self) -> None:
        self.request_line = (b"", b"", b"")
        super().connectionMade()

    def lineLengthExceeded(self, line: bytes) -> None:
        self._respondToBadRequestAndDisconnect()

    def lineReceived(self, line: bytes) -> None:
        # The request line, strictly `METHOD SP target SP HTTP/x.y` (older
        # Twisted accepts any whitespace between the parts).
        first = getattr(self, "_HTTPChannel__first_line", 0)
        if first and line:
            m = _REQUEST_LINE.fullmatch(line)
            if m is None:
                self._respondToBadRequestAndDisconnect()
                return
            self.request_line = (m.group(1), m.group(2), m.group(3))
        super().lineReceived(line)

    def headerReceived(self, line: bytes) -> bool:
        # A CR, LF, NUL or other control byte inside a header line is refused
        # here, on the raw line: older Twisted turns a bare CR or LF into a
        # space when it stores the value, and a request sbg relays must be
        # the one it received.
        if _BAD_HEADER_BYTES.search(line):
            self._respondToBadRequestAndDisconnect()
            return False
        return bool(super().headerReceived(line))

    def _respondToBadRequestAndDisconnect(self) -> None:
        handler: RequestHandler | None = getattr(self.factory, "handler", None)
        if handler is not None and self.transport is not None:
            peer = str(getattr(self.transport.getPeer(), "host", "-"))
            request = self.requests[-1] if self.requests else None
            current = request if isinstance(request, BorderRequest) else None
            if current is None or not current.answered:
                handler.refused(
                    current,
                    peer,
                    Refusal(reasons.MALFORMED_REQUEST, "malformed HTTP request head"),
                )
        if self.transport is not None:
            self.transport.write(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
        self.loseConnection()


class BorderHTTPFactory(http.HTTPFactory):
    """Builds HTTP/1.1 channels whose requests go to `handler`."""

    noisy = False

    def __init__(self, handler: RequestHandler, reactor: Any, idle_timeout: float) -> None:
        super().__init__(timeout=idle_timeout, reactor=reactor)
        self.handler = handler

    protocol = BorderHTTPChannel  # type: ignore[assignment]

    def log(self, request: http.Request) -> None:
        # The audit log is the access log.
        pass
