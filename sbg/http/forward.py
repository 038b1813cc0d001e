"""The one forwarder both directions use.

It sends the request with its method, raw target and body byte-identical
(hop-by-hop headers dropped, one unambiguous framing), then relays the
upstream's status, headers and body back, streamed with backpressure: the
upstream connection is the registered producer of the client connection, so
a slow client slows the upstream down instead of filling memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet import defer, error
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web._newclient import (
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from zope.interface import implementer

from sbg.errors import SbgError
from sbg.http.agent import RawTargetAgent

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
# Framing is the HTTP client's job: it sets one Content-Length from the body.
_REQUEST_DROP = HOP_BY_HOP | {b"content-length", b"expect", b"x-forwarded-for"}
_RESPONSE_DROP = HOP_BY_HOP | {b"content-length"}


def _connection_tokens(headers: Headers) -> set[bytes]:
    tokens: set[bytes] = set()
    for value in headers.getRawHeaders(b"connection") or ():
        for token in value.split(b","):
            t = token.strip().lower()
            if t:
                tokens.add(t)
    return tokens


def copy_headers(src: Headers, drop: frozenset[bytes]) -> Headers:
    """Copy `src` without the `drop` headers and those named in Connection."""
    named = _connection_tokens(src)
    out = Headers()
    for name, values in src.getAllRawHeaders():
        lower = name.lower()
        if lower in drop or lower in named:
            continue
        out.setRawHeaders(name, list(values))
    return out


def request_headers_for_upstream(src: Headers, x_forwarded_for: bytes | None) -> Headers:
    """The headers to send upstream; X-Forwarded-For replaced (or dropped)."""
    out = copy_headers(src, _REQUEST_DROP)
    if x_forwarded_for is not None:
        out.setRawHeaders(b"X-Forwarded-For", [x_forwarded_for])
    return out


@implementer(IBodyProducer)
class BytesProducer:
    """A request body already in memory (bounded by max_body_size)."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> defer.Deferred[None]:
        consumer.write(self._body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@dataclass
class ForwardResult:
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
    reasons: list[Failure] = []
    if failure.check(
        ResponseNeverReceived, RequestNotSent, RequestTransmissionFailed, ResponseFailed
    ):
        reasons = list(getattr(failure.value, "reasons", []) or [])
    for r in reasons:
        if _is_tls_failure(r):
            return 502, "tls", "TLS to the upstream failed verification"
    if _is_tls_failure(failure):
        return 502, "tls", "TLS to the upstream failed verification"
    return 502, "protocol", "upstream connection failed"


def _is_tls_failure(failure: Failure) -> bool:
    from OpenSSL.SSL import Error as SSLError

    return bool(failure.check(SSLError)) or "SSL" in type(failure.value).__name__


_DONE = Failure(ResponseDone())


class _Relay(Protocol):
    """Writes the upstream body into the client request as it arrives."""

    def __init__(
        self,
        request: http.Request,
        clock: IReactorTime,
        idle_timeout: float,
        done: defer.Deferred[ForwardResult],
        status: int,
    ) -> None:
        self._request = request
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._done = done
        self._status = status
        self._timer: IDelayedCall | None = None
        self.bytes = 0
        self._producer: IPushProducer | None = None
        self.client_gone = False

    def connectionMade(self) -> None:
        producer = self.transport
        if IPushProducer.providedBy(producer):
            self._producer = producer
            self._request.registerProducer(producer, True)
        self._arm()

    def _arm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._idle_timeout)
        else:
            self._timer = self._clock.callLater(self._idle_timeout, self._idle)

    def _idle(self) -> None:
        self._timer = None
        logger.warning(
            "upstream idle for %ss while relaying a response: aborting", self._idle_timeout
        )
        self.stop()

    def stop(self) -> None:
        """Abort the upstream (client gone, or idle): the client is cut too."""
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.bytes += len(data)
        self._arm()
        if not self.client_gone:
            self._request.write(data)

    def connectionLost(self, reason: Failure = _DONE) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        complete = bool(reason.check(ResponseDone, PotentialDataLoss))
        if not self.client_gone:
            if self._producer is not None:
                self._request.unregisterProducer()
            if complete:
                self._request.finish()
            else:
                # Headers are gone already: the only honest signal left is
                # to close the connection after what was relayed, so the
                # client sees a body shorter than announced (or a chunked
                # body without its last chunk).
                channel = self._request.channel
                if channel is not None and channel.transport is not None:
                    channel.persistent = False
                    # The channel's own loseConnection first unregisters it
                    # as the transport's producer; TLS would wait forever.
                    channel.loseConnection()
        self._done.callback(ForwardResult(self._status, self.bytes, complete))


async def forward(
    *,
    agent: RawTargetAgent,
    request: http.Request,
    base_url: bytes,
    headers: Headers,
    body: bytes | None,
    clock: IReactorTime,
    request_timeout: float,
    idle_timeout: float,
    on_response: Callable[[IResponse], None] | None = None,
) -> ForwardResult:
    """Forward `request` to `base_url` and relay the answer into `request`.

    Raises `SbgError` (502/504) when no response headers came back; once
    headers are relayed the result says whether the body completed.
    """
    method = request.method
    producer = BytesProducer(body) if body is not None else None
    # The raw target as received, byte for byte: it is what was signed.
    d: defer.Deferred[IResponse] = agent.request_raw(
        method, base_url, request.uri, headers, producer
    )
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
        failure = Failure()
        status, reason, text = upstream_error_reason(failure)
        if timed_out:
            status, reason, text = 504, "timeout", "upstream did not answer in time"
        if client_gone:
            raise ClientGone()
        logger.info("upstream request failed: %s", failure.getErrorMessage())
        raise UpstreamError(status, reason, text)
    finally:
        if timer.active():
            timer.cancel()

    if client_gone:
        response.deliverBody(_Discard())
        raise ClientGone()
    length = response.length
    if length is not UNKNOWN_LENGTH and (not isinstance(length, int) or length < 0):
        # Older Twisted parses a negative Content-Length without complaint:
        # never relay a framing the client could read two ways.
        response.deliverBody(_Discard())
        raise UpstreamError(502, "protocol", "upstream sent an invalid Content-Length")
    if on_response is not None:
        on_response(response)
    request.setResponseCode(response.code, response.phrase)
    out = copy_headers(response.headers, _RESPONSE_DROP)
    if request.channel is not None and not request.channel.persistent:
        # This connection ends with this response (the client asked, or sbg
        # is stopping): say so, since the upstream's Connection is dropped.
        out.setRawHeaders(b"Connection", [b"close"])
    if response.length is not UNKNOWN_LENGTH and method != b"HEAD":
        out.setRawHeaders(b"Content-Length", [str(response.length).encode()])
    request.responseHeaders = out
    done: defer.Deferred[ForwardResult] = defer.Deferred()
    relay = _Relay(request, clock, idle_timeout, done, response.code)
    relays.append(relay)
    response.deliverBody(relay)
    return await done


class _Discard(Protocol):
    def connectionMade(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        pass


class ClientGone(Exception):
    """The client went away before the upstream answered."""


class UpstreamError(SbgError):
    def __init__(self, status: int, metric_reason: str, text: str) -> None:
        super().__init__(status, "M_UNKNOWN", text, "upstream_" + metric_reason)
        self.metric_reason = metric_reason
