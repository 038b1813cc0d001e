"""Normalisation of Host headers, SNI values and CONNECT targets."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from sbg.hosts import (
    HostParseError,
    format_authority,
    parse_authority,
    parse_connect_target,
    parse_sni,
)


class HostTests(SynchronousTestCase):
    def test_authority(self) -> None:
        self.assertEqual(parse_authority("Matrix.Example.ORG"), ("matrix.example.org", None))
        self.assertEqual(parse_authority("hs.test:8448"), ("hs.test", 8448))
        self.assertEqual(parse_authority("[2001:DB8::1]:8448"), ("2001:db8::1", 8448))
        self.assertEqual(parse_authority("10.0.0.1"), ("10.0.0.1", None))

    def test_authority_refusals(self) -> None:
        for bad in (
            "",
            "a b",
            "host:",
            "host:99999",
            "host:0",
            "2001:db8::1",
            "[nothex]:1",
            "[::1]x",
            "ho_st",
            "host:80:80",
            "h\x00",
        ):
            self.assertRaises(HostParseError, parse_authority, bad)

    def test_connect_target(self) -> None:
        self.assertEqual(parse_connect_target("hs.test:8448"), ("hs.test", 8448))
        # Synapse writes IPv6 literals without brackets.
        self.assertEqual(parse_connect_target("2001:db8::1:8448"), ("2001:db8::1", 8448))
        self.assertEqual(parse_connect_target("[2001:db8::1]:443"), ("2001:db8::1", 443))
        self.assertRaises(HostParseError, parse_connect_target, "hs.test")
        self.assertRaises(HostParseError, parse_connect_target, "hs.test:http")

    def test_sni(self) -> None:
        self.assertIsNone(parse_sni(None))
        self.assertEqual(parse_sni(b"HS.test"), "hs.test")
        # Unparseable SNI matches nothing, but is not "absent" either.
        self.assertEqual(parse_sni(b"bad name"), "\x00invalid")

    def test_format(self) -> None:
        self.assertEqual(format_authority("::1", 8448), "[::1]:8448")
        self.assertEqual(format_authority("hs.test", None), "hs.test")
