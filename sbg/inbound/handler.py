"""Inbound: external homeserver -> sbg -> internal homeserver.

`InboundHandler` gathers the facts of each request, asks the pure deciders
of `sbg.policy.inbound` and carries out their decision, in the order of
`docs/decisions.md` (inbound steps 4-23): the head is decided before any
body byte is kept, the signature is checked over the body as received
before it is parsed, and an allowed request is forwarded byte-identical.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from twisted.internet import threads

from sbg import reasons
from sbg.config.model import ExternalHomeserver, Listener
from sbg.http.forward import forward
from sbg.http.pipeline import InflightTracker, Pipeline, RequestContext
from sbg.http.site import BorderRequest
from sbg.matrix.xmatrix import CONTENT_PREFIX
from sbg.policy.inbound import (
    Head,
    HeadFacts,
    check_signature,
    decide_head,
    decide_trust,
    parse_body,
)
from sbg.policy.joins import decide_send_join, joining_key, prepared_key
from sbg.policy.snapshot import Policy
from sbg.reasons import Direction, Refusal
from sbg.runtime import Runtime

if TYPE_CHECKING:
    from signedjson.types import VerifyKey

# Bodies above this are parsed in the thread pool once their signature
# verified, so a multi-megabyte transaction never blocks the reactor for
# its whole parse.
THREAD_THRESHOLD = 256 * 1024
# Forwarding headers a peer could set to mislead the homeserver behind.
UNTRUSTED_FORWARDING = frozenset(
    (b"forwarded", b"x-forwarded-proto", b"x-forwarded-host", b"x-real-ip")
)


class _Lookups:
    """The runtime state `decide_head` reads, under one policy snapshot."""

    def __init__(self, runtime: Runtime, policy: Policy) -> None:
        self._rt = runtime
        self._policy = policy

    def killed(self, server: str | None) -> bool:
        return self._rt.killswitch.is_killed(server, "inbound")

    def keys_for(self, origin: ExternalHomeserver) -> Mapping[str, VerifyKey]:
        pinned = self._policy.keyring.keys_for(origin.server_name)
        return self._rt.key_fetcher.keys_for(origin, pinned)

    def may_refetch(self, origin: ExternalHomeserver) -> bool:
        return self._rt.key_fetcher.may_refresh(origin)


class InboundHandler(Pipeline):
    """One inbound listener's requests."""

    direction: Direction = "inbound"

    def __init__(self, runtime: Runtime, listener: Listener, tracker: InflightTracker) -> None:
        super().__init__(runtime.audit, runtime.metrics, tracker, runtime.body_budget)
        self._rt = runtime
        self._listener = listener

    def header_timeout(self) -> float:
        return self._rt.policy.config.limits.header_timeout

    def _forwarded_for(self, request: BorderRequest) -> tuple[str, bytes]:
        """(client address for decisions and logs, X-Forwarded-For to send)."""
        tcp_peer = request.peer_host()
        if not self._listener.x_forwarded:
            return tcp_peer, tcp_peer.encode()
        received = request.requestHeaders.getRawHeaders(b"x-forwarded-for") or []
        joined = b", ".join(v.strip() for v in received if v.strip())
        if not joined:
            return tcp_peer, tcp_peer.encode()
        last = joined.rsplit(b",", 1)[-1].strip().decode("latin-1")
        try:
            client = str(ipaddress.ip_address(last))
        except ValueError:
            # Not an address: no client address at all (it matches no
            # `source_ips`), rather than the terminator's own.
            client = "-"
        return client, joined + b", " + tcp_peer.encode()

    def peer(self, request: BorderRequest) -> str:
        return self._forwarded_for(request)[0]

    # -- the head ----------------------------------------------------------

    def decide_head(self, request: BorderRequest, ctx: RequestContext) -> None:
        policy = self._rt.policy
        rec = ctx.record
        headers = request.requestHeaders
        per_ip = policy.config.limits.rate_limit_per_ip
        wait = self._rt.rate_limiter.take("ip:" + rec.peer, per_ip) if per_ip else 0.0
        facts = HeadFacts(
            tls=self._listener.tls,
            sni=request.sni() if self._listener.tls else None,
            host=headers.getRawHeaders(b"host") or [],
            method=request.head_method,
            target=request.head_target,
            authorization=headers.getRawHeaders(b"authorization"),
            peer=rec.peer,
            has_body=request.has_body(),
            declared_length=request.declared_length,
            ip_rate_wait=wait,
        )
        head = decide_head(policy, facts, _Lookups(self._rt, policy))
        if head.match is not None:
            rec.group = head.match.endpoint.group
        if head.internal is not None:
            rec.destination = head.internal.server_name
        if head.auth is not None:
            rec.origin = head.auth.origin
        if head.origin is not None:
            ctx.server = head.origin.server_name
        if head.refusal is not None:
            raise head.refusal
        ctx.data = (policy, head)
        if head.body_cap and not request.accept_body(
            head.body_cap, self._budget, prefix=CONTENT_PREFIX
        ):
            raise Refusal(reasons.BUFFER_FULL, "too many request bodies held: retry later")

    # -- the body ----------------------------------------------------------

    async def process(self, request: BorderRequest, ctx: RequestContext) -> None:
        policy, head = ctx.data
        assert head.internal is not None
        keys = head.keys
        if head.refetch_key and head.origin is not None and head.auth is not None:
            # `key_fetch: fetch`: an unknown key id may be a rotated key;
            # ask the server (at most once a minute) before refusing.
            await self._rt.key_fetcher.refresh(head.origin, policy.config.outbound)
            keys = _Lookups(self._rt, policy).keys_for(head.origin)
            if head.auth.key_id not in keys:
                raise Refusal(
                    reasons.UNKNOWN_KEY, f"no known key {head.auth.key_id} for {head.auth.origin}"
                )
        content, body = await self._check_body(request, head, keys)
        wait = 0.0
        origin = head.origin
        if origin is not None:
            # Step 18: the origin's rate limit, counted only now that the
            # signature proved who it is: nobody can spend a partner's budget.
            level = policy.trust_levels.get(origin.trust_level)
            if level is not None and level.rate_limit is not None:
                wait = self._rt.rate_limiter.take("origin:" + origin.server_name, level.rate_limit)
        self.apply(ctx, decide_trust(policy, head, content, wait))
        assert head.match is not None
        endpoint, params = head.match.endpoint.name, head.match.params
        origin_name = origin.server_name if origin is not None else None
        joining = joining_key(endpoint, params, origin_name, content)
        if joining is not None:
            prepared = await self._rt.prepared_joins.is_prepared(joining)
            self.apply(ctx, decide_send_join(policy.mode(origin) == "monitor", joining, prepared))
        self.allow(ctx)
        _client, xff = self._forwarded_for(request)
        settings = policy.config.inbound
        with self._rt.inflight.hold(origin.server_name if origin else None, policy.config.limits):
            result = await forward(
                pool=self._rt.upstream_pool(head.internal),
                request=request,
                x_forwarded_for=xff,
                body=body if request.method in (b"PUT", b"POST") else None,
                clock=self._rt.reactor,
                drop=UNTRUSTED_FORWARDING,
                request_timeout=settings.request_timeout,
                idle_timeout=settings.idle_timeout,
            )
        ctx.record_result(result)
        prepared_join = prepared_key(endpoint, params, origin_name, result.status)
        if prepared_join is not None:
            self._rt.prepared_joins.record(prepared_join)

    async def _check_body(
        self, request: BorderRequest, head: Head, keys: Mapping[str, VerifyKey]
    ) -> tuple[dict[str, Any] | None, bytes]:
        """Steps 16 then 17: the signature over the body as received (on
        the reactor: one hash, never more than one copy of a body at a
        time), then the strict parse (in the thread pool for a large body)."""
        received = request.body
        method = request.method.decode("ascii")
        if received is None:
            check_signature(head, method, request.uri, keys, None, 0)
            return None, b""
        check_signature(head, method, request.uri, keys, received.buffer, received.start)
        body = received.bytes()
        received.clear()
        if len(body) > THREAD_THRESHOLD:
            content: dict[str, Any] | None = await threads.deferToThreadPool(
                self._rt.reactor, self._rt.reactor.getThreadPool(), parse_body, head, body
            )
        else:
            content = parse_body(head, body)
        return content, body
