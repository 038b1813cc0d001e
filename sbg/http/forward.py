"""The one forwarder both directions use.

It sends the request with its method, raw target and body byte-identical
(hop-by-hop headers dropped, one unambiguous framing), then relays the
upstream's status, headers and body back, streamed with backpressure: the
upstream response is the registered producer of the client connection, so
a slow client slows the upstream down instead of filling memory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from twisted.internet import defer, error
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http_headers import Headers

from sbg.http.upstream import UpstreamResponse
from sbg.http.upstream_pool import UpstreamPool
from sbg.http.upstream_wire import UpstreamClosed
from sbg.matrix.endpoints import target_problem

logger = logging.getLogger(__name__)

# RFC 9110 7.6.1 plus the legacy ones; headers named in Connection are added.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Framing is sbg's job: it sends one Content-Length from the body.
_REQUEST_DROP = HOP_BY_HOP | {b"content-length", b"expect", b"x-forwarded-for"}
_RESPONSE_DROP = HOP_BY_HOP | {b"content-length"}
_NO_BODY = (204, 304)


class InvalidTarget(ValueError):
    """A request sbg cannot write upstream as one clean request head."""


def check_target(target: bytes) -> None:
    """A request target sbg may write on a request line (the grammar of
    `sbg.matrix.endpoints.target_problem`)."""
    problem = target_problem(target)
    if problem is not None:
        raise InvalidTarget(problem)


def _connection_tokens(values: Iterable[bytes]) -> set[bytes]:
    tokens: set[bytes] = set()
    for value in values:
        for token in value.split(b","):
            t = token.strip().lower()
            if t:
                tokens.add(t)
    return tokens


def request_head(
    method: bytes,
    target: bytes,
    headers: Headers,
    x_forwarded_for: bytes | None,
    body: bytes | None,
    drop: frozenset[bytes] = frozenset(),
) -> bytes:
    """The request line and header block to send upstream.

    The target goes out as received (it is what was signed); hop-by-hop
    headers, those named in Connection and those in DROP (lower-case names)
    are dropped, X-Forwarded-For is replaced (or dropped when None), and a
    body gets one Content-Length.

    Raises:
        InvalidTarget: the target or a header would not be one clean line.
    """
    check_target(target)
    fields = list(headers.getAllRawHeaders())
    named: set[bytes] = set()
    for name, values in fields:
        if name.lower() == b"connection":
            named = _connection_tokens(values)
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    append = parts.append
    lines = 1
    for name, values in fields:
        lower = name.lower()
        if lower in _REQUEST_DROP or lower in named or lower in drop:
            continue
        for value in values:
            append(name)
            append(b": ")
            append(value)
            append(b"\r\n")
            lines += 1
    if x_forwarded_for is not None:
        append(b"X-Forwarded-For: ")
        append(x_forwarded_for)
        append(b"\r\n")
        lines += 1
    if body is not None:
        append(b"Content-Length: %d\r\n" % len(body))
        lines += 1
    append(b"\r\n")
    head = b"".join(parts)
    # Every CR and LF is a line end sbg wrote, and no NUL: a value can
    # never split into two header lines upstream.
    lines += 1
    if head.count(b"\n") != lines or head.count(b"\r") != lines or b"\0" in head:
        raise InvalidTarget("a header value with CR, LF or NUL")
    return head


@dataclass
class ForwardResult:
    """What the upstream answered to a forwarded request, for the audit record."""

    status: int
    bytes_out: int
    complete: bool


def upstream_error_reason(failure: Failure) -> tuple[int, str, str]:
    """Map a failed upstream request to (status, metric reason, human text)."""
    if failure.check(defer.CancelledError, defer.TimeoutError, error.TimeoutError):
        return 504, "timeout", "upstream did not answer in time"
    if failure.check(error.DNSLookupError):
        return 502, "dns", "upstream name does not resolve"
    if failure.check(error.ConnectionRefusedError, error.ConnectError):
        return 502, "connect", "upstream unreachable"
    if _is_tls_failure(failure):
        return 502, "tls", "TLS to the upstream failed verification"
    if failure.check(UpstreamClosed):
        reason = failure.value.reason  # type: ignore[union-attr]
        if _is_tls_failure(reason):
            return 502, "tls", "TLS to the upstream failed verification"
    return 502, "protocol", "upstream connection failed"


def _is_tls_failure(failure: Failure) -> bool:
    from OpenSSL.SSL import Error as SSLError

    return bool(failure.check(SSLError)) or "SSL" in type(failure.value).__name__


class _Relay:
    """Writes the upstream body into the client request as it arrives.

    The response is the client request's push producer: a slow client
    pauses reading from the upstream.
    """

    def __init__(
        self,
        request: http.Request,
        response: UpstreamResponse,
        clock: IReactorTime,
        idle_timeout: float,
        done: defer.Deferred[ForwardResult],
    ) -> None:
        self._request = request
        self._response = response
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._done = done
        self._timer: IDelayedCall | None = None
        self._registered = False
        self._ended = False
        self.bytes = 0
        self.client_gone = False

    def start(self) -> None:
        self._request.registerProducer(self._response, True)
        self._registered = True
        self._response.deliver(self)
        if not self._ended:
            self._timer = self._clock.callLater(self._idle_timeout, self._idle)

    def _idle(self) -> None:
        self._timer = None
        logger.warning(
            "upstream idle for %ss while relaying a response: aborting", self._idle_timeout
        )
        self.stop()

    def stop(self) -> None:
        """Abort the upstream (client gone, or idle): the client is cut too."""
        self._response.stopProducing()

    def data(self, data: bytes) -> None:
        self.bytes += len(data)
        timer = self._timer
        if timer is not None:
            timer.reset(self._idle_timeout)
        if not self.client_gone:
            self._request.write(data)

    def end(self, complete: bool) -> None:
        self._ended = True
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        request = self._request
        if not self.client_gone:
            if self._registered:
                request.unregisterProducer()
            if complete:
                request.finish()
            else:
                # Headers are gone already: the only honest signal left is
                # to close the connection after what was relayed, so the
                # client sees a body shorter than announced (or a chunked
                # body without its last chunk).
                channel = request.channel
                if channel is not None and channel.transport is not None:
                    channel.persistent = False
                    # The channel's own loseConnection first unregisters it
                    # as the transport's producer; TLS would wait forever.
                    channel.loseConnection()
        self._done.callback(ForwardResult(self._response.code, self.bytes, complete))


def response_headers(response: UpstreamResponse) -> Headers:
    """The upstream's headers minus hop-by-hop ones and its framing."""
    named: set[bytes] = set()
    for name, value in response.headers:
        if len(name) == 10 and name.lower() == b"connection":
            named |= _connection_tokens((value,))
    out = Headers()
    add = out.addRawHeader
    for name, value in response.headers:
        lower = name.lower()
        if lower in _RESPONSE_DROP or lower in named:
            continue
        add(name, value)
    return out


async def forward(
    *,
    pool: UpstreamPool,
    request: http.Request,
    x_forwarded_for: bytes | None,
    body: bytes | None,
    clock: IReactorTime,
    request_timeout: float,
    idle_timeout: float,
    drop: frozenset[bytes] = frozenset(),
) -> ForwardResult:
    """Forward `request` through `pool` and relay the answer into `request`:
    method, raw target, headers (hop-by-hop ones dropped, `x_forwarded_for`
    as X-Forwarded-For when not None, the headers named in `drop` dropped)
    and `body` (None: none). Raises
    `UpstreamError` (502/504) when no response head came back, `ClientGone`
    when the client left first; then the result says if the body completed.
    """
    method = request.method
    head = _upstream_head(request, x_forwarded_for, body, drop)
    d = pool.request(method, head, body)
    timed_out = []

    def on_timeout() -> None:
        timed_out.append(True)
        d.cancel()

    timer = clock.callLater(request_timeout, on_timeout)
    client_gone: list[bool] = []
    relays: list[_Relay] = []

    def on_client_gone(f: Failure) -> None:
        client_gone.append(True)
        if relays:
            relays[0].client_gone = True
            relays[0].stop()
        elif not d.called:
            d.cancel()

    request.notifyFinish().addErrback(on_client_gone)
    try:
        response = await d
    except Exception:
        raise _failed(Failure(), bool(timed_out), bool(client_gone)) from None
    finally:
        if timer.active():
            timer.cancel()

    if client_gone:
        response.discard()
        raise ClientGone()
    _relay_head(request, response)
    done: defer.Deferred[ForwardResult] = defer.Deferred()
    relay = _Relay(request, response, clock, idle_timeout, done)
    relays.append(relay)
    relay.start()
    return await done


def _upstream_head(
    request: http.Request, x_forwarded_for: bytes | None, body: bytes | None, drop: frozenset[bytes]
) -> bytes:
    """The request head to send upstream; 502 `protocol` when the target
    cannot be sent."""
    try:
        return request_head(
            request.method, request.uri, request.requestHeaders, x_forwarded_for, body, drop
        )
    except InvalidTarget as e:
        logger.info("request not sendable upstream: %s", e)
        raise UpstreamError(502, "protocol", "upstream connection failed") from None


def _failed(failure: Failure, timed_out: bool, client_gone: bool) -> Exception:
    """What a request that got no response head ends with."""
    if client_gone:
        return ClientGone()
    status, reason, text = upstream_error_reason(failure)
    if timed_out:
        status, reason, text = 504, "timeout", "upstream did not answer in time"
    logger.info("upstream request failed: %s", failure.getErrorMessage())
    return UpstreamError(status, reason, text)


def _relay_head(request: http.Request, response: UpstreamResponse) -> None:
    """The upstream's status and headers (minus hop-by-hop ones and its
    framing) as `request`'s response head."""
    code = response.code
    request.setResponseCode(code, response.phrase)
    out = response_headers(response)
    if request.channel is not None and not request.channel.persistent:
        # This connection ends with this response (the client asked, or sbg
        # is stopping): say so, since the upstream's Connection is dropped.
        out.setRawHeaders(b"Connection", [b"close"])
    if response.length is not None and request.method != b"HEAD" and code not in _NO_BODY:
        out.setRawHeaders(b"Content-Length", [b"%d" % response.length])
    request.responseHeaders = out


class ClientGone(Exception):
    """The client went away before the upstream answered."""


class UpstreamError(Exception):
    """The upstream failed an allowed request: 502 or 504 `M_UNKNOWN`.

    Not a refusal: it counts in `sbg_upstream_errors_total{reason}`, and
    its audit record's code is `upstream_` + that reason.
    """

    def __init__(self, status: int, metric_reason: str, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.reason = text
        self.metric_reason = metric_reason
        self.code = "upstream_" + metric_reason
