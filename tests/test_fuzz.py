"""Fuzzers for sbg's parsers of attacker-controlled bytes.

Each parser may only ever refuse with its own refusal exception (never
crash: a crash is a 500 at best), and whatever it accepts is checked
against an independent reading:

* `parse_json_object`: an accepted body is what stdlib `json` (Synapse's
  reader) reads, has no duplicate key, NaN, infinity or lone surrogate, is
  nested at most `MAX_DEPTH` deep and has a canonical encoding; a body the
  independent strict reader accepts is never refused (no false refusals);
* `parse_authorization`: an accepted header means the same to Synapse's
  `_parse_auth_header`;
* `match_target`: an accepted target routes to the same endpoint and
  parameters in the Synapse model (`tests.test_adversarial_targets`);
* `parse_head` (outbound proxy head): accepted parts hold no CR, LF or SP;
* `sbg.hosts` parsers and the origin-consistency check: typed refusals only.

`SBG_FUZZ_EXAMPLES` sets the number of examples per fuzzer (default 1000;
`make fuzz` runs 100000).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from canonicaljson import encode_canonical_json
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sbg.hosts import HostParseError, parse_authority, parse_connect_target, parse_sni
from sbg.matrix.endpoints import ENDPOINTS, Match, match_target
from sbg.matrix.ids import is_key_id, is_server_name
from sbg.matrix.jsonbody import MAX_DEPTH, parse_json_object
from sbg.matrix.origin import check_origin_consistency
from sbg.matrix.xmatrix import parse_authorization
from sbg.outbound.proxy import parse_head
from sbg.reasons import Refusal
from tests.synapse_model import synapse_auth, synapse_route

EXAMPLES = int(os.environ.get("SBG_FUZZ_EXAMPLES", "0") or 0) or 1000
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)

# --------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------


class _Duplicate(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len({k for k, _ in pairs}) != len(pairs):
        raise _Duplicate()
    return dict(pairs)


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def _strings(value: Any) -> Any:
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def _floats(value: Any) -> Any:
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        for v in value:
            yield from _floats(v)
    elif isinstance(value, float):
        yield value


def strict_reading(body: bytes) -> dict[str, Any] | None:
    """An independent reading of docs/decisions.md, inbound step 17: the
    object, or None."""
    if body[:3] == b"\xef\xbb\xbf":
        return None
    try:
        text = body.decode("utf-8")
        value = json.loads(text, object_pairs_hook=_no_duplicates)
    except (ValueError, _Duplicate, RecursionError):
        return None
    if not isinstance(value, dict) or _depth(value) > MAX_DEPTH:
        return None
    if any(math.isnan(f) or math.isinf(f) for f in _floats(value)):
        return None
    if any(0xD800 <= ord(c) <= 0xDFFF for s in _strings(value) for c in s):
        return None
    return value


_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(st.sampled_from('ab"\\[]{}:,\u00e9\U0001f600\x00\n'), max_size=8),
)
_json_values = st.recursive(
    _json_leaf,
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text("abc", max_size=2), kids, max_size=3)
    ),
    max_leaves=12,
)


@st.composite
def json_texts(draw: st.DrawFn) -> bytes:
    """Valid JSON objects, then (often) damaged in a way that matters."""
    value = draw(st.dictionaries(st.text("abcxyz", max_size=3), _json_values, max_size=4))
    text = json.dumps(value, ensure_ascii=draw(st.booleans()))
    how = draw(
        st.sampled_from(
            ["none", "none", "dup", "deep", "nan", "surrogate", "bom", "insert", "cut", "bytes"]
        )
    )
    if how == "dup" and text != "{}":
        # The same key again, at the top or inside the first nested object.
        at = text.rfind("{")
        key = draw(st.sampled_from(['"a"', '"b"', '"x"', '"\\u0061"']))
        text = (
            text[: at + 1]
            + key
            + ": 1, "
            + key
            + ": 2"
            + ("," if text[at + 1] != "}" else "")
            + text[at + 1 :]
        )
    elif how == "deep":
        n = draw(st.integers(MAX_DEPTH - 3, MAX_DEPTH + 3))
        filler = draw(st.sampled_from(['"[{\\"', '"\\\\"', "1", '"]]"']))
        text = '{"d": ' + "[" * n + filler + "]" * n + "}"
    elif how == "nan":
        text = (
            text[:-1]
            + ("," if text != "{}" else "")
            + '"n": '
            + draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1e-999"]))
            + "}"
        )
    elif how == "surrogate":
        esc = draw(
            st.sampled_from(
                ["\\ud800", "\\udbff\\udfff", "\\udc00\\ud800", "\\\\ud800", "\\ud83d\\ude00"]
            )
        )
        text = text[:-1] + ("," if text != "{}" else "") + '"s": "' + esc + '"}'
    elif how == "bom":
        text = "\ufeff" + text
    elif how == "insert":
        at = draw(st.integers(0, len(text)))
        text = (
            text[:at] + draw(st.sampled_from([*'{}[]",:\\ ', "\x00", "\ud800", "NaN"])) + text[at:]
        )
    elif how == "cut":
        text = text[: draw(st.integers(0, len(text)))]
    body = text.encode("utf-8", "surrogatepass")
    if how == "bytes":
        at = draw(st.integers(0, len(body)))
        body = body[:at] + draw(st.binary(min_size=1, max_size=3)) + body[at:]
    return body


class JsonFuzzTests(SynchronousTestCase):
    def check(self, body: bytes) -> None:
        reference = strict_reading(body)
        try:
            value = parse_json_object(body)
        except Refusal as e:
            self.assertEqual((e.status, e.errcode, e.code), (400, "M_NOT_JSON", "bad_json"))
            self.assertIsNone(reference, f"refused a legal body {body!r}: {e.reason}")
            return
        self.assertIsNotNone(reference, f"accepted an illegal body {body!r}")
        self.assertEqual(value, reference)
        # Synapse's reader sees the same; the signature can be computed.
        self.assertEqual(json.loads(body.decode("utf-8")), value)
        encode_canonical_json(value)

    @FUZZ
    @given(json_texts())
    def test_structured(self, body: bytes) -> None:
        self.check(body)

    @FUZZ
    @given(st.binary(max_size=300))
    def test_bytes(self, body: bytes) -> None:
        self.check(body)


# --------------------------------------------------------------------------
# X-Matrix
# --------------------------------------------------------------------------

_SIG = "A" * 85 + "Q"
_auth_pieces = st.sampled_from(
    [
        "X-Matrix ",
        "x-matrix ",
        "origin=",
        "Origin=",
        "destination=",
        "key=",
        "KEY=",
        "sig=",
        "foo=",
        "ed25519:k",
        "ed25519:",
        _SIG,
        "==",
        "hs.test",
        "hs.test:8448",
        "[::1]",
        *list('"\\,= \t;:./+_aZ09\x00\x7f\xe9'),
    ]
)


class XMatrixFuzzTests(SynchronousTestCase):
    def check(self, values: list[bytes]) -> None:
        try:
            auth = parse_authorization(values)
        except Refusal as e:
            self.assertEqual((e.status, e.errcode), (401, "M_UNAUTHORIZED"))
            self.assertIn(e.code, {"missing_auth", "multiple_auth", "malformed_auth"})
            return
        [header] = values
        self.assertTrue(is_server_name(auth.origin))
        self.assertTrue(is_key_id(auth.key_id))
        if auth.destination is not None:
            self.assertTrue(is_server_name(auth.destination))
        # Synapse reads the same origin, key, signature and destination.
        facts = synapse_auth(header)
        self.assertIsNotNone(facts, header)
        assert facts is not None
        origin, key, sig, destination = facts
        self.assertEqual(
            (origin, key, sig.rstrip("="), destination),
            (auth.origin, auth.key_id, auth.sig.rstrip("="), auth.destination),
            header,
        )

    @FUZZ
    @given(
        st.lists(_auth_pieces, max_size=40).map(
            lambda p: ("X-Matrix " + "".join(p)).encode("utf-8")
        )
    )
    def test_header_like(self, header: bytes) -> None:
        self.check([header])

    @FUZZ
    @given(st.lists(st.binary(max_size=120), max_size=3))
    def test_bytes(self, values: list[bytes]) -> None:
        self.check(values)


# --------------------------------------------------------------------------
# Request targets
# --------------------------------------------------------------------------

_LITERALS = sorted(
    {seg for ep in ENDPOINTS for seg in ep.template.split("/") if seg and "{" not in seg}
)
_target_pieces = st.one_of(
    st.sampled_from(_LITERALS),
    st.sampled_from(
        [
            "/",
            "/",
            "/",
            "?",
            "#",
            ";",
            "%2F",
            "%2e",
            ".",
            "..",
            "%",
            "%C0%AE",
            "%00",
            "+",
            "!r:hs",
            "$e",
            "@u:hs.test",
            "hs.test",
            "\u00e9",
            " ",
        ]
    ),
)
_ALLOWED_REFUSALS = {
    (400, "malformed_target"),
    (404, "unknown_endpoint"),
    (405, "method_not_allowed"),
}


class TargetFuzzTests(SynchronousTestCase):
    def check(self, method: bytes, target: bytes) -> None:
        try:
            result: Match | Refusal = match_target(method, target)
        except Refusal as e:
            self.assertIn((e.status, e.code), _ALLOWED_REFUSALS)
            self.assertEqual(e.errcode, "M_UNRECOGNIZED")
            if e.status == 405:
                self.assertEqual(synapse_route(method, target), 405, target)
            return
        routed = synapse_route(method, target)
        self.assertIsInstance(routed, tuple, (method, target, routed))
        assert isinstance(routed, tuple)
        self.assertEqual(routed[0], result.endpoint, target)
        self.assertEqual(routed[1], dict(result.params), target)

    @FUZZ
    @given(
        st.sampled_from([b"GET", b"PUT", b"POST", b"HEAD", b"DELETE", b"get", b""]),
        st.lists(_target_pieces, max_size=14).map(lambda p: "".join(p).encode("utf-8")),
    )
    def test_target_like(self, method: bytes, target: bytes) -> None:
        self.check(method, target)

    @FUZZ
    @given(st.sampled_from([b"GET", b"PUT", b"POST"]), st.binary(max_size=80))
    def test_bytes(self, method: bytes, target: bytes) -> None:
        self.check(method, target)


# --------------------------------------------------------------------------
# Outbound proxy head, host parsers
# --------------------------------------------------------------------------

_head_pieces = st.sampled_from(
    [
        "CONNECT ",
        "GET ",
        "matrix.partner.example:8448",
        "[::1]:443",
        "2001:db8::1:8448",
        " HTTP/1.0",
        " HTTP/1.1",
        " HTTP/2",
        "\r\n",
        "\n",
        "\r",
        "Proxy-Authorization: Basic eDp5",
        "Host: a",
        ": ",
        " ",
        "\t",
        "\x00",
        "\xff",
    ]
)


class ProxyHeadFuzzTests(SynchronousTestCase):
    def check(self, head: bytes) -> None:
        try:
            method, target, version, headers = parse_head(head)
        except Refusal as r:
            self.assertEqual(r.code, "malformed_request")
            return
        self.assertIn(version, (b"HTTP/1.0", b"HTTP/1.1"))
        for part in (method, target):
            self.assertFalse(set(part) & set(b" \r\n"), head)
        for name, values in headers.items():
            self.assertEqual(name, name.lower())
            self.assertTrue(name and not set(name) & set(b" \t\r\n:"), head)
            for v in values:
                self.assertFalse(set(v) & set(b"\r\n"), head)
        if target:
            try:
                host, port = parse_connect_target(target.decode("ascii"))
            except (HostParseError, UnicodeDecodeError):
                return
            self.assertTrue(0 < port < 65536)
            self.assertFalse(set(host) & set(" /@?#\r\n"))

    @FUZZ
    @given(st.lists(_head_pieces, max_size=20).map(lambda p: "".join(p).encode("latin-1")))
    def test_head_like(self, head: bytes) -> None:
        self.check(head)

    @FUZZ
    @given(st.binary(max_size=200))
    def test_bytes(self, head: bytes) -> None:
        self.check(head)

    @FUZZ
    @given(
        st.text(st.sampled_from("abc.:[]0189-_ @/%\u00e9\x00"), max_size=30), st.binary(max_size=30)
    )
    def test_host_parsers(self, text: str, raw: bytes) -> None:
        for parse in (parse_authority, parse_connect_target):
            try:
                parse(text)
            except HostParseError:
                pass
        try:
            parse_sni(raw)
        except HostParseError:
            pass


# --------------------------------------------------------------------------
# Origin consistency over arbitrary (parsed) content
# --------------------------------------------------------------------------

_ids = st.sampled_from(
    [
        "@a:partner.example",
        "@a:internal.example",
        "@a:evil.example",
        "@x",
        "",
        "partner.example",
        "!r:internal.example",
    ]
)
_content_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        _ids,
        st.sampled_from(
            [
                "m.typing",
                "m.receipt",
                "m.presence",
                "m.direct_to_device",
                "m.device_list_update",
                "m.signing_key_update",
                "m.room.member",
                "join",
                "invite",
                "leave",
            ]
        ),
    ),
    lambda kids: (
        st.lists(kids, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "origin",
                    "pdus",
                    "edus",
                    "edu_type",
                    "content",
                    "user_id",
                    "sender",
                    "state_key",
                    "type",
                    "membership",
                    "event",
                    "m.read",
                    "push",
                    "messages",
                    "third_party_invite",
                    "room_id",
                ]
            ),
            kids,
            max_size=5,
        )
    ),
    max_leaves=25,
)
_ENDPOINT_NAMES = sorted(ep.name for ep in ENDPOINTS)


class OriginCheckFuzzTests(SynchronousTestCase):
    @FUZZ
    @given(
        st.sampled_from(_ENDPOINT_NAMES),
        st.dictionaries(st.sampled_from(["userId", "roomId", "eventId", "txnId"]), _ids),
        st.none()
        | st.dictionaries(
            st.sampled_from(
                ["origin", "pdus", "edus", "event", "sender", "type", "state_key", "content"]
            ),
            _content_values,
            max_size=5,
        ),
    )
    def test_only_refusals(
        self, name: str, params: dict[str, str], content: dict[str, Any] | None
    ) -> None:
        try:
            check_origin_consistency(
                name,
                params,
                "partner.example",
                content,
                internal_servers=frozenset({"internal.example"}),
                external_servers=frozenset({"partner.example"}),
            )
        except Refusal as e:
            self.assertEqual((e.status, e.errcode), (403, "M_FORBIDDEN"))
