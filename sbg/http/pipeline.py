"""The frame every request goes through, in both directions.

A subclass decides and carries out (`process`); this class turns a refusal
into its Matrix error, an unexpected exception into a logged 500, and always
writes exactly one audit record and the metrics for it.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.python.failure import Failure

from sbg.audit import AuditLog, AuditRecord, path_for_log
from sbg.errors import SbgError
from sbg.http.forward import ClientGone, ForwardResult, UpstreamError
from sbg.http.site import BorderRequest, send_error
from sbg.metrics import UNKNOWN, Metrics

logger = logging.getLogger(__name__)


@dataclass
class RequestContext:
    """What the pipeline learns about one request, for the audit and metrics."""

    record: AuditRecord
    # The configured external server this request is about (metric label).
    server: str = UNKNOWN
    # Refusal codes monitor mode let through (counted, logged as would_deny).
    would_deny: list[str] = field(default_factory=list)

    def record_result(self, result: ForwardResult) -> None:
        """What the upstream answered, for the audit record."""
        self.record.status = result.status
        self.record.bytes_out = result.bytes_out
        if not result.complete:
            self.record.reason = "response body cut short"

    def allow(self) -> None:
        """The request is forwarded (a would_deny decision stays one)."""
        if not self.would_deny:
            self.record.decision = "allow"


class InflightTracker:
    """Counts requests in flight, so a graceful stop can wait for them."""

    def __init__(self) -> None:
        self.count = 0
        # Set by a graceful stop: connections close after their current
        # request instead of waiting for another.
        self.draining = False
        self._waiters: list[defer.Deferred[None]] = []

    def enter(self) -> None:
        self.count += 1

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)

    def wait_idle(self) -> defer.Deferred[None]:
        if self.count == 0:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred(lambda d: self._waiters.remove(d))
        self._waiters.append(d)
        return d


class Pipeline(abc.ABC):
    direction: str = "inbound"

    def __init__(self, audit: AuditLog, metrics: Metrics, tracker: InflightTracker) -> None:
        self._audit = audit
        self._metrics = metrics
        self._tracker = tracker
        self._inflight = metrics.inflight.labels(self.direction)
        self._duration = metrics.duration.labels(self.direction)

    def handle(self, request: BorderRequest) -> None:
        d = defer.ensureDeferred(self._run(request))
        d.addErrback(self._crash, request)

    def _crash(self, failure: Failure, request: BorderRequest) -> None:
        logger.error("request handling failed: %s", failure.getTraceback())
        if not request.finished and not request._disconnected:
            request.setResponseCode(500)
            request.finish()

    @abc.abstractmethod
    async def process(self, request: BorderRequest, ctx: RequestContext) -> None:
        """Decide on `request` (raising `SbgError` to refuse) and forward it."""

    def soft_refusal(self, ctx: RequestContext, err: SbgError, mode: str) -> None:
        """A trust-level or origin-consistency refusal, which monitor mode
        turns into a logged and counted `would_deny` that lets the request
        through. Authentication refusals never come here."""
        if mode != "monitor":
            raise err
        ctx.would_deny.append(err.code)
        ctx.record.decision = "would_deny"
        ctx.record.reason = err.reason
        ctx.record.code = err.code
        self._metrics.refusals.labels(self.direction, ctx.server, err.code).inc()

    def peer(self, request: BorderRequest) -> str:
        return request.peer_host()

    async def _run(self, request: BorderRequest) -> None:
        record = AuditRecord(
            direction="inbound" if self.direction == "inbound" else "outbound",
            peer=self.peer(request),
            method=request.method.decode("latin-1")[:32],
            path=path_for_log(request.uri),
            bytes_in=request.bytes_in,
        )
        ctx = RequestContext(record)
        inflight = self._inflight
        inflight.inc()
        self._tracker.enter()
        if self._tracker.draining and request.channel is not None:
            request.channel.persistent = False
        try:
            if request.bad_framing:
                if request.channel is not None:
                    request.channel.persistent = False
                raise SbgError(
                    400, "M_UNRECOGNIZED", "ambiguous message framing", "malformed_request"
                )
            await self.process(request, ctx)
        except UpstreamError as e:
            self._metrics.upstream_errors.labels(self.direction, e.metric_reason).inc()
            record.status = e.status
            record.reason = e.reason
            record.code = e.code
            # The request was allowed; the upstream failed it.
            record.decision = "allow"
            record.bytes_out = send_error(request, e)
        except SbgError as e:
            record.decision = "deny"
            record.status = e.status
            record.reason = e.reason
            record.code = e.code
            self._metrics.refusals.labels(self.direction, ctx.server, e.code).inc()
            retry = getattr(e, "retry_after_ms", None)
            extra = {"retry_after_ms": retry} if isinstance(retry, int) else None
            record.bytes_out = send_error(request, e, extra)
        except ClientGone:
            record.status = 499
            record.reason = record.reason or "client went away"
        except Exception:
            logger.exception("unexpected error handling %s %s", record.method, record.path)
            record.decision = "deny"
            record.status = 500
            record.reason = "internal error"
            send_error(request, SbgError(500, "M_UNKNOWN", "internal error", "internal_error"))
        finally:
            inflight.dec()
            self._tracker.leave()
            elapsed = request.elapsed_ms()
            record.duration_ms = elapsed
            self._duration.observe(elapsed / 1000.0)
            self._metrics.count_request(
                self.direction, ctx.server, record.group or UNKNOWN, record.decision
            )
            self._audit.emit(record)
