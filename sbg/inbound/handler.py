"""Inbound: external homeserver -> sbg -> internal homeserver (contract 5).

`InboundHandler.process` is the decision order of contract 5.1, row by row;
each refusal is an `SbgError` raised at its row, so the order in the code is
the order in the contract. An allowed request is forwarded byte-identical.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet import threads

from sbg.config.model import ExternalHomeserver, InternalHomeserver, Listener, RateLimit
from sbg.errors import SbgError
from sbg.hosts import HostParseError, parse_authority
from sbg.http.forward import forward
from sbg.http.pipeline import InflightTracker, Pipeline, RequestContext
from sbg.http.site import BorderRequest
from sbg.matrix.endpoints import Match, match_target
from sbg.matrix.jsonbody import parse_json_object
from sbg.matrix.origin import check_origin_consistency
from sbg.matrix.xmatrix import XMatrixAuth, parse_authorization, verify_request_signature
from sbg.policy.snapshot import Policy
from sbg.runtime import Runtime

# Bodies above this are parsed and verified in the thread pool, so a
# multi-megabyte transaction never blocks the reactor.
THREAD_THRESHOLD = 256 * 1024


class RateLimited(SbgError):
    """429 with the time to wait, as Synapse's clients expect it."""

    def __init__(self, retry_after_ms: int, code: str) -> None:
        super().__init__(429, "M_LIMIT_EXCEEDED", "too many requests", code)
        self.retry_after_ms = retry_after_ms


def _not_found(reason: str, code: str) -> SbgError:
    return SbgError(404, "M_UNRECOGNIZED", reason, code)


def _forbidden(reason: str, code: str) -> SbgError:
    return SbgError(403, "M_FORBIDDEN", reason, code)


def _unauthorized(reason: str, code: str) -> SbgError:
    return SbgError(401, "M_UNAUTHORIZED", reason, code)


def _parse_and_verify(
    body: bytes,
    json_body: bool,
    auth: XMatrixAuth | None,
    method: str,
    uri: bytes,
    destination: str,
    keys: Any,
) -> dict[str, Any] | None:
    """Rows 8 and 9: parse once, verify over the same parse."""
    content: dict[str, Any] | None = None
    if json_body:
        content = parse_json_object(body)
    elif body:
        raise SbgError(400, "M_NOT_JSON", "this endpoint takes no request body", "unexpected_body")
    if auth is not None:
        verify_request_signature(auth, method, uri, destination, content, keys, body)
    return content


class InboundHandler(Pipeline):
    direction = "inbound"

    def __init__(self, runtime: Runtime, listener: Listener, tracker: InflightTracker) -> None:
        super().__init__(runtime.audit, runtime.metrics, tracker)
        self._rt = runtime
        self._listener = listener

    def header_timeout(self) -> float:
        return self._rt.policy.config.limits.header_timeout

    def max_body_size(self) -> int:
        return self._rt.policy.config.inbound.max_body_size

    def _forwarded_for(self, request: BorderRequest) -> tuple[str, bytes]:
        """(client address for decisions and logs, X-Forwarded-For to send)."""
        tcp_peer = request.peer_host()
        if not self._listener.x_forwarded:
            return tcp_peer, tcp_peer.encode()
        received = request.requestHeaders.getRawHeaders(b"x-forwarded-for") or []
        joined = b", ".join(v.strip() for v in received if v.strip())
        client = tcp_peer
        if joined:
            last = joined.rsplit(b",", 1)[-1].strip().decode("latin-1")
            try:
                client = str(ipaddress.ip_address(last))
            except ValueError:
                # Not an address: no client address at all (it matches no
                # `source_ips`), rather than the terminator's own.
                client = "-"
            return client, joined + b", " + tcp_peer.encode()
        return client, tcp_peer.encode()

    def peer(self, request: BorderRequest) -> str:
        return self._forwarded_for(request)[0]

    # -- the decision order ------------------------------------------------

    def _route(self, request: BorderRequest, policy: Policy) -> tuple[InternalHomeserver, bool]:
        """Row 1: the Host names an internal homeserver (and the SNI agrees)."""
        hosts = request.requestHeaders.getRawHeaders(b"host") or []
        if len(hosts) != 1:
            raise _not_found("no single Host header", "unknown_host")
        try:
            host, port = parse_authority(hosts[0].decode("ascii"))
        except (UnicodeDecodeError, HostParseError):
            raise _not_found("Host names no server behind this gateway", "unknown_host")
        internal = policy.internal_for_host(host, port)
        discovery_only = False
        if internal is None:
            internal = policy.internal_for_server_name(host, port)
            discovery_only = True
        if internal is None:
            raise _not_found("Host names no server behind this gateway", "unknown_host")
        if self._listener.tls:
            sni = request.sni()
            if sni is not None:
                by_sni = policy.internal_for_sni(sni)
                if by_sni is not None and by_sni is not internal:
                    raise _not_found("TLS server name and Host disagree", "sni_mismatch")
        return internal, discovery_only

    async def process(self, request: BorderRequest, ctx: RequestContext) -> None:
        policy = self._rt.policy
        rec = ctx.record
        internal, discovery_only = self._route(request, policy)
        # Row 2: the endpoint table.
        match: Match = match_target(request.method, request.uri)
        endpoint = match.endpoint
        rec.group = endpoint.group
        rec.destination = internal.server_name
        if discovery_only and endpoint.group != "discovery":
            raise _not_found("Host names no server behind this gateway", "unknown_host")
        # Row 3: the global kill switch.
        if self._rt.killswitch.is_killed(None, "inbound"):
            raise _forbidden("the border is closed (kill switch)", "killswitch")
        # Per peer address rate limit, before any expensive work.
        per_ip = policy.config.limits.rate_limit_per_ip
        if per_ip is not None:
            self._rate_limit("ip:" + rec.peer, per_ip, "rate_limited_ip")

        auth: XMatrixAuth | None = None
        origin: ExternalHomeserver | None = None
        if endpoint.authenticated:
            # Row 4: exactly one well-formed X-Matrix header.
            auth = parse_authorization(request.requestHeaders.getRawHeaders(b"authorization"))
            rec.origin = auth.origin
            # Row 5: a trusted, enabled, not killed origin, from its addresses.
            origin = policy.external_by_name.get(auth.origin)
            if origin is None or not origin.enabled:
                raise _forbidden(f"{auth.origin} is not a trusted server", "unknown_origin")
            ctx.server = origin.server_name
            if self._rt.killswitch.is_killed(origin.server_name, "inbound"):
                raise _forbidden(f"{auth.origin} is cut off (kill switch)", "killswitch")
            if origin.source_ips and not _in_networks(rec.peer, origin):
                raise _forbidden(f"{auth.origin} may not connect from {rec.peer}", "source_ip")
            # Row 6: the signed destination is the server this Host routes to.
            if auth.destination != internal.server_name:
                raise _unauthorized(
                    f"destination {auth.destination!r} is not {internal.server_name}",
                    "bad_destination",
                )
        elif endpoint.group not in policy.inbound_groups_any:
            err = _forbidden(f"endpoint group {endpoint.group} is not allowed", "group_not_allowed")
            self.soft_refusal(ctx, err, policy.config.mode)

        # Row 7: the body fits.
        if request.too_large:
            raise SbgError(413, "M_TOO_LARGE", "request body too large", "body_too_large")
        body = request.body()
        # Rows 8 and 9: strict JSON, then the signature over that same parse.
        keys = policy.keyring.keys_for(auth.origin) if auth is not None else {}
        fetcher = self._rt.key_fetcher
        if origin is not None:
            keys = fetcher.keys_for(origin, keys)
        method = request.method.decode("ascii")

        async def parse_and_verify(keys: Any) -> dict[str, Any] | None:
            args = (body, endpoint.json_body, auth, method, request.uri, internal.server_name, keys)
            if len(body) > THREAD_THRESHOLD:
                parsed: dict[str, Any] | None = await threads.deferToThreadPool(
                    self._rt.reactor,
                    self._rt.reactor.getThreadPool(),
                    _parse_and_verify,
                    *args,
                )
                return parsed
            return _parse_and_verify(*args)

        try:
            content = await parse_and_verify(keys)
        except SbgError as e:
            # Row 9, `key_fetch: fetch`: an unknown key id may be a rotated
            # key; ask the server (at most once a minute) and retry once.
            if e.code != "unknown_key" or origin is None or auth is None:
                raise
            if origin.key_fetch != "fetch":
                raise
            if not await fetcher.refresh(origin, policy.config.outbound):
                raise
            keys = fetcher.keys_for(origin, policy.keyring.keys_for(auth.origin))
            if auth.key_id not in keys:
                raise
            content = await parse_and_verify(keys)

        if auth is not None and origin is not None:
            # The origin's rate limit, counted only now that the signature
            # proved who it is: nobody can spend a partner's budget.
            level = policy.trust_levels.get(origin.trust_level)
            if level is not None and level.rate_limit is not None:
                self._rate_limit(
                    "origin:" + origin.server_name, level.rate_limit, "rate_limited_origin"
                )
            mode = policy.mode(origin)
            # Row 10: the origin's trust level allows this group inbound.
            if endpoint.group not in policy.groups(origin, "inbound"):
                err = _forbidden(
                    f"endpoint group {endpoint.group} is not allowed for {origin.server_name}",
                    "group_not_allowed",
                )
                self.soft_refusal(ctx, err, mode)
            # Row 11: the origin speaks only for itself.
            if policy.config.inbound.strict_origin_checks:
                try:
                    check_origin_consistency(
                        endpoint.name,
                        match.params,
                        auth.origin,
                        content,
                        internal_servers=policy.internal_names,
                        external_servers=policy.enabled_external_names,
                    )
                except SbgError as err:
                    self.soft_refusal(ctx, err, mode)

        ctx.allow()
        _client, xff = self._forwarded_for(request)
        settings = policy.config.inbound
        with self._rt.inflight.hold(origin.server_name if origin else None, policy.config.limits):
            result = await forward(
                pool=self._rt.upstream_pool(internal),
                request=request,
                x_forwarded_for=xff,
                body=body if request.method in (b"PUT", b"POST") else None,
                clock=self._rt.reactor,
                request_timeout=settings.request_timeout,
                idle_timeout=settings.idle_timeout,
            )
        ctx.record_result(result)

    def _rate_limit(self, key: str, limit: RateLimit, code: str) -> None:
        wait = self._rt.rate_limiter.take(key, limit)
        if wait > 0:
            raise RateLimited(int(wait * 1000) + 1, code)


def _in_networks(peer: str, server: ExternalHomeserver) -> bool:
    try:
        addr = ipaddress.ip_address(peer)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in server.source_ips)
