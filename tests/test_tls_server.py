"""Inbound TLS termination: certificate chosen by SNI, over real loopback TLS."""

from __future__ import annotations

import os
from typing import Any

from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from sbg.hosts import normalise_name
from sbg.tls.pem import PemError
from sbg.tls.server import build_sni_server_context, sni_of
from testbed.tlstools import (
    CertFiles,
    ProbeResult,
    RawClientCreator,
    RecordingServerFactory,
    issue_cert,
    listen_tls,
    load_cert,
    make_ca,
    probe_tls,
    san_dns,
)
from tests.asynctest import TestCase


def _trust(ca: CertFiles) -> Certificate:
    with open(ca.certificate, "rb") as f:
        return Certificate.loadPEM(f.read())


class _SNIResource(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return (sni_of(request.channel.transport) or "-").encode()


class _H2Site(Site):
    """A Site that would pick h2 if anything let it (as with the h2 package)."""

    def acceptableProtocols(self) -> list[bytes]:
        return [b"h2", b"http/1.1"]


class SNISelectionTests(TestCase):
    def setUp(self) -> None:
        d = self.mktemp()
        self.root = make_ca(os.path.join(d, "root"), "root")
        inter = make_ca(os.path.join(d, "root"), "intermediate", "inter", parent=self.root)
        # A: issued by an intermediate; the file holds leaf + intermediate.
        self.a = issue_cert(inter, d, "a", ["hs-a.test"], with_chain=True)
        self.b = issue_cert(self.root, d, "b", ["hs-b.test", "b.example"], key_type="rsa")
        self.inter_cert = load_cert(inter.certificate)
        self.entries = [
            (["hs-a.test"], self.a.certificate, self.a.private_key),
            (["HS-B.test", "b.example"], self.b.certificate, self.b.private_key),
        ]
        self.factory = build_sni_server_context(self.entries)
        self.server = RecordingServerFactory()
        self.port = listen_tls(reactor, self.factory, self.server)
        self.addCleanup(self.port.stopListening)

    def _probe(self, creator: Any, port: Any = None) -> Deferred[ProbeResult]:
        p = port or self.port
        return probe_tls(reactor, p.getHost().port, creator, b"ping")

    async def test_sni_a_gets_a_with_its_intermediate(self) -> None:
        # The client trusts the root only and checks the name: this handshake
        # succeeds only if the intermediate is served as well.
        r = await self._probe(optionsForClientTLS("hs-a.test", _trust(self.root)))
        self.assertTrue(r.handshake_done, r.reason)
        self.assertEqual(san_dns(r.leaf), ["hs-a.test"])
        self.assertEqual(r.chain[1:], [self.inter_cert])
        self.assertEqual(r.data, b"pong")

    async def test_sni_b_any_case_and_second_name(self) -> None:
        for name in ("hs-b.test", "HS-B.TEST", "b.example"):
            r = await self._probe(RawClientCreator(name.encode(), ca_file=self.root.certificate))
            self.assertTrue(r.handshake_done, (name, r.reason))
            self.assertEqual(san_dns(r.leaf), ["hs-b.test", "b.example"], name)
        # A client checking the name accepts it too.
        r = await self._probe(optionsForClientTLS("b.example", _trust(self.root)))
        self.assertTrue(r.handshake_done, r.reason)

    async def test_unknown_and_absent_sni_get_the_default(self) -> None:
        for sni in (b"unknown.test", None):
            r = await self._probe(RawClientCreator(sni))
            self.assertTrue(r.handshake_done, (sni, r.reason))
            self.assertEqual(san_dns(r.leaf), ["hs-a.test"], sni)
        # ... and a client that wanted the unknown name refuses it.
        r = await self._probe(optionsForClientTLS("unknown.test", _trust(self.root)))
        self.assertFalse(r.data)
        self.assertIsNotNone(r.reason)

    async def test_default_index(self) -> None:
        factory = build_sni_server_context(self.entries, default_index=1)
        port = listen_tls(reactor, factory, RecordingServerFactory())
        self.addCleanup(port.stopListening)
        r = await self._probe(RawClientCreator(None), port)
        self.assertEqual(san_dns(r.leaf), ["hs-b.test", "b.example"])
        r = await self._probe(RawClientCreator(b"hs-a.test"), port)
        self.assertEqual(san_dns(r.leaf), ["hs-a.test"])

    async def test_sni_of_in_a_site_behind_listen_ssl(self) -> None:
        # What the inbound listener does: SSL4ServerEndpoint/listenSSL + Site.
        site = _H2Site(_SNIResource())
        port = reactor.listenSSL(0, site, self.factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        request = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        creator = RawClientCreator(b"HS-B.test", alpn=[b"h2", b"http/1.1"])
        r = await probe_tls(reactor, port.getHost().port, creator, request)
        # h2 was offered by both sides and still not selected.
        self.assertEqual(r.alpn, b"http/1.1")
        self.assertTrue(r.data.startswith(b"HTTP/1.1 200"), r.data)
        self.assertTrue(r.data.endswith(b"\r\n\r\nhs-b.test"), r.data)
        creator = RawClientCreator(None, alpn=[b"h2", b"http/1.1"])
        r = await probe_tls(reactor, port.getHost().port, creator, request)
        self.assertEqual(r.alpn, b"http/1.1")
        self.assertTrue(r.data.endswith(b"\r\n\r\n-"), r.data)

    async def test_alpn_h2_only_gets_no_protocol(self) -> None:
        r = await self._probe(RawClientCreator(b"hs-a.test", alpn=[b"h2"]))
        self.assertTrue(r.handshake_done, r.reason)
        self.assertIsNone(r.alpn)

    async def test_tls_1_1_refused_1_2_accepted(self) -> None:
        old = RawClientCreator(b"hs-a.test", max_version=SSL.TLS1_1_VERSION)
        r = await self._probe(old)
        self.assertFalse(r.handshake_done)
        self.assertEqual(self.server.received, [])
        r = await self._probe(RawClientCreator(b"hs-a.test", max_version=SSL.TLS1_2_VERSION))
        self.assertTrue(r.handshake_done, r.reason)
        self.assertEqual(self.server.received, [b"ping"])


class BuildErrorsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        self.ca = make_ca(self.dir)
        self.a = issue_cert(self.ca, self.dir, "a", ["hs-a.test"])
        self.b = issue_cert(self.ca, self.dir, "b", ["hs-b.test"])

    def test_key_of_another_certificate(self) -> None:
        e = self.assertRaises(
            PemError,
            build_sni_server_context,
            [(["hs-a.test"], self.a.certificate, self.b.private_key)],
        )
        self.assertIn(self.b.private_key, str(e))

    def test_missing_file(self) -> None:
        missing = os.path.join(self.dir, "missing.crt")
        e = self.assertRaises(
            PemError, build_sni_server_context, [(["x.test"], missing, self.a.private_key)]
        )
        self.assertIn(missing, str(e))

    def test_name_in_two_entries(self) -> None:
        self.assertRaises(
            ValueError,
            build_sni_server_context,
            [
                (["hs-a.test"], self.a.certificate, self.a.private_key),
                (["HS-A.test"], self.b.certificate, self.b.private_key),
            ],
        )

    def test_empty_and_bad_default(self) -> None:
        self.assertRaises(ValueError, build_sni_server_context, [])
        entries = [(["hs-a.test"], self.a.certificate, self.a.private_key)]
        self.assertRaises(ValueError, build_sni_server_context, entries, default_index=1)

    def test_uncovered_name_is_logged(self) -> None:
        with self.assertLogs("sbg.tls.server", "WARNING") as logs:
            build_sni_server_context([(["other.test"], self.a.certificate, self.a.private_key)])
        self.assertIn("other.test", logs.output[0])

    def test_context_for_sni_lookup(self) -> None:
        factory = build_sni_server_context(
            [
                (["hs-a.test"], self.a.certificate, self.a.private_key),
                (["hs-b.test"], self.b.certificate, self.b.private_key),
            ]
        )
        a, b = factory.context_for_sni("hs-a.test"), factory.context_for_sni("HS-B.test.")
        self.assertIsNot(a, b)
        self.assertIs(factory.context_for_sni(None), a)
        self.assertIs(factory.context_for_sni("nope.test"), a)
        # Connections start on a front context that is none of the serving ones.
        self.assertIsNot(factory.getContext(), a)
        self.assertIsNot(factory.getContext(), b)


class HelpersTests(SynchronousTestCase):
    def test_sni_of_plain_transport(self) -> None:
        self.assertIsNone(sni_of(StringTransport()))
        self.assertIsNone(sni_of(object()))

    def test_normalise_name(self) -> None:
        self.assertEqual(normalise_name("HS.Example."), "hs.example")
        self.assertEqual(normalise_name("[2001:DB8::0:1]"), "2001:db8::1")
        self.assertEqual(normalise_name("2001:db8:0::1"), "2001:db8::1")
