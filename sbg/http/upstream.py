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
import re
from collections.abc import Hashable
from typing import Any, Protocol

from twisted.internet import defer, error
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.interfaces import IStreamClientEndpoint as _Endpoint
from twisted.internet.protocol import Factory
from twisted.internet.protocol import Protocol as _Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

logger = logging.getLogger(__name__)

MAX_HEAD = 64 * 1024  # bytes of one response head (status line and fields)
MAX_HEADER_LINES = 100
MAX_INTERIM = 8  # 1xx responses skipped before the final one
MAX_CHUNK_LINE = 4096  # a chunk-size line, extensions included
MAX_TRAILERS = 64 * 1024
IDLE_TIMEOUT = 20.0  # below Synapse's 60 s: never write to a connection it closed
WRITE_JOIN = 64 * 1024  # bodies up to this go out in one write with the head
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS"})

_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-5][0-9][0-9])(?: ([\t\x20-\x7e\x80-\xff]*))?")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Control bytes other than HTAB, CR and LF (those are checked apart), and DEL.
_CTL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[\t\x20-\x7e\x80-\xff]*)?")

# Connection states.
_IDLE = 0  # in the pool (or not yet used)
_HEAD = 1  # request written, reading the response head
_BODY = 2  # reading the response body
_CLOSED = 3

# Body framings.
_NONE = 0  # no body (HEAD, 204, 304, Content-Length: 0)
_LENGTH = 1
_CHUNKED = 2
_UNTIL_CLOSE = 3

# Chunked decoder states.
_C_SIZE = 0
_C_DATA = 1
_C_DATA_END = 2
_C_TRAILER = 3

_CONNECTION_DONE = Failure(error.ConnectionDone())

# Reasons the transport is paused (bits).
_PAUSED_BY_CONSUMER = 1
_PAUSED_NO_SINK = 2


class UpstreamProtocolError(Exception):
    """The upstream's answer is not a response sbg may relay."""


class UpstreamClosed(Exception):
    """The connection ended before a complete response head arrived."""

    def __init__(self, reason: Failure) -> None:
        super().__init__(f"upstream closed the connection: {reason.getErrorMessage()}")
        self.reason = reason


class BodySink(Protocol):
    """Receives a response body as it arrives."""

    def data(self, data: bytes) -> None:
        """A piece of the body (never empty)."""

    def end(self, complete: bool) -> None:
        """The body ended; `complete` is False when it was cut short."""


def parse_head(head: bytes) -> tuple[int, int, bytes, list[tuple[bytes, bytes]]]:
    """Parse a response head (without its final CRLF CRLF) strictly.

    Returns (minor version, status, reason phrase, [(name, value)]).

    Raises:
        UpstreamProtocolError: anything but a clean HTTP/1.x response head.
    """
    # A bare CR or LF, a NUL or another control byte anywhere is refused
    # before splitting, so no line can smuggle one.
    if _CTL.search(head) is not None:
        raise UpstreamProtocolError("control byte in the response head")
    lines = head.split(b"\r\n")
    if head.count(b"\r") != len(lines) - 1 or head.count(b"\n") != len(lines) - 1:
        raise UpstreamProtocolError("bare CR or LF in the response head")
    if len(lines) - 1 > MAX_HEADER_LINES:
        raise UpstreamProtocolError("too many header lines")
    m = _STATUS_LINE.fullmatch(lines[0])
    if m is None:
        raise UpstreamProtocolError("malformed status line")
    fields: list[tuple[bytes, bytes]] = []
    token = _TOKEN.fullmatch
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or token(name) is None:
            # Also obs-fold and leading whitespace: the name is no token.
            raise UpstreamProtocolError("malformed header line")
        fields.append((name, value.strip(b" \t")))
    return int(m.group(1)), int(m.group(2)), m.group(3) or b"", fields


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
        self._mode = _NONE
        self._remaining = 0  # _LENGTH: body bytes left; _CHUNKED: of this chunk
        self._chunk_state = _C_SIZE
        self._trailer_bytes = 0
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
            mode, length, keep_alive = self._framing(minor, code, fields)
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
        self._chunk_state = _C_SIZE
        self._trailer_bytes = 0
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
        elif buf or mode == _NONE:
            self._body_data(buf)

    def _framing(
        self, minor: int, code: int, fields: list[tuple[bytes, bytes]]
    ) -> tuple[int, int | None, bool]:
        """(body framing, announced length, reusable) from the head."""
        lengths: set[bytes] = set()
        te: list[bytes] = []
        close = minor == 0
        for name, value in fields:
            n = len(name)
            if n == 14 and name.lower() == b"content-length":
                lengths.add(value)
            elif n == 17 and name.lower() == b"transfer-encoding":
                te.append(value)
            elif (
                n == 10
                and name.lower() == b"connection"
                and any(t.strip().lower() == b"close" for t in value.split(b","))
            ):
                close = True
        length: int | None = None
        if lengths:
            if len(lengths) > 1:
                raise UpstreamProtocolError("conflicting Content-Length headers")
            (text,) = lengths
            if not text.isdigit() or len(text) > 18:
                raise UpstreamProtocolError("invalid Content-Length")
            length = int(text)
        chunked = False
        if te:
            if length is not None:
                raise UpstreamProtocolError("both Transfer-Encoding and Content-Length")
            if len(te) != 1 or te[0].lower() != b"chunked":
                raise UpstreamProtocolError("unsupported Transfer-Encoding")
            chunked = True
        if self._head_only or code in (204, 304):
            return _NONE, 0, not close
        if chunked:
            return _CHUNKED, None, not close
        if length is None:
            return _UNTIL_CLOSE, None, False
        return (_LENGTH if length else _NONE), length, not close

    def _body_data(self, data: bytes) -> None:
        """Body bytes (or b"" to complete a body-less response)."""
        mode = self._mode
        if mode == _LENGTH:
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
        elif mode == _CHUNKED:
            self._chunked_data(data)
        elif mode == _UNTIL_CLOSE:
            if data:
                self._sink.data(data)  # type: ignore[union-attr]
        else:
            self._complete(data)

    def _chunked_data(self, data: bytes) -> None:
        if self._buf:
            data = self._buf + data
            self._buf = b""
        pos = 0
        size = len(data)
        while pos < size:
            if self._aborted or self._state != _BODY:
                return
            cstate = self._chunk_state
            if cstate == _C_DATA:
                take = min(self._remaining, size - pos)
                piece = data if take == size else data[pos : pos + take]
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._chunk_state = _C_DATA_END
                self._sink.data(piece)  # type: ignore[union-attr]
                continue
            if cstate == _C_DATA_END:
                if size - pos < 2:
                    self._buf = data[pos:]
                    return
                if data[pos : pos + 2] != b"\r\n":
                    self._body_error("chunk data not followed by CRLF")
                    return
                pos += 2
                self._chunk_state = _C_SIZE
                continue
            eol = data.find(b"\r\n", pos)
            if eol < 0:
                rest = data[pos:]
                if len(rest) > MAX_CHUNK_LINE:
                    self._body_error("chunk size line too long")
                else:
                    self._buf = rest
                return
            line = data[pos:eol]
            pos = eol + 2
            if cstate == _C_SIZE:
                m = _CHUNK_SIZE.fullmatch(line) if len(line) <= MAX_CHUNK_LINE else None
                if m is None:
                    self._body_error("malformed chunk size line")
                    return
                chunk = int(m.group(1), 16)
                if chunk:
                    self._remaining = chunk
                    self._chunk_state = _C_DATA
                else:
                    self._chunk_state = _C_TRAILER
                continue
            # The trailer section: read, checked, dropped; an empty line ends it.
            self._trailer_bytes += len(line) + 2
            if self._trailer_bytes > MAX_TRAILERS:
                self._body_error("trailer section too large")
                return
            if not line:
                self._complete(data[pos:])
                return
            name, colon, _value = line.partition(b":")
            if (
                not colon
                or _TOKEN.fullmatch(name) is None
                or _CTL.search(line) is not None
                or b"\r" in line
                or b"\n" in line
            ):
                self._body_error("malformed trailer field")
                return

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
        if buf or self._mode == _NONE:
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
        complete = self._mode == _UNTIL_CLOSE and not self._aborted
        if response is not None:
            response._ended(complete)
        if sink is not None:
            sink.end(complete)


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        return UpstreamConnection(self._pool)


class UpstreamPool:
    """Kept-alive connections to one upstream (one endpoint).

    Args:
        clock: the reactor's time functions.
        endpoint: connects to the upstream (TCP, TLS, through a proxy...).
        max_idle: at most this many idle connections are kept (LIFO reuse).
        idle_timeout: an idle connection is closed after this many seconds.
    """

    def __init__(
        self,
        clock: IReactorTime,
        endpoint: _Endpoint,
        *,
        max_idle: int,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self._clock = clock
        self._endpoint = endpoint
        self._max_idle = max_idle
        self._idle_timeout = idle_timeout
        self._idle: list[UpstreamConnection] = []  # oldest first
        self._timer: IDelayedCall | None = None
        self._factory = _ConnectionFactory(self)
        self._closing: list[defer.Deferred[None]] = []

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def request(
        self, method: bytes, head: bytes, body: bytes | None
    ) -> defer.Deferred[UpstreamResponse]:
        """Send `head` (request line and fields, ending CRLF CRLF) and `body`.

        Fires with the response once its head is parsed; fails with
        `UpstreamProtocolError`, `UpstreamClosed`, or the endpoint's
        connection error. Cancelling it aborts the connection.
        """
        exchange = _Exchange(self, method, head, body)
        idle = self._idle
        while idle:
            conn = idle.pop()
            if self._clock.seconds() - conn.released_at < self._idle_timeout:
                conn.send(exchange, reused=True)
                return exchange.result
            # Expired (the sweep is late): the rest are older still.
            for old in [conn, *idle]:
                old.close()
            idle.clear()
        self._connect(exchange)
        return exchange.result

    def _connect(self, exchange: _Exchange) -> None:
        d = self._endpoint.connect(self._factory)
        exchange.connecting = d
        d.addCallbacks(
            self._connected,
            self._connect_failed,
            callbackArgs=(exchange,),
            errbackArgs=(exchange,),
        )

    def _connected(self, conn: UpstreamConnection, exchange: _Exchange) -> None:
        exchange.connecting = None
        if exchange.done:
            conn.close()
            return
        conn.send(exchange, reused=False)

    def _connect_failed(self, failure: Failure, exchange: _Exchange) -> None:
        exchange.connecting = None
        if not exchange.done:
            exchange.done = True
            exchange.result.errback(failure)

    def _release(self, conn: UpstreamConnection) -> None:
        idle = self._idle
        if len(idle) >= self._max_idle:
            idle.pop(0).close()
        conn.released_at = self._clock.seconds()
        idle.append(conn)
        if self._timer is None:
            self._timer = self._clock.callLater(self._idle_timeout, self._sweep)

    def _forget(self, conn: UpstreamConnection) -> None:
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    def _sweep(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        idle = self._idle
        while idle and now - idle[0].released_at >= self._idle_timeout:
            idle.pop(0).close()
        if idle:
            wait = idle[0].released_at + self._idle_timeout - now
            self._timer = self._clock.callLater(max(wait, 0.0), self._sweep)

    def closeCachedConnections(self) -> defer.Deferred[None]:
        """Close every idle connection; fires once they are closed."""
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        idle, self._idle = self._idle, []
        d = defer.gatherResults([conn.close() for conn in idle], consumeErrors=True)
        return d.addCallback(_none)


class UpstreamPools:
    """Pools by key (an upstream and its trust), closed together."""

    def __init__(self) -> None:
        self._pools: dict[Hashable, UpstreamPool] = {}

    def get(self, key: Hashable) -> UpstreamPool | None:
        return self._pools.get(key)

    def add(self, key: Hashable, pool: UpstreamPool) -> None:
        self._pools[key] = pool

    def closeCachedConnections(self) -> defer.Deferred[None]:
        """Close every idle connection of every pool."""
        closing = [p.closeCachedConnections() for p in self._pools.values()]
        return defer.gatherResults(closing, consumeErrors=True).addCallback(_none)


def _none(_: object) -> None:
    return None
