"""A lean HTTP/1.1 client for forwarding: raw framing on kept-alive connections.

`UpstreamPool.request` writes a request head the caller built (bytes, sent
as they are) and its body, and fires with an `UpstreamResponse` once the
response head is parsed. The caller then hands the body to a `BodySink`
(`deliver`), which receives it piece by piece as it arrives: nothing is
buffered whole, and the response is the push producer a slow consumer
pauses (it pauses reading from the upstream connection).

The response is parsed strictly; anything a reader could take two ways
(folded or control-laden header lines, duplicate or malformed framing, a
header block too large) fails the request with `UpstreamProtocolError`.
One request at a time per connection (no pipelining). A connection whose
response ended cleanly with reusable framing goes back to its pool; a
request that meets a reused connection closed by the server before any
byte of the answer is retried once on a fresh one when its method is
idempotent.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, error
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory
from twisted.internet.protocol import Protocol as _Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from sbg.http.upstream_wire import (
    CHUNKED,
    LENGTH,
    MAX_HEAD,
    MAX_INTERIM,
    NONE,
    UNTIL_CLOSE,
    BodySink,
    ChunkedDecoder,
    UpstreamClosed,
    UpstreamProtocolError,
    framing,
    parse_head,
)

if TYPE_CHECKING:
    from sbg.http.upstream_pool import UpstreamPool

logger = logging.getLogger(__name__)

WRITE_JOIN = 64 * 1024  # bodies up to this go out in one write with the head
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS"})

# Connection states.
_IDLE = 0  # in the pool (or not yet used)
_HEAD = 1  # request written, reading the response head
_BODY = 2  # reading the response body
_CLOSED = 3

_CONNECTION_DONE = Failure(error.ConnectionDone())

# Reasons the transport is paused (bits).
_PAUSED_BY_CONSUMER = 1
_PAUSED_NO_SINK = 2


@implementer(IPushProducer)
class UpstreamResponse:
    """A response head; the body follows through `deliver`.

    Also the push producer of the body: pausing it pauses reading from the
    upstream, stopping it aborts the connection (the sink then gets
    `end(False)`).
    """

    def __init__(
        self,
        conn: UpstreamConnection,
        version: int,
        code: int,
        phrase: bytes,
        headers: list[tuple[bytes, bytes]],
        length: int | None,
    ) -> None:
        self._conn: UpstreamConnection | None = conn
        self.version = version  # minor version: 0 or 1
        self.code = code
        self.phrase = phrase
        self.headers = headers  # raw (name, value) pairs, in order
        # The body length the framing announces (0 for no body); None
        # when chunked or delimited by the connection's close.
        self.length = length
        self._outcome: bool | None = None  # set when the body ended before deliver

    def deliver(self, sink: BodySink) -> None:
        """Start sending the body into `sink` (exactly once)."""
        conn = self._conn
        if conn is None:
            sink.end(bool(self._outcome))
            return
        conn._deliver(self, sink)

    def discard(self) -> None:
        """The body is not wanted: close the connection."""
        self.stopProducing()

    def pauseProducing(self) -> None:
        if self._conn is not None:
            self._conn._pause(_PAUSED_BY_CONSUMER)

    def resumeProducing(self) -> None:
        if self._conn is not None:
            self._conn._unpause(_PAUSED_BY_CONSUMER)

    def stopProducing(self) -> None:
        if self._conn is not None:
            self._conn._abort()

    def _ended(self, complete: bool) -> None:
        self._conn = None
        self._outcome = complete


class _Exchange:
    """One request, from `UpstreamPool.request` to its response head."""

    __slots__ = (
        "body",
        "conn",
        "connecting",
        "done",
        "head",
        "method",
        "pool",
        "result",
        "retried",
    )

    def __init__(self, pool: UpstreamPool, method: bytes, head: bytes, body: bytes | None) -> None:
        self.pool = pool
        self.method = method
        self.head: bytes | None = head
        self.body: bytes | None = body
        self.result: defer.Deferred[UpstreamResponse] = defer.Deferred(self._cancel)
        self.connecting: defer.Deferred[Any] | None = None
        self.conn: UpstreamConnection | None = None
        self.done = False
        self.retried = False

    def _cancel(self, _: defer.Deferred[UpstreamResponse]) -> None:
        # Deferred then fails itself with CancelledError.
        self.done = True
        connecting, self.connecting = self.connecting, None
        if connecting is not None:
            connecting.cancel()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn._abandon()

    def got_response(self, response: UpstreamResponse) -> None:
        self.conn = None
        self.done = True
        self.head = self.body = None
        self.result.callback(response)

    def failed(self, failure: Failure, stale: bool) -> None:
        """The connection ended or failed before a response head."""
        self.conn = None
        if self.done:
            return
        if stale and not self.retried and self.method in IDEMPOTENT:
            # The server closed a kept-alive connection as we reused it.
            self.retried = True
            self.pool._connect(self)
            return
        self.done = True
        self.result.errback(failure)


class UpstreamConnection(_Protocol):
    """One HTTP/1.1 connection to the upstream; one request at a time."""

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self._state = _IDLE
        self._buf = b""  # body bytes held for the sink or the chunk decoder
        self._head_buf = bytearray()  # a response head arriving in pieces
        self._exchange: _Exchange | None = None
        self._head_only = False
        self._reused = False
        self._got_bytes = False
        self._interim = 0
        self._response: UpstreamResponse | None = None
        self._sink: BodySink | None = None
        self._mode = NONE
        self._remaining = 0  # LENGTH: body bytes left
        self._chunks = ChunkedDecoder()
        self._keep_alive = False
        self._paused = 0
        self._aborted = False
        self._lost = False
        self._in_head_callback = False
        self._close_waiters: list[defer.Deferred[None]] = []
        self.released_at = 0.0

    # -- sending -------------------------------------------------------------

    def send(self, exchange: _Exchange, reused: bool) -> None:
        exchange.conn = self
        self._exchange = exchange
        self._reused = reused
        self._got_bytes = False
        self._interim = 0
        self._head_only = exchange.method == b"HEAD"
        self._state = _HEAD
        transport: Any = self.transport
        head, body = exchange.head or b"", exchange.body
        if not body:
            transport.write(head)
        elif len(body) <= WRITE_JOIN:
            transport.write(head + body)
        else:
            transport.write(head)
            transport.write(body)

    def close(self) -> defer.Deferred[None]:
        """Close an idle connection; fires once it is closed."""
        self._state = _CLOSED
        if self._lost:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._close_waiters.append(d)
        self._abort()
        return d

    def _abandon(self) -> None:
        """The request was cancelled while waiting for its head."""
        self._exchange = None
        self._state = _CLOSED
        self._abort()

    def _abort(self) -> None:
        """Cut the connection; a sink waiting for the body hears end(False)
        from connectionLost."""
        if self._aborted or self._lost:
            return
        self._aborted = True
        self.transport.abortConnection()  # type: ignore[union-attr]

    # -- receiving -----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._aborted:
            return
        state = self._state
        if state == _BODY:
            if self._sink is None:
                self._buf += data
            else:
                self._body_data(data)
        elif state == _HEAD:
            self._got_bytes = True
            head = self._head_buf
            if not head:
                self._head_data(data)
                return
            # A head arriving in pieces: append, and look for its end only
            # where it can be, so a trickling upstream costs linear time.
            start = max(len(head) - 3, 0)
            head += data
            if head.find(b"\r\n\r\n", start) < 0:
                if len(head) > MAX_HEAD + 4:
                    self._fail_head("response head too large")
                return
            data = bytes(head)
            head.clear()
            self._head_data(data)
        elif state == _IDLE:
            # Nothing was asked: whatever this is, the connection is unusable.
            logger.debug("unsolicited bytes on an idle upstream connection: closing")
            self._state = _CLOSED
            self._pool._forget(self)
            self._abort()

    def _fail_head(self, text: str) -> None:
        self._state = _CLOSED
        self._head_buf.clear()
        exchange, self._exchange = self._exchange, None
        self._abort()
        if exchange is not None:
            exchange.failed(Failure(UpstreamProtocolError(text)), stale=False)

    def _head_data(self, buf: bytes) -> None:
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD + 4:
                    self._fail_head("response head too large")
                else:
                    self._head_buf += buf
                return
            if end > MAX_HEAD:
                self._fail_head("response head too large")
                return
            try:
                minor, code, phrase, fields = parse_head(buf[:end])
            except UpstreamProtocolError as e:
                self._fail_head(str(e))
                return
            buf = buf[end + 4 :]
            if code >= 200:
                break
            if code == 101 or self._interim >= MAX_INTERIM:
                self._fail_head("unexpected interim response")
                return
            self._interim += 1
        try:
            mode, length, keep_alive = framing(self._head_only, minor, code, fields)
        except UpstreamProtocolError as e:
            self._fail_head(str(e))
            return
        exchange, self._exchange = self._exchange, None
        if exchange is None:  # cannot happen: a cancel closes the connection
            self._abandon()
            return
        response = UpstreamResponse(self, minor, code, phrase, fields, length)
        self._response = response
        self._mode = mode
        self._remaining = length or 0
        self._chunks = ChunkedDecoder()
        self._keep_alive = keep_alive
        self._state = _BODY
        # The caller usually calls `deliver` from inside this callback; the
        # rest of `buf` is then handled below, in order.
        self._in_head_callback = True
        try:
            exchange.got_response(response)
        finally:
            self._in_head_callback = False
        if self._response is not response or self._aborted:
            return
        if self._sink is None:
            self._buf = buf
            self._pause(_PAUSED_NO_SINK)
        elif buf or mode == NONE:
            self._body_data(buf)

    def _body_data(self, data: bytes) -> None:
        """Body bytes (or b"" to complete a body-less response)."""
        mode = self._mode
        if mode == LENGTH:
            remaining = self._remaining
            n = len(data)
            if n < remaining:
                self._remaining = remaining - n
                self._sink.data(data)  # type: ignore[union-attr]
                return
            self._remaining = 0
            extra = b""
            if n != remaining:
                data, extra = data[:remaining], data[remaining:]
            self._sink.data(data)  # type: ignore[union-attr]
            if self._state == _BODY and not self._aborted:
                self._complete(extra)
        elif mode == CHUNKED:
            self._chunked_data(data)
        elif mode == UNTIL_CLOSE:
            if data:
                self._sink.data(data)  # type: ignore[union-attr]
        else:
            self._complete(data)

    def _chunked_data(self, data: bytes) -> None:
        try:
            extra = self._chunks.feed(data, self._emit)
        except UpstreamProtocolError as e:
            self._body_error(str(e))
            return
        if extra is not None and self._state == _BODY and not self._aborted:
            self._complete(extra)

    def _emit(self, piece: bytes) -> bool:
        """A piece of chunk data for the sink; False once nobody wants more."""
        self._sink.data(piece)  # type: ignore[union-attr]
        return not self._aborted and self._state == _BODY

    def _body_error(self, text: str) -> None:
        logger.info("upstream response body malformed (%s): cut", text)
        self._abort()

    def _complete(self, extra: bytes) -> None:
        """The body ended as framed; back to the pool if the connection allows."""
        response, sink = self._response, self._sink
        self._response = None
        self._sink = None
        self._buf = b""
        if response is not None:
            response._ended(True)
        if self._keep_alive and not extra and not self._lost:
            self._state = _IDLE
            self._unpause(_PAUSED_BY_CONSUMER | _PAUSED_NO_SINK)
            self._pool._release(self)
        else:
            self._state = _CLOSED
            self._abort()
        if sink is not None:
            sink.end(True)

    def _deliver(self, response: UpstreamResponse, sink: BodySink) -> None:
        if response is not self._response or self._sink is not None:
            raise RuntimeError("a response body can be delivered once")
        self._sink = sink
        if self._in_head_callback:
            return  # _head_data goes on with the bytes it holds
        buf, self._buf = self._buf, b""
        self._unpause(_PAUSED_NO_SINK)
        if buf or self._mode == NONE:
            self._body_data(buf)
        if self._lost and self._response is response:
            self._end_lost()

    # -- flow control --------------------------------------------------------

    def _pause(self, why: int) -> None:
        if not self._paused and not self._lost:
            self.transport.pauseProducing()  # type: ignore[union-attr]
        self._paused |= why

    def _unpause(self, why: int) -> None:
        was = self._paused
        self._paused = was & ~why
        if was and not self._paused and not self._lost:
            self.transport.resumeProducing()  # type: ignore[union-attr]

    # -- the end -------------------------------------------------------------

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        self._lost = True
        state = self._state
        if state == _IDLE:
            self._state = _CLOSED
            self._pool._forget(self)
        elif state == _HEAD:
            self._state = _CLOSED
            exchange, self._exchange = self._exchange, None
            if exchange is not None:
                if self._got_bytes:
                    failure = Failure(UpstreamProtocolError("upstream closed mid-head"))
                else:
                    failure = Failure(UpstreamClosed(reason))
                exchange.failed(failure, stale=self._reused and not self._got_bytes)
        elif state == _BODY and self._sink is not None:
            self._end_lost()
        # _BODY without a sink: `deliver` ends it.
        waiters, self._close_waiters = self._close_waiters, []
        for d in waiters:
            d.callback(None)

    def _end_lost(self) -> None:
        """The connection ended inside a body: complete only if the body
        was delimited by the close."""
        response, sink = self._response, self._sink
        self._response = None
        self._sink = None
        self._state = _CLOSED
        complete = self._mode == UNTIL_CLOSE and not self._aborted
        if response is not None:
            response._ended(complete)
        if sink is not None:
            sink.end(complete)


class _ConnectionFactory(Factory):
    """Builds the connections of one `UpstreamPool`."""

    noisy = False

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        return UpstreamConnection(self._pool)
