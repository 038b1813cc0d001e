"""Outbound: the requests inside an intercepted tunnel (contract 7, rows 3-7).

One `OutboundHandler` serves one tunnel, under the policy snapshot the
tunnel was accepted with; the kill switch is read live, so an engaged switch
applies to open tunnels at once.
"""

from __future__ import annotations

from sbg.errors import SbgError
from sbg.hosts import HostParseError, parse_authority
from sbg.http.forward import UpstreamError, forward
from sbg.http.pipeline import Pipeline, RequestContext
from sbg.http.site import BorderRequest
from sbg.matrix.endpoints import match_target
from sbg.matrix.xmatrix import parse_authorization
from sbg.outbound.state import OutboundState, Tunnel
from sbg.tls.client import NoUpstreamTrust
from sbg.tls.pem import PemError


def _forbidden(reason: str, code: str) -> SbgError:
    return SbgError(403, "M_FORBIDDEN", reason, code)


class OutboundHandler(Pipeline):
    direction = "outbound"

    def __init__(self, state: OutboundState, tunnel: Tunnel) -> None:
        super().__init__(state.runtime.audit, state.runtime.metrics, state.tracker)
        self._state = state
        self._tunnel = tunnel

    def header_timeout(self) -> float:
        return self._state.runtime.policy.config.limits.header_timeout

    def max_body_size(self) -> int:
        return self._state.runtime.policy.config.inbound.max_body_size

    async def process(self, request: BorderRequest, ctx: RequestContext) -> None:
        tunnel = self._tunnel
        tunnel.active_requests += 1
        try:
            await self._process(request, ctx)
        finally:
            tunnel.active_requests -= 1

    def _host(self, request: BorderRequest) -> tuple[str, int | None]:
        hosts = request.requestHeaders.getRawHeaders(b"host") or []
        if len(hosts) != 1:
            raise _forbidden("no single Host header", "host_mismatch")
        try:
            return parse_authority(hosts[0].decode("ascii"))
        except (UnicodeDecodeError, HostParseError):
            raise _forbidden("malformed Host header", "host_mismatch")

    async def _process(self, request: BorderRequest, ctx: RequestContext) -> None:
        # Every request is decided under the current policy: a reload that
        # disables a server or narrows its trust level applies to the
        # requests of tunnels opened before it, not only to new tunnels.
        opened = self._tunnel
        tunnel = self._state.classify(
            self._state.runtime.policy, opened.connect_host, opened.connect_port
        )
        if tunnel is None or (tunnel.kind, tunnel.server_name) != (
            opened.kind,
            opened.server_name,
        ):
            ctx.record.destination = opened.server_name
            raise _forbidden(
                "the tunnel's destination is no longer trusted (configuration reloaded)",
                "unknown_destination",
            )
        policy = tunnel.policy
        rec = ctx.record
        rec.destination = tunnel.server_name
        ctx.server = tunnel.metric_server
        ks = self._state.runtime.killswitch
        host, port = self._host(request)
        sni = request.sni()
        settings = policy.config.outbound

        if tunnel.kind == "non_matrix":
            # Row 4 for a non-Matrix entry: its host, and its path regex.
            path_query = request.uri.decode("latin-1")
            effective_port = port if port is not None else 443
            if not any(
                e.host == host
                and e.port == effective_port
                and e.path.fullmatch(path_query)
                and (sni is None or sni == e.host)
                for e in tunnel.non_matrix
            ):
                raise SbgError(
                    404,
                    "M_UNRECOGNIZED",
                    "URL not in allowed_non_matrix_urls",
                    "non_matrix_not_allowed",
                )
            if ks.is_killed(None, "outbound"):
                raise _forbidden("the border is closed (kill switch)", "killswitch")
            ctx.allow()
            await self._forward(tunnel, request, ctx, host, None, settings.default_trust)
            return

        server = tunnel.server
        assert server is not None
        # Row 3: SNI and Host belong to the CONNECT target's server.
        if tunnel.kind == "discovery":
            by_host = policy.external_for_server_name(host, port)
        elif tunnel.kind == "client":
            by_host = policy.external_for_client_host(host, port)
        else:
            by_host = policy.external_for_federation_host(host, port)
        if by_host is not server:
            raise _forbidden("Host does not belong to the CONNECT target's server", "host_mismatch")
        if sni is not None and policy.external_for_sni(sni) is not server:
            raise _forbidden(
                "TLS server name does not belong to the CONNECT target's server", "sni_mismatch"
            )
        # Row 4: the endpoint table.
        match = match_target(request.method, request.uri)
        group = match.endpoint.group
        rec.group = group
        if tunnel.kind == "discovery" and group != "discovery":
            raise _forbidden("server name on port 443 is for discovery only", "discovery_only")
        if tunnel.kind == "client" and group != "legacy_media":
            raise _forbidden("client host is for legacy media only", "group_not_allowed")
        # Row 5: kill switch.
        if ks.is_killed(server.server_name, "outbound"):
            raise _forbidden(f"{server.server_name} is cut off (kill switch)", "killswitch")
        # Row 6: trust level (monitor mode lets it through, logged).
        if group not in policy.groups(server, "outbound"):
            err = _forbidden(
                f"endpoint group {group} is not allowed for {server.server_name}",
                "group_not_allowed",
            )
            self.soft_refusal(ctx, err, policy.mode(server))
        # Row 7: the signed destination and origin.
        auth_headers = request.requestHeaders.getRawHeaders(b"authorization")
        if auth_headers:
            try:
                auth = parse_authorization(auth_headers)
            except SbgError as e:
                raise _forbidden(e.reason, e.code)
            rec.origin = auth.origin
            if auth.destination is not None and auth.destination != server.server_name:
                raise _forbidden(
                    f"signed destination {auth.destination} is not {server.server_name}",
                    "bad_destination",
                )
            if auth.origin not in policy.internal_names:
                raise _forbidden(f"{auth.origin} is not an internal server", "unknown_origin")
        elif match.endpoint.authenticated:
            raise _forbidden("federation request without X-Matrix signature", "missing_auth")
        if request.too_large:
            raise SbgError(413, "M_TOO_LARGE", "request body too large", "body_too_large")
        ctx.allow()
        await self._forward(tunnel, request, ctx, host, server.tls_ca, settings.default_trust)

    async def _forward(
        self,
        tunnel: Tunnel,
        request: BorderRequest,
        ctx: RequestContext,
        tls_name: str,
        ca_file: str | None,
        default_trust: str,
    ) -> None:
        settings = tunnel.policy.config.outbound
        try:
            pool = self._state.pool_for(
                tunnel, tls_name, (ca_file,) if ca_file else None, default_trust
            )
        except (NoUpstreamTrust, PemError) as e:
            # Nothing to verify the destination against: the contract's
            # "TLS to the destination fails verification", a 502.
            raise UpstreamError(502, "tls", f"no usable trust for {tls_name}: {e}")
        # The connection goes where the tunnel's endpoint says, and Host is
        # sent as received.
        with self._state.runtime.inflight.hold(tunnel.server_name, tunnel.policy.config.limits):
            result = await forward(
                pool=pool,
                request=request,
                # Internal addresses are not the external servers' business.
                x_forwarded_for=None,
                body=request.body() if request.method in (b"PUT", b"POST") else None,
                clock=self._state.runtime.reactor,
                request_timeout=settings.request_timeout,
                idle_timeout=settings.idle_timeout,
            )
        ctx.record_result(result)
