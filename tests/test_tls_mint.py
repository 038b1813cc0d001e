"""Interception certificates: minting, caching, and a real intercepted tunnel."""

from __future__ import annotations

import datetime
import os
import time
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.protocol import Factory
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from sbg.config.certificates import not_valid_after, not_valid_before
from sbg.tls.ca import CertificateAuthority, init_ca, load_ca
from sbg.tls.mint import (
    LEAF_RENEW_BEFORE,
    LEAF_VALIDITY,
    CertMinter,
    InterceptingServerContextFactory,
    canonical_name,
)
from sbg.tls.server import sni_of
from testbed.tlstools import (
    RawClientCreator,
    load_cert,
    make_ca,
    probe_tls,
    san_dns,
    san_ips,
)
from tests.asynctest import TestCase

_REQUEST = b"GET / HTTP/1.1\r\nHost: hs-ext.test\r\nConnection: close\r\n\r\n"


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _verify_signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> None:
    key = issuer.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
    else:
        assert isinstance(key, rsa.RSAPublicKey)
        key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), hashes.SHA256())


class CanonicalNameTests(SynchronousTestCase):
    def test_accepted(self) -> None:
        self.assertEqual(canonical_name("HS-Ext.Test."), "hs-ext.test")
        self.assertEqual(canonical_name("localhost"), "localhost")
        self.assertEqual(canonical_name("xn--bcher-kva.example"), "xn--bcher-kva.example")
        self.assertEqual(canonical_name("[2001:DB8::1]"), "2001:db8::1")
        self.assertEqual(canonical_name("2001:db8:0:0::1"), "2001:db8::1")
        self.assertEqual(canonical_name("10.0.0.1"), "10.0.0.1")
        self.assertEqual(canonical_name("a" * 63 + ".test"), "a" * 63 + ".test")

    def test_refused(self) -> None:
        for bad in (
            "",
            ".",
            "*.example.org",
            "a_b.example",
            "bücher.example",
            "-lead.example",
            "trail-.example",
            "a..b",
            "a b.example",
            "a" * 64 + ".test",
            ".".join(["abcdefghi"] * 26),  # 259 characters
            "fe80::1%eth0",
            "hs.example:8448",
            "hs.example/x",
        ):
            self.assertRaises(ValueError, canonical_name, bad)


class MintTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.ca = load_ca(*init_ca(self.mktemp()))
        self.minter = CertMinter(self.ca)

    def test_leaf_profile(self) -> None:
        before = datetime.datetime.now(datetime.UTC)
        cert = self.minter.certificate_for("hs-ext.test")
        self.assertEqual(san_dns(cert), ["hs-ext.test"])
        self.assertEqual(san_ips(cert), [])
        self.assertEqual(cert.issuer, self.ca.certificate.subject)
        _verify_signed_by(cert, self.ca.certificate)
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        self.assertEqual(aki.key_identifier, self.ca.ski)
        bc = cert.extensions.get_extension_for_oid(ExtensionOID.BASIC_CONSTRAINTS)
        self.assertFalse(bc.value.ca)
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(eku), [ExtendedKeyUsageOID.SERVER_AUTH])
        # Backdated by a day, valid for 30 days.
        self.assertLess(not_valid_before(cert), before - datetime.timedelta(hours=23))
        lifetime = not_valid_after(cert) - before
        self.assertLess(abs(lifetime - LEAF_VALIDITY), datetime.timedelta(minutes=1))

    def test_ip_literal_gets_an_ip_san(self) -> None:
        cert = self.minter.certificate_for("[2001:DB8::1]")
        self.assertEqual(san_ips(cert), ["2001:db8::1"])
        self.assertEqual(san_dns(cert), [])
        self.assertEqual(san_ips(self.minter.certificate_for("10.1.2.3")), ["10.1.2.3"])

    def test_long_name_has_a_critical_san_and_no_common_name(self) -> None:
        name = ".".join(["a" * 40] * 3)
        cert = self.minter.certificate_for(name)
        self.assertEqual(san_dns(cert), [name])
        self.assertEqual(len(cert.subject), 0)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        self.assertTrue(san.critical)

    def test_one_leaf_key_random_serials(self) -> None:
        a = self.minter.certificate_for("a.test")
        b = self.minter.certificate_for("b.test")
        self.assertEqual(_spki(a), _spki(b))
        self.assertNotEqual(a.serial_number, b.serial_number)
        # Another minter has another key.
        other = CertMinter(self.ca).certificate_for("a.test")
        self.assertNotEqual(_spki(a), _spki(other))

    def test_refuses_invalid_names(self) -> None:
        self.assertRaises(ValueError, self.minter.context_for, "*.test")
        self.assertRaises(ValueError, InterceptingServerContextFactory, self.minter, "a_b.test")
        self.assertEqual(len(self.minter), 0)

    def test_cache_is_case_insensitive(self) -> None:
        ctx = self.minter.context_for("hs-ext.test")
        self.assertIs(self.minter.context_for("HS-EXT.test"), ctx)
        self.assertIs(self.minter.context_for("hs-ext.test."), ctx)
        self.assertEqual(self.minter.cached_names(), ("hs-ext.test",))

    def test_lru_bound(self) -> None:
        minter = CertMinter(self.ca, cache_size=2)
        a = minter.context_for("a.test")
        minter.context_for("b.test")
        self.assertIs(minter.context_for("a.test"), a)  # a is now the most recent
        minter.context_for("c.test")  # evicts b, the least recently used
        self.assertEqual(minter.cached_names(), ("a.test", "c.test"))
        self.assertIs(minter.context_for("a.test"), a)
        self.assertEqual(len(minter), 2)
        serial = minter.certificate_for("b.test").serial_number  # minted again
        self.assertEqual(minter.cached_names(), ("a.test", "b.test"))
        self.assertNotEqual(serial, minter.certificate_for("a.test").serial_number)

    def test_renewed_close_to_expiry(self) -> None:
        clock = Clock()
        clock.advance(time.time())
        minter = CertMinter(self.ca, clock=clock)
        ctx = minter.context_for("hs-ext.test")
        first = minter.certificate_for("hs-ext.test")
        keep = LEAF_VALIDITY - LEAF_RENEW_BEFORE - datetime.timedelta(hours=1)
        clock.advance(keep.total_seconds())
        self.assertIs(minter.context_for("hs-ext.test"), ctx)
        clock.advance(datetime.timedelta(hours=2).total_seconds())
        renewed = minter.context_for("hs-ext.test")
        self.assertIsNot(renewed, ctx)
        second = minter.certificate_for("hs-ext.test")
        self.assertGreater(not_valid_after(second), not_valid_after(first))
        self.assertNotEqual(second.serial_number, first.serial_number)

    def test_bad_cache_size(self) -> None:
        self.assertRaises(ValueError, CertMinter, self.ca, cache_size=0)


class _SNIResource(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return (sni_of(request.channel.transport) or "none").encode()


class _H2Site(Site):
    def acceptableProtocols(self) -> list[bytes]:
        return [b"h2", b"http/1.1"]


class _TunnelFactory(Factory):
    """Plays the CONNECT handler after a tunnel to `fallback` was accepted.

    Each connection gets its own `InterceptingServerContextFactory` and its
    own `TLSMemoryBIOFactory` around an HTTP site, as the outbound proxy does.
    """

    def __init__(self, minter: CertMinter, fallback: str) -> None:
        self.minter = minter
        self.fallback = fallback
        self.site = _H2Site(_SNIResource())

    def buildProtocol(self, addr: Any) -> Any:
        creator = InterceptingServerContextFactory(self.minter, self.fallback)
        return TLSMemoryBIOFactory(creator, False, self.site).buildProtocol(addr)


class InterceptionTests(TestCase):
    def setUp(self) -> None:
        self.ca_files = make_ca(self.mktemp(), "interception test CA")
        self.ca = load_ca(self.ca_files.certificate, self.ca_files.private_key)
        self.minter = CertMinter(self.ca)
        with open(self.ca_files.certificate, "rb") as f:
            self.trust = Certificate.loadPEM(f.read())

    def _listen(self, fallback: str, minter: CertMinter | None = None) -> int:
        port = reactor.listenTCP(
            0,
            _TunnelFactory(minter if minter is not None else self.minter, fallback),
            interface="127.0.0.1",
        )
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    async def test_certificate_for_the_sni_not_the_connect_target(self) -> None:
        port = self._listen("10.9.9.9")  # the CONNECT target, e.g. an SRV target
        # Twisted's own client: SNI hs-ext.test, trusts only the test CA,
        # checks the host name.
        client = optionsForClientTLS("hs-ext.test", self.trust)
        r = await probe_tls(reactor, port, client, _REQUEST)
        self.assertTrue(r.handshake_done, r.reason)
        self.assertEqual(r.servername_sent, b"hs-ext.test")
        self.assertEqual(san_dns(r.leaf), ["hs-ext.test"])
        _verify_signed_by(r.leaf, load_cert(self.ca_files.certificate))
        # A self-signed CA is not sent: the chain is the leaf alone.
        self.assertEqual(len(r.chain), 1)
        self.assertTrue(r.data.startswith(b"HTTP/1.1 200"), r.data)
        # The request handler read the SNI from its transport.
        self.assertTrue(r.data.endswith(b"\r\n\r\nhs-ext.test"), r.data)
        self.assertEqual(r.alpn, None)

    async def test_second_handshake_reuses_the_cached_certificate(self) -> None:
        port = self._listen("10.9.9.9")
        client = optionsForClientTLS("hs-ext.test", self.trust)
        first = await probe_tls(reactor, port, client, _REQUEST)
        second = await probe_tls(reactor, port, client, _REQUEST)
        self.assertTrue(second.handshake_done, second.reason)
        self.assertEqual(first.leaf.serial_number, second.leaf.serial_number)
        self.assertEqual(set(self.minter.cached_names()), {"10.9.9.9", "hs-ext.test"})

    async def test_lru_eviction_remints(self) -> None:
        # Room for the CONNECT fallback name (used by every tunnel) and two more.
        minter = CertMinter(self.ca, cache_size=3)
        port = self._listen("10.9.9.9", minter)
        serials: dict[str, list[int]] = {}
        for name in ("hs-a.test", "hs-b.test", "hs-c.test", "hs-b.test", "hs-a.test"):
            r = await probe_tls(reactor, port, optionsForClientTLS(name, self.trust), _REQUEST)
            self.assertTrue(r.handshake_done, (name, r.reason))
            self.assertEqual(san_dns(r.leaf), [name])
            serials.setdefault(name, []).append(r.leaf.serial_number)
        # hs-b.test stayed cached while hs-c.test came in (hs-a.test went) ...
        self.assertEqual(serials["hs-b.test"][0], serials["hs-b.test"][1])
        # ... and hs-a.test, evicted, was minted anew.
        self.assertNotEqual(serials["hs-a.test"][0], serials["hs-a.test"][1])
        self.assertEqual(len(minter), 3)
        self.assertEqual(set(minter.cached_names()), {"10.9.9.9", "hs-b.test", "hs-a.test"})

    async def test_ip_literal_without_sni(self) -> None:
        port = self._listen("127.0.0.1")
        client = optionsForClientTLS("127.0.0.1", self.trust)
        r = await probe_tls(reactor, port, client, _REQUEST)
        self.assertTrue(r.handshake_done, r.reason)
        self.assertIsNone(r.servername_sent)  # Twisted sends no SNI for an IP
        self.assertEqual(san_ips(r.leaf), ["127.0.0.1"])
        self.assertTrue(r.data.endswith(b"\r\n\r\nnone"), r.data)

    async def test_no_sni_gets_the_connect_target_certificate(self) -> None:
        # No SNI: the certificate is for the fallback (the CONNECT host).
        port = self._listen("127.0.0.1")
        r = await probe_tls(reactor, port, RawClientCreator(None), _REQUEST)
        self.assertEqual(san_ips(r.leaf), ["127.0.0.1"])
        self.assertEqual(san_dns(r.leaf), [])

    async def test_unmintable_sni_gets_the_fallback(self) -> None:
        port = self._listen("hs-ext.test")
        client = RawClientCreator(b"bad_name.test", ca_file=self.ca_files.certificate)
        r = await probe_tls(reactor, port, client, _REQUEST)
        self.assertTrue(r.handshake_done, r.reason)
        self.assertEqual(san_dns(r.leaf), ["hs-ext.test"])
        self.assertNotIn("bad_name.test", self.minter.cached_names())

    async def test_alpn_never_h2(self) -> None:
        port = self._listen("hs-ext.test")
        both = RawClientCreator(b"hs-ext.test", alpn=[b"h2", b"http/1.1"])
        r = await probe_tls(reactor, port, both, _REQUEST)
        self.assertEqual(r.alpn, b"http/1.1")
        self.assertTrue(r.data.startswith(b"HTTP/1.1 200"), r.data)
        r = await probe_tls(reactor, port, RawClientCreator(b"hs-ext.test", alpn=[b"h2"]))
        self.assertIsNone(r.alpn)
        # Without SNI too (the connection still moves to a serving context).
        r = await probe_tls(reactor, port, RawClientCreator(None, alpn=[b"h2", b"http/1.1"]))
        self.assertEqual(r.alpn, b"http/1.1")

    async def test_tls_1_1_refused(self) -> None:
        port = self._listen("hs-ext.test")
        old = RawClientCreator(b"hs-ext.test", max_version=SSL.TLS1_1_VERSION)
        r = await probe_tls(reactor, port, old, _REQUEST)
        self.assertFalse(r.handshake_done)
        self.assertEqual(r.data, b"")
        ok = RawClientCreator(b"hs-ext.test", max_version=SSL.TLS1_2_VERSION)
        r = await probe_tls(reactor, port, ok, _REQUEST)
        self.assertTrue(r.data.startswith(b"HTTP/1.1 200"), r.data)

    async def test_intermediate_ca_sends_its_chain(self) -> None:
        d = self.mktemp()
        root = make_ca(d, "root", "root")
        inter = make_ca(d, "intermediate", "inter", parent=root)
        ca = CertificateAuthority(
            certificate=load_cert(inter.certificate),
            key=load_ca(inter.certificate, inter.private_key).key,
            ski=load_ca(inter.certificate, inter.private_key).ski,
        )
        port = self._listen("hs-ext.test", CertMinter(ca))
        with open(root.certificate, "rb") as f:
            root_trust = Certificate.loadPEM(f.read())
        r = await probe_tls(reactor, port, optionsForClientTLS("hs-ext.test", root_trust))
        self.assertTrue(r.handshake_done, r.reason)
        self.assertEqual(r.chain[1:], [load_cert(inter.certificate)])

    async def test_rsa_ca(self) -> None:
        files = make_ca(self.mktemp(), "rsa CA", key_type="rsa")
        port = self._listen(
            "hs-ext.test", CertMinter(load_ca(files.certificate, files.private_key))
        )
        with open(files.certificate, "rb") as f:
            trust = Certificate.loadPEM(f.read())
        r = await probe_tls(reactor, port, optionsForClientTLS("hs-ext.test", trust), _REQUEST)
        self.assertTrue(r.handshake_done, r.reason)
        _verify_signed_by(r.leaf, load_cert(files.certificate))


class InitCAInterceptionTests(TestCase):
    async def test_sbg_ca_init_output_is_trusted_by_twisted_clients(self) -> None:
        cert_path, key_path = init_ca(os.path.join(self.mktemp(), "ca"))
        minter = CertMinter(load_ca(cert_path, key_path))
        port = reactor.listenTCP(0, _TunnelFactory(minter, "hs-ext.test"), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        with open(cert_path, "rb") as f:
            trust = Certificate.loadPEM(f.read())
        client = optionsForClientTLS("hs-ext.test", trust)
        r = await probe_tls(reactor, port.getHost().port, client, _REQUEST)
        self.assertTrue(r.handshake_done, r.reason)
        self.assertTrue(r.data.endswith(b"hs-ext.test"), r.data)
