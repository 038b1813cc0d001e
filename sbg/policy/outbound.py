"""Outbound decisions (internal homeserver -> external homeserver), pure.

The outbound decision order (`docs/decisions.md`, outbound steps), as
functions of facts:

- `decide_connect`: a proxy request head (steps 3-9): proxy credentials
  first, then only `CONNECT` to a destination some enabled external server
  (or an allowed non-Matrix URL) answers for, no kill switch covering it.
- `decide_request`: each request inside an accepted tunnel (steps 11-19),
  under the policy in force when it arrives (a reload applies to open
  tunnels at once).
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from sbg import reasons
from sbg.config.model import ExternalHomeserver, NonMatrixURL, ProxyAuth
from sbg.hosts import HostParseError, format_authority, parse_authority, parse_connect_target
from sbg.matrix.endpoints import Match, check_dot_segments, match_target
from sbg.matrix.xmatrix import XMatrixAuth, parse_authorization
from sbg.policy.decision import Decision, Verdict
from sbg.policy.snapshot import Policy
from sbg.reasons import Refusal

TunnelKind = Literal["federation", "client", "discovery", "non_matrix"]
# `killed(server)`: whether the global outbound switch or `server`'s is on.
Killed = Callable[[str | None], bool]
PROXY_CHALLENGE = (("Proxy-Authenticate", 'Basic realm="sbg"'),)


@dataclass(frozen=True)
class Tunnel:
    """What a CONNECT target is under one policy.

    Attributes:
        connect_host, connect_port: the CONNECT target.
        kind: a federation host, a client host (legacy media), a server
            name on 443 (discovery), or an allowed non-Matrix URL.
        server: the external server (None for a non-Matrix URL).
        non_matrix: the allowed URL entries for this host and port.
    """

    connect_host: str
    connect_port: int
    kind: TunnelKind
    server: ExternalHomeserver | None = None
    non_matrix: tuple[NonMatrixURL, ...] = ()
    # The server's name (None for a non-Matrix URL), read on every request.
    server_name: str | None = field(init=False, compare=False)

    def __post_init__(self) -> None:
        name = self.server.server_name if self.server is not None else None
        object.__setattr__(self, "server_name", name)

    def describe(self) -> str:
        target = format_authority(self.connect_host, self.connect_port)
        if self.kind == "non_matrix":
            return f"tunnel to {target} (allowed non-Matrix URL)"
        return f"tunnel to {target} ({self.kind} host of {self.server_name})"

    def same_as(self, other: Tunnel) -> bool:
        return (self.kind, self.server_name) == (other.kind, other.server_name)


def classify(policy: Policy, host: str, port: int) -> Tunnel | None:
    """What a CONNECT to host:port is under `policy`, or None (refused)."""
    kind: TunnelKind = "federation"
    server = policy.external_for_federation_host(host, port)
    if server is None:
        server = policy.external_for_client_host(host, port)
        kind = "client"
    if server is None and port == 443:
        server = policy.external_for_server_name(host, port)
        kind = "discovery"
    if server is not None and server.enabled:
        return Tunnel(host, port, kind, server=server)
    entries = tuple(
        e
        for e in policy.config.outbound.allowed_non_matrix_urls
        if e.host == host and e.port == port
    )
    if entries:
        return Tunnel(host, port, "non_matrix", non_matrix=entries)
    return None


# -- the CONNECT head ------------------------------------------------------


@dataclass(frozen=True)
class ConnectFacts:
    """A proxy request head as the outbound listener received it.

    Attributes:
        method, target: the request line's method and target.
        proxy_authorization: every `Proxy-Authorization` value.
        open_tunnels: tunnels this process has open now.
        has_ca: whether an interception CA is loaded.
    """

    method: bytes
    target: bytes
    proxy_authorization: Sequence[bytes]
    open_tunnels: int
    has_ca: bool


def check_proxy_auth(auth: ProxyAuth | None, values: Sequence[bytes]) -> None:
    """Step 3: Basic proxy credentials, when `proxy_auth` is configured."""
    if auth is None:
        return
    if len(values) != 1:
        raise Refusal(reasons.PROXY_AUTH, "proxy credentials required")
    scheme, _, encoded = values[0].partition(b" ")
    if scheme.lower() != b"basic":
        raise Refusal(reasons.PROXY_AUTH, "proxy credentials required")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise Refusal(reasons.PROXY_AUTH, "malformed proxy credentials") from None
    expected = f"{auth.username}:{auth.password or ''}".encode()
    if auth.password is None or not hmac.compare_digest(decoded, expected):
        raise Refusal(reasons.PROXY_AUTH, "wrong proxy credentials")


@dataclass
class Connect:
    """The decision on a proxy request head: the tunnel, or a refusal (with
    the tunnel it would have been, when the target was classified)."""

    refusal: Refusal | None = None
    tunnel: Tunnel | None = None


def decide_connect(policy: Policy, facts: ConnectFacts, killed: Killed) -> Connect:
    """Steps 3-9: the tunnel a proxy request head opens (proxy credentials
    before anything else, the 403 for plain-HTTP requests included)."""
    out = Connect()
    try:
        _decide_connect(policy, facts, killed, out)
    except Refusal as refusal:
        out.refusal = refusal
    return out


def _decide_connect(policy: Policy, facts: ConnectFacts, killed: Killed, out: Connect) -> None:
    check_proxy_auth(policy.config.outbound.proxy_auth, facts.proxy_authorization)
    if facts.method != b"CONNECT":
        if facts.target.lower().startswith(b"http://"):
            raise Refusal(reasons.PLAIN_HTTP, "plain HTTP is not proxied: federation is HTTPS only")
        raise Refusal(reasons.METHOD_NOT_ALLOWED, "only CONNECT is supported")
    try:
        host, port = parse_connect_target(facts.target.decode("ascii"))
    except (UnicodeDecodeError, HostParseError):
        raise Refusal(reasons.MALFORMED_REQUEST, "malformed CONNECT target") from None
    if facts.open_tunnels >= policy.config.limits.max_tunnels:
        raise Refusal(reasons.OVERLOADED, "too many open tunnels")
    tunnel = out.tunnel = classify(policy, host, port)
    if tunnel is None:
        raise Refusal(
            reasons.UNKNOWN_DESTINATION,
            f"{format_authority(host, port)} is not a trusted destination",
        )
    if killed(tunnel.server_name):
        raise Refusal(
            reasons.KILLSWITCH, f"{tunnel.server_name or 'the border'} is cut off (kill switch)"
        )
    if not facts.has_ca:  # every tunnel is intercepted
        raise Refusal(reasons.NO_CA, "no interception CA configured")


# -- requests inside a tunnel ----------------------------------------------


@dataclass(frozen=True)
class RequestFacts:
    """A request head inside an intercepted tunnel.

    Attributes:
        host: every `Host` header value.
        sni: the normalised TLS server name, None without one.
        method, target: from the request line.
        authorization: every `Authorization` header value (None: none).
        declared_length: the Content-Length, None when chunked or absent.
    """

    host: Sequence[bytes]
    sni: str | None
    method: bytes
    target: bytes
    authorization: Sequence[bytes] | None
    declared_length: int | None = None


@dataclass
class TunnelRequest:
    """The decision on one request in a tunnel, with the facts established
    on the way (for the audit record, even when refused).

    Attributes:
        refusal: the refusal that stands (None: forward it).
        would_deny: the refusals monitor mode softened.
        tunnel: the tunnel as the current policy sees it.
        tls_name: the name the destination's certificate must be for.
        ca_file: the pinned CA file (None: `default_trust`).
        group: the endpoint group (None for a non-Matrix URL).
        origin: the signing internal server, if signed.
        body_cap: the largest body accepted.
    """

    refusal: Refusal | None = None
    would_deny: tuple[Refusal, ...] = ()
    tunnel: Tunnel | None = None
    tls_name: str = ""
    ca_file: str | None = None
    group: str | None = None
    origin: str | None = None
    body_cap: int = 0

    @property
    def decision(self) -> Decision:
        return Decision(self.refusal, self.would_deny)


def _host(values: Sequence[bytes]) -> tuple[str, int | None]:
    if len(values) != 1:
        raise Refusal(reasons.HOST_MISMATCH, "no single Host header")
    try:
        return parse_authority(values[0].decode("ascii"))
    except (UnicodeDecodeError, HostParseError):
        raise Refusal(reasons.HOST_MISMATCH, "malformed Host header") from None


def _non_matrix(
    policy: Policy, tunnel: Tunnel, facts: RequestFacts, host: str, port: int | None, killed: Killed
) -> TunnelRequest:
    """Step 13: an allowed non-Matrix URL (instead of steps 14-18)."""
    check_dot_segments(facts.target)
    path_query = facts.target.decode("latin-1")
    effective_port = port if port is not None else 443
    entries = [
        e
        for e in tunnel.non_matrix
        if e.host == host
        and e.port == effective_port
        and e.path.fullmatch(path_query)
        and (facts.sni is None or facts.sni == e.host)
    ]
    if not entries:
        raise Refusal(reasons.NON_MATRIX_NOT_ALLOWED, "URL not in allowed_non_matrix_urls")
    method = facts.method.decode("latin-1")
    if not any(method in e.methods for e in entries):
        allowed = ", ".join(sorted({m for e in entries for m in e.methods}))
        raise Refusal(reasons.METHOD_NOT_ALLOWED, f"method not allowed (allowed: {allowed})")
    if killed(None):
        raise Refusal(reasons.KILLSWITCH, "the border is closed (kill switch)")
    return TunnelRequest(tunnel=tunnel, tls_name=host, body_cap=policy.config.inbound.max_body_size)


def _signature(
    policy: Policy, server: ExternalHomeserver, values: Sequence[bytes] | None
) -> XMatrixAuth | Refusal | None:
    """Step 18's facts: the parsed header (None: unsigned) or why it fails."""
    if not values:
        return None
    try:
        auth = parse_authorization(values)
    except Refusal as e:
        return e
    if auth.destination is not None and auth.destination != server.server_name:
        return Refusal(
            reasons.BAD_DESTINATION,
            f"signed destination {auth.destination} is not {server.server_name}",
        )
    if auth.origin not in policy.internal_names:
        return Refusal(reasons.UNKNOWN_ORIGIN, f"{auth.origin} is not an internal server")
    return auth


def _same_server(
    policy: Policy,
    tunnel: Tunnel,
    server: ExternalHomeserver,
    host: str,
    port: int | None,
    sni: str | None,
) -> None:
    """Step 14: the Host and the SNI belong to the CONNECT target's server."""
    if tunnel.kind == "discovery":
        by_host = policy.external_for_server_name(host, port)
    elif tunnel.kind == "client":
        by_host = policy.external_for_client_host(host, port)
    else:
        by_host = policy.external_for_federation_host(host, port)
    if by_host is not server:
        raise Refusal(reasons.HOST_MISMATCH, "Host does not belong to the CONNECT target's server")
    if sni is not None and policy.external_for_sni(sni) is not server:
        raise Refusal(
            reasons.SNI_MISMATCH, "TLS server name does not belong to the CONNECT target's server"
        )


def _federation(
    policy: Policy,
    facts: RequestFacts,
    host: str,
    port: int | None,
    killed: Killed,
    out: TunnelRequest,
) -> None:
    tunnel = out.tunnel
    assert tunnel is not None
    server = tunnel.server
    assert server is not None
    _same_server(policy, tunnel, server, host, port, facts.sni)
    # Step 15: the endpoint table, and what the tunnel's kind carries.
    match: Match = match_target(facts.method, facts.target)
    group = out.group = match.endpoint.group
    if tunnel.kind == "discovery" and group != "discovery":
        raise Refusal(reasons.DISCOVERY_ONLY, "server name on port 443 is for discovery only")
    if tunnel.kind == "client" and group != "legacy_media":
        raise Refusal(reasons.GROUP_NOT_ALLOWED, "client host is for legacy media only")
    # Step 16: kill switch.
    if killed(server.server_name):
        raise Refusal(reasons.KILLSWITCH, f"{server.server_name} is cut off (kill switch)")
    signature = _signature(policy, server, facts.authorization)
    if isinstance(signature, XMatrixAuth):
        out.origin = signature.origin
    # Monitor mode softens step 17 only for what an internal server signed.
    signed = isinstance(signature, XMatrixAuth)
    verdict = Verdict(monitor=signed and policy.mode(server) == "monitor")
    # Step 17: trust level.
    if group not in policy.groups(server, "outbound"):
        verdict.refuse(
            Refusal(
                reasons.GROUP_NOT_ALLOWED,
                f"endpoint group {group} is not allowed for {server.server_name}",
            )
        )
    # Step 18: the signed destination and origin.
    if isinstance(signature, Refusal):
        verdict.refuse(signature)
    elif signature is None and match.endpoint.authenticated:
        verdict.refuse(
            Refusal(reasons.MISSING_AUTH, "federation request without X-Matrix signature")
        )
    # Step 19: the declared body size.
    cap = policy.config.inbound.max_body_size
    if facts.declared_length is not None and facts.declared_length > cap:
        verdict.refuse(Refusal(reasons.BODY_TOO_LARGE, "request body too large"))
    decision = verdict.decision()
    out.refusal, out.would_deny = decision.refusal, decision.would_deny
    out.tls_name, out.ca_file, out.body_cap = host, server.tls_ca, cap


def decide_request(
    policy: Policy, opened: Tunnel, facts: RequestFacts, killed: Killed
) -> TunnelRequest:
    """Steps 11-19 for one request in a tunnel opened as `opened`.

    The tunnel is classified again under `policy`: a reload that disabled
    its server, or made its target something else, refuses the requests of
    tunnels opened before it.
    """
    out = TunnelRequest(tunnel=opened)
    try:
        tunnel = classify(policy, opened.connect_host, opened.connect_port)
        if tunnel is None or not tunnel.same_as(opened):
            raise Refusal(
                reasons.UNKNOWN_DESTINATION,
                "the tunnel's destination is no longer trusted (configuration reloaded)",
            )
        out.tunnel = tunnel
        host, port = _host(facts.host)
        if tunnel.kind == "non_matrix":
            return _non_matrix(policy, tunnel, facts, host, port, killed)
        _federation(policy, facts, host, port, killed, out)
    except Refusal as refusal:
        out.refusal = refusal
    return out
