"""The endpoint table and the request-target matcher (docs/endpoints.md)."""

import re
from pathlib import Path
from urllib.parse import quote

from twisted.trial.unittest import SynchronousTestCase

from sbg.matrix.endpoints import (
    ENDPOINTS,
    ENDPOINTS_BY_NAME,
    Endpoint,
    Match,
    _compile,
    is_server_name,
    match_target,
)
from sbg.matrix.groups import GROUPS
from sbg.reasons import Refusal

ROOM = "!OGEhHVWSdvArJzumhm:matrix.org"  # rooms v1-11
ROOM_V12 = "!bSf3SjS8kz7cXl0SLPaB8pXtF2UtrjcXmuhMwX7LX9I"  # rooms v12: no server part
EVENT_V3 = "$acR1l0raoZnm60CBwAVgqbZqoO/mYU81xysh1u7XcJk"  # standard base64: "/" and "+"
EVENT_V4 = "$Rqnc-F-dvnEYJTyHq_iKxU2bZ1CI92-kuZq3a5lr5Zg"
USER = "@alice:example.org"
SERVER = "example.org:8448"
MEDIA = "ZkKaJVlQZsKSbcPldBabPnHz"

F1 = "/_matrix/federation/v1"
F2 = "/_matrix/federation/v2"
FU = "/_matrix/federation/unstable"


def enc(value: str) -> str:
    """How Synapse's federation client encodes a path argument."""
    return quote(value, safe="")


# One realistic request per entry: name -> (method, target, expected params).
# Targets use Synapse's encoding (`quote(arg, safe="")`); RAW_FORMS below
# checks the unencoded form other servers send.
EXAMPLES: dict[str, tuple[str, str, dict[str, str]]] = {
    "well_known_server": ("GET", "/.well-known/matrix/server", {}),
    "version": ("GET", f"{F1}/version", {}),
    "key_server": ("GET", "/_matrix/key/v2/server", {}),
    "key_query": (
        "GET",
        "/_matrix/key/v2/query/matrix.org?minimum_valid_until_ts=1700000000000",
        {"serverName": "matrix.org"},
    ),
    "key_query_batch": ("POST", "/_matrix/key/v2/query", {}),
    "send": ("PUT", f"{F1}/send/1700000000123", {"txnId": "1700000000123"}),
    "event_auth": (
        "GET",
        f"{F1}/event_auth/{enc(ROOM)}/{enc(EVENT_V3)}",
        {"roomId": ROOM, "eventId": EVENT_V3},
    ),
    "backfill": (
        "GET",
        f"{F1}/backfill/{enc(ROOM)}?v={enc(EVENT_V4)}&v={enc(EVENT_V3)}&limit=100",
        {"roomId": ROOM},
    ),
    "get_missing_events": ("POST", f"{F1}/get_missing_events/{enc(ROOM)}", {"roomId": ROOM}),
    "event": ("GET", f"{F1}/event/{enc(EVENT_V3)}", {"eventId": EVENT_V3}),
    "state": ("GET", f"{F1}/state/{enc(ROOM)}?event_id={enc(EVENT_V4)}", {"roomId": ROOM}),
    "state_ids": (
        "GET",
        f"{F1}/state_ids/{enc(ROOM_V12)}?event_id={enc(EVENT_V4)}",
        {"roomId": ROOM_V12},
    ),
    "timestamp_to_event": (
        "GET",
        f"{F1}/timestamp_to_event/{enc(ROOM)}?ts=1700000000000&dir=b",
        {"roomId": ROOM},
    ),
    "make_join": (
        "GET",
        f"{F1}/make_join/{enc(ROOM)}/{enc(USER)}?ver=1&ver=2&ver=10&ver=11",
        {"roomId": ROOM, "userId": USER},
    ),
    "send_join": (
        "PUT",
        f"{F1}/send_join/{enc(ROOM)}/{enc(EVENT_V4)}",
        {"roomId": ROOM, "eventId": EVENT_V4},
    ),
    "send_join_v2": (
        "PUT",
        f"{F2}/send_join/{enc(ROOM_V12)}/{enc(EVENT_V4)}?omit_members=true",
        {"roomId": ROOM_V12, "eventId": EVENT_V4},
    ),
    "make_leave": (
        "GET",
        f"{F1}/make_leave/{enc(ROOM)}/{enc(USER)}",
        {"roomId": ROOM, "userId": USER},
    ),
    "send_leave": (
        "PUT",
        f"{F1}/send_leave/{enc(ROOM)}/{enc(EVENT_V4)}",
        {"roomId": ROOM, "eventId": EVENT_V4},
    ),
    "send_leave_v2": (
        "PUT",
        f"{F2}/send_leave/{enc(ROOM)}/{enc(EVENT_V3)}",
        {"roomId": ROOM, "eventId": EVENT_V3},
    ),
    "make_knock": (
        "GET",
        f"{F1}/make_knock/{enc(ROOM)}/{enc(USER)}?ver=7&ver=10",
        {"roomId": ROOM, "userId": USER},
    ),
    "send_knock": (
        "PUT",
        f"{F1}/send_knock/{enc(ROOM)}/{enc(EVENT_V4)}",
        {"roomId": ROOM, "eventId": EVENT_V4},
    ),
    "invite": (
        "PUT",
        f"{F1}/invite/{enc(ROOM)}/{enc('$143273582443PhrSn:example.org')}",
        {"roomId": ROOM, "eventId": "$143273582443PhrSn:example.org"},
    ),
    "invite_v2": (
        "PUT",
        f"{F2}/invite/{enc(ROOM)}/{enc(EVENT_V4)}",
        {"roomId": ROOM, "eventId": EVENT_V4},
    ),
    "exchange_third_party_invite": (
        "PUT",
        f"{F1}/exchange_third_party_invite/{enc(ROOM)}",
        {"roomId": ROOM},
    ),
    "onbind": ("PUT", f"{F1}/3pid/onbind", {}),
    "onbind_post": ("POST", f"{F1}/3pid/onbind", {}),
    "public_rooms": ("GET", f"{F1}/publicRooms?include_all_networks=false&limit=20", {}),
    "public_rooms_search": ("POST", f"{F1}/publicRooms", {}),
    "hierarchy": ("GET", f"{F1}/hierarchy/{enc(ROOM)}?suggested_only=false", {"roomId": ROOM}),
    "hierarchy_unstable": (
        "GET",
        f"{FU}/org.matrix.msc2946/hierarchy/{enc(ROOM)}?suggested_only=true",
        {"roomId": ROOM},
    ),
    "query_profile": ("GET", f"{F1}/query/profile?user_id={enc(USER)}&field=displayname", {}),
    "query_directory": ("GET", f"{F1}/query/directory?room_alias=%23room%3Aexample.org", {}),
    "query": ("GET", f"{F1}/query/client_keys", {"queryType": "client_keys"}),
    "openid_userinfo": ("GET", f"{F1}/openid/userinfo?access_token=SomeT0kenHere", {}),
    "user_devices": ("GET", f"{F1}/user/devices/{enc(USER)}", {"userId": USER}),
    "user_keys_claim": ("POST", f"{F1}/user/keys/claim", {}),
    "user_keys_query": ("POST", f"{F1}/user/keys/query", {}),
    "user_keys_claim_unstable": ("POST", f"{FU}/user/keys/claim", {}),
    "media_download": ("GET", f"{F1}/media/download/{MEDIA}?timeout_ms=20000", {"mediaId": MEDIA}),
    "media_thumbnail": (
        "GET",
        f"{F1}/media/thumbnail/{MEDIA}?width=64&height=64&method=crop",
        {"mediaId": MEDIA},
    ),
    "legacy_media_download": (
        "GET",
        f"/_matrix/media/v3/download/{SERVER}/{MEDIA}"
        "?allow_remote=false&timeout_ms=20000&allow_redirect=true",
        {"serverName": SERVER, "mediaId": MEDIA},
    ),
    "legacy_media_download_filename": (
        "GET",
        f"/_matrix/media/v3/download/example.org/{MEDIA}/cat%20picture.png",
        {"serverName": "example.org", "mediaId": MEDIA, "fileName": "cat picture.png"},
    ),
    "legacy_media_thumbnail": (
        "GET",
        f"/_matrix/media/v3/thumbnail/[2001:db8::1]:8448/{MEDIA}?width=32&height=32",
        {"serverName": "[2001:db8::1]:8448", "mediaId": MEDIA},
    ),
    "legacy_media_download_r0": (
        "GET",
        f"/_matrix/media/r0/download/{SERVER}/{MEDIA}?allow_remote=false&timeout_ms=20000",
        {"serverName": SERVER, "mediaId": MEDIA},
    ),
    "legacy_media_download_filename_r0": (
        "GET",
        f"/_matrix/media/r0/download/192.0.2.7/{MEDIA}/f%C3%A9e.txt",
        {"serverName": "192.0.2.7", "mediaId": MEDIA, "fileName": "f\u00e9e.txt"},
    ),
    "legacy_media_thumbnail_r0": (
        "GET",
        f"/_matrix/media/r0/thumbnail/example.org/{MEDIA}",
        {"serverName": "example.org", "mediaId": MEDIA},
    ),
    "policy_sign": ("POST", "/_matrix/policy/v1/sign", {}),
    "policy_sign_unstable": ("POST", "/_matrix/policy/unstable/org.matrix.msc4284/sign", {}),
}

EXPECTED_GROUPS = {
    "well_known_server": "discovery",
    "version": "discovery",
    "key_server": "keys",
    "key_query": "key_query",
    "key_query_batch": "key_query",
    "send": "transactions",
    "event_auth": "events",
    "backfill": "events",
    "get_missing_events": "events",
    "event": "events",
    "state": "events",
    "state_ids": "events",
    "timestamp_to_event": "events",
    "make_join": "joins",
    "send_join": "joins",
    "send_join_v2": "joins",
    "make_leave": "leaves",
    "send_leave": "leaves",
    "send_leave_v2": "leaves",
    "make_knock": "knocks",
    "send_knock": "knocks",
    "invite": "invites",
    "invite_v2": "invites",
    "exchange_third_party_invite": "third_party_invites",
    "onbind": "third_party_invites",
    "onbind_post": "third_party_invites",
    "public_rooms": "public_rooms",
    "public_rooms_search": "public_rooms",
    "hierarchy": "hierarchy",
    "hierarchy_unstable": "hierarchy",
    "query_profile": "queries_profile",
    "query_directory": "queries_directory",
    "query": "queries_other",
    "openid_userinfo": "openid",
    "user_devices": "devices",
    "user_keys_claim": "e2ee",
    "user_keys_query": "e2ee",
    "user_keys_claim_unstable": "e2ee",
    "media_download": "media",
    "media_thumbnail": "media",
    "legacy_media_download": "legacy_media",
    "legacy_media_download_filename": "legacy_media",
    "legacy_media_thumbnail": "legacy_media",
    "legacy_media_download_r0": "legacy_media",
    "legacy_media_download_filename_r0": "legacy_media",
    "legacy_media_thumbnail_r0": "legacy_media",
    "policy_sign": "policy",
    "policy_sign_unstable": "policy",
}

# The endpoints without X-Matrix (docs/decisions.md, inbound step 8): discovery, keys, key_query,
# openid, 3pid/onbind, legacy_media.
UNAUTHENTICATED = {
    "well_known_server",
    "version",
    "key_server",
    "key_query",
    "key_query_batch",
    "onbind",
    "onbind_post",
    "openid_userinfo",
    "legacy_media_download",
    "legacy_media_download_filename",
    "legacy_media_thumbnail",
    "legacy_media_download_r0",
    "legacy_media_download_filename_r0",
    "legacy_media_thumbnail_r0",
}

# The same requests with identifiers unencoded, as other servers send them.
RAW_FORMS: list[tuple[str, str, str, dict[str, str]]] = [
    (
        "event_auth",
        "GET",
        f"{F1}/event_auth/{ROOM}/{EVENT_V4}",
        {"roomId": ROOM, "eventId": EVENT_V4},
    ),
    ("make_join", "GET", f"{F1}/make_join/{ROOM}/{USER}?ver=10", {"roomId": ROOM, "userId": USER}),
    ("make_leave", "GET", f"{F1}/make_leave/{ROOM}/{USER}", {"roomId": ROOM, "userId": USER}),
    ("make_knock", "GET", f"{F1}/make_knock/{ROOM}/{USER}", {"roomId": ROOM, "userId": USER}),
    (
        "send_join_v2",
        "PUT",
        f"{F2}/send_join/{ROOM}/{EVENT_V4}",
        {"roomId": ROOM, "eventId": EVENT_V4},
    ),
    ("invite_v2", "PUT", f"{F2}/invite/{ROOM}/{EVENT_V4}", {"roomId": ROOM, "eventId": EVENT_V4}),
    ("event", "GET", f"{F1}/event/{EVENT_V4}", {"eventId": EVENT_V4}),
    ("state_ids", "GET", f"{F1}/state_ids/{ROOM}?event_id={EVENT_V4}", {"roomId": ROOM}),
    ("user_devices", "GET", f"{F1}/user/devices/{USER}", {"userId": USER}),
    ("hierarchy", "GET", f"{F1}/hierarchy/{ROOM}", {"roomId": ROOM}),
    # v3 event ids carry "/" and "+": "/" must stay encoded, "+" may be raw or %2B
    ("event", "GET", f"{F1}/event/$a+b%2Fc", {"eventId": "$a+b/c"}),
    ("event", "GET", f"{F1}/event/%24a%2Bb%2Fc", {"eventId": "$a+b/c"}),
    # percent-encoding of characters that need none is decoded once
    ("event", "GET", f"{F1}/event/%24%41bc", {"eventId": "$Abc"}),
    # lower-case hex digits
    ("event", "GET", f"{F1}/event/%24ab%2fc", {"eventId": "$ab/c"}),
    # a "%25" decodes to "%" once, never twice
    ("event", "GET", f"{F1}/event/%24a%252Fb", {"eventId": "$a%2Fb"}),
    # user ids may carry "/" (modern grammar) and non-ASCII (historical)
    (
        "user_devices",
        "GET",
        f"{F1}/user/devices/%40a%2Fb%3Aexample.org",
        {"userId": "@a/b:example.org"},
    ),
    (
        "user_devices",
        "GET",
        f"{F1}/user/devices/%40%C3%A9t%C3%A9:example.org",
        {"userId": "@\u00e9t\u00e9:example.org"},
    ),
    # ";" is an ordinary character inside a parameter (Synapse keeps it)
    ("send", "PUT", f"{F1}/send/12;x=y", {"txnId": "12;x=y"}),
    ("key_query", "GET", "/_matrix/key/v2/query/[::1]", {"serverName": "[::1]"}),
    (
        "key_query",
        "GET",
        "/_matrix/key/v2/query/example.org%3A8448",
        {"serverName": "example.org:8448"},
    ),
    ("query", "GET", f"{F1}/query/Profile", {"queryType": "Profile"}),
]


def refusal(method: str, target: bytes | str) -> Refusal:
    """The Refusal the matcher raises (fails the test if it matches)."""
    raw = target.encode("latin-1") if isinstance(target, str) else target
    try:
        match = match_target(method.encode("ascii"), raw)
    except Refusal as e:
        return e
    raise AssertionError(f"{method} {target!r} unexpectedly matched {match.endpoint.name}")


class TableTests(SynchronousTestCase):
    def test_every_entry_has_an_example(self) -> None:
        self.assertEqual(set(EXAMPLES), {e.name for e in ENDPOINTS})
        self.assertEqual(set(EXPECTED_GROUPS), {e.name for e in ENDPOINTS})

    def test_groups(self) -> None:
        for ep in ENDPOINTS:
            self.assertEqual(ep.group, EXPECTED_GROUPS[ep.name], ep.name)
        self.assertEqual({e.group for e in ENDPOINTS}, set(GROUPS))

    def test_authenticated(self) -> None:
        for ep in ENDPOINTS:
            self.assertEqual(ep.authenticated, ep.name not in UNAUTHENTICATED, ep.name)

    def test_json_body_for_put_and_post(self) -> None:
        for ep in ENDPOINTS:
            self.assertEqual(ep.json_body, ep.method in ("PUT", "POST"), ep.name)

    def test_by_name(self) -> None:
        self.assertEqual(len(ENDPOINTS_BY_NAME), len(ENDPOINTS))
        for ep in ENDPOINTS:
            self.assertIs(ENDPOINTS_BY_NAME[ep.name], ep)

    def test_param_names(self) -> None:
        self.assertEqual(ENDPOINTS_BY_NAME["make_join"].param_names, ("roomId", "userId"))
        self.assertEqual(ENDPOINTS_BY_NAME["version"].param_names, ())

    def test_exact_paths(self) -> None:
        """The paths that matter most, spelled out (not derived from the table)."""
        spelled = {
            ("GET", "/.well-known/matrix/server"),
            ("GET", "/_matrix/key/v2/server"),
            ("POST", "/_matrix/key/v2/query"),
            ("PUT", "/_matrix/federation/v1/send/{txnId}"),
            ("PUT", "/_matrix/federation/v2/send_join/{roomId}/{eventId}"),
            ("PUT", "/_matrix/federation/v1/send_join/{roomId}/{eventId}"),
            ("GET", "/_matrix/federation/unstable/org.matrix.msc2946/hierarchy/{roomId}"),
            ("POST", "/_matrix/federation/unstable/user/keys/claim"),
            ("POST", "/_matrix/policy/unstable/org.matrix.msc4284/sign"),
            ("PUT", "/_matrix/federation/v1/3pid/onbind"),
            ("POST", "/_matrix/federation/v1/3pid/onbind"),
            ("GET", "/_matrix/media/r0/download/{serverName}/{mediaId}/{fileName}"),
        }
        self.assertLessEqual(spelled, {(e.method, e.template) for e in ENDPOINTS})


class CompileTests(SynchronousTestCase):
    """An inconsistent table fails at import, not at request time."""

    def assertRefused(self, *endpoints: Endpoint) -> None:
        self.assertRaises(ValueError, _compile, endpoints)

    def test_unknown_group(self) -> None:
        self.assertRefused(Endpoint("x", "GET", "/a", "nope", True, False))

    def test_duplicate_name(self) -> None:
        a = Endpoint("x", "GET", "/a", "events", True, False)
        self.assertRefused(a, Endpoint("x", "GET", "/b", "events", True, False))

    def test_duplicate_method_and_path(self) -> None:
        a = Endpoint("x", "GET", "/a/{roomId}", "events", True, False)
        self.assertRefused(a, Endpoint("y", "GET", "/a/{roomId}", "events", True, False))

    def test_clashing_parameters(self) -> None:
        a = Endpoint("x", "GET", "/a/{roomId}", "events", True, False)
        self.assertRefused(a, Endpoint("y", "PUT", "/a/{eventId}", "events", True, True))

    def test_parameter_without_grammar(self) -> None:
        self.assertRefused(Endpoint("x", "GET", "/a/{whatever}", "events", True, False))

    def test_bad_literal(self) -> None:
        for template in ("/a/%73", "/a/..", "/a//b", "/a/b#c", "a/b", "/a/\u00e9"):
            self.assertRefused(Endpoint("x", "GET", template, "events", True, False))

    def test_json_body_consistency(self) -> None:
        self.assertRefused(Endpoint("x", "PUT", "/a", "events", True, False))
        self.assertRefused(Endpoint("x", "GET", "/a", "events", True, True))

    def test_bad_method(self) -> None:
        self.assertRefused(Endpoint("x", "DELETE", "/a", "events", True, False))

    def test_the_shipped_table_compiles(self) -> None:
        _compile(ENDPOINTS)


class MatchEveryEntryTests(SynchronousTestCase):
    def test_examples(self) -> None:
        for name, (method, target, params) in EXAMPLES.items():
            m = match_target(method.encode(), target.encode("ascii"))
            self.assertIsInstance(m, Match)
            self.assertEqual(m.endpoint.name, name, target)
            self.assertEqual(m.endpoint.group, EXPECTED_GROUPS[name])
            self.assertEqual(m.endpoint.authenticated, name not in UNAUTHENTICATED)
            self.assertEqual(dict(m.params), params, target)
            self.assertEqual(m.path, target.split("?")[0].encode("ascii"))

    def test_raw_forms(self) -> None:
        for name, method, target, params in RAW_FORMS:
            m = match_target(method.encode(), target.encode("ascii"))
            self.assertEqual(m.endpoint.name, name, target)
            self.assertEqual(dict(m.params), params, target)

    def test_params_are_read_only(self) -> None:
        m = match_target(b"GET", f"{F1}/event/{enc(EVENT_V4)}".encode())
        with self.assertRaises(TypeError):
            m.params["eventId"] = "$other"  # type: ignore[index]

    def test_head_matches_as_get(self) -> None:
        for name, (method, target, _params) in EXAMPLES.items():
            if method != "GET":
                continue
            m = match_target(b"HEAD", target.encode("ascii"))
            self.assertEqual(m.endpoint.name, name)
            self.assertEqual(m.endpoint.method, "GET")

    def test_wrong_method_is_405(self) -> None:
        served: dict[str, set[str]] = {}
        for ep in ENDPOINTS:
            served.setdefault(ep.template, set()).add(ep.method)
        for name, (_method, target, _params) in EXAMPLES.items():
            allowed = served[ENDPOINTS_BY_NAME[name].template]
            for other in ("GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS", "PATCH", "get"):
                if other in allowed or (other == "HEAD" and "GET" in allowed):
                    continue
                e = refusal(other, target)
                self.assertEqual(
                    (e.status, e.errcode, e.code),
                    (405, "M_UNRECOGNIZED", "method_not_allowed"),
                    f"{other} {target}",
                )
                for method in allowed:
                    self.assertIn(method, e.reason)

    def test_both_methods_of_shared_paths(self) -> None:
        for path, pairs in (
            (f"{F1}/3pid/onbind", (("PUT", "onbind"), ("POST", "onbind_post"))),
            (f"{F1}/publicRooms", (("GET", "public_rooms"), ("POST", "public_rooms_search"))),
        ):
            for method, name in pairs:
                self.assertEqual(match_target(method.encode(), path.encode()).endpoint.name, name)


class QueryTypeTests(SynchronousTestCase):
    """profile and directory go to their own groups, never to queries_other."""

    def test_literal_types(self) -> None:
        for qt, group in (("profile", "queries_profile"), ("directory", "queries_directory")):
            m = match_target(b"GET", f"{F1}/query/{qt}?x=1".encode())
            self.assertEqual(m.endpoint.group, group)
            self.assertEqual(dict(m.params), {})

    def test_encoded_literal_types_are_refused(self) -> None:
        # Synapse decodes these to "profile"/"directory" and answers them as
        # such: classifying them as queries_other would bypass the trust level.
        for segment in ("%70rofile", "profil%65", "%70%72%6F%66%69%6C%65", "%64irectory"):
            e = refusal("GET", f"{F1}/query/{segment}")
            self.assertEqual((e.status, e.code), (404, "unknown_endpoint"), segment)

    def test_other_types(self) -> None:
        for qt in ("client_keys", "user_devices", "Profile", "profile2", "x%2Dy"):
            m = match_target(b"GET", f"{F1}/query/{qt}".encode())
            self.assertEqual(m.endpoint.group, "queries_other", qt)

    def test_wrong_method_on_query(self) -> None:
        for qt in ("profile", "directory", "other"):
            self.assertEqual(refusal("POST", f"{F1}/query/{qt}").status, 405)


def assert_refused(
    test: SynchronousTestCase, status: int, code: str, method: str, target: bytes | str
) -> Refusal:
    e = refusal(method, target)
    test.assertEqual((e.status, e.errcode, e.code), (status, "M_UNRECOGNIZED", code), target)
    return e


MALFORMED: list[bytes | str] = [
    # not origin-form
    "https://hs.example/_matrix/key/v2/server",
    "http://hs.example:8448/_matrix/federation/v1/version",
    "hs.example:443",
    "*",
    "",
    "_matrix/key/v2/server",
    # dot segments, also encoded
    "/_matrix/key/v2/../v2/server",
    "/_matrix/key/v2/./server",
    "/_matrix/key/v2/%2e%2E/v2/server",
    "/_matrix/key/v2/%2E/server",
    "/_matrix/federation/v1/event/..",
    "/_matrix/federation/v1/event/%2e",
    "/_matrix/federation/v1/send/.%2e",
    "/../_matrix/key/v2/server",
    # empty segments and trailing slashes (Synapse's retry gets 400 again)
    "/_matrix//key/v2/server",
    "//_matrix/key/v2/server",
    "//hs.example/_matrix/key/v2/server",
    "/_matrix/key/v2/server/",
    "/_matrix/federation/v1/send/1700000000123/",
    f"/_matrix/federation/v1/event/{enc(EVENT_V4)}/",
    f"/_matrix/federation/v1/state_ids/{enc(ROOM)}/?event_id=%24x",
    f"/_matrix/federation/v1/backfill/{enc(ROOM)}/?v=%24x&limit=10",
    f"/_matrix/federation/v1/timestamp_to_event/{enc(ROOM)}/?ts=1&dir=f",
    "/_matrix/key/v2/server//",
    # fragments
    "/_matrix/key/v2/server#frag",
    "/_matrix/key/v2/server?x=1#frag",
    "/_matrix/federation/v1/event/$abc#",
    # space, control, non-ASCII bytes
    b"/_matrix/key/v2/server ",
    b"/_matrix/key/v2/ server",
    b"/_matrix/key/v2/server\x00",
    b"/_matrix/key/v2/ser\x7fver",
    b"/_matrix/key/v2/server\r\n",
    b"/_matrix/key/v2/server\t",
    b"/_matrix/federation/v1/event/$\xc3\xa9",
    b"/_matrix/key/v2/server?x=\xff",
    b"/_matrix/key/v2/server?x=\x01",
    # invalid percent-escapes, in the path and in the query
    "/_matrix/federation/v1/event/$a%zz",
    "/_matrix/federation/v1/event/$a%4",
    "/_matrix/federation/v1/event/$a%",
    "/_matrix/federation/v1/event/$a%%41",
    "/_matrix/federation/v1/send/1%G0",
    "/_matrix/key/v2/server?x=%zz",
    "/_matrix/key/v2/server?x=%4",
    "/_matrix/key/v2/server?%",
    # decoded NUL / control characters, in the path and in the query
    "/_matrix/federation/v1/event/$a%00b",
    "/_matrix/federation/v1/send/1%0A",
    "/_matrix/federation/v1/send/1%0d%0aX-Injected:%201",
    "/_matrix/federation/v1/send/%7F",
    "/_matrix/federation/v1/event/$a%C2%85",  # U+0085, a C1 control
    "/_matrix/key/v2/server?x=%00",
    "/_matrix/key/v2/server?x=a%0Ab",
    # segments that are not UTF-8 once decoded: overlong, lone bytes, surrogates
    "/_matrix/federation/v1/event/$%C0%AE",
    "/_matrix/key/v2/%C0%AE%C0%AE/v2/server",
    "/_matrix/federation/v1/event/$%FF",
    "/_matrix/federation/v1/event/$%C3",
    "/_matrix/federation/v1/event/$%ED%A0%80",
    "/_matrix/federation/v1/user/devices/%40%E0%80%AF:example.org",
    # a malformed segment after an unknown one is still malformed, not 404
    "/_matrix/client/v3/%zz",
    "/nothing/here/%2e%2e",
    "/_matrix/client/v3/login/",
]

UNKNOWN: list[str] = [
    # the query string is never part of the match (the Rust reference's bypass)
    "/_matrix/client/v3/login?x=/_matrix/key/v2/server",
    "/anything?/.well-known/matrix/server",
    "/_matrix/client/v3/login?/_matrix/federation/v1/version",
    "/?/_matrix/key/v2/server",
    "/",
    # /_matrix/media/ substrings are not legacy media
    "/_matrix/client/v3/login/_matrix/media/v3/download/example.org/abc",
    "/x/_matrix/media/v3/download/example.org/abc",
    "/_matrix/media/v3/upload",
    "/_matrix/media/v3/upload/example.org/abc",
    "/_matrix/media/v3/preview_url?url=https://example.org",
    "/_matrix/media/v3/config",
    "/_matrix/media/v1/download/example.org/abc",
    "/_matrix/media/v3/download/example.org",
    "/_matrix/media/v3/download/example.org/abc/file/more",
    "/_matrix/media/v3/thumbnail/example.org/abc/file",
    "/_matrix/media/v3/download/example.org%2Fevil/abc",
    "/_matrix/media/v3/download/example.org/abc%2F..%2Fx",
    "/_matrix/media/v3/download/example.org/abc/a%2Fb",
    # %2F outside the slots whose grammar allows "/"
    "/_matrix/key/v2/query/example.org%2F..%2Fserver",
    "/_matrix/federation/v1/send/1%2F2",
    "/_matrix/federation/v1/media/download/abc%2Fdef",
    "/_matrix/federation/v1/query/profile%2Fx",
    # a literal segment percent-encoded is not that literal
    "/_matrix/federation/v1/%73end/1",
    "/_matrix/federation/v1/send%2F1",
    "/%5Fmatrix/key/v2/server",
    "/_matrix/key/v2/serve%72",
    "/%2Ewell-known/matrix/server",
    # extra and missing segments
    "/_matrix/key/v2/server/ed25519:abc",
    "/_matrix/key/v2/query/example.org/ed25519:abc",
    "/_matrix/federation/v1/send",
    "/_matrix/federation/v1/send/1/2",
    f"/_matrix/federation/v1/event_auth/{enc(ROOM)}",
    f"/_matrix/federation/v1/event_auth/{enc(ROOM)}/{enc(EVENT_V4)}/x",
    "/_matrix/federation/v1",
    "/_matrix/federation",
    "/_matrix",
    "/_matrix/federation/v1/version/x",
    "/prefix/_matrix/federation/v1/version",
    "/.well-known/matrix/server/x",
    "/.well-known/matrix/client",
    # case differences
    "/_MATRIX/key/v2/server",
    "/_matrix/Key/v2/server",
    "/_matrix/federation/V1/version",
    "/_matrix/federation/v1/Send/1",
    "/.well-known/Matrix/server",
    # ";" path parameters are part of the segment
    "/_matrix/key/v2/server;x=1",
    "/_matrix/federation/v1/version;",
    "/_matrix;x/key/v2/server",
    # backslashes are ordinary characters, never separators
    "/_matrix/key/v2\\server",
    "/_matrix\\key\\v2\\server",
    # wrong identifier shapes
    "/_matrix/federation/v1/event/abc",
    "/_matrix/federation/v1/event/%24",
    f"/_matrix/federation/v1/event/{enc(ROOM)}",
    f"/_matrix/federation/v1/state/{enc(EVENT_V4)}",
    f"/_matrix/federation/v1/make_join/{enc(ROOM)}/alice",
    f"/_matrix/federation/v1/make_join/{enc(ROOM)}/%40alice",
    f"/_matrix/federation/v1/make_join/{enc(ROOM)}/%40%3Aexample.org",
    f"/_matrix/federation/v1/make_join/{enc(ROOM)}/%40alice%3Aexa%2Fmple.org",
    f"/_matrix/federation/v1/make_join/{enc(ROOM)}/%40alice%3A",
    f"/_matrix/federation/v1/make_join/{enc(USER)}/{enc(USER)}",
    "/_matrix/key/v2/query/exa_mple.org",
    "/_matrix/key/v2/query/example.org:",
    "/_matrix/key/v2/query/example.org:123456",
    "/_matrix/key/v2/query/example.org:80:80",
    "/_matrix/key/v2/query/[::1",
    "/_matrix/key/v2/query/[fe80::1%25eth0]",
    "/_matrix/key/v2/query/[example.org]",
    "/_matrix/key/v2/query/example..org",
    # not federation at all
    "/_matrix/client/v3/login",
    "/_synapse/admin/v1/users",
    "/health",
    "/metrics",
    "/_matrix/federation/unstable/rooms/!a:b/complexity",
    "/_matrix/federation/unstable/org.matrix.msc3720/account_status",
    "/_matrix/federation/unstable/org.matrix.msc4370/extremities/!a:b",
    "/_matrix/policy/unstable/org.matrix.msc4284/event/$a/check",
]


class RefusalTests(SynchronousTestCase):
    def test_malformed_is_400(self) -> None:
        for target in MALFORMED:
            for method in ("GET", "PUT"):
                assert_refused(self, 400, "malformed_target", method, target)

    def test_unknown_is_404(self) -> None:
        for target in UNKNOWN:
            for method in ("GET", "PUT", "POST"):
                assert_refused(self, 404, "unknown_endpoint", method, target)

    def test_malformed_wins_over_unknown_and_method(self) -> None:
        # A later malformed segment beats an earlier unknown or badly shaped one.
        assert_refused(self, 400, "malformed_target", "GET", "/nope/%2e%2e")
        assert_refused(self, 400, "malformed_target", "GET", f"{F1}/event_auth/abc/%zz")
        # The method is looked at last.
        assert_refused(self, 400, "malformed_target", "DELETE", f"{F1}/send/1/")
        assert_refused(self, 404, "unknown_endpoint", "DELETE", f"{F1}/send")

    def test_reasons_do_not_echo_the_target(self) -> None:
        for target in ("/<script>alert(1)</script>", f"{F1}/event/<b>", "/x/%3Cb%3E/%zz"):
            e = refusal("GET", target)
            self.assertNotIn("<", e.reason)
            self.assertNotIn("script", e.reason)
        e = refusal("EVIL<x>", f"{F1}/version")
        self.assertEqual(e.status, 405)
        self.assertNotIn("EVIL", e.reason)

    def test_shape_reason_names_the_slot(self) -> None:
        e = refusal("GET", f"{F1}/make_join/{enc(ROOM)}/alice")
        self.assertIn("{userId}", e.reason)

    def test_trailing_slash_on_every_endpoint(self) -> None:
        for _name, (method, target, _params) in EXAMPLES.items():
            path, sep, query = target.partition("?")
            assert_refused(self, 400, "malformed_target", method, f"{path}/{sep}{query}")

    def test_synapse_encoded_and_raw_forms_agree(self) -> None:
        for quoted, raw in (
            (
                f"{F1}/make_join/%21room%3Aserver/%40u%3Aserver",
                f"{F1}/make_join/!room:server/@u:server",
            ),
            (f"{F1}/event/%24abc%3Aserver", f"{F1}/event/$abc:server"),
        ):
            a = match_target(b"GET", quoted.encode())
            b = match_target(b"GET", raw.encode())
            self.assertEqual((a.endpoint, dict(a.params)), (b.endpoint, dict(b.params)))


class ServerNameTests(SynchronousTestCase):
    def test_valid(self) -> None:
        for name in (
            "example.org",
            "example.org:8448",
            "EXAMPLE.org",
            "localhost",
            "a-b.c-d.e",
            "1.2.3.4",
            "1.2.3.4:1",
            "[1234:5678::abcd]",
            "[::1]:8448",
            "[::ffff:192.0.2.1]",
            "hs-int.test:8448",
            "x" * 255,
        ):
            self.assertTrue(is_server_name(name), name)

    def test_invalid(self) -> None:
        for name in (
            "",
            ":8448",
            "example.org:",
            "example.org:123456",
            "example.org:port",
            "example.org:+80",
            "example.org:80:80",
            "exa_mple.org",
            "example.org.",
            ".example.org",
            "example..org",
            "ex ample.org",
            "example.org/x",
            "x" * 256,
            "[::1",
            "[::1]x",
            "[]",
            "[::g]",
            "[fe80::1%eth0]",
            "[1.2.3.4]",
            "::1",
            "\u00e9xample.org",
            "example.org\n",
        ):
            self.assertFalse(is_server_name(name), name)


class DocsTests(SynchronousTestCase):
    """docs/endpoints.md lists exactly the table."""

    def test_docs_table_matches(self) -> None:
        doc = Path(__file__).resolve().parent.parent / "docs" / "endpoints.md"
        rows = set()
        for line in doc.read_text(encoding="utf-8").splitlines():
            m = re.match(
                r"\|\s*`([a-z0-9_]+)`\s*\|\s*(\w+)\s*\|\s*`([^`]+)`\s*\|\s*`(\w+)`\s*\|\s*(\w+)\s*\|",
                line,
            )
            if m:
                rows.add((m[1], m[2], m[3], m[4], m[5] == "yes"))
        expected = {(e.name, e.method, e.template, e.group, e.authenticated) for e in ENDPOINTS}
        self.assertEqual(rows, expected)
