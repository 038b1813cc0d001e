"""Strict JSON request bodies (docs/decisions.md, inbound step 17)."""

from __future__ import annotations

import json
from itertools import accumulate

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sbg.matrix.jsonbody import MAX_DEPTH, _depth, parse_json_object
from sbg.reasons import Refusal


class ParseTests(SynchronousTestCase):
    def assertRefused(self, body: bytes) -> Refusal:
        e = self.assertRaises(Refusal, parse_json_object, body)
        self.assertEqual((e.status, e.errcode, e.code), (400, "M_NOT_JSON", "bad_json"))
        return e

    REFUSED: list[tuple[str, bytes]] = [
        ("empty", b""),
        ("whitespace only", b"  "),
        ("top-level list", b"[]"),
        ("top-level string", b'"x"'),
        ("top-level number", b"1"),
        ("top-level null", b"null"),
        ("duplicate key", b'{"a": 1, "a": 1}'),
        ("duplicate key nested", b'{"a": {"b": [{"c": 1, "c": 2}]}}'),
        ("duplicate key deep", b'{"x": [[[{"k": {"d": 1, "e": 2, "d": 3}}]]]}'),
        ("NaN", b'{"a": NaN}'),
        ("Infinity", b'{"a": Infinity}'),
        ("-Infinity", b'{"a": [-Infinity]}'),
        ("overflowing float", b'{"a": 1e400}'),
        ("overflowing negative float", b'{"a": -1e400}'),
        ("lone high surrogate in value", b'{"a": "x\\ud800y"}'),
        ("lone low surrogate in value", b'{"a": "\\udc00"}'),
        ("lone surrogate in key", b'{"\\ud83d": 1}'),
        ("lone surrogate in list", b'{"a": [1, ["\\uDBFF"]]}'),
        ("reversed pair", b'{"a": "\\ude00\\ud83d"}'),
        ("UTF-8 BOM", b'\xef\xbb\xbf{"a": 1}'),
        ("UTF-16 BOM", '\ufeff{"a": 1}'.encode("utf-16")),
        ("UTF-16 without BOM", '{"a": 1}'.encode("utf-16-le")),
        ("invalid UTF-8", b'{"a": "\xff"}'),
        ("overlong UTF-8", b'{"a": "\xc0\xaf"}'),
        ("encoded surrogate", b'{"a": "\xed\xa0\x80"}'),
        ("truncated UTF-8", b'{"a": "\xe2\x82"}'),
        ("trailing garbage", b'{"a": 1} x'),
        ("two objects", b"{}{}"),
        ("trailing comma", b'{"a": 1,}'),
        ("single quotes", b"{'a': 1}"),
        ("raw control char", b'{"a": "x\ny"}'),
        ("10000-digit integer", b'{"a": ' + b"9" * 10000 + b"}"),
        ("5000-digit integer", b'{"a": -' + b"1" * 5000 + b"}"),
        ("unterminated", b'{"a": "'),
        ("comment", b'{"a": 1 /* x */}'),
    ]

    def test_refused(self) -> None:
        for label, body in self.REFUSED:
            with self.subTest(label=label):
                self.assertRefused(body)

    def test_deep_nesting(self) -> None:
        for n in (MAX_DEPTH + 1, 1000, 10000, 1_000_000):
            with self.subTest(depth=n):
                e = self.assertRefused(b'{"a":' + b"[" * (n - 1) + b"]" * (n - 1) + b"}")
                self.assertIn("deeper", e.reason)
                e = self.assertRefused(b'{"a":' + b'{"a":' * (n - 1) + b"1" + b"}" * n)
                self.assertIn("deeper", e.reason)
        # Unbalanced, too deep and unterminated: never a RecursionError.
        e = self.assertRefused(b'{"a":' + b"[" * 100000)
        self.assertIn("deeper", e.reason)

    def test_depth_limit_is_exact(self) -> None:
        at_limit = b'{"a":' + b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1) + b"}"
        self.assertIn("a", parse_json_object(at_limit))
        self.assertRefused(b'{"a":[' + at_limit[5:-1] + b"]}")

    def test_brackets_inside_strings_do_not_count(self) -> None:
        deep_text = "[" * 1000 + "{" * 1000 + '\\"[['
        body = json.dumps({"a": deep_text, "b": ["]]]", "\\"]}).encode()
        self.assertEqual(parse_json_object(body)["a"], deep_text)

    @settings(max_examples=2000, deadline=None)
    @given(st.text(alphabet='"[{]}\\a', min_size=150, max_size=600).map(str.encode))
    def test_depth_is_the_plain_algorithm(self, body: bytes) -> None:
        """`_depth` drops adjacent quote pairs before splitting: its result
        must be the plain algorithm's on any bytes, JSON or not."""
        plain = body.replace(b"\\\\", b"").replace(b'\\"', b"")
        kept = bytes(c for c in plain if c in b'"[]{}')
        brackets = b"".join(kept.split(b'"')[::2])
        opens = brackets.count(b"[") + brackets.count(b"{")
        steps = [1 if c in b"[{" else -1 for c in brackets]
        self.assertEqual(_depth(body), max(accumulate(steps)) if opens > MAX_DEPTH else 0)

    ACCEPTED: list[tuple[str, bytes, object]] = [
        ("empty object", b"{}", {}),
        ("whitespace", b' \r\n\t{ "a" : 1 } \n', {"a": 1}),
        (
            "floats",
            b'{"a": 1.5, "b": -0.0, "c": 1e10, "d": 1E-400}',
            {"a": 1.5, "b": -0.0, "c": 1e10, "d": 0.0},
        ),
        (
            "big int",
            b'{"a": 123456789012345678901234567890}',
            {"a": 123456789012345678901234567890},
        ),
        ("surrogate pair", b'{"\\ud83d\\ude00": "\\uD83D\\uDE00"}', {"\U0001f600": "\U0001f600"}),
        ("escaped backslash before u", b'{"a": "\\\\ud800"}', {"a": "\\ud800"}),
        ("raw non-ASCII", '{"a": "caf\u00e9 \U0001f600"}'.encode(), {"a": "caf\u00e9 \U0001f600"}),
        (
            "same key in sibling objects",
            b'{"a": {"k": 1}, "b": {"k": 2}}',
            {"a": {"k": 1}, "b": {"k": 2}},
        ),
        ("nul escape", b'{"a": "\\u0000"}', {"a": "\x00"}),
    ]

    def test_accepted(self) -> None:
        for label, body, expected in self.ACCEPTED:
            with self.subTest(label=label):
                self.assertEqual(parse_json_object(body), expected)

    def test_transaction_shape(self) -> None:
        txn = {
            "origin": "hs-ext.test",
            "origin_server_ts": 1700000000000,
            "pdus": [
                {"type": "m.room.message", "content": {"body": "x" * 100}, "depth": i}
                for i in range(50)
            ],
            "edus": [
                {
                    "edu_type": "m.presence",
                    "content": {"push": [{"user_id": "@a:b", "last_active_ago": 1.5}]},
                }
            ],
        }
        self.assertEqual(parse_json_object(json.dumps(txn).encode()), txn)
