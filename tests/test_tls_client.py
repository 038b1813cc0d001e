"""Client TLS for forwarding: pinning, default trust, names, over real loopback TLS."""

from __future__ import annotations

import os
import shutil
from typing import Any

from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from sbg.tls.client import ClientTLSPolicy, NoUpstreamTrust
from sbg.tls.pem import PemError
from sbg.tls.server import build_sni_server_context
from testbed.tlstools import (
    CertFiles,
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


@implementer(IOpenSSLServerConnectionCreator)
class _OldServer:
    """A server that speaks TLS 1.1 at most."""

    def __init__(self, files: CertFiles) -> None:
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.set_max_proto_version(SSL.TLS1_1_VERSION)
        ctx.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        ctx.use_certificate_chain_file(files.certificate)
        ctx.use_privatekey_file(files.private_key)
        self._ctx = ctx

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self._ctx, None)


class ClientTLSTests(TestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        self.ca_a = make_ca(os.path.join(self.dir, "a"), "CA A")
        self.ca_b = make_ca(os.path.join(self.dir, "b"), "CA B")
        self.policy = ClientTLSPolicy()

    def _serve(self, files: CertFiles, creator: Any = None) -> tuple[int, RecordingServerFactory]:
        factory = RecordingServerFactory()
        if creator is None:
            creator = build_sni_server_context([([], files.certificate, files.private_key)])
        port = listen_tls(reactor, creator, factory)
        self.addCleanup(port.stopListening)
        return port.getHost().port, factory

    def _setenv(self, name: str, value: str) -> None:
        before = os.environ.get(name)
        os.environ[name] = value
        if before is None:
            self.addCleanup(os.environ.pop, name, None)
        else:
            self.addCleanup(os.environ.__setitem__, name, before)

    def _server_cert(self, ca: CertFiles, name: str, **kw: Any) -> CertFiles:
        return issue_cert(
            ca, self.dir, f"{name}-{os.path.basename(os.path.dirname(ca.certificate))}", **kw
        )

    async def test_pinned_ca_accepts_its_certificate(self) -> None:
        port, server = self._serve(self._server_cert(self.ca_a, "ok", dns_names=["hs-ext.test"]))
        creator = self.policy.creator_for("hs-ext.test", [self.ca_a.certificate], "none")
        r = await probe_tls(reactor, port, creator, b"ping")
        self.assertTrue(r.handshake_done, r.reason)
        self.assertEqual(r.servername_sent, b"hs-ext.test")
        self.assertEqual(r.alpn, b"http/1.1")
        self.assertEqual(r.data, b"pong")
        self.assertEqual(server.received, [b"ping"])

    async def test_pinned_ca_refuses_another_ca(self) -> None:
        port, server = self._serve(self._server_cert(self.ca_b, "evil", dns_names=["hs-ext.test"]))
        creator = self.policy.creator_for("hs-ext.test", [self.ca_a.certificate], "system")
        r = await probe_tls(reactor, port, creator, b"secret request")
        self.assertFalse(r.handshake_done)
        self.assertIsNotNone(r.reason)
        self.assertTrue(r.reason.check(SSL.Error), r.reason)
        self.assertEqual(r.data, b"")
        # The server never saw a byte of application data.
        self.assertEqual(server.received, [])

    async def test_pinning_ignores_the_system_roots(self) -> None:
        # Make CA B a "system" root: platform trust accepts B's certificate ...
        self._setenv("SSL_CERT_FILE", self.ca_b.certificate)
        self._setenv("SSL_CERT_DIR", os.path.join(self.dir, "no-such-dir"))
        port, server = self._serve(self._server_cert(self.ca_b, "sys", dns_names=["hs-ext.test"]))
        system = self.policy.creator_for("hs-ext.test", None, "system")
        r = await probe_tls(reactor, port, system, b"ping")
        self.assertTrue(r.handshake_done, r.reason)
        self.assertEqual(server.received, [b"ping"])
        # ... but a destination pinned to CA A does not.
        pinned = self.policy.creator_for("hs-ext.test", [self.ca_a.certificate], "system")
        r = await probe_tls(reactor, port, pinned, b"ping")
        self.assertFalse(r.handshake_done)
        self.assertEqual(server.received, [b"ping"])

    async def test_wrong_host_name_refused(self) -> None:
        port, server = self._serve(self._server_cert(self.ca_a, "other", dns_names=["other.test"]))
        creator = self.policy.creator_for("hs-ext.test", [self.ca_a.certificate], "none")
        with self.assertLogs("sbg.tls.client", "DEBUG") as logs:
            r = await probe_tls(reactor, port, creator, b"secret request")
        self.assertIn("hs-ext.test", logs.output[0])
        self.assertFalse(r.handshake_done)
        self.assertIsNotNone(r.reason)
        self.assertEqual(r.data, b"")
        self.assertEqual(server.received, [])

    async def test_ip_literal(self) -> None:
        files = self._server_cert(self.ca_a, "ip", ip_addresses=["127.0.0.1"])
        port, _ = self._serve(files)
        creator = self.policy.creator_for("127.0.0.1", [self.ca_a.certificate], "none")
        r = await probe_tls(reactor, port, creator, b"ping")
        self.assertTrue(r.handshake_done, r.reason)
        self.assertIsNone(r.servername_sent)  # no SNI for an IP literal
        self.assertEqual(r.data, b"pong")
        # A certificate for another address is refused.
        port2, server2 = self._serve(
            self._server_cert(self.ca_a, "ip2", ip_addresses=["127.0.0.2"])
        )
        with self.assertLogs("sbg.tls.client", "DEBUG"):
            r = await probe_tls(reactor, port2, creator, b"ping")
        self.assertFalse(r.handshake_done)
        self.assertEqual(server2.received, [])
        # ... and so is a DNS SAN spelling the address.
        files3 = self._server_cert(self.ca_a, "ip3", dns_names=["127.0.0.1"])
        port3, server3 = self._serve(files3)
        with self.assertLogs("sbg.tls.client", "DEBUG"):
            r = await probe_tls(reactor, port3, creator, b"ping")
        self.assertFalse(r.handshake_done)
        self.assertEqual(server3.received, [])

    async def test_malformed_san_does_not_match_any_name(self) -> None:
        # service_identity cannot parse the DNS SAN "10.0.0.1"; the check
        # must fail closed rather than accept the certificate for any name.
        files = self._server_cert(self.ca_a, "odd", dns_names=["other.test", "10.0.0.1"])
        port, server = self._serve(files)
        creator = self.policy.creator_for("hs-ext.test", [self.ca_a.certificate], "none")
        with self.assertLogs("sbg.tls.client", "DEBUG") as logs:
            r = await probe_tls(reactor, port, creator, b"secret request")
        self.assertIn("does not match", logs.output[0])
        self.assertFalse(r.handshake_done)
        self.assertEqual(server.received, [])

    async def test_pinned_intermediate_is_a_trust_anchor(self) -> None:
        inter = make_ca(os.path.join(self.dir, "a"), "A intermediate", "inter", parent=self.ca_a)
        files = issue_cert(inter, self.dir, "via-inter", ["hs-ext.test"])  # no chain sent
        port, server = self._serve(files)
        pinned = self.policy.creator_for("hs-ext.test", [inter.certificate], "none")
        r = await probe_tls(reactor, port, pinned, b"ping")
        self.assertTrue(r.handshake_done, r.reason)
        # Pinning the root needs the intermediate, which this server does not send.
        root = self.policy.creator_for("hs-ext.test", [self.ca_a.certificate], "none")
        r = await probe_tls(reactor, port, root, b"ping")
        self.assertFalse(r.handshake_done)
        self.assertEqual(server.received, [b"ping"])

    async def test_every_certificate_of_a_ca_file_is_trusted(self) -> None:
        bundle = os.path.join(self.dir, "bundle.pem")
        with open(bundle, "wb") as out:
            for path in (self.ca_b.certificate, self.ca_a.certificate):
                with open(path, "rb") as f:
                    out.write(f.read())
        port, _ = self._serve(self._server_cert(self.ca_a, "ok", dns_names=["hs-ext.test"]))
        r = await probe_tls(
            reactor, port, self.policy.creator_for("hs-ext.test", [bundle], "none"), b"ping"
        )
        self.assertTrue(r.handshake_done, r.reason)
        # Two files work the same.
        creator = self.policy.creator_for(
            "hs-ext.test", [self.ca_b.certificate, self.ca_a.certificate], "none"
        )
        r = await probe_tls(reactor, port, creator, b"ping")
        self.assertTrue(r.handshake_done, r.reason)

    async def test_tls_below_1_2_refused(self) -> None:
        files = self._server_cert(self.ca_a, "old", dns_names=["hs-ext.test"], with_chain=False)
        port, server = self._serve(files, _OldServer(files))
        creator = self.policy.creator_for("hs-ext.test", [self.ca_a.certificate], "none")
        r = await probe_tls(reactor, port, creator, b"ping")
        self.assertFalse(r.handshake_done)
        self.assertEqual(server.received, [])
        # The server itself works for a client that accepts TLS 1.1.
        old_client = RawClientCreator(b"hs-ext.test", max_version=SSL.TLS1_1_VERSION)
        r = await probe_tls(reactor, port, old_client, b"ping")
        self.assertTrue(r.handshake_done, r.reason)
        self.assertEqual(server.received, [b"ping"])

    async def test_changed_ca_file_is_read_again(self) -> None:
        pin = os.path.join(self.dir, "pin.pem")
        shutil.copy(self.ca_a.certificate, pin)
        port, _ = self._serve(self._server_cert(self.ca_b, "b", dns_names=["hs-ext.test"]))
        first = self.policy.creator_for("hs-ext.test", [pin], "none")
        r = await probe_tls(reactor, port, first, b"ping")
        self.assertFalse(r.handshake_done)
        # The operator replaces the pinned CA (and reloads): B is trusted now.
        os.unlink(pin)
        shutil.copy(self.ca_b.certificate, pin)
        second = self.policy.creator_for("hs-ext.test", [pin], "none")
        self.assertIsNot(second, first)
        r = await probe_tls(reactor, port, second, b"ping")
        self.assertTrue(r.handshake_done, r.reason)
        self.assertEqual(san_dns(r.leaf), ["hs-ext.test"])
        self.assertEqual(r.leaf.issuer, load_cert(self.ca_b.certificate).subject)


class PolicyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        self.ca_a = make_ca(os.path.join(self.dir, "a"), "CA A")
        self.ca_b = make_ca(os.path.join(self.dir, "b"), "CA B")

    def test_no_trust(self) -> None:
        policy = ClientTLSPolicy()
        e = self.assertRaises(NoUpstreamTrust, policy.creator_for, "hs.test", None, "none")
        self.assertIn("no CA is trusted for hs.test", str(e))
        # An empty pin list trusts nothing either (never the system roots).
        self.assertRaises(NoUpstreamTrust, policy.creator_for, "hs.test", [], "system")
        self.assertRaises(ValueError, policy.creator_for, "hs.test", None, "everything")
        self.assertRaises(ValueError, policy.creator_for, "", None, "system")

    def test_missing_ca_file(self) -> None:
        missing = os.path.join(self.dir, "missing.pem")
        e = self.assertRaises(PemError, ClientTLSPolicy().creator_for, "hs.test", [missing], "none")
        self.assertIn(missing, str(e))

    def test_cached_per_name_and_trust(self) -> None:
        policy = ClientTLSPolicy()
        a = policy.creator_for("hs.test", [self.ca_a.certificate], "none")
        self.assertIs(policy.creator_for("HS.test", [self.ca_a.certificate], "system"), a)
        self.assertIsNot(policy.creator_for("hs.test", [self.ca_b.certificate], "none"), a)
        self.assertIsNot(policy.creator_for("other.test", [self.ca_a.certificate], "none"), a)
        system = policy.creator_for("hs.test", None, "system")
        self.assertIsNot(system, a)
        self.assertIs(policy.creator_for("hs.test", None, "system"), system)
        self.assertEqual(len(policy), 4)

    def test_sni_only_for_dns_names(self) -> None:
        policy = ClientTLSPolicy()
        v6 = policy.creator_for("[2001:DB8::1]", [self.ca_a.certificate], "none")
        self.assertEqual(v6.hostname, "2001:db8::1")
        conn = v6.clientConnectionForTLS(None)
        self.assertIsNone(conn.get_servername())
        dns = policy.creator_for("HS.Example.", [self.ca_a.certificate], "none")
        self.assertEqual(dns.hostname, "hs.example")
        self.assertEqual(dns.clientConnectionForTLS(None).get_servername(), b"hs.example")

    def test_cache_is_bounded(self) -> None:
        policy = ClientTLSPolicy(cache_size=2)
        first = policy.creator_for("a.test", [self.ca_a.certificate], "none")
        policy.creator_for("b.test", [self.ca_a.certificate], "none")
        policy.creator_for("c.test", [self.ca_a.certificate], "none")
        self.assertEqual(len(policy), 2)
        self.assertIsNot(policy.creator_for("a.test", [self.ca_a.certificate], "none"), first)
