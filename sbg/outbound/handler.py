"""Outbound: the requests inside an intercepted tunnel.

One `OutboundHandler` serves one tunnel. Each request is decided from its
head by `sbg.policy.outbound.decide_request` (`docs/decisions.md`,
outbound steps 10-23), under the policy in force
when it arrives and the kill switch as it is then, and forwarded over a
new TLS connection verified against the destination's pinned CA.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sbg import reasons
from sbg.http.forward import UpstreamError, forward
from sbg.http.pipeline import Pipeline, RequestContext
from sbg.http.site import BorderRequest
from sbg.metrics import UNKNOWN
from sbg.outbound.state import OutboundState
from sbg.policy.outbound import RequestFacts, TunnelRequest, decide_request
from sbg.policy.snapshot import Policy
from sbg.reasons import Direction, Refusal
from sbg.tls.client import NoUpstreamTrust
from sbg.tls.pem import PemError

if TYPE_CHECKING:
    from sbg.outbound.proxy import ConnectProtocol


class OutboundHandler(Pipeline):
    """The requests of one tunnel."""

    direction: Direction = "outbound"

    def __init__(self, state: OutboundState, connection: ConnectProtocol) -> None:
        rt = state.runtime
        super().__init__(rt.audit, rt.metrics, state.tracker, rt.body_budget)
        self._state = state
        self._connection = connection

    def header_timeout(self) -> float:
        return self._state.runtime.policy.config.limits.header_timeout

    def decide_head(self, request: BorderRequest, ctx: RequestContext) -> None:
        rt = self._state.runtime
        policy = rt.policy
        opened = self._connection.tunnel
        assert opened is not None
        headers = request.requestHeaders
        facts = RequestFacts(
            host=headers.getRawHeaders(b"host") or [],
            sni=request.sni(),
            method=request.head_method,
            target=request.head_target,
            authorization=headers.getRawHeaders(b"authorization"),
            declared_length=request.declared_length,
        )
        out = decide_request(
            policy, opened, facts, lambda s: rt.killswitch.is_killed(s, "outbound")
        )
        rec = ctx.record
        tunnel = out.tunnel or opened
        rec.destination = tunnel.server_name
        ctx.server = tunnel.server_name or UNKNOWN
        rec.group = out.group
        rec.origin = out.origin
        self.apply(ctx, out.decision)
        ctx.data = (policy, out)
        if request.has_body() and not request.accept_body(out.body_cap, self._budget):
            raise Refusal(reasons.BUFFER_FULL, "too many request bodies held: retry later")

    async def process(self, request: BorderRequest, ctx: RequestContext) -> None:
        policy, out = ctx.data
        self._connection.active_requests += 1
        try:
            self.allow(ctx)
            await self._forward(policy, out, request, ctx)
        finally:
            self._connection.active_requests -= 1

    async def _forward(
        self, policy: Policy, out: TunnelRequest, request: BorderRequest, ctx: RequestContext
    ) -> None:
        tunnel = out.tunnel
        assert tunnel is not None
        settings = policy.config.outbound
        ca_files = (out.ca_file,) if out.ca_file else None
        try:
            pool = self._state.pool_for(
                policy, tunnel, out.tls_name, ca_files, settings.default_trust
            )
        except (NoUpstreamTrust, PemError) as e:
            # Nothing to verify the destination against: a TLS failure of
            # the upstream, a 502 (docs/decisions.md, outbound step 21).
            raise UpstreamError(502, "tls", f"no usable trust for {out.tls_name}: {e}") from None
        body = request.body_bytes() if request.method in (b"PUT", b"POST") else None
        with self._state.runtime.inflight.hold(tunnel.server_name, policy.config.limits):
            result = await forward(
                pool=pool,
                request=request,
                # Internal addresses are not the external servers' business.
                x_forwarded_for=None,
                body=body,
                clock=self._state.runtime.reactor,
                request_timeout=settings.request_timeout,
                idle_timeout=settings.idle_timeout,
            )
        ctx.record_result(result)
