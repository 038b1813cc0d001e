"""Every refusal sbg can answer, in one table: code, status, errcode, meaning.

A refusal is raised as `Refusal(REASON, "detail for this request")`; the
answer's status and Matrix errcode come from the table, per direction (a
few reasons answer an outbound client differently: the internal homeserver
gets 403 where an external one would get 401). The codes are the `reason`
label of `sbg_refusals_total` and the `code` of audit records: a fixed set,
never free text. `docs/reason-codes.md` is rendered from this table
(`python -m sbg.reasons`) and a test keeps the two identical.

This module imports nothing from sbg: every layer may raise a refusal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Direction = Literal["inbound", "outbound"]


@dataclass(frozen=True)
class Reason:
    """One row of the table.

    Attributes:
        code: the short fixed code (metric label, audit `code`).
        status: the HTTP status answered (0: the connection is closed
            without an answer).
        errcode: the Matrix errcode of the JSON error body.
        meaning: what it means, for the operator (the docs' table).
        outbound: (status, errcode) answered to an internal homeserver
            when it differs from the inbound answer.
        soft: monitor mode may turn this refusal into a logged
            `would_deny` (trust levels and origin consistency), and only for
            a request whose signature verified (inbound) or that an internal
            homeserver signed (outbound).
        counted: whether it counts in `sbg_refusals_total` (a bug in sbg,
            `internal_error`, does not).
    """

    code: str
    status: int
    errcode: str
    meaning: str
    outbound: tuple[int, str] | None = None
    soft: bool = False
    counted: bool = True

    def answer(self, direction: Direction) -> tuple[int, str]:
        """(status, errcode) for a request of `direction`."""
        if direction == "outbound" and self.outbound is not None:
            return self.outbound
        return self.status, self.errcode


_NOT_FOUND = "M_UNRECOGNIZED"
_FORBIDDEN = "M_FORBIDDEN"
_UNAUTHORIZED = "M_UNAUTHORIZED"
_OUT_FORBIDDEN = (403, _FORBIDDEN)

# Routing and the endpoint table.
UNKNOWN_HOST = Reason(
    "unknown_host", 404, _NOT_FOUND, "the Host names no internal homeserver (inbound)"
)
SNI_MISMATCH = Reason(
    "sni_mismatch",
    404,
    _NOT_FOUND,
    "the TLS server name and the Host name different servers",
    outbound=_OUT_FORBIDDEN,
)
MALFORMED_TARGET = Reason(
    "malformed_target",
    400,
    _NOT_FOUND,
    "a malformed request target: absolute-form, `.`/`..` segments (also encoded), `//`, "
    "control characters, bad percent-escapes",
)
UNKNOWN_ENDPOINT = Reason("unknown_endpoint", 404, _NOT_FOUND, "not in the endpoint table")
METHOD_NOT_ALLOWED = Reason(
    "method_not_allowed",
    405,
    _NOT_FOUND,
    "the path exists with another method (outbound listener: anything but CONNECT; "
    "an allowed non-Matrix URL: a method its entry does not list)",
)
# Kill switch.
KILLSWITCH = Reason("killswitch", 403, _FORBIDDEN, "a kill switch covers this request or tunnel")
CLUSTER_UNREACHABLE = Reason(
    "cluster_unreachable",
    503,
    "M_UNKNOWN",
    "admin API: a kill-switch lift refused while the cluster's Redis is unreachable or did not "
    "confirm it (lifting on one node only would split the border); nothing was lifted. Not "
    "counted in `sbg_refusals_total`",
    counted=False,
)
# Authentication.
MISSING_AUTH = Reason(
    "missing_auth",
    401,
    _UNAUTHORIZED,
    "an authenticated endpoint without `X-Matrix` authorization",
    outbound=_OUT_FORBIDDEN,
)
MULTIPLE_AUTH = Reason(
    "multiple_auth",
    401,
    _UNAUTHORIZED,
    "more than one `Authorization` header",
    outbound=_OUT_FORBIDDEN,
)
MALFORMED_AUTH = Reason(
    "malformed_auth",
    401,
    _UNAUTHORIZED,
    "an `X-Matrix` header outside the strict grammar",
    outbound=_OUT_FORBIDDEN,
)
UNKNOWN_ORIGIN = Reason(
    "unknown_origin",
    403,
    _FORBIDDEN,
    "the origin is not an enabled external server (outbound: not an internal server)",
)
SOURCE_IP = Reason(
    "source_ip", 403, _FORBIDDEN, "the peer address is outside the origin's `source_ips`"
)
BAD_DESTINATION = Reason(
    "bad_destination",
    401,
    _UNAUTHORIZED,
    "the signed destination is missing or not the server this request is for",
    outbound=_OUT_FORBIDDEN,
)
UNKNOWN_KEY = Reason(
    "unknown_key",
    401,
    _UNAUTHORIZED,
    "the signing key id is not pinned (nor fetched) for the origin",
)
BAD_SIGNATURE = Reason(
    "bad_signature",
    401,
    _UNAUTHORIZED,
    "the signature does not verify (a body over 1 MiB must be sent as canonical JSON, as "
    "Synapse sends it)",
)
# Bodies.
BODY_TOO_LARGE = Reason("body_too_large", 413, "M_TOO_LARGE", "a body above `max_body_size`")
BAD_JSON = Reason("bad_json", 400, "M_NOT_JSON", "a body that is not a strict UTF-8 JSON object")
UNEXPECTED_BODY = Reason(
    "unexpected_body", 400, "M_NOT_JSON", "a body on an endpoint that takes none"
)
BUFFER_FULL = Reason(
    "buffer_full",
    503,
    "M_UNKNOWN",
    "`limits.max_buffered_bytes` of request bodies already held: retry later (`Retry-After`)",
)
# Trust levels.
GROUP_NOT_ALLOWED = Reason(
    "group_not_allowed",
    403,
    _FORBIDDEN,
    "the endpoint group is not in the trust level (for an unauthenticated endpoint: in no "
    "enabled external server's trust level)",
    soft=True,
)
# Origin consistency: the origin speaks only for itself.
ORIGIN_MISMATCH = Reason(
    "origin_mismatch",
    403,
    _FORBIDDEN,
    "a transaction's `origin` is not the signing server",
    soft=True,
)
PDU_SENDER_MISMATCH = Reason(
    "pdu_sender_mismatch", 403, _FORBIDDEN, "a PDU sent for another server's user", soft=True
)
EDU_USER_MISMATCH = Reason(
    "edu_user_mismatch", 403, _FORBIDDEN, "an EDU about another server's user", soft=True
)
TO_DEVICE_SENDER_MISMATCH = Reason(
    "to_device_sender_mismatch",
    403,
    _FORBIDDEN,
    "a to-device message sent as another server's user",
    soft=True,
)
MEMBERSHIP_USER_MISMATCH = Reason(
    "membership_user_mismatch",
    403,
    _FORBIDDEN,
    "a make/send join, leave, knock or invite for another server's user",
    soft=True,
)
IMPERSONATES_INTERNAL_USER = Reason(
    "impersonates_internal_user",
    403,
    _FORBIDDEN,
    "speaking as a user of an internal server",
    soft=True,
)
MALFORMED_CONTENT = Reason(
    "malformed_content",
    403,
    _FORBIDDEN,
    "a body whose user ids or shapes cannot be checked",
    soft=True,
)
UNTRUSTED_RELAYED_SENDER = Reason(
    "untrusted_relayed_sender",
    403,
    _FORBIDDEN,
    "a relayed membership of a user of a server sbg does not trust",
    soft=True,
)
# Joins: a send_join follows a make_join this homeserver answered.
JOIN_NOT_PREPARED = Reason(
    "join_not_prepared",
    403,
    _FORBIDDEN,
    "a `send_join` that no `make_join` answered 200 by the internal homeserver (for this "
    "origin, room and user, within 10 minutes) prepared: a hand-crafted join, which the room "
    "rules could otherwise only undo",
    soft=True,
)
# The outbound proxy.
PLAIN_HTTP = Reason(
    "plain_http", 403, _FORBIDDEN, "an absolute-form plain-HTTP proxy request (HTTPS only)"
)
PROXY_AUTH = Reason("proxy_auth", 407, _FORBIDDEN, "missing or wrong proxy credentials")
MALFORMED_REQUEST = Reason(
    "malformed_request",
    400,
    _NOT_FOUND,
    "a malformed proxy request head, or ambiguous message framing",
)
UNKNOWN_DESTINATION = Reason(
    "unknown_destination",
    403,
    _FORBIDDEN,
    "the CONNECT target is no enabled external server nor allowed URL (or no longer, after a "
    "reload)",
)
HOST_MISMATCH = Reason(
    "host_mismatch", 403, _FORBIDDEN, "the Host does not belong to the CONNECT target's server"
)
DISCOVERY_ONLY = Reason(
    "discovery_only", 403, _FORBIDDEN, "a `server_name:443` tunnel used beyond discovery"
)
NON_MATRIX_NOT_ALLOWED = Reason(
    "non_matrix_not_allowed", 404, _NOT_FOUND, "not matched by `allowed_non_matrix_urls`"
)
NO_CA = Reason(
    "no_ca", 403, _FORBIDDEN, "a tunnel needs interception but `outbound.ca` is not configured"
)
# Resource limits.
OVERLOADED = Reason(
    "overloaded",
    503,
    "M_LIMIT_EXCEEDED",
    "`limits.max_tunnels` open tunnels, or `limits.max_inflight_upstream` / "
    "`max_inflight_per_server` requests being forwarded",
)
RATE_LIMITED_IP = Reason(
    "rate_limited_ip", 429, "M_LIMIT_EXCEEDED", "`limits.rate_limit_per_ip` exceeded"
)
RATE_LIMITED_ORIGIN = Reason(
    "rate_limited_origin", 429, "M_LIMIT_EXCEEDED", "the trust level's `rate_limit` exceeded"
)
HEADER_TIMEOUT = Reason(
    "header_timeout",
    0,
    "M_UNKNOWN",
    "a request (or `CONNECT` head) not received within `limits.header_timeout`: connection closed",
)
MAX_CONNECTIONS = Reason(
    "max_connections", 0, "M_UNKNOWN", "connection closed at accept: `limits.max_connections`"
)
MAX_CONNECTIONS_PER_IP = Reason(
    "max_connections_per_ip",
    0,
    "M_UNKNOWN",
    "connection closed at accept: `limits.max_connections_per_ip`",
)
INTERNAL_ERROR = Reason(
    "internal_error",
    500,
    "M_UNKNOWN",
    "a bug in sbg (logged with its traceback; not counted as a refusal)",
    counted=False,
)

REASONS: tuple[Reason, ...] = tuple(v for v in list(globals().values()) if isinstance(v, Reason))
BY_CODE: dict[str, Reason] = {r.code: r for r in REASONS}
REFUSAL_CODES: frozenset[str] = frozenset(BY_CODE)


class Refusal(Exception):
    """A request refused for `reason`, with a human detail for this request.

    `retry_after_ms` is set for the answers that tell the client when to
    come back (rate limits, a full body buffer).
    """

    def __init__(self, reason: Reason, detail: str, *, retry_after_ms: int | None = None) -> None:
        super().__init__(detail)
        self.kind = reason
        self.reason = detail
        self.retry_after_ms = retry_after_ms

    @property
    def code(self) -> str:
        return self.kind.code

    @property
    def status(self) -> int:
        return self.kind.status

    @property
    def errcode(self) -> str:
        return self.kind.errcode

    def answer(self, direction: Direction) -> tuple[int, str]:
        return self.kind.answer(direction)


def render_table() -> str:
    """The Markdown table of every reason (docs/reason-codes.md's body)."""
    lines = [
        "| code | status | errcode | meaning |",
        "|---|---|---|---|",
    ]
    for r in REASONS:
        status = str(r.status) if r.status else "—"
        errcode = f"`{r.errcode}`" if r.status else "—"
        if r.outbound is not None:
            status += f" (outbound: {r.outbound[0]})"
            if r.outbound[1] != r.errcode:
                errcode += f" (outbound: `{r.outbound[1]}`)"
        flags = " Softened by monitor mode." if r.soft else ""
        lines.append(f"| `{r.code}` | {status} | {errcode} | {r.meaning}.{flags} |")
    return "\n".join(lines) + "\n"


_DOC_START = "<!-- generated by `python -m sbg.reasons`: start -->\n"
_DOC_END = "<!-- generated: end -->\n"


def _write(path: str) -> None:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    head, _, rest = text.partition(_DOC_START)
    _, _, tail = rest.partition(_DOC_END)
    with open(path, "w", encoding="utf-8") as f:
        f.write(head + _DOC_START + render_table() + _DOC_END + tail)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--write"]:
        _write(sys.argv[2] if len(sys.argv) > 2 else "docs/reason-codes.md")
    else:
        print(render_table(), end="")
