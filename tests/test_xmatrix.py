"""X-Matrix header parsing, signing and signature checks (docs/decisions.md,
inbound steps 9 and 16)."""

from __future__ import annotations

import base64

from canonicaljson import encode_canonical_json
from signedjson.key import decode_verify_key_bytes, generate_signing_key, get_verify_key
from twisted.trial.unittest import SynchronousTestCase

from sbg.matrix.xmatrix import (
    XMatrixAuth,
    parse_authorization,
    sign_request,
    signed_bytes_with_raw_body,
    signed_request_json,
    verify_request_signature,
)
from sbg.reasons import Refusal

SIG = base64.b64encode(bytes(range(64))).decode().rstrip("=")
assert len(SIG) == 86
KEY = "ed25519:a_1"


def _h(params: str) -> list[bytes]:
    return [("X-Matrix " + params).encode()]


def _std() -> str:
    return f'origin="hs-ext.test",destination="hs-int.test",key="{KEY}",sig="{SIG}"'


class GrammarTests(SynchronousTestCase):
    VALID: list[tuple[bytes, XMatrixAuth]] = [
        # Synapse's own shape.
        (
            f'X-Matrix origin="hs-ext.test",key="{KEY}",sig="{SIG}",destination="hs-int.test"'.encode(),
            XMatrixAuth("hs-ext.test", "hs-int.test", KEY, SIG),
        ),
        # Unquoted values, including ':' in key id and ports.
        (
            f"X-Matrix origin=hs-ext.test:8448,destination=hs-int.test:443,key={KEY},sig={SIG}".encode(),
            XMatrixAuth("hs-ext.test:8448", "hs-int.test:443", KEY, SIG),
        ),
        # Spaces and tabs around commas, several spaces after the scheme.
        (
            f'X-Matrix   origin="a.test" ,\tkey="{KEY}"\t, sig="{SIG}"'.encode(),
            XMatrixAuth("a.test", None, KEY, SIG),
        ),
        # Case-insensitive names, any order, unknown names ignored.
        (
            f'X-Matrix SIG="{SIG}",Key={KEY},ORIGIN=a.test,foo="bar baz",x=1'.encode(),
            XMatrixAuth("a.test", None, KEY, SIG),
        ),
        # Padded signature, IP literal origins.
        (
            f'X-Matrix origin="[::1]:8448",destination=10.0.0.1,key={KEY},sig="{SIG}=="'.encode(),
            XMatrixAuth("[::1]:8448", "10.0.0.1", KEY, SIG + "=="),
        ),
        (
            f"X-Matrix origin=[2001:db8::1],key={KEY},sig={SIG}".encode(),
            XMatrixAuth("[2001:db8::1]", None, KEY, SIG),
        ),
    ]

    def test_valid(self) -> None:
        for raw, expected in self.VALID:
            with self.subTest(raw=raw):
                self.assertEqual(parse_authorization([raw]), expected)

    INVALID: list[tuple[str, bytes]] = [
        ("tab after scheme", f"X-Matrix\torigin=a.test,key={KEY},sig={SIG}".encode()),
        ("lower-case scheme", f"x-matrix origin=a.test,key={KEY},sig={SIG}".encode()),
        ("other scheme", f"Bearer origin=a.test,key={KEY},sig={SIG}".encode()),
        ("no space", f"X-Matrixorigin=a.test,key={KEY},sig={SIG}".encode()),
        ("leading space", f" X-Matrix origin=a.test,key={KEY},sig={SIG}".encode()),
        ("scheme only", b"X-Matrix "),
        ("duplicate param", f"X-Matrix origin=a.test,key={KEY},sig={SIG},origin=b.test".encode()),
        (
            "duplicate param by case",
            f"X-Matrix origin=a.test,key={KEY},sig={SIG},Origin=a.test".encode(),
        ),
        ("duplicate unknown", f"X-Matrix origin=a.test,key={KEY},sig={SIG},x=1,x=2".encode()),
        ("quoted comma", f'X-Matrix origin="a.test,b.test",key={KEY},sig={SIG}'.encode()),
        ("quoted comma unknown", f'X-Matrix origin=a.test,key={KEY},sig={SIG},x="1,2"'.encode()),
        ("backslash", f'X-Matrix origin="a\\.test",key={KEY},sig={SIG}'.encode()),
        ("escaped quote", f'X-Matrix origin="a.test\\"",key={KEY},sig={SIG}'.encode()),
        ("unterminated quote", f'X-Matrix key={KEY},sig={SIG},origin="a.test'.encode()),
        ("bad key id algorithm", f"X-Matrix origin=a.test,key=curve25519:a,sig={SIG}".encode()),
        ("bad key id chars", f"X-Matrix origin=a.test,key=ed25519:a-b,sig={SIG}".encode()),
        ("empty key version", f"X-Matrix origin=a.test,key=ed25519:,sig={SIG}".encode()),
        ("bad base64 char", f"X-Matrix origin=a.test,key={KEY},sig={SIG[:-1]}!".encode()),
        ("urlsafe base64", f"X-Matrix origin=a.test,key={KEY},sig={SIG[:-2]}-_".encode()),
        ("short sig", f"X-Matrix origin=a.test,key={KEY},sig={SIG[:-4]}".encode()),
        ("long sig", f"X-Matrix origin=a.test,key={KEY},sig={SIG}AAAA".encode()),
        ("missing sig", f"X-Matrix origin=a.test,key={KEY}".encode()),
        ("missing key", f"X-Matrix origin=a.test,sig={SIG}".encode()),
        ("missing origin", f"X-Matrix key={KEY},sig={SIG}".encode()),
        ("signature not sig", f"X-Matrix origin=a.test,key={KEY},signature={SIG}".encode()),
        ("bad origin", f"X-Matrix origin=a_b.test,key={KEY},sig={SIG}".encode()),
        ("origin trailing dot", f"X-Matrix origin=a.test.,key={KEY},sig={SIG}".encode()),
        ("origin empty label", f"X-Matrix origin=a..test,key={KEY},sig={SIG}".encode()),
        ("origin port 6 digits", f"X-Matrix origin=a.test:123456,key={KEY},sig={SIG}".encode()),
        ("origin empty port", f"X-Matrix origin=a.test:,key={KEY},sig={SIG}".encode()),
        ("origin bad ipv6", f"X-Matrix origin=[::g],key={KEY},sig={SIG}".encode()),
        ("origin scoped ipv6", f"X-Matrix origin=[fe80::1%eth0],key={KEY},sig={SIG}".encode()),
        ("bad destination", f"X-Matrix origin=a.test,destination=b/c,key={KEY},sig={SIG}".encode()),
        (
            "empty destination",
            f'X-Matrix origin=a.test,destination="",key={KEY},sig={SIG}'.encode(),
        ),
        ("space around =", f"X-Matrix origin = a.test,key={KEY},sig={SIG}".encode()),
        ("trailing comma", f"X-Matrix origin=a.test,key={KEY},sig={SIG},".encode()),
        ("empty element", f"X-Matrix origin=a.test,,key={KEY},sig={SIG}".encode()),
        ("trailing space", f"X-Matrix origin=a.test,key={KEY},sig={SIG} ".encode()),
        ("no comma", f"X-Matrix origin=a.test key={KEY},sig={SIG}".encode()),
        ("empty value", f"X-Matrix origin=a.test,key={KEY},sig={SIG},x=".encode()),
        ("non-ASCII", f"X-Matrix origin=a.test,key={KEY},sig={SIG},x=\u00e9".encode()),
        ("NUL", f"X-Matrix origin=a.test\x00,key={KEY},sig={SIG}".encode()),
        ("unicode digit port", f"X-Matrix origin=a.test:\u0661,key={KEY},sig={SIG}".encode()),
    ]

    def test_invalid(self) -> None:
        for label, raw in self.INVALID:
            with self.subTest(label=label):
                e = self.assertRaises(Refusal, parse_authorization, [raw])
                self.assertEqual(
                    (e.status, e.errcode, e.code), (401, "M_UNAUTHORIZED", "malformed_auth")
                )

    def test_missing(self) -> None:
        no_values: list[list[bytes] | None] = [None, []]
        for values in no_values:
            e = self.assertRaises(Refusal, parse_authorization, values)
            self.assertEqual((e.status, e.errcode, e.code), (401, "M_UNAUTHORIZED", "missing_auth"))

    def test_two_headers(self) -> None:
        one = _h(_std())[0]
        other = f"X-Matrix origin=evil.test,key={KEY},sig={SIG}".encode()
        for values in ([one, other], [one, one], [one, b"Bearer x"]):
            e = self.assertRaises(Refusal, parse_authorization, values)
            self.assertEqual((e.status, e.code), (401, "multiple_auth"))


class SignatureTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.key = generate_signing_key("k1")
        self.keys = {"ed25519:k1": get_verify_key(self.key)}
        self.content = {"pdus": [], "edus": [{"edu_type": "m.typing", "content": {"f": 1.5}}]}
        self.uri = b"/_matrix/federation/v1/send/txn1?a=b%20c"

    def _auth(self, content: object | None = None, **kw: object) -> XMatrixAuth:
        args: dict[str, object] = {
            "method": "PUT",
            "uri": self.uri,
            "origin": "hs-ext.test",
            "destination": "hs-int.test",
            "content": self.content if content is None else content,
        }
        args.update(kw)
        header = sign_request(self.key, **args)  # type: ignore[arg-type]
        return parse_authorization([header])

    def _verify(self, auth: XMatrixAuth, **kw: object) -> None:
        args: dict[str, object] = {
            "method": "PUT",
            "uri": self.uri,
            "destination": "hs-int.test",
            "content": self.content,
            "keys": self.keys,
        }
        args.update(kw)
        verify_request_signature(auth, **args)  # type: ignore[arg-type]

    def _assert_bad(self, auth: XMatrixAuth, code: str = "bad_signature", **kw: object) -> None:
        e = self.assertRaises(Refusal, self._verify, auth, **kw)
        self.assertEqual((e.status, e.errcode, e.code), (401, "M_UNAUTHORIZED", code))

    def test_header_shape(self) -> None:
        header = sign_request(
            self.key, "GET", "/_matrix/federation/v1/version", "a.test", "b.test", None
        )
        self.assertTrue(
            header.startswith(
                b'X-Matrix origin="a.test",destination="b.test",key="ed25519:k1",sig="'
            )
        )
        auth = parse_authorization([header])
        self.assertEqual(
            (auth.origin, auth.destination, auth.key_id), ("a.test", "b.test", "ed25519:k1")
        )
        self.assertEqual(len(auth.sig), 86)

    def test_valid_verifies(self) -> None:
        self._verify(self._auth())

    def test_get_without_content(self) -> None:
        auth = parse_authorization(
            [sign_request(self.key, "GET", self.uri, "hs-ext.test", "hs-int.test", None)]
        )
        self._verify(auth, method="GET", content=None)
        # A signature over no content does not cover an (injected) body.
        self._assert_bad(auth, method="GET", content={})

    def test_padded_sig_verifies(self) -> None:
        auth = self._auth()
        padded = XMatrixAuth(auth.origin, auth.destination, auth.key_id, auth.sig + "==")
        self._verify(padded)

    def test_floats_and_unicode_in_content(self) -> None:
        content = {"x": 0.1, "y": 1e10, "z": "caf\u00e9 \U0001f600", "n": -(2**60)}
        self._verify(self._auth(content=content), content=content)

    def test_tampered_method(self) -> None:
        self._assert_bad(self._auth(), method="POST")

    def test_tampered_uri_path(self) -> None:
        self._assert_bad(self._auth(), uri=b"/_matrix/federation/v1/send/txn2?a=b%20c")

    def test_tampered_uri_query(self) -> None:
        self._assert_bad(self._auth(), uri=b"/_matrix/federation/v1/send/txn1?a=b+c")
        self._assert_bad(self._auth(), uri=b"/_matrix/federation/v1/send/txn1")

    def test_uri_not_ascii(self) -> None:
        self._assert_bad(self._auth(), uri=self.uri + "\u00e9".encode())

    def test_tampered_origin(self) -> None:
        auth = self._auth()
        self._assert_bad(XMatrixAuth("other.test", auth.destination, auth.key_id, auth.sig))

    def test_tampered_destination(self) -> None:
        self._assert_bad(self._auth(), destination="hs-int2.test")

    def test_signed_for_other_destination(self) -> None:
        self._assert_bad(self._auth(destination="elsewhere.test"))

    def test_tampered_content(self) -> None:
        changed = {"pdus": [], "edus": [{"edu_type": "m.typing", "content": {"f": 1.25}}]}
        self._assert_bad(self._auth(), content=changed)
        self._assert_bad(self._auth(), content=None)

    def test_other_key(self) -> None:
        other = generate_signing_key("k1")
        self._assert_bad(self._auth(), keys={"ed25519:k1": get_verify_key(other)})

    def test_mapping_decides_key_id(self) -> None:
        # The same key bytes loaded under another version name still check
        # the header's key id: the mapping, not the key's own name, decides.
        raw = get_verify_key(self.key).encode()
        self._verify(self._auth(), keys={"ed25519:k1": decode_verify_key_bytes("ed25519:x", raw)})

    def test_unknown_key(self) -> None:
        auth = self._auth()
        self._assert_bad(auth, code="unknown_key", keys={})
        unknown = XMatrixAuth(auth.origin, auth.destination, "ed25519:k9", auth.sig)
        self._assert_bad(unknown, code="unknown_key")

    def test_flipped_sig(self) -> None:
        auth = self._auth()
        raw = bytearray(base64.b64decode(auth.sig + "=="))
        raw[10] ^= 1
        flipped = base64.b64encode(bytes(raw)).decode().rstrip("=")
        self._assert_bad(XMatrixAuth(auth.origin, auth.destination, auth.key_id, flipped))

    def test_signed_object(self) -> None:
        self.assertEqual(
            signed_request_json("GET", "/x?y", "a", "b", None),
            {"method": "GET", "uri": "/x?y", "origin": "a", "destination": "b"},
        )
        self.assertEqual(
            signed_request_json("PUT", "/x", "a", "b", {})["content"],
            {},
        )


class RawBodySignatureTests(SignatureTests):
    """Every signature test again, with the raw body given as Synapse sends
    it (canonical JSON): the check over the body's own bytes comes first."""

    def _verify(self, auth: XMatrixAuth, **kw: object) -> None:
        content = kw.get("content", self.content)
        if content is not None and "body" not in kw:
            kw["body"] = encode_canonical_json(content)
        super()._verify(auth, **kw)

    def _sign_raw(self, body: bytes, destination: str = "hs-int.test") -> XMatrixAuth:
        """A signature over the request with `body` spliced in as it is."""
        message = signed_bytes_with_raw_body(
            "PUT", self.uri.decode(), "hs-ext.test", destination, body
        )
        sig = self.key.sign(message).signature
        return XMatrixAuth(
            "hs-ext.test", destination, "ed25519:k1", base64.b64encode(sig).decode().rstrip("=")
        )

    def test_spliced_bytes_are_the_canonical_encoding(self) -> None:
        body = encode_canonical_json(self.content)
        self.assertEqual(
            signed_bytes_with_raw_body("PUT", "/x?y", "a", "b", body),
            encode_canonical_json(signed_request_json("PUT", "/x?y", "a", "b", self.content)),
        )

    def test_non_canonical_body_falls_back_to_canonical(self) -> None:
        # Keys out of order and spaces: the raw bytes are not what was
        # signed, the canonical encoding of the parse is.
        body = b'{ "pdus": [], "edus": [ {"content": {"f": 1.5}, "edu_type": "m.typing"} ] }'
        self._verify(self._auth(), body=body)

    def test_signature_over_the_raw_body_verifies(self) -> None:
        body = b'{"edus": [{"content": {"f": 1.5}, "edu_type": "m.typing"}], "pdus": []}'
        self._verify(self._sign_raw(body), body=body)

    def test_raw_signature_does_not_cover_other_bytes(self) -> None:
        body = b'{"edus": [{"content": {"f": 1.5}, "edu_type": "m.typing"}], "pdus": []}'
        auth = self._sign_raw(body)
        # Same parse, other bytes: neither check passes.
        self._assert_bad(auth, body=body.replace(b", ", b","))
        self._assert_bad(auth, body=encode_canonical_json(self.content))
        # Signed for another destination.
        self._assert_bad(self._sign_raw(body, "elsewhere.test"), body=body)
        # Without a body (GET), the raw check does not apply.
        self._assert_bad(auth, method="GET", content=None, body=None)
