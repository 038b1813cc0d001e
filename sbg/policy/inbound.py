"""Inbound decisions (external homeserver -> internal homeserver), pure.

The inbound decision order (`docs/decisions.md`, inbound steps 4-21), step
by step, as functions of facts: no Twisted, no I/O, no clock.

- `decide_head`: what the request head decides (steps 4-13): the Host and
  SNI route it to an internal homeserver, the endpoint table knows the
  method and target, no kill switch covers it, an `X-Matrix` header names an
  enabled trusted origin (from its `source_ips`), this destination and one
  of its known keys, and the declared body fits. Answered before any body
  byte is kept.
- `check_signature`, then `parse_body`: the signature over the body as
  received (step 16: see `verify_body_signature`), then the strict JSON
  parse (step 17).
- `decide_trust`: the origin's rate limit (step 18), its trust level (step
  19) and origin consistency (step 20), the last two softened by monitor
  mode.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from sbg import reasons
from sbg.config.model import ExternalHomeserver, InternalHomeserver
from sbg.hosts import HostParseError, parse_authority
from sbg.matrix.endpoints import Match, match_target
from sbg.matrix.jsonbody import parse_json_object
from sbg.matrix.origin import check_origin_consistency
from sbg.matrix.xmatrix import (
    XMatrixAuth,
    parse_authorization,
    verify_body_signature,
    verify_request_signature,
)
from sbg.policy.decision import Decision, Verdict
from sbg.policy.snapshot import Policy
from sbg.reasons import Refusal

if TYPE_CHECKING:
    from signedjson.types import VerifyKey

# The largest body an unauthenticated endpoint (notary key queries,
# 3pid/onbind) may send: it is parsed with no signature to prove anything.
UNAUTHENTICATED_BODY_MAX = 1024 * 1024


class Lookups(Protocol):
    """The runtime state a head decision reads (kill switches, keys)."""

    def killed(self, server: str | None) -> bool:
        """Whether the global inbound switch, or `server`'s, is engaged."""

    def keys_for(self, origin: ExternalHomeserver) -> Mapping[str, VerifyKey]:
        """The origin's usable keys: pinned, and fetched ones if any."""

    def may_refetch(self, origin: ExternalHomeserver) -> bool:
        """Whether an unknown key id may make sbg fetch the origin's keys now."""


@dataclass(frozen=True)
class HeadFacts:
    """What the inbound listener knows once a request's head is in.

    Attributes:
        tls: whether the listener terminates TLS (the SNI is then checked).
        sni: the normalised TLS server name, None without one.
        host: every `Host` header value.
        method: the request method.
        target: the raw request target.
        authorization: every `Authorization` header value (None: none).
        peer: the client address (X-Forwarded-For applied where trusted).
        has_body: whether a body is announced (Content-Length > 0, chunked).
        declared_length: the Content-Length, None when chunked or absent.
        ip_rate_wait: seconds the peer's rate limit says to wait (0: none).
    """

    tls: bool
    sni: str | None
    host: Sequence[bytes]
    method: bytes
    target: bytes
    authorization: Sequence[bytes] | None
    peer: str
    has_body: bool = False
    declared_length: int | None = None
    ip_rate_wait: float = 0.0


@dataclass
class Head:
    """The head decision: a refusal, or an accepted head, with every fact
    established on the way (for the audit record, even when refused).

    Attributes:
        refusal: the row that refused (None: accepted).
        internal: the internal homeserver the Host routes to.
        match: the endpoint and its parameters.
        auth: the X-Matrix header (None for an unauthenticated endpoint).
        origin: the configured origin server (None when unauthenticated).
        keys: the origin's usable keys at head time.
        refetch_key: the key id is unknown but a fetch may find it.
        body_cap: the largest body accepted (0: none).
    """

    refusal: Refusal | None = None
    internal: InternalHomeserver | None = None
    match: Match | None = None
    auth: XMatrixAuth | None = None
    origin: ExternalHomeserver | None = None
    keys: Mapping[str, VerifyKey] = field(default_factory=dict)
    refetch_key: bool = False
    body_cap: int = 0


def _not_found(detail: str) -> Refusal:
    return Refusal(reasons.UNKNOWN_HOST, detail)


def route(
    policy: Policy, host_values: Sequence[bytes], sni: str | None, tls: bool
) -> tuple[InternalHomeserver, bool]:
    """Step 4: the internal homeserver the Host names (and the SNI agrees
    with); True when only its `server_name` matched (discovery only)."""
    if len(host_values) != 1:
        raise _not_found("no single Host header")
    try:
        host, port = parse_authority(host_values[0].decode("ascii"))
    except (UnicodeDecodeError, HostParseError):
        raise _not_found("Host names no server behind this gateway") from None
    internal = policy.internal_for_host(host, port)
    discovery_only = False
    if internal is None:
        internal = policy.internal_for_server_name(host, port)
        discovery_only = True
    if internal is None:
        raise _not_found("Host names no server behind this gateway")
    if tls and sni is not None:
        by_sni = policy.internal_for_sni(sni)
        if by_sni is not None and by_sni is not internal:
            raise Refusal(reasons.SNI_MISMATCH, "TLS server name and Host disagree")
    return internal, discovery_only


def _in_networks(peer: str, server: ExternalHomeserver) -> bool:
    try:
        addr = ipaddress.ip_address(peer)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in server.source_ips)


def _body_cap(policy: Policy, facts: HeadFacts, match: Match, authenticated: bool) -> int:
    """Step 13: the body this endpoint takes, and its cap."""
    if not match.endpoint.json_body:
        if facts.has_body:
            raise Refusal(reasons.UNEXPECTED_BODY, "this endpoint takes no request body")
        return 0
    if not facts.has_body:
        raise Refusal(reasons.BAD_JSON, "the body is empty: a JSON object is required")
    cap = policy.config.inbound.max_body_size
    if not authenticated:
        cap = min(cap, UNAUTHENTICATED_BODY_MAX)
    if facts.declared_length is not None and facts.declared_length > cap:
        raise Refusal(reasons.BODY_TOO_LARGE, "request body too large")
    return cap


def _authenticate(
    policy: Policy, facts: HeadFacts, internal: InternalHomeserver, lookups: Lookups, out: Head
) -> None:
    """Steps 9-12: who signed, for whom, and with a key sbg knows."""
    # Step 9: exactly one well-formed X-Matrix header.
    auth = out.auth = parse_authorization(facts.authorization)
    # Step 10: an enabled trusted origin, not killed, from its addresses.
    origin = policy.external_by_name.get(auth.origin)
    if origin is None or not origin.enabled:
        raise Refusal(reasons.UNKNOWN_ORIGIN, f"{auth.origin} is not a trusted server")
    out.origin = origin
    if lookups.killed(origin.server_name):
        raise Refusal(reasons.KILLSWITCH, f"{auth.origin} is cut off (kill switch)")
    if origin.source_ips and not _in_networks(facts.peer, origin):
        raise Refusal(reasons.SOURCE_IP, f"{auth.origin} may not connect from {facts.peer}")
    # Step 11: the signed destination is the server this Host routes to.
    if auth.destination != internal.server_name:
        raise Refusal(
            reasons.BAD_DESTINATION,
            f"destination {auth.destination!r} is not {internal.server_name}",
        )
    # Step 12: a key sbg knows for this origin (or may fetch: step 15).
    out.keys = lookups.keys_for(origin)
    if auth.key_id not in out.keys:
        if not lookups.may_refetch(origin):
            raise Refusal(reasons.UNKNOWN_KEY, f"no known key {auth.key_id} for {auth.origin}")
        out.refetch_key = True


def decide_head(policy: Policy, facts: HeadFacts, lookups: Lookups) -> Head:
    """Steps 4-13 of the inbound decision order, from the head alone."""
    out = Head()
    try:
        _decide_head(policy, facts, lookups, out)
    except Refusal as refusal:
        out.refusal = refusal
    return out


def _decide_head(policy: Policy, facts: HeadFacts, lookups: Lookups, out: Head) -> None:
    # Step 4: the Host names an internal homeserver.
    internal, discovery_only = route(policy, facts.host, facts.sni, facts.tls)
    out.internal = internal
    # Step 5: the endpoint table.
    match = out.match = match_target(facts.method, facts.target)
    endpoint = match.endpoint
    if discovery_only and endpoint.group != "discovery":
        raise _not_found("Host names no server behind this gateway")
    # Step 6: the global kill switch.
    if lookups.killed(None):
        raise Refusal(reasons.KILLSWITCH, "the border is closed (kill switch)")
    # Step 7: the client address's rate limit.
    if facts.ip_rate_wait > 0:
        raise Refusal(
            reasons.RATE_LIMITED_IP,
            "too many requests",
            retry_after_ms=int(facts.ip_rate_wait * 1000) + 1,
        )
    if not endpoint.authenticated:
        # Step 8. No origin to judge: the group must be one some enabled external
        # server may use. Never softened: nothing proves who is asking.
        if endpoint.group not in policy.inbound_groups_any:
            raise Refusal(
                reasons.GROUP_NOT_ALLOWED, f"endpoint group {endpoint.group} is not allowed"
            )
        out.body_cap = _body_cap(policy, facts, match, authenticated=False)
        return
    _authenticate(policy, facts, internal, lookups, out)
    out.body_cap = _body_cap(policy, facts, match, authenticated=True)


def check_signature(
    head: Head,
    method: str,
    uri: bytes,
    keys: Mapping[str, VerifyKey],
    buffer: bytearray | None,
    start: int,
) -> None:
    """Step 16, before any parse: the signature over the body as received.

    `buffer` holds `CONTENT_PREFIX` and then the body from `start` on (a
    `BodyBuffer`'s), None when the head accepted no body. An
    unauthenticated endpoint has nothing to check.

    Raises:
        Refusal: `unknown_key`, `bad_signature`, or `bad_json` when the
            bounded fallback for non-canonical bodies finds no JSON.
    """
    assert head.internal is not None
    auth = head.auth
    if auth is None:
        return
    internal = head.internal.server_name
    if buffer is None:
        verify_request_signature(auth, method, uri, internal, None, keys)
    else:
        verify_body_signature(auth, method, uri, internal, keys, buffer, start)


def parse_body(head: Head, body: bytes) -> dict[str, Any] | None:
    """Step 17: the body, when the endpoint takes one, as a strict JSON object.

    Raises:
        Refusal: `bad_json`.
    """
    if head.match is None or not head.match.endpoint.json_body:
        return None
    return parse_json_object(body)


def decide_trust(
    policy: Policy,
    head: Head,
    content: Mapping[str, Any] | None,
    origin_rate_wait: float = 0.0,
) -> Decision:
    """Steps 18 (the origin's rate limit), 19 (trust level) and 20 (origin
    consistency) for an authenticated request; monitor mode softens the
    last two. An unauthenticated request was decided by its head."""
    auth, origin, match = head.auth, head.origin, head.match
    if auth is None or origin is None or match is None:
        return Decision()
    if origin_rate_wait > 0:
        return Decision(
            Refusal(
                reasons.RATE_LIMITED_ORIGIN,
                "too many requests",
                retry_after_ms=int(origin_rate_wait * 1000) + 1,
            )
        )
    verdict = Verdict(monitor=policy.mode(origin) == "monitor")
    group = match.endpoint.group
    # Step 19: the origin's trust level allows this group inbound.
    if group not in policy.groups(origin, "inbound"):
        verdict.refuse(
            Refusal(
                reasons.GROUP_NOT_ALLOWED,
                f"endpoint group {group} is not allowed for {origin.server_name}",
            )
        )
    # Step 20: the origin speaks only for itself.
    if not verdict.stopped and policy.config.inbound.strict_origin_checks:
        try:
            check_origin_consistency(
                match.endpoint.name,
                match.params,
                auth.origin,
                content,
                internal_servers=policy.internal_names,
                external_servers=policy.enabled_external_names,
            )
        except Refusal as refusal:
            verdict.refuse(refusal)
    return verdict.decision()
