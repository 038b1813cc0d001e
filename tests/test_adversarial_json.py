"""JSON bodies through the real inbound listener.

A body that two JSON readers could read differently, or that Synapse's
reader refuses, gets 400 `M_NOT_JSON` (docs/decisions.md, inbound step
17): the attacker signs the object Synapse would see (for a duplicate key,
the last value wins), and the answer is still 400, not the 401 of a bad
signature (step 16), and nothing reaches the upstream. Legal oddities (floats,
large integers, escapes, nesting up to the limit) are forwarded
byte-identical.
"""

from __future__ import annotations

import json
from typing import Any

from testbed.configtools import INTERNAL_HOST, PARTNER_SERVER
from tests.asynctest import TestCase
from tests.gateway import Gateway, assert_refused, start_gateway
from tests.rawhttp import build_request

TXN = b"/_matrix/federation/v1/send/1700000000009"
KEYS_QUERY = b"/_matrix/federation/v1/user/keys/query"


def txn(**extra: Any) -> dict[str, Any]:
    return {"origin": PARTNER_SERVER, "origin_server_ts": 1, "pdus": [], "edus": [], **extra}


def _last_wins(body: bytes) -> Any:
    """What Synapse's reader (stdlib json) makes of the body, if anything."""
    try:
        return json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def request_with_body(gw: Gateway, body: bytes, signed_content: Any, target: bytes = TXN) -> bytes:
    method = "PUT" if target == TXN else "POST"
    headers = gw.signed_headers(method, target, signed_content)
    return build_request(method.encode(), target, headers, body)


def nest(depth: int) -> bytes:
    """A `/send` body whose deepest value sits `depth` containers down."""
    inner = b"[" * (depth - 1) + b"1" + b"]" * (depth - 1)
    head = b'{"origin": "partner.example", "origin_server_ts": 1, "pdus": [], "edus": [], "x": '
    return head + inner + b"}"


# (name, body): each must be refused with 400 M_NOT_JSON.
REFUSED: list[tuple[str, bytes]] = [
    (
        "duplicate top-level key",
        b'{"origin": "evil.example", "origin": "partner.example", "pdus": [], "edus": []}',
    ),
    (
        "duplicate key at depth",
        b'{"origin": "partner.example", "pdus": [], "edus": [{"edu_type": "m.typing", '
        b'"content": {"user_id": "@a:internal.example", "user_id": "@a:partner.example"}}]}',
    ),
    (
        "duplicate key deep in a list",
        b'{"origin": "partner.example", "pdus": [], "edus": [], "x": [[{"a": 1, "b": [{"c": 1, "c": 2}]}]]}',
    ),
    (
        "duplicate escaped key",
        b'{"origin": "partner.example", "\\u006frigin": "partner.example", "pdus": [], "edus": []}',
    ),
    ("NaN", b'{"origin": "partner.example", "pdus": [], "edus": [], "x": NaN}'),
    ("Infinity", b'{"origin": "partner.example", "pdus": [], "edus": [], "x": Infinity}'),
    ("-Infinity", b'{"origin": "partner.example", "pdus": [], "edus": [], "x": -Infinity}'),
    ("float overflow", b'{"origin": "partner.example", "pdus": [], "edus": [], "x": 1e400}'),
    (
        "negative float overflow",
        b'{"origin": "partner.example", "pdus": [], "edus": [], "x": -1.5e99999}',
    ),
    (
        "integer too long",
        b'{"origin": "partner.example", "pdus": [], "edus": [], "x": ' + b"9" * 5000 + b"}",
    ),
    (
        "lone high surrogate",
        b'{"origin": "partner.example", "pdus": [], "edus": [], "x": "\\ud800"}',
    ),
    (
        "lone low surrogate",
        b'{"origin": "partner.example", "pdus": [], "edus": [], "x": "\\udc00x"}',
    ),
    (
        "reversed surrogate pair",
        b'{"origin": "partner.example", "pdus": [], "edus": [], "x": "\\udc00\\ud800"}',
    ),
    ("surrogate in a key", b'{"origin": "partner.example", "pdus": [], "edus": [], "\\udfff": 1}'),
    ("UTF-8 BOM", b'\xef\xbb\xbf{"origin": "partner.example", "pdus": [], "edus": []}'),
    ("UTF-16", '{"origin": "partner.example", "pdus": [], "edus": []}'.encode("utf-16")),
    ("invalid UTF-8", b'{"origin": "partner.example", "pdus": [], "edus": [], "x": "\xff"}'),
    ("overlong UTF-8", b'{"origin": "partner.example", "pdus": [], "edus": [], "x": "\xc0\xaf"}'),
    (
        "CESU-8 surrogate bytes",
        b'{"origin": "partner.example", "pdus": [], "edus": [], "x": "\xed\xa0\x80"}',
    ),
    ("too deep", nest(65)),
    ("far too deep", b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ("top-level array", b'[{"origin": "partner.example"}]'),
    ("top-level string", b'"x"'),
    ("trailing garbage", b'{"origin": "partner.example", "pdus": [], "edus": []} {}'),
    ("trailing comma", b'{"origin": "partner.example", "pdus": [], "edus": [],}'),
    ("single quotes", b"{'origin': 'partner.example'}"),
    ("comment", b'{"origin": "partner.example", "pdus": [], "edus": [] /* x */}'),
    ("empty", b""),
    (
        "raw control character in a string",
        b'{"origin": "partner.example", "pdus": [], "edus": [], "x": "a\x01"}',
    ),
]

# (name, body): legal, forwarded as sent.
ACCEPTED: list[tuple[str, bytes]] = [
    (
        "float in EDU content",
        b'{"origin": "partner.example", "origin_server_ts": 1, "pdus": [], "edus": [], "x": 1.5}',
    ),
    (
        "exponent",
        b'{"origin": "partner.example", "origin_server_ts": 1, "pdus": [], "edus": [], "x": 1E10}',
    ),
    (
        "float underflow",
        b'{"origin": "partner.example", "origin_server_ts": 1, "pdus": [], "edus": [], "x": 1e-400}',
    ),
    (
        "negative zero",
        b'{"origin": "partner.example", "origin_server_ts": 1, "pdus": [], "edus": [], "x": -0}',
    ),
    (
        "big integer",
        b'{"origin": "partner.example", "origin_server_ts": 1, "pdus": [], "edus": [], "x": '
        + b"9" * 300
        + b"}",
    ),
    (
        "surrogate pair",
        b'{"origin": "partner.example", "origin_server_ts": 1, "pdus": [], "edus": [], "x": "\\ud83d\\ude00"}',
    ),
    (
        "escaped keys, different",
        b'{"origin": "partner.example", "origin_server_ts": 1, "pdus": [], "edus": [], "\\u0078": 1, "y": 2}',
    ),
    (
        "raw non-ASCII",
        '{"origin": "partner.example", "origin_server_ts": 1, "pdus": [], "edus": [], "x": "é€😀"}'.encode(),
    ),
    (
        "brackets and quotes in strings",
        b'{"origin": "partner.example", "origin_server_ts": 1, "pdus": [], "edus": [], "x": "[[[{{\\"\\\\"}',
    ),
    ("nested to the limit", nest(64)),
    (
        "whitespace everywhere",
        b' \r\n\t{ "origin" : "partner.example" ,"origin_server_ts":1,"pdus":[ ],"edus":[]\n}\n ',
    ),
]


class RefusedJsonTests(TestCase):
    async def test_each_refused_body_gets_not_json_once_its_signature_holds(self) -> None:
        gw = await start_gateway(self)
        for name, body in REFUSED:
            # Signed over what Synapse would read, where it reads anything:
            # the signature is valid for that reading, and still irrelevant.
            signed = _last_wins(body)
            request = None
            if isinstance(signed, dict):
                try:
                    request = request_with_body(gw, body, signed)
                except (ValueError, UnicodeError):
                    pass
            if request is None:
                # Not even signable as JSON (NaN, infinity, lone surrogates,
                # a BOM): a hostile origin signs the bytes themselves.
                headers = gw.raw_signed_headers("PUT", TXN, body)
                request = build_request(b"PUT", TXN, headers, body)
            resp = await gw.inbound(request)
            self.assertEqual(resp.status, 400, (name, resp.body))
            assert_refused(self, gw, resp, 400, "M_NOT_JSON", code="bad_json")

    async def test_each_refused_body_under_a_forged_signature_is_never_parsed(self) -> None:
        # Nobody signed these bodies: the signature check over the bytes
        # comes first; only a body of at most 1 MiB is then read (as
        # Synapse reads it) to check its canonical encoding, which refuses
        # what does not parse with 400 and the rest with 401.
        gw = await start_gateway(self)
        for name, body in REFUSED:
            resp = await gw.inbound(request_with_body(gw, body, {"not": "this"}))
            self.assertIn(resp.status, (400, 401), (name, resp.body))
            self.assertEqual(gw.upstream.requests, [], name)
            self.assertIn(gw.last_audit()["code"], ("bad_json", "bad_signature"), name)

    async def test_duplicate_key_signed_last_wins_is_not_a_signature_question(self) -> None:
        """The signature over the last-wins object verifies (so a reader that
        keeps the last value would accept it); sbg refuses the body itself."""
        gw = await start_gateway(self)
        body = b'{"origin": "internal.example", "origin": "partner.example", "origin_server_ts": 1, "pdus": [], "edus": []}'
        last = json.loads(body)
        self.assertEqual(last["origin"], PARTNER_SERVER)
        resp = await gw.inbound(request_with_body(gw, body, last))
        assert_refused(self, gw, resp, 400, "M_NOT_JSON", code="bad_json")
        self.assertIn("duplicate", resp.json()["error"])
        # The same object without the duplicate goes through: the refusal
        # above was the duplicate's, not the signature's.
        clean = json.dumps(last).encode()
        resp = await gw.inbound(request_with_body(gw, clean, last))
        self.assertEqual(resp.status, 200, resp.body)
        self.assertEqual(gw.upstream.requests[-1].body, clean)

    async def test_bad_json_outranks_a_bad_signature(self) -> None:
        gw = await start_gateway(self)
        body = b'{"origin": "partner.example", "pdus": [], "edus": [], "x": NaN}'
        resp = await gw.inbound(request_with_body(gw, body, {"something": "else"}))
        assert_refused(self, gw, resp, 400, "M_NOT_JSON", code="bad_json")

    async def test_refused_on_other_json_endpoints_too(self) -> None:
        gw = await start_gateway(self)
        body = b'{"device_keys": {"@a:internal.example": [], "@a:internal.example": ["x"]}}'
        resp = await gw.inbound(request_with_body(gw, body, json.loads(body), KEYS_QUERY))
        assert_refused(self, gw, resp, 400, "M_NOT_JSON", code="bad_json")

    async def test_unauthenticated_json_endpoint(self) -> None:
        """3pid/onbind needs no signature: its body is still checked."""
        gw = await start_gateway(self, {"trust_levels.external.inbound": ["third_party_invites"]})
        target = b"/_matrix/federation/v1/3pid/onbind"
        headers = [(b"Host", INTERNAL_HOST.encode()), (b"Content-Type", b"application/json")]
        for body in (b'{"mxid": "@a:b", "mxid": "@c:d"}', b'{"x": NaN}', b"\xef\xbb\xbf{}"):
            resp = await gw.inbound(build_request(b"POST", target, headers, body))
            assert_refused(self, gw, resp, 400, "M_NOT_JSON", code="bad_json")
        resp = await gw.inbound(build_request(b"POST", target, headers, b'{"mxid": "@a:b"}'))
        self.assertEqual(resp.status, 200, resp.body)


class AcceptedJsonTests(TestCase):
    async def test_legal_oddities_are_forwarded_byte_identical(self) -> None:
        gw = await start_gateway(self)
        for name, body in ACCEPTED:
            content = json.loads(body)
            resp = await gw.inbound(request_with_body(gw, body, content))
            self.assertEqual(resp.status, 200, (name, resp.body))
            self.assertEqual(gw.upstream.requests[-1].body, body, name)
        self.assertEqual(len(gw.upstream.requests), len(ACCEPTED))

    async def test_float_signature_uses_synapse_encoding(self) -> None:
        """`1E10` is a float to Synapse and is signed as `10000000000.0`; a
        sender that signed the integer 10000000000 does not verify."""
        gw = await start_gateway(self)
        body = b'{"origin": "partner.example", "origin_server_ts": 1, "pdus": [], "edus": [], "x": 1E10}'
        as_int = txn(x=10_000_000_000)
        resp = await gw.inbound(request_with_body(gw, body, as_int))
        assert_refused(self, gw, resp, 401, "M_UNAUTHORIZED", code="bad_signature")
