"""Pinned and fetched server keys (docs/configuration.md, `verify_keys`, `key_fetch`)."""

from __future__ import annotations

import copy
from typing import Any

from signedjson.key import encode_verify_key_base64, generate_signing_key, get_verify_key
from signedjson.sign import sign_json
from twisted.trial.unittest import SynchronousTestCase

from sbg.matrix.keys import (
    MAX_KEYS_PER_RESPONSE,
    MAX_VALIDITY_MS,
    KeyResponseError,
    KeyRing,
    validate_key_response,
)
from sbg.matrix.xmatrix import parse_authorization, sign_request, verify_request_signature
from sbg.reasons import Refusal

NOW_MS = 1_700_000_000_000


class Clock:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> float:
        return self.ms / 1000


def _raw(signing_key: Any) -> bytes:
    return bytes(get_verify_key(signing_key).encode())


class KeyRingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.k1 = generate_signing_key("k1")
        self.k2 = generate_signing_key("k2")
        self.fk = generate_signing_key("f1")
        self.ring = KeyRing(
            {
                "pinned.test": (("ed25519:k1", _raw(self.k1)), ("ed25519:k2", _raw(self.k2))),
                "fetching.test": (("ed25519:k1", _raw(self.k1)),),
            }
        )

    def test_pinned_keys(self) -> None:
        keys = self.ring.keys_for("pinned.test")
        self.assertEqual(set(keys), {"ed25519:k1", "ed25519:k2"})
        self.assertEqual(bytes(keys["ed25519:k2"].encode()), _raw(self.k2))
        self.assertEqual(dict(self.ring.keys_for("unknown.test")), {})

    def test_pinned_keys_verify_requests(self) -> None:
        for key in (self.k1, self.k2):
            header = sign_request(
                key, "GET", "/_matrix/federation/v1/version", "pinned.test", "hs-int.test", None
            )
            auth = parse_authorization([header])
            verify_request_signature(
                auth,
                "GET",
                b"/_matrix/federation/v1/version",
                "hs-int.test",
                None,
                self.ring.keys_for("pinned.test"),
            )
        # A key pinned for another server does not make its signatures valid.
        header = sign_request(self.k2, "GET", "/x", "fetching.test", "hs-int.test", None)
        e = self.assertRaises(
            Refusal,
            verify_request_signature,
            parse_authorization([header]),
            "GET",
            b"/x",
            "hs-int.test",
            None,
            self.ring.keys_for("fetching.test"),
        )
        self.assertEqual(e.code, "unknown_key")

    def test_keys_for_is_read_only(self) -> None:
        keys = self.ring.keys_for("pinned.test")
        with self.assertRaises(TypeError):
            keys["ed25519:evil"] = get_verify_key(self.fk)  # type: ignore[index]
        self.assertNotIn("ed25519:evil", self.ring.keys_for("pinned.test"))

    def test_bad_pinned_key_refused(self) -> None:
        self.assertRaises(ValueError, KeyRing, {"a.test": [("ed25519:x", b"short")]})
        self.assertRaises(ValueError, KeyRing, {"a.test": [("rsa:x", b"\x00" * 32)]})


def _response(
    server: str,
    keys: list[Any],
    valid_until: int = NOW_MS + 3_600_000,
    old: dict[str, Any] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "server_name": server,
        "valid_until_ts": valid_until,
        "verify_keys": {
            f"ed25519:{k.version}": {"key": encode_verify_key_base64(get_verify_key(k))}
            for k in keys
        },
        "old_verify_keys": copy.deepcopy(old or {}),
    }
    for k in keys:
        body = sign_json(body, server, k)
    return body


class KeyResponseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.a = generate_signing_key("a")
        self.b = generate_signing_key("b")
        self.old = generate_signing_key("old")
        self.old_entry = {
            "ed25519:old": {
                "key": encode_verify_key_base64(get_verify_key(self.old)),
                "expired_ts": 123,
            }
        }

    def test_valid_response(self) -> None:
        body = _response("hs.test", [self.a, self.b], old=self.old_entry)
        keys = validate_key_response(body, "hs.test", NOW_MS)
        self.assertEqual(set(keys), {"ed25519:a", "ed25519:b", "ed25519:old"})
        self.assertEqual(keys["ed25519:a"][1], NOW_MS + 3_600_000)
        self.assertEqual(bytes(keys["ed25519:b"][0].encode()), _raw(self.b))
        self.assertEqual(keys["ed25519:old"], (keys["ed25519:old"][0], 123))
        self.assertEqual(bytes(keys["ed25519:old"][0].encode()), _raw(self.old))

    def test_validity_capped_at_seven_days(self) -> None:
        body = _response("hs.test", [self.a], valid_until=NOW_MS + 10 * MAX_VALIDITY_MS)
        self.assertEqual(
            validate_key_response(body, "hs.test", NOW_MS)["ed25519:a"][1], NOW_MS + MAX_VALIDITY_MS
        )

    def test_unknown_algorithms_ignored(self) -> None:
        body = _response("hs.test", [self.a])
        del body["signatures"]
        body["verify_keys"]["curve25519:x"] = {"key": "whatever"}
        body = sign_json(body, "hs.test", self.a)
        self.assertEqual(set(validate_key_response(body, "hs.test", NOW_MS)), {"ed25519:a"})

    def assertBad(self, body: Any, server: str = "hs.test") -> None:
        self.assertRaises(KeyResponseError, validate_key_response, body, server, NOW_MS)

    def test_wrong_server_name(self) -> None:
        self.assertBad(_response("hs.test", [self.a]), "other.test")
        self.assertBad(_response("HS.test", [self.a]))

    def test_expired(self) -> None:
        self.assertBad(_response("hs.test", [self.a], valid_until=NOW_MS))
        self.assertBad(_response("hs.test", [self.a], valid_until=NOW_MS - 1))

    def test_bad_valid_until(self) -> None:
        for value in (None, "9999999999999", True, float(NOW_MS + 10**6)):
            body = _response("hs.test", [self.a])
            body["valid_until_ts"] = value
            self.assertBad(body)

    def test_not_signed_by_every_listed_key(self) -> None:
        body = _response("hs.test", [self.a])
        body["verify_keys"]["ed25519:b"] = {"key": encode_verify_key_base64(get_verify_key(self.b))}
        self.assertBad(body)

    def test_signed_by_other_key(self) -> None:
        body = _response("hs.test", [self.a])
        evil = generate_signing_key("a")
        body["signatures"] = sign_json(
            {k: v for k, v in body.items() if k != "signatures"}, "hs.test", evil
        )["signatures"]
        self.assertBad(body)

    def test_signed_under_other_name(self) -> None:
        body = _response("hs.test", [self.a])
        body["signatures"] = {"other.test": body["signatures"]["hs.test"]}
        self.assertBad(body)

    def test_tampered_after_signing(self) -> None:
        for change in ("valid_until_ts", "old_verify_keys", "verify_keys"):
            body = _response("hs.test", [self.a], old=self.old_entry)
            tampered = copy.deepcopy(body)
            if change == "valid_until_ts":
                tampered[change] += 1
            elif change == "old_verify_keys":
                tampered[change]["ed25519:old"]["expired_ts"] = NOW_MS * 2
            else:
                tampered[change]["ed25519:a"]["extra"] = 1
            self.assertBad(tampered)

    def test_no_keys(self) -> None:
        body = sign_json(
            {"server_name": "hs.test", "valid_until_ts": NOW_MS + 1000, "verify_keys": {}},
            "hs.test",
            self.a,
        )
        self.assertBad(body)

    def test_malformed(self) -> None:
        not_objects: list[Any] = [[], "x"]
        for not_object in not_objects:
            self.assertBad(not_object)
        bad_id = generate_signing_key("bad-id")
        cases: list[tuple[str, Any]] = [
            ("verify_keys is not an object", lambda b: b.__setitem__("verify_keys", [])),
            ("ed25519:a: not an object", lambda b: b["verify_keys"].__setitem__("ed25519:a", "k")),
            (
                "not base64",
                lambda b: b["verify_keys"]["ed25519:a"].__setitem__("key", "x" * 42 + "!"),
            ),
            ("not base64", lambda b: b["verify_keys"]["ed25519:a"].__setitem__("key", "AAAA")),
            (
                "bad key id",
                lambda b: b["verify_keys"].__setitem__(
                    "ed25519:bad-id", {"key": encode_verify_key_base64(get_verify_key(bad_id))}
                ),
            ),
            (
                "expired_ts is not an integer",
                lambda b: b["old_verify_keys"]["ed25519:old"].pop("expired_ts"),
            ),
            ("not base64", lambda b: b["old_verify_keys"]["ed25519:old"].__setitem__("key", 5)),
            ("old_verify_keys is not an object", lambda b: b.__setitem__("old_verify_keys", "x")),
        ]
        for expected, mutate in cases:
            body = _response("hs.test", [self.a], old=self.old_entry)
            del body["signatures"]
            mutate(body)
            # Correctly self-signed by every key listed: only the shape is wrong.
            body = sign_json(sign_json(body, "hs.test", self.a), "hs.test", bad_id)
            e = self.assertRaises(KeyResponseError, validate_key_response, body, "hs.test", NOW_MS)
            self.assertIn(expected, str(e))

    def test_too_many_keys(self) -> None:
        body = _response("hs.test", [self.a])
        for i in range(MAX_KEYS_PER_RESPONSE):
            body["verify_keys"][f"ed25519:x{i}"] = body["verify_keys"]["ed25519:a"]
        self.assertBad(body)

    def test_validated_keys_feed_the_ring(self) -> None:
        usable = {
            key_id: vk
            for key_id, (vk, until) in validate_key_response(
                _response("hs.test", [self.a], old=self.old_entry), "hs.test", NOW_MS
            ).items()
            if until >= NOW_MS
        }
        # The old key expired long ago: only the current one is usable.
        self.assertEqual(set(usable), {"ed25519:a"})
        header = sign_request(self.a, "GET", "/x", "hs.test", "hs-int.test", None)
        verify_request_signature(
            parse_authorization([header]),
            "GET",
            b"/x",
            "hs-int.test",
            None,
            usable,
        )
