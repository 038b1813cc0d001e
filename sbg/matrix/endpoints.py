"""The endpoint-group table and the one request-target matcher.

Every federation endpoint sbg lets across the border is one `Endpoint` in
`ENDPOINTS` (docs/endpoints.md); `match_target` is the only place a request
target is matched against it, for both directions.

Matching follows Synapse's router: the raw path (before `?`) is split on `/`
first and each segment is then percent-decoded once (strict UTF-8), so a
`%2F` stays inside its segment. Literal segments must equal the template text
exactly; a parameter is exactly one non-empty segment, checked lightly against
the identifier grammar of its slot. The table is compiled at import into a
segment trie, so a match costs one dictionary lookup per segment.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from sbg import reasons
from sbg.hosts import is_server_name
from sbg.matrix.groups import GROUPS
from sbg.reasons import Refusal

# --------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """One federation endpoint: a method and a path template.

    Attributes:
        name: short stable id, e.g. `send`, `send_join_v2`.
        method: `GET`, `PUT` or `POST`.
        template: the path, `{name}` marking a one-segment parameter.
        group: the endpoint group (one of `sbg.matrix.groups.GROUPS`).
        authenticated: whether an `X-Matrix` Authorization header is required.
        json_body: whether the request carries a JSON object body.
    """

    name: str
    method: str
    template: str
    group: str
    authenticated: bool
    json_body: bool

    @property
    def param_names(self) -> tuple[str, ...]:
        """The template's parameter names, in path order."""
        return tuple(s[1:-1] for s in self.template.split("/") if s.startswith("{"))


@dataclass(frozen=True)
class Match:
    """A request target that matched an endpoint.

    Attributes:
        endpoint: the matched entry (for HEAD, the GET entry).
        params: the decoded parameter values by template name.
        path: the raw path without the query string (for logs).
    """

    endpoint: Endpoint
    params: Mapping[str, str]
    path: bytes


_F1 = "/_matrix/federation/v1"
_F2 = "/_matrix/federation/v2"
_FU = "/_matrix/federation/unstable"
_K2 = "/_matrix/key/v2"


def _e(
    name: str, method: str, template: str, group: str, auth: bool = True, body: bool = False
) -> Endpoint:
    return Endpoint(name, method, template, group, auth, body)


def _legacy_media(version: str) -> tuple[Endpoint, ...]:
    prefix = f"/_matrix/media/{version}"
    suffix = "" if version == "v3" else f"_{version}"
    return (
        _e(
            f"legacy_media_download{suffix}",
            "GET",
            f"{prefix}/download/{{serverName}}/{{mediaId}}",
            "legacy_media",
            auth=False,
        ),
        _e(
            f"legacy_media_download_filename{suffix}",
            "GET",
            f"{prefix}/download/{{serverName}}/{{mediaId}}/{{fileName}}",
            "legacy_media",
            auth=False,
        ),
        _e(
            f"legacy_media_thumbnail{suffix}",
            "GET",
            f"{prefix}/thumbnail/{{serverName}}/{{mediaId}}",
            "legacy_media",
            auth=False,
        ),
    )


ENDPOINTS: tuple[Endpoint, ...] = (
    # discovery
    _e("well_known_server", "GET", "/.well-known/matrix/server", "discovery", auth=False),
    _e("version", "GET", f"{_F1}/version", "discovery", auth=False),
    # keys (the spec dropped /server/{keyId}; Synapse never sends it)
    _e("key_server", "GET", f"{_K2}/server", "keys", auth=False),
    _e("key_query", "GET", f"{_K2}/query/{{serverName}}", "key_query", auth=False),
    _e("key_query_batch", "POST", f"{_K2}/query", "key_query", auth=False, body=True),
    # transactions
    _e("send", "PUT", f"{_F1}/send/{{txnId}}", "transactions", body=True),
    # events
    _e("event_auth", "GET", f"{_F1}/event_auth/{{roomId}}/{{eventId}}", "events"),
    _e("backfill", "GET", f"{_F1}/backfill/{{roomId}}", "events"),
    _e("get_missing_events", "POST", f"{_F1}/get_missing_events/{{roomId}}", "events", body=True),
    _e("event", "GET", f"{_F1}/event/{{eventId}}", "events"),
    _e("state", "GET", f"{_F1}/state/{{roomId}}", "events"),
    _e("state_ids", "GET", f"{_F1}/state_ids/{{roomId}}", "events"),
    _e("timestamp_to_event", "GET", f"{_F1}/timestamp_to_event/{{roomId}}", "events"),
    # joins (v1 send_join left the spec in v1.18; Synapse still falls back to it)
    _e("make_join", "GET", f"{_F1}/make_join/{{roomId}}/{{userId}}", "joins"),
    _e("send_join", "PUT", f"{_F1}/send_join/{{roomId}}/{{eventId}}", "joins", body=True),
    _e("send_join_v2", "PUT", f"{_F2}/send_join/{{roomId}}/{{eventId}}", "joins", body=True),
    # leaves
    _e("make_leave", "GET", f"{_F1}/make_leave/{{roomId}}/{{userId}}", "leaves"),
    _e("send_leave", "PUT", f"{_F1}/send_leave/{{roomId}}/{{eventId}}", "leaves", body=True),
    _e("send_leave_v2", "PUT", f"{_F2}/send_leave/{{roomId}}/{{eventId}}", "leaves", body=True),
    # knocks
    _e("make_knock", "GET", f"{_F1}/make_knock/{{roomId}}/{{userId}}", "knocks"),
    _e("send_knock", "PUT", f"{_F1}/send_knock/{{roomId}}/{{eventId}}", "knocks", body=True),
    # invites
    _e("invite", "PUT", f"{_F1}/invite/{{roomId}}/{{eventId}}", "invites", body=True),
    _e("invite_v2", "PUT", f"{_F2}/invite/{{roomId}}/{{eventId}}", "invites", body=True),
    # third-party invites (onbind: PUT in the spec, POST in Synapse; called by
    # identity servers, so unauthenticated)
    _e(
        "exchange_third_party_invite",
        "PUT",
        f"{_F1}/exchange_third_party_invite/{{roomId}}",
        "third_party_invites",
        body=True,
    ),
    _e("onbind", "PUT", f"{_F1}/3pid/onbind", "third_party_invites", auth=False, body=True),
    _e("onbind_post", "POST", f"{_F1}/3pid/onbind", "third_party_invites", auth=False, body=True),
    # public rooms
    _e("public_rooms", "GET", f"{_F1}/publicRooms", "public_rooms"),
    _e("public_rooms_search", "POST", f"{_F1}/publicRooms", "public_rooms", body=True),
    # hierarchy
    _e("hierarchy", "GET", f"{_F1}/hierarchy/{{roomId}}", "hierarchy"),
    _e(
        "hierarchy_unstable",
        "GET",
        f"{_FU}/org.matrix.msc2946/hierarchy/{{roomId}}",
        "hierarchy",
    ),
    # queries: profile and directory are literals, so they never reach
    # {queryType} (which also refuses those two values percent-encoded)
    _e("query_profile", "GET", f"{_F1}/query/profile", "queries_profile"),
    _e("query_directory", "GET", f"{_F1}/query/directory", "queries_directory"),
    _e("query", "GET", f"{_F1}/query/{{queryType}}", "queries_other"),
    # openid (the access token in the query is the authentication)
    _e("openid_userinfo", "GET", f"{_F1}/openid/userinfo", "openid", auth=False),
    # devices
    _e("user_devices", "GET", f"{_F1}/user/devices/{{userId}}", "devices"),
    # e2ee
    _e("user_keys_claim", "POST", f"{_F1}/user/keys/claim", "e2ee", body=True),
    _e("user_keys_query", "POST", f"{_F1}/user/keys/query", "e2ee", body=True),
    _e("user_keys_claim_unstable", "POST", f"{_FU}/user/keys/claim", "e2ee", body=True),
    # media
    _e("media_download", "GET", f"{_F1}/media/download/{{mediaId}}", "media"),
    _e("media_thumbnail", "GET", f"{_F1}/media/thumbnail/{{mediaId}}", "media"),
    # legacy (client-server) media, unauthenticated
    *_legacy_media("v3"),
    *_legacy_media("r0"),
    # policy servers
    _e("policy_sign", "POST", "/_matrix/policy/v1/sign", "policy", body=True),
    _e(
        "policy_sign_unstable",
        "POST",
        "/_matrix/policy/unstable/org.matrix.msc4284/sign",
        "policy",
        body=True,
    ),
)

ENDPOINTS_BY_NAME: Mapping[str, Endpoint] = MappingProxyType({e.name: e for e in ENDPOINTS})

# --------------------------------------------------------------------------
# Identifier grammar (light: only what is unambiguous)
# --------------------------------------------------------------------------


def _room_id(value: str) -> bool:
    # rooms v1-11: !opaque:server (opaque may be anything); v12: ! + base64
    return len(value) > 1 and value[0] == "!"


def _event_id(value: str) -> bool:
    # v1-2: $opaque:server; v3: $ + standard base64 (may contain "/"); v4+: url-safe
    return len(value) > 1 and value[0] == "$"


def _user_id(value: str) -> bool:
    # The localpart never contains ":" (historical ids neither) and may
    # contain "/" (modern grammar); the server part follows the first ":".
    local, sep, server = value.partition(":")
    return len(local) > 1 and local[0] == "@" and sep == ":" and is_server_name(server)


def _opaque_token(value: str) -> bool:
    return "/" not in value


_VALIDATORS: Mapping[str, tuple[Callable[[str], bool], str]] = MappingProxyType(
    {
        "roomId": (_room_id, "a room id (!…)"),
        "eventId": (_event_id, "an event id ($…)"),
        "userId": (_user_id, "a user id (@localpart:server)"),
        "serverName": (is_server_name, "a server name"),
        "txnId": (_opaque_token, "a transaction id without '/'"),
        "mediaId": (_opaque_token, "a media id without '/'"),
        "fileName": (_opaque_token, "a file name without '/'"),
        "queryType": (_opaque_token, "a query type without '/'"),
    }
)

# --------------------------------------------------------------------------
# The compiled trie
# --------------------------------------------------------------------------


@dataclass
class _Param:
    name: str
    check: Callable[[str], bool]
    shape: str
    node: _Node


@dataclass
class _Node:
    literals: dict[bytes, _Node] = field(default_factory=dict)
    literal_texts: frozenset[str] = frozenset()
    param: _Param | None = None
    methods: dict[str, Endpoint] = field(default_factory=dict)


def _literal_ok(seg: str) -> bool:
    return (
        bool(seg)
        and seg not in (".", "..")
        and all(0x21 <= ord(c) <= 0x7E and c not in "#%?{}" for c in seg)
    )


def _compile(endpoints: tuple[Endpoint, ...]) -> _Node:
    """Builds the segment trie; refuses an inconsistent table at import."""
    root = _Node()
    names: set[str] = set()
    for ep in endpoints:
        if ep.name in names:
            raise ValueError(f"duplicate endpoint name {ep.name}")
        names.add(ep.name)
        if ep.group not in GROUPS:
            raise ValueError(f"endpoint {ep.name}: unknown group {ep.group}")
        if ep.method not in ("GET", "PUT", "POST"):
            raise ValueError(f"endpoint {ep.name}: unsupported method {ep.method}")
        if ep.json_body != (ep.method != "GET"):
            raise ValueError(f"endpoint {ep.name}: json_body must be set for PUT/POST only")
        if not ep.template.startswith("/"):
            raise ValueError(f"endpoint {ep.name}: template must start with '/'")
        node = root
        for seg in ep.template[1:].split("/"):
            if seg.startswith("{") and seg.endswith("}"):
                pname = seg[1:-1]
                if pname not in _VALIDATORS:
                    raise ValueError(f"endpoint {ep.name}: no grammar for parameter {pname}")
                if node.param is None:
                    check, shape = _VALIDATORS[pname]
                    node.param = _Param(pname, check, shape, _Node())
                elif node.param.name != pname:
                    raise ValueError(f"endpoint {ep.name}: parameter {pname} clashes")
                node = node.param.node
            else:
                if not _literal_ok(seg):
                    raise ValueError(f"endpoint {ep.name}: bad literal segment {seg!r}")
                node.literal_texts = node.literal_texts | {seg}
                node = node.literals.setdefault(seg.encode("ascii"), _Node())
        if ep.method in node.methods:
            raise ValueError(f"endpoint {ep.name}: duplicate {ep.method} {ep.template}")
        node.methods[ep.method] = ep
    return root


_ROOT = _compile(ENDPOINTS)

# --------------------------------------------------------------------------
# The matcher
# --------------------------------------------------------------------------

# Bytes allowed anywhere in a target: visible ASCII except "#".
_TARGET_BYTES = bytes(b for b in range(0x21, 0x7F) if b != ord("#"))
_HEX = b"0123456789abcdefABCDEF"
_UNHEX: Mapping[bytes, bytes] = MappingProxyType(
    {bytes((a, b)): bytes((int(bytes((a, b)), 16),)) for a in _HEX for b in _HEX}
)
# Unicode category Cc: C0, DEL and C1.
_CONTROL_TEXT = re.compile("[\x00-\x1f\x7f-\x9f]")
_CONTROL_BYTES = re.compile(b"[\x00-\x1f\x7f]")


def _malformed(reason: str) -> Refusal:
    return Refusal(reasons.MALFORMED_TARGET, f"malformed request target: {reason}")


def _unknown(reason: str) -> Refusal:
    return Refusal(reasons.UNKNOWN_ENDPOINT, reason)


def _unescape(raw: bytes) -> bytes:
    """Percent-decodes `raw` once; raises on an invalid escape."""
    parts = raw.split(b"%")
    out = [parts[0]]
    for part in parts[1:]:
        byte = _UNHEX.get(part[:2])
        if byte is None:
            raise _malformed("invalid percent-escape")
        out.append(byte)
        out.append(part[2:])
    return b"".join(out)


def _decode_segment(raw: bytes) -> str:
    """Returns the decoded text of one non-empty path segment.

    Raises the 400 refusal for an invalid escape, invalid UTF-8, a control
    character or a `.`/`..` segment (also percent-encoded).
    """
    if b"%" not in raw:
        value = raw.decode("ascii")  # visible ASCII only, already checked
    else:
        try:
            value = _unescape(raw).decode("utf-8", "strict")
        except UnicodeDecodeError:
            raise _malformed("a path segment is not valid UTF-8 once decoded") from None
        if _CONTROL_TEXT.search(value):
            raise _malformed("a path segment contains a NUL or control character")
    if value in (".", ".."):
        raise _malformed("'.' and '..' segments are not allowed")
    return value


def target_problem(target: bytes) -> str | None:
    """What keeps `target` from being a clean origin-form request target
    (`/` then visible ASCII, no fragment), None if nothing: the one
    grammar of a target sbg matches, forwards and writes upstream."""
    if not target.startswith(b"/"):
        if target == b"*":
            return "asterisk-form is not a federation request"
        if not target:
            return "empty target"
        return "only origin-form targets (starting with '/') are accepted"
    if target.translate(None, _TARGET_BYTES):
        if b"#" in target:
            return "a fragment ('#') is not allowed"
        return "space, control or non-ASCII byte"
    return None


def check_dot_segments(target: bytes) -> None:
    """The hygiene every forwarded target gets, also outside the endpoint
    table (`allowed_non_matrix_urls`): a clean origin-form target with no
    `.` or `..` path segment (also percent-encoded).

    Raises:
        Refusal: 400 `malformed_target`.
    """
    problem = target_problem(target)
    if problem is not None:
        raise _malformed(problem)
    path = target.partition(b"?")[0]
    for raw in path[1:].split(b"/"):
        if raw and (raw in (b".", b"..") or (b"%" in raw and _decode_segment(raw) in (".", ".."))):
            raise _malformed("'.' and '..' segments are not allowed")


def _refuse_unknown(segments: list[bytes], reason: str) -> Refusal:
    """The 404 refusal, unless a segment makes the target malformed (400)."""
    for raw in segments:
        _decode_segment(raw)
    return _unknown(reason)


def match_target(method: bytes, target: bytes) -> Match:
    """Matches a request's method and raw request-target against the table.

    HEAD is matched as GET. The query string is validated but never matched.

    Raises:
        Refusal: 400 `malformed_target` for a malformed target, 404
            `unknown_endpoint` for a target no entry matches, 405
            `method_not_allowed` when the path matches only other methods.
    """
    problem = target_problem(target)
    if problem is not None:
        raise _malformed(problem)
    path, _, query = target.partition(b"?")
    if b"%" in query and _CONTROL_BYTES.search(_unescape(query)):
        raise _malformed("the query string contains a NUL or control character")
    if path == b"/":
        raise _unknown("no federation endpoint at '/'")
    segments = path[1:].split(b"/")
    if b"" in segments:
        if segments[-1] == b"":
            raise _malformed("a trailing '/' (empty last segment) is not allowed")
        raise _malformed("empty path segment ('//')")

    node = _ROOT
    params: dict[str, str] = {}
    for raw in segments:
        child = node.literals.get(raw)
        if child is not None:
            node = child
            continue
        param = node.param
        if param is None:
            raise _refuse_unknown(segments, "no federation endpoint matches this path")
        value = _decode_segment(raw)
        if value in node.literal_texts:
            # e.g. /query/%70rofile: Synapse decodes it to "profile", so it
            # must count neither as that literal nor as the parameter.
            raise _refuse_unknown(segments, "a percent-encoded literal segment")
        if not param.check(value):
            raise _refuse_unknown(segments, f"the {{{param.name}}} segment is not {param.shape}")
        params[param.name] = value
        node = param.node

    if not node.methods:
        raise _refuse_unknown(segments, "no federation endpoint matches this path")
    endpoint = node.methods.get("GET" if method == b"HEAD" else method.decode("latin-1"))
    if endpoint is None:
        allowed = ", ".join(sorted(node.methods))
        raise Refusal(
            reasons.METHOD_NOT_ALLOWED, f"method not allowed for this endpoint (allowed: {allowed})"
        )
    return Match(endpoint, MappingProxyType(params), path)
