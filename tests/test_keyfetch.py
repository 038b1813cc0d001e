"""Fetched signing keys (`key_fetch: fetch`; docs/decisions.md, inbound step 15).

A stand-in key server (twisted.web over real TLS on 127.0.0.1, certificate
from a test CA) serves a self-signed `/_matrix/key/v2/server` and can rotate
its key. The fetcher reaches it as `matrix.partner.example:8448` through
`addresses`, so SNI, `Host` and the certificate check are for that name.
Every refusal asserts that the refused response's keys are not usable.
"""

from __future__ import annotations

import os
import time
from typing import Any

from signedjson.key import generate_signing_key, get_verify_key
from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from sbg.clients.keyfetch import KeyFetcher, KeyFetchError, fetch_target
from sbg.config.model import ExternalHomeserver, HostPattern, OutboundSettings
from sbg.matrix.xmatrix import parse_authorization, sign_request, verify_request_signature
from sbg.reasons import Refusal
from sbg.tls.client import ClientTLSPolicy
from testbed.configtools import INTERNAL_SERVER, PARTNER_HOST, PARTNER_SERVER
from testbed.pki import CertFiles, issue_server_cert
from testbed.tlstools import deferred_test
from tests.gateway import assert_refused, start_gateway
from tests.keyserver import KeyServer, key_id, make_pki, start_key_server

TXN = b"/_matrix/federation/v1/send/1700000000042"


class Clock:
    """Seconds since the epoch, moved by hand."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def partner(port: int, tls_ca: str | None, **kw: Any) -> ExternalHomeserver:
    fields: dict[str, Any] = {
        "server_name": PARTNER_SERVER,
        "federation_hosts": (HostPattern(PARTNER_HOST, None),),
        "key_fetch": "fetch",
        "tls_ca": tls_ca,
        "addresses": ((f"{PARTNER_HOST}:8448", ("127.0.0.1", port)),),
    }
    fields.update(kw)
    return ExternalHomeserver(**fields)


def signed_auth(signing_key: Any) -> Any:
    header = sign_request(signing_key, "GET", b"/x", PARTNER_SERVER, INTERNAL_SERVER, None)
    return parse_authorization([header])


def verify_with(signing_key: Any, keys: Any) -> None:
    """A request signed by SIGNING_KEY checked against KEYS (raises Refusal)."""
    verify_request_signature(signed_auth(signing_key), "GET", b"/x", INTERNAL_SERVER, None, keys)


OUTBOUND = OutboundSettings()


class TargetTests(TestCase):
    def test_port_from_entry_then_server_name_then_8448(self) -> None:
        s = ExternalHomeserver(
            server_name="p.example:8500",
            federation_hosts=(HostPattern("m.p.example", 9000), HostPattern("x.example", 1)),
        )
        self.assertEqual((fetch_target(s).host, fetch_target(s).port), ("m.p.example", 9000))
        s = ExternalHomeserver(
            server_name="p.example:8500", federation_hosts=(HostPattern("m.p.example", None),)
        )
        self.assertEqual(fetch_target(s).port, 8500)
        s = ExternalHomeserver(
            server_name="p.example", federation_hosts=(HostPattern("m.p.example", None),)
        )
        t = fetch_target(s)
        self.assertEqual(
            (t.host, t.port, t.connect, t.ca_files),
            ("m.p.example", 8448, ("m.p.example", 8448), None),
        )

    def test_addresses_and_tls_ca(self) -> None:
        s = ExternalHomeserver(
            server_name="p.example",
            federation_hosts=(HostPattern("m.p.example", None),),
            tls_ca="/pins/ca.pem",
            addresses=(
                ("m.p.example:443", ("10.0.0.1", 1)),
                ("m.p.example:8448", ("10.0.0.2", 8449)),
            ),
        )
        t = fetch_target(s)
        self.assertEqual(t.connect, ("10.0.0.2", 8449))
        self.assertEqual(t.host, "m.p.example")
        self.assertEqual(t.ca_files, ("/pins/ca.pem",))


class FetcherTests(TestCase):
    def setUp(self) -> None:
        self.pki = make_pki(self.mktemp())
        self.k1 = generate_signing_key("k1")
        self.k2 = generate_signing_key("k2")
        self.clock = Clock()
        self.fetcher = KeyFetcher(reactor, ClientTLSPolicy(), clock=self.clock)

    def serve(self, tls: CertFiles | None = None, **kw: Any) -> tuple[KeyServer, int]:
        state = KeyServer(PARTNER_SERVER, [self.k1], **kw)
        return state, start_key_server(self, state, tls or self.pki.tls)

    @deferred_test
    async def test_fetch_then_verify_sni_host_and_cache(self) -> None:
        state, port = self.serve()
        server = partner(port, self.pki.ca.certificate)
        self.assertRaises(Refusal, verify_with, self.k1, self.fetcher.keys_for(server, {}))
        self.assertTrue(await self.fetcher.refresh(server, OUTBOUND))
        self.assertEqual(state.hits, 1)
        self.assertEqual(state.host_headers, [f"{PARTNER_HOST}:8448".encode()])
        self.assertEqual(state.snis, [PARTNER_HOST.encode()])
        keys = self.fetcher.keys_for(server, {})
        self.assertEqual(set(keys), {key_id(self.k1)})
        verify_with(self.k1, keys)
        # Another key signing as k1 still fails: the fetched key is k1's.
        self.assertRaises(Refusal, verify_with, generate_signing_key("k1"), keys)

    @deferred_test
    async def test_rotation_one_fetch_then_verifies(self) -> None:
        state, port = self.serve()
        server = partner(port, self.pki.ca.certificate)
        self.assertTrue(await self.fetcher.refresh(server, OUTBOUND))
        verify_with(self.k1, self.fetcher.keys_for(server, {}))

        self.clock.now += 120
        state.rotate(self.k2, expired_ts=int(self.clock.now * 1000) - 1000)
        with self.assertRaises(Refusal) as cm:
            verify_with(self.k2, self.fetcher.keys_for(server, {}))
        self.assertEqual(cm.exception.code, "unknown_key")
        self.assertTrue(await self.fetcher.refresh(server, OUTBOUND))
        self.assertEqual(state.hits, 2)
        keys = self.fetcher.keys_for(server, {})
        verify_with(self.k2, keys)
        # k1 now comes as an old key that expired: no longer usable.
        self.assertNotIn(key_id(self.k1), keys)

        # A second unknown key id within a minute: no fetch.
        self.clock.now += 59
        k3 = generate_signing_key("k3")
        state.rotate(k3, expired_ts=0)
        self.assertFalse(await self.fetcher.refresh(server, OUTBOUND))
        self.assertEqual(state.hits, 2)
        self.assertRaises(Refusal, verify_with, k3, self.fetcher.keys_for(server, {}))
        # A minute after the last fetch, it may ask again.
        self.clock.now += 2
        self.assertTrue(await self.fetcher.refresh(server, OUTBOUND))
        self.assertEqual(state.hits, 3)
        verify_with(k3, self.fetcher.keys_for(server, {}))

    @deferred_test
    async def test_old_key_usable_until_expired_ts(self) -> None:
        state, port = self.serve()
        server = partner(port, self.pki.ca.certificate)
        state.rotate(self.k2, expired_ts=int(self.clock.now * 1000) + 10_000)
        self.assertTrue(await self.fetcher.refresh(server, OUTBOUND))
        verify_with(self.k1, self.fetcher.keys_for(server, {}))
        self.clock.now += 11
        self.assertNotIn(key_id(self.k1), self.fetcher.keys_for(server, {}))
        verify_with(self.k2, self.fetcher.keys_for(server, {}))

    @deferred_test
    async def test_keys_expire_at_valid_until(self) -> None:
        _state, port = self.serve(valid_until_ms=int(self.clock.now * 1000) + 5000)
        server = partner(port, self.pki.ca.certificate)
        self.assertTrue(await self.fetcher.refresh(server, OUTBOUND))
        verify_with(self.k1, self.fetcher.keys_for(server, {}))
        self.clock.now += 6
        self.assertEqual(dict(self.fetcher.keys_for(server, {})), {})

    @deferred_test
    async def test_concurrent_refreshes_share_one_fetch(self) -> None:
        state, port = self.serve()
        server = partner(port, self.pki.ca.certificate)
        results = await defer.gatherResults(
            [self.fetcher.refresh(server, OUTBOUND) for _ in range(5)]
        )
        self.assertEqual(results, [True] * 5)
        self.assertEqual(state.hits, 1)

    @deferred_test
    async def test_failed_fetch_also_rate_limited(self) -> None:
        state, port = self.serve(name_in_response="evil.example")
        server = partner(port, self.pki.ca.certificate)
        self.assertFalse(await self.fetcher.refresh(server, OUTBOUND))
        self.assertFalse(await self.fetcher.refresh(server, OUTBOUND))
        self.assertEqual(state.hits, 1)

    @deferred_test
    async def test_pinned_server_never_fetches_and_pinned_ids_win(self) -> None:
        state, port = self.serve()
        pinned_server = partner(port, self.pki.ca.certificate, key_fetch="pinned")
        self.assertFalse(await self.fetcher.refresh(pinned_server, OUTBOUND))
        self.assertEqual(state.hits, 0)
        # A fetching server whose response reuses a pinned key id: pinned wins.
        server = partner(port, self.pki.ca.certificate)
        self.assertTrue(await self.fetcher.refresh(server, OUTBOUND))
        other = generate_signing_key("k1")
        pinned = {key_id(other): get_verify_key(other)}
        keys = self.fetcher.keys_for(server, pinned)
        verify_with(other, keys)
        self.assertRaises(Refusal, verify_with, self.k1, keys)
        # Switched to pinned by a reload: fetched keys are not used.
        self.assertEqual(dict(self.fetcher.keys_for(pinned_server, {})), {})

    @deferred_test
    async def test_cache_dropped_when_target_or_trust_changes(self) -> None:
        _state, port = self.serve()
        server = partner(port, self.pki.ca.certificate)
        self.assertTrue(await self.fetcher.refresh(server, OUTBOUND))
        moved = partner(port, self.pki.other_ca.certificate)
        self.assertEqual(dict(self.fetcher.keys_for(moved, {})), {})
        # ... and stays dropped.
        self.assertEqual(dict(self.fetcher.keys_for(server, {})), {})

    async def _refused(self, server: ExternalHomeserver, state: KeyServer, hits: int) -> None:
        self.assertFalse(await self.fetcher.refresh(server, OUTBOUND))
        self.assertEqual(state.hits, hits)
        self.assertEqual(dict(self.fetcher.keys_for(server, {})), {})
        self.assertRaises(Refusal, verify_with, self.k1, self.fetcher.keys_for(server, {}))

    async def _fetch_error(self, server: ExternalHomeserver) -> str:
        try:
            await self.fetcher.fetch(server, OUTBOUND)
        except KeyFetchError as e:
            return str(e)
        self.fail("the fetch was accepted")

    @deferred_test
    async def test_expired_response_refused(self) -> None:
        state, port = self.serve(valid_until_ms=int(self.clock.now * 1000) - 1)
        server = partner(port, self.pki.ca.certificate)
        await self._refused(server, state, 1)
        self.assertIn("valid_until_ts", await self._fetch_error(server))

    @deferred_test
    async def test_wrong_server_name_refused(self) -> None:
        state, port = self.serve(name_in_response="evil.example")
        server = partner(port, self.pki.ca.certificate)
        await self._refused(server, state, 1)
        self.assertIn("server_name", await self._fetch_error(server))

    @deferred_test
    async def test_unsigned_response_refused(self) -> None:
        state, port = self.serve(signers=[])
        await self._refused(partner(port, self.pki.ca.certificate), state, 1)

    @deferred_test
    async def test_badly_signed_response_refused(self) -> None:
        # Signed under k1's key id, by another key.
        state, port = self.serve(signers=[generate_signing_key("k1")])
        await self._refused(partner(port, self.pki.ca.certificate), state, 1)

    @deferred_test
    async def test_response_not_signed_by_every_listed_key_refused(self) -> None:
        state, port = self.serve(signers=[self.k1])
        state.current = [self.k1, self.k2]
        await self._refused(partner(port, self.pki.ca.certificate), state, 1)

    @deferred_test
    async def test_response_over_size_cap_refused(self) -> None:
        state, port = self.serve(padding=1024 * 1024)
        server = partner(port, self.pki.ca.certificate)
        await self._refused(server, state, 1)
        self.assertIn("larger than", await self._fetch_error(server))

    @deferred_test
    async def test_streamed_response_over_size_cap_refused(self) -> None:
        state, port = self.serve(padding=1024 * 1024, streamed=True)
        server = partner(port, self.pki.ca.certificate)
        await self._refused(server, state, 1)
        self.assertIn("larger than", await self._fetch_error(server))

    @deferred_test
    async def test_streamed_response_under_cap_accepted(self) -> None:
        state, port = self.serve(padding=200_000, streamed=True)
        self.addCleanup(lambda: self.assertEqual(state.hits, 1))
        self.assertTrue(
            await self.fetcher.refresh(partner(port, self.pki.ca.certificate), OUTBOUND)
        )

    @deferred_test
    async def test_certificate_from_another_ca_refused(self) -> None:
        state, port = self.serve(tls=self.pki.other_tls)
        server = partner(port, self.pki.ca.certificate)
        await self._refused(server, state, 0)
        self.assertIn(f"{PARTNER_HOST}:8448", await self._fetch_error(server))

    @deferred_test
    async def test_test_ca_not_trusted_without_tls_ca(self) -> None:
        # No tls_ca: the system roots, which do not know the test CA.
        state, port = self.serve()
        await self._refused(partner(port, None), state, 0)
        # default_trust none and no tls_ca: nothing is trusted at all.
        self.fetcher = KeyFetcher(reactor, ClientTLSPolicy(), clock=self.clock)
        self.assertFalse(
            await self.fetcher.refresh(partner(port, None), OutboundSettings(default_trust="none"))
        )
        self.assertEqual(state.hits, 0)

    @deferred_test
    async def test_certificate_for_another_name_refused(self) -> None:
        state, port = self.serve()
        # Same CA, but the name checked is not in the certificate.
        server = partner(
            port,
            self.pki.ca.certificate,
            federation_hosts=(HostPattern("matrix.other.example", None),),
            addresses=(("matrix.other.example:8448", ("127.0.0.1", port)),),
        )
        await self._refused(server, state, 0)

    @deferred_test
    async def test_redirect_not_followed(self) -> None:
        state, port = self.serve(status=302, headers={b"location": b"https://127.0.0.1:1/"})
        server = partner(port, self.pki.ca.certificate)
        await self._refused(server, state, 1)
        self.assertIn("HTTP 302", await self._fetch_error(server))

    @deferred_test
    async def test_silent_server_times_out(self) -> None:
        connections: list[Protocol] = []

        class Silent(Protocol):
            def connectionMade(self) -> None:
                connections.append(self)

        port = reactor.listenTCP(0, Factory.forProtocol(Silent), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        self.fetcher = KeyFetcher(reactor, ClientTLSPolicy(), clock=self.clock, timeout=0.5)
        server = partner(port.getHost().port, self.pki.ca.certificate)
        started = time.monotonic()
        self.assertIn("timed out", await self._fetch_error(server))
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual(len(connections), 1)
        for c in connections:
            assert c.transport is not None
            c.transport.loseConnection()

    @deferred_test
    async def test_unreachable_refused(self) -> None:
        probe = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")  # type: ignore[attr-defined]
        free = probe.getHost().port
        await probe.stopListening()
        server = partner(free, self.pki.ca.certificate)
        self.assertFalse(await self.fetcher.refresh(server, OUTBOUND))
        self.assertIn(f"{PARTNER_HOST}:8448", await self._fetch_error(server))


class InboundFetchTests(TestCase):
    """Through the real inbound listener: steps 12, 15 and 16 with `key_fetch: fetch`."""

    @deferred_test
    async def test_unknown_key_fetched_once_then_verified_and_kept_across_reload(self) -> None:
        k1 = generate_signing_key("k1")
        state = KeyServer(PARTNER_SERVER, [k1])

        def overrides(material: Any) -> dict[str, Any]:
            port = start_key_server(self, state, material.partner_tls)
            return {
                "external_homeservers[0].key_fetch": "fetch",
                "external_homeservers[0].addresses": {f"{PARTNER_HOST}:8448": f"127.0.0.1:{port}"},
            }

        gw = await start_gateway(self, overrides)
        body = {"origin": PARTNER_SERVER, "origin_server_ts": 1, "pdus": [], "edus": []}

        # Signed by k1, which sbg has never seen: one fetch, then allowed.
        resp = await gw.inbound(gw.signed_request("PUT", TXN, body, signing_key=k1))
        self.assertEqual(resp.status, 200, resp.body)
        self.assertEqual(state.hits, 1)
        self.assertEqual(state.snis, [PARTNER_HOST.encode()])
        self.assertEqual(len(gw.upstream.requests), 1)

        # Cached: no second fetch.
        resp = await gw.inbound(gw.signed_request("PUT", TXN + b"1", body, signing_key=k1))
        self.assertEqual(resp.status, 200, resp.body)
        self.assertEqual(state.hits, 1)

        # The pinned key still works.
        resp = await gw.inbound(gw.signed_request("PUT", TXN + b"2", body))
        self.assertEqual(resp.status, 200, resp.body)

        # A reload builds a new policy; the fetched key survives it.
        self.assertTrue(gw.service.reload())
        resp = await gw.inbound(gw.signed_request("PUT", TXN + b"3", body, signing_key=k1))
        self.assertEqual(resp.status, 200, resp.body)
        self.assertEqual(state.hits, 1)

        # Another unknown key id within the minute: no fetch, refused.
        k3 = generate_signing_key("k3")
        state.rotate(k3, expired_ts=0)
        resp = await gw.inbound(gw.signed_request("PUT", TXN + b"4", body, signing_key=k3))
        assert_refused(self, gw, resp, 401, "M_UNAUTHORIZED", upstream_before=4, code="unknown_key")
        self.assertEqual(state.hits, 1)
        self.assertIn("k3", gw.last_audit().get("reason", ""))

    @deferred_test
    async def test_pinned_mode_never_fetches(self) -> None:
        k1 = generate_signing_key("k1")
        state = KeyServer(PARTNER_SERVER, [k1])

        def overrides(material: Any) -> dict[str, Any]:
            port = start_key_server(self, state, material.partner_tls)
            return {
                "external_homeservers[0].addresses": {f"{PARTNER_HOST}:8448": f"127.0.0.1:{port}"},
            }

        gw = await start_gateway(self, overrides)
        body = {"origin": PARTNER_SERVER, "origin_server_ts": 1, "pdus": [], "edus": []}
        resp = await gw.inbound(gw.signed_request("PUT", TXN, body, signing_key=k1))
        assert_refused(self, gw, resp, 401, "M_UNAUTHORIZED", code="unknown_key")
        self.assertEqual(state.hits, 0)

    @deferred_test
    async def test_fetch_from_wrong_ca_server_refused(self) -> None:
        k1 = generate_signing_key("k1")
        state = KeyServer(PARTNER_SERVER, [k1])

        def overrides(material: Any) -> dict[str, Any]:
            # The server's certificate is from the internal CA, not tls_ca.
            tls = issue_server_cert(
                material.internal_ca,
                os.path.join(material.directory, "rogue"),
                "rogue",
                [PARTNER_HOST],
            )
            port = start_key_server(self, state, tls)
            return {
                "external_homeservers[0].key_fetch": "fetch",
                "external_homeservers[0].addresses": {f"{PARTNER_HOST}:8448": f"127.0.0.1:{port}"},
            }

        gw = await start_gateway(self, overrides)
        body = {"origin": PARTNER_SERVER, "origin_server_ts": 1, "pdus": [], "edus": []}
        resp = await gw.inbound(gw.signed_request("PUT", TXN, body, signing_key=k1))
        assert_refused(self, gw, resp, 401, "M_UNAUTHORIZED", code="unknown_key")
        self.assertEqual(state.hits, 0)
