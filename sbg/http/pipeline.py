"""The frame every request goes through, in both directions.

A subclass gathers facts, asks the pure deciders (`sbg.policy`) and carries
out what they decide: `decide_head` once the head is in, `process` once the
body is. This class answers a refusal with its Matrix error (before the
body when the head decided it), turns an unexpected exception into a
logged 500, and writes exactly one audit record and the metrics for every
request, refused ones included.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from sbg import reasons
from sbg.audit import AuditLog, AuditRecord, path_for_log
from sbg.http.budgets import BodyBudget
from sbg.http.forward import ClientGone, ForwardResult, UpstreamError
from sbg.http.site import BorderRequest, send_json
from sbg.metrics import UNKNOWN, Metrics
from sbg.policy.decision import Decision
from sbg.reasons import Direction, Refusal

logger = logging.getLogger(__name__)


@dataclass
class RequestContext:
    """What the pipeline learns about one request, for the audit and metrics."""

    record: AuditRecord
    # The configured external server this request is about (metric label).
    server: str = UNKNOWN
    # Refusals monitor mode let through (counted, logged as would_deny).
    would_deny: list[Refusal] = field(default_factory=list)
    done: bool = False
    # The handler's own, from the head decision to `process`.
    data: Any = None

    def record_result(self, result: ForwardResult) -> None:
        """What the upstream answered, for the audit record."""
        self.record.status = result.status
        self.record.bytes_out = result.bytes_out
        if not result.complete:
            self.record.reason = "response body cut short"


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
    """One listener's (or tunnel's) requests: decide, carry out, audit."""

    direction: Direction = "inbound"

    def __init__(
        self, audit: AuditLog, metrics: Metrics, tracker: InflightTracker, budget: BodyBudget
    ) -> None:
        self._audit = audit
        self._metrics = metrics
        self._tracker = tracker
        self._budget = budget
        self._inflight = metrics.inflight.labels(self.direction)
        self._duration = metrics.duration.labels(self.direction)

    # -- what subclasses provide -------------------------------------------

    @abc.abstractmethod
    def header_timeout(self) -> float: ...

    @abc.abstractmethod
    def decide_head(self, request: BorderRequest, ctx: RequestContext) -> None:
        """Decide on the head (raise `Refusal`), accept the body it may have."""

    @abc.abstractmethod
    async def process(self, request: BorderRequest, ctx: RequestContext) -> None:
        """Decide on the body (raise `Refusal`) and forward the request."""

    def peer(self, request: BorderRequest) -> str:
        return request.peer_host()

    # -- the RequestHandler side (sbg.http.site) ---------------------------

    def head(self, request: BorderRequest) -> None:
        record = AuditRecord(
            direction=self.direction,
            peer=self.peer(request),
            method=request.head_method.decode("latin-1")[:32],
            path=path_for_log(request.head_target),
        )
        ctx = RequestContext(record)
        request.state = ctx
        self._inflight.inc()
        self._tracker.enter()
        if self._tracker.draining and request.channel is not None:
            request.channel.persistent = False
        try:
            if request.bad_framing:
                raise Refusal(reasons.MALFORMED_REQUEST, "ambiguous message framing")
            self.decide_head(request, ctx)
        except Refusal as refusal:
            self._deny(ctx, refusal)
            record.bytes_out = self._answer_early(request, refusal)
            self._finish(request, ctx)
        except Exception:
            logger.exception("unexpected error deciding on %s %s", record.method, record.path)
            self._internal_error(ctx)
            request.refuse_early(500, "M_UNKNOWN", "internal error")
            self._finish(request, ctx)

    def handle(self, request: BorderRequest) -> None:
        ctx = request.state
        assert isinstance(ctx, RequestContext)
        d = defer.ensureDeferred(self._run(request, ctx))
        d.addErrback(self._crash, request)

    def refused(self, request: BorderRequest | None, peer: str, refusal: Refusal) -> None:
        """A refusal answered by the HTTP layer itself (a body too large or
        over the budget, a malformed head, a request too slow to arrive)."""
        ctx = request.state if request is not None else None
        if not isinstance(ctx, RequestContext):
            record = AuditRecord(
                direction=self.direction,
                peer=peer,
                method=request.head_method.decode("latin-1")[:32] if request else "-",
                path=path_for_log(request.head_target) if request else "-",
            )
            ctx = RequestContext(record)
            self._deny(ctx, refusal)
            self._emit(request, ctx)
            return
        if ctx.done:
            return
        self._deny(ctx, refusal)
        self._finish(request, ctx)

    def apply(self, ctx: RequestContext, decision: Decision) -> None:
        """Carry out a decision: raise its refusal, or note what monitor
        mode softened (a `would_deny` record, and a refusal counted)."""
        if decision.refusal is not None:
            raise decision.refusal
        for refusal in decision.would_deny:
            ctx.would_deny.append(refusal)
            ctx.record.decision = "would_deny"
            ctx.record.reason = refusal.reason
            ctx.record.code = refusal.code
            self._metrics.refusals.labels(self.direction, ctx.server, refusal.code).inc()

    def allow(self, ctx: RequestContext) -> None:
        """The request is forwarded (a would_deny decision stays one)."""
        if not ctx.would_deny:
            ctx.record.decision = "allow"

    # -- internals ---------------------------------------------------------

    def _crash(self, failure: Failure, request: BorderRequest) -> None:
        logger.error("request handling failed: %s", failure.getTraceback())
        if not request.finished and not request._disconnected:
            request.setResponseCode(500)
            request.finish()

    def _deny(self, ctx: RequestContext, refusal: Refusal) -> None:
        record = ctx.record
        record.decision = "deny"
        record.status = refusal.answer(self.direction)[0]
        record.reason = refusal.reason
        record.code = refusal.code
        if refusal.kind.counted:
            self._metrics.refusals.labels(self.direction, ctx.server, refusal.code).inc()

    def _internal_error(self, ctx: RequestContext) -> None:
        self._deny(ctx, Refusal(reasons.INTERNAL_ERROR, "internal error"))

    def _answer_early(self, request: BorderRequest, refusal: Refusal) -> int:
        status, errcode = refusal.answer(self.direction)
        return request.refuse_early(
            status, errcode, refusal.reason, retry_after=refusal.kind is reasons.BUFFER_FULL
        )

    def _answer(self, request: BorderRequest, refusal: Refusal) -> int:
        status, errcode = refusal.answer(self.direction)
        body: dict[str, object] = {"errcode": errcode, "error": refusal.reason}
        if refusal.retry_after_ms is not None:
            body["retry_after_ms"] = refusal.retry_after_ms
        return send_json(request, status, body)

    async def _run(self, request: BorderRequest, ctx: RequestContext) -> None:
        record = ctx.record
        try:
            await self.process(request, ctx)
        except UpstreamError as e:
            self._metrics.upstream_errors.labels(self.direction, e.metric_reason).inc()
            record.status = e.status
            record.reason = e.reason
            record.code = e.code
            # The request was allowed; the upstream failed it.
            record.decision = "allow"
            record.bytes_out = send_json(
                request, e.status, {"errcode": "M_UNKNOWN", "error": e.reason}
            )
        except Refusal as refusal:
            self._deny(ctx, refusal)
            record.bytes_out = self._answer(request, refusal)
        except ClientGone:
            record.status = 499
            record.reason = record.reason or "client went away"
        except Exception:
            logger.exception("unexpected error handling %s %s", record.method, record.path)
            self._internal_error(ctx)
            send_json(request, 500, {"errcode": "M_UNKNOWN", "error": "internal error"})
        finally:
            request.release_body()
            self._finish(request, ctx)

    def _finish(self, request: BorderRequest | None, ctx: RequestContext) -> None:
        if ctx.done:
            return
        ctx.done = True
        self._inflight.dec()
        self._tracker.leave()
        self._emit(request, ctx)

    def _emit(self, request: BorderRequest | None, ctx: RequestContext) -> None:
        record = ctx.record
        if request is not None:
            record.bytes_in = request.bytes_in
            elapsed = request.elapsed_ms()
            record.duration_ms = elapsed
            self._duration.observe(elapsed / 1000.0)
        self._metrics.count_request(
            self.direction, ctx.server, record.group or UNKNOWN, record.decision
        )
        self._audit.emit(record)
