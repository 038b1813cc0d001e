"""The HTTP server side shared by the inbound listener and the intercepted
outbound tunnels: a `Request` that caps its body while reading it and hands
itself to a handler, and the factory that builds channels for it.

twisted.web's `Resource` tree is not used: a border gateway has exactly one
thing to do with every request, and the handler does it.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
from typing import Any, Protocol

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.web import http

from sbg.errors import SbgError
from sbg.hosts import parse_sni
from sbg.tls.server import sni_of

logger = logging.getLogger(__name__)

# Control bytes (HTAB is legal in a field value) and DEL.
_BAD_HEADER_BYTES = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_REQUEST_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ [\x21-\x7e\x80-\xff]+ HTTP/1\.[01]")


class RequestHandler(Protocol):
    def handle(self, request: BorderRequest) -> None: ...

    def max_body_size(self) -> int: ...

    def header_timeout(self) -> float: ...


class BorderRequest(http.Request):
    """A request whose body is read into memory up to a cap, never beyond.

    Bodies beyond `max_body_size` are counted and dropped as they arrive;
    `too_large` tells the handler, which answers 413 at its place in the
    decision order. Nothing but JSON request bodies travels here (media goes
    the other way, in responses), so memory stays bounded by the cap.
    """

    # Never add a Content-Type the upstream did not send.
    defaultContentType = None

    def __init__(self, channel: http.HTTPChannel, queued: object = None) -> None:
        super().__init__(channel)
        self.started = time.monotonic()
        self.too_large = False
        self.bad_framing = False
        self.bytes_in = 0
        self._cap = 0
        factory = channel.factory if channel is not None else None
        self.handler: RequestHandler | None = getattr(factory, "handler", None)
        # The whole request (head and body) must arrive within the header
        # timeout: the channel's idle timeout alone lets a client that sends
        # a byte now and then hold a connection forever.
        self._read_timer: Any = None
        call_later = getattr(channel, "callLater", None)
        if self.handler is not None and call_later is not None:
            self._read_timer = call_later(self.handler.header_timeout(), self._too_slow)

    def _too_slow(self) -> None:
        self._read_timer = None
        logger.info("request from %s not received in time: closing", self.peer_host())
        transport = self.channel.transport if self.channel is not None else None
        if transport is not None:
            transport.abortConnection()  # type: ignore[attr-defined]

    def _cancel_read_timer(self) -> None:
        if self._read_timer is not None and self._read_timer.active():
            self._read_timer.cancel()
        self._read_timer = None

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self._cancel_read_timer()
        super().requestReceived(command, path, version)

    def connectionLost(self, reason: Any) -> None:
        self._cancel_read_timer()
        super().connectionLost(reason)

    def gotLength(self, length: int | None) -> None:
        handler = self.handler
        self._cap = handler.max_body_size() if handler is not None else 0
        self.content = io.BytesIO()
        if length is not None and length > self._cap:
            self.too_large = True
            # Never invite a body that will be refused: Twisted sends
            # `100 Continue` right after this when the client asked. (The
            # client sends its body after its own wait, and gets the 413;
            # answering before the body and closing would make the kernel
            # reset the connection under the client's unread answer.)
            self.requestHeaders.removeHeader(b"expect")
        # One framing, unambiguous: Transfer-Encoding, if present, is one
        # header line saying exactly "chunked" (RFC 9112 6.1); anything else
        # is refused with 400 and the connection closed.
        te = self.requestHeaders.getRawHeaders(b"transfer-encoding")
        if te is not None and (len(te) != 1 or te[0].strip().lower() != b"chunked"):
            self.bad_framing = True

    def handleContentChunk(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if self.too_large:
            return
        if self.bytes_in > self._cap:
            self.too_large = True
            self.content = io.BytesIO()
            return
        assert self.content is not None
        self.content.write(data)

    def body(self) -> bytes:
        content = self.content
        return content.getvalue() if isinstance(content, io.BytesIO) else b""

    def process(self) -> None:
        if self.bad_framing:
            if self.channel is not None:
                self.channel.persistent = False
            send_error(
                self,
                SbgError(400, "M_UNRECOGNIZED", "ambiguous message framing", "malformed_request"),
            )
            return
        if self.handler is None:
            self.setResponseCode(500)
            self.finish()
            return
        self.handler.handle(self)

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


def send_error(request: http.Request, err: SbgError, extra: dict[str, Any] | None = None) -> int:
    """Answer with the Matrix error `err`; returns the bytes written."""
    body: dict[str, Any] = {"errcode": err.errcode, "error": err.reason}
    if extra:
        body.update(extra)
    return send_json(request, err.status, body)


def send_json(request: http.Request, status: int, body: object) -> int:
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
    go through the channel's own `loseConnection`, which unregisters first.
    """

    requestFactory = BorderRequest  # type: ignore[assignment]

    def lineLengthExceeded(self, line: bytes) -> None:
        self._respondToBadRequestAndDisconnect()

    def lineReceived(self, line: bytes) -> None:
        # The request line, strictly `METHOD SP target SP HTTP/x.y` (older
        # Twisted accepts any whitespace between the parts).
        first = getattr(self, "_HTTPChannel__first_line", 0)
        if first and line and not _REQUEST_LINE.fullmatch(line):
            self._respondToBadRequestAndDisconnect()
            return
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
        if self.transport is not None:
            self.transport.write(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
        self.loseConnection()


class BorderHTTPFactory(http.HTTPFactory):
    """Builds HTTP/1.1 channels whose requests go to `handler`."""

    noisy = False

    def __init__(
        self,
        handler: RequestHandler,
        reactor: IReactorTime,
        idle_timeout: float,
    ) -> None:
        super().__init__(timeout=idle_timeout, reactor=reactor)
        self.handler = handler

    protocol = BorderHTTPChannel  # type: ignore[assignment]

    def log(self, request: http.Request) -> None:
        # The audit log is the access log.
        pass
