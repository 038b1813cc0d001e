"""Outbound: docs/decisions.md, outbound steps, from the attacker's side, over real sockets and TLS.

The internal homeserver's side is played by a raw client that sends
`CONNECT` to sbg's outbound listener, then TLS inside the tunnel (trusting
only sbg's interception CA), then HTTP requests. The external server is a
recording TLS stand-in whose certificate comes from the partner's CA, which
sbg pins through `tls_ca`.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from cryptography import x509

from testbed.configtools import (
    DELETE,
    INTERNAL_SERVER,
    PARTNER_HOST,
    PARTNER_SERVER,
    PROXY_USERNAME,
    Material,
)
from tests.asynctest import TestCase
from tests.gateway import start_gateway
from tests.outbound_tunnels import CONNECT, HOST, TXN, assert_nothing_sent, signed, start, txn
from tests.rawhttp import build_request
from tests.standin import StandinState, start_standin


class AllowedTests(TestCase):
    async def test_transaction_forwarded_byte_identical(self) -> None:
        gw, ext = await start(self)
        request = signed("PUT", TXN, txn())
        answer, [resp], facts = await gw.outbound(CONNECT, [request])
        self.assertEqual(answer.status, 200)
        self.assertEqual(resp.status, 200, resp.body)
        self.assertEqual(resp.header(b"X-Standin"), b"yes")
        [seen] = ext.requests
        self.assertEqual(seen.uri, TXN)
        sent_head, _, sent_body = request.partition(b"\r\n\r\n")
        self.assertEqual(seen.body, sent_body)
        got = {k.lower(): v for k, v in seen.headers}
        self.assertEqual(got[b"host"], [HOST])
        sent_auth = [
            v
            for k, v in (x.split(b": ", 1) for x in sent_head.split(b"\r\n")[1:])
            if k == b"Authorization"
        ]
        self.assertEqual(got[b"authorization"], sent_auth)
        # Internal addresses do not leak to the external server.
        self.assertNotIn(b"x-forwarded-for", got)
        self.assertTrue(ext.raw_bytes.startswith(b"PUT " + TXN + b" HTTP/1.1\r\n"))
        # The intercepting certificate names the SNI host and chains to the CA
        # (the client trusted only sbg's CA and checked the host name).
        cert = x509.load_der_x509_certificate(facts["peer_cert"])
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertIn(PARTNER_HOST, san.get_values_for_type(x509.DNSName))
        records = gw.audit.records
        self.assertEqual(records[0]["method"], "CONNECT")
        self.assertEqual(records[0]["decision"], "allow")
        self.assertEqual(records[-1]["decision"], "allow")
        self.assertEqual(records[-1]["origin"], INTERNAL_SERVER)
        self.assertEqual(records[-1]["destination"], PARTNER_SERVER)
        self.assertEqual(records[-1]["group"], "transactions")

    async def test_kept_alive_tunnel_checks_every_request(self) -> None:
        gw, ext = await start(self)
        requests = [
            signed("PUT", TXN, txn()),
            signed("GET", b"/_matrix/federation/v1/publicRooms"),  # not in `external`
            signed("GET", b"/_matrix/federation/v1/query/profile?user_id=%40a%3Apartner.example"),
        ]
        _answer, responses, _ = await gw.outbound(CONNECT, requests)
        self.assertEqual([r.status for r in responses], [200, 403, 200])
        self.assertEqual(
            [s.uri.split(b"?")[0] for s in ext.requests],
            [TXN, b"/_matrix/federation/v1/query/profile"],
        )

    async def test_synapse_style_connect_http10_no_headers(self) -> None:
        gw, ext = await start(self)
        answer, [resp], _ = await gw.outbound(CONNECT, [signed("GET", b"/_matrix/key/v2/server")])
        self.assertEqual(answer.status, 200)
        self.assertEqual(resp.status, 200)
        self.assertEqual(len(ext.requests), 1)

    async def test_discovery_tunnel_allows_only_discovery(self) -> None:
        gw, ext = await start(self)
        well_known = build_request(
            b"GET", b"/.well-known/matrix/server", [(b"Host", PARTNER_SERVER.encode())]
        )
        send = signed("PUT", TXN, txn(), host=PARTNER_SERVER.encode())
        answer, responses, _ = await gw.outbound(
            PARTNER_SERVER.encode() + b":443", [well_known, send], sni=PARTNER_SERVER
        )
        self.assertEqual(answer.status, 200)
        self.assertEqual([r.status for r in responses], [200, 403])
        self.assertEqual([s.uri for s in ext.requests], [b"/.well-known/matrix/server"])

    async def test_large_response_streams(self) -> None:
        size = 64 * 1024 * 1024
        gw, _ext = await start(self, upstream=StandinState(media_size=size))
        target = b"/_matrix/federation/v1/media/download/abc"
        _answer, [resp], _ = await gw.outbound(CONNECT, [signed("GET", target)])
        self.assertEqual(resp.status, 200)
        self.assertEqual(len(resp.body), size)


class RefusalTests(TestCase):
    async def test_connect_to_unknown_target(self) -> None:
        gw, ext = await start(self)
        answer, responses, _ = await gw.outbound(b"evil.example:8448", [])
        self.assertEqual(answer.status, 403)
        self.assertEqual(gw.last_audit()["code"], "unknown_destination")
        self.assertEqual(responses, [])
        assert_nothing_sent(self, ext)
        self.assertEqual(gw.last_audit()["decision"], "deny")
        self.assertEqual(gw.last_audit()["method"], "CONNECT")
        self.assertEqual(gw.last_audit()["path"], "evil.example:8448")

    async def test_connect_to_disabled_server(self) -> None:
        gw, ext = await start(self, {"external_homeservers[0].enabled": False})
        answer, _, _ = await gw.outbound(CONNECT, [])
        self.assertEqual(answer.status, 403)
        self.assertEqual(gw.last_audit()["code"], "unknown_destination")
        assert_nothing_sent(self, ext)

    async def test_connect_to_killed_server(self) -> None:
        gw, ext = await start(self)
        gw.service.killswitch.engage(PARTNER_SERVER, "outbound")
        answer, _, _ = await gw.outbound(CONNECT, [])
        self.assertEqual(answer.status, 403)
        self.assertEqual(gw.last_audit()["code"], "killswitch")
        assert_nothing_sent(self, ext)

    async def test_proxy_credentials(self) -> None:
        gw, ext = await start(
            self,
            {
                "outbound.proxy_auth": {
                    "username": PROXY_USERNAME,
                    "password_file": "secrets/proxy_password",
                }
            },
        )
        answer, _, _ = await gw.outbound(CONNECT, [])
        self.assertEqual(answer.status, 407)
        self.assertEqual(gw.last_audit()["code"], "proxy_auth")
        self.assertEqual(answer.header(b"Proxy-Authenticate"), b'Basic realm="sbg"')
        wrong = base64.b64encode(f"{PROXY_USERNAME}:nope".encode())
        answer, _, _ = await gw.outbound(
            CONNECT, [], proxy_headers=[(b"Proxy-Authorization", b"Basic " + wrong)]
        )
        self.assertEqual(answer.status, 407)
        self.assertEqual(gw.last_audit()["code"], "proxy_auth")
        assert_nothing_sent(self, ext)
        good = base64.b64encode(f"{PROXY_USERNAME}:{gw.material.proxy_password}".encode())
        answer, [resp], _ = await gw.outbound(
            CONNECT,
            [signed("PUT", TXN, txn())],
            proxy_headers=[(b"Proxy-Authorization", b"Basic " + good)],
        )
        self.assertEqual(answer.status, 200)
        self.assertEqual(resp.status, 200)
        # The password never reaches the audit log.
        self.assertNotIn(gw.material.proxy_password, json.dumps(gw.audit.records))

    async def test_plain_http_request(self) -> None:
        gw, ext = await start(self)
        from tests.rawhttp import exchange

        req = build_request(
            b"GET", b"http://" + HOST + b"/_matrix/key/v2/server", [(b"Host", HOST)]
        )
        resp = await exchange("127.0.0.1", gw.ports["outbound"], req)
        self.assertEqual(resp.status, 403)
        self.assertEqual(gw.last_audit()["code"], "plain_http")
        assert_nothing_sent(self, ext)

    async def test_non_spec_path(self) -> None:
        gw, ext = await start(self)
        _a, [resp], _ = await gw.outbound(CONNECT, [signed("GET", b"/_synapse/admin/v1/users")])
        self.assertEqual(resp.status, 404)
        self.assertEqual(gw.last_audit()["code"], "unknown_endpoint")
        self.assertEqual(resp.json()["errcode"], "M_UNRECOGNIZED")
        assert_nothing_sent(self, ext)

    async def test_host_mismatch(self) -> None:
        gw, ext = await start(self)
        req = signed("PUT", TXN, txn(), host=b"matrix.elsewhere.example:8448")
        _a, [resp], _ = await gw.outbound(CONNECT, [req])
        self.assertEqual(resp.status, 403)
        self.assertEqual(gw.last_audit()["code"], "host_mismatch")
        self.assertEqual(resp.json()["errcode"], "M_FORBIDDEN")
        assert_nothing_sent(self, ext)

    async def test_sni_mismatch(self) -> None:
        gw, ext = await start(self)
        _a, [resp], _ = await gw.outbound(
            CONNECT, [signed("PUT", TXN, txn())], sni="matrix.elsewhere.example"
        )
        self.assertEqual(resp.status, 403)
        self.assertEqual(gw.last_audit()["code"], "sni_mismatch")
        assert_nothing_sent(self, ext)

    async def test_signed_destination_mismatch(self) -> None:
        gw, ext = await start(self)
        req = signed("PUT", TXN, txn(), destination="elsewhere.example")
        _a, [resp], _ = await gw.outbound(CONNECT, [req])
        self.assertEqual(resp.status, 403)
        self.assertEqual(gw.last_audit()["code"], "bad_destination")
        assert_nothing_sent(self, ext)

    async def test_origin_not_internal(self) -> None:
        gw, ext = await start(self)
        req = signed("PUT", TXN, txn(), origin="evil.example")
        _a, [resp], _ = await gw.outbound(CONNECT, [req])
        self.assertEqual(resp.status, 403)
        self.assertEqual(gw.last_audit()["code"], "unknown_origin")
        assert_nothing_sent(self, ext)

    async def test_unsigned_federation_request(self) -> None:
        gw, ext = await start(self)
        req = build_request(b"PUT", TXN, [(b"Host", HOST)], json.dumps(txn()).encode())
        _a, [resp], _ = await gw.outbound(CONNECT, [req])
        self.assertEqual(resp.status, 403)
        self.assertEqual(gw.last_audit()["code"], "missing_auth")
        assert_nothing_sent(self, ext)

    async def test_group_not_in_trust_level(self) -> None:
        gw, ext = await start(self)
        req = signed("GET", b"/_matrix/federation/v1/hierarchy/%21r%3Apartner.example")
        _a, [resp], _ = await gw.outbound(CONNECT, [req])
        self.assertEqual(resp.status, 403)
        self.assertEqual(gw.last_audit()["code"], "group_not_allowed")
        self.assertIn("hierarchy", resp.json()["error"])
        assert_nothing_sent(self, ext)

    async def test_wrong_pinned_ca_gives_502_and_sends_nothing(self) -> None:
        gw, ext = await start(self, tls_ca="internal")
        _a, [resp], _ = await gw.outbound(CONNECT, [signed("PUT", TXN, txn())])
        self.assertEqual(resp.status, 502)
        self.assertEqual(gw.last_audit()["code"], "upstream_tls")
        self.assertEqual(resp.json()["errcode"], "M_UNKNOWN")
        self.assertEqual(ext.raw, [], "bytes reached a server whose certificate failed")

    async def test_unreachable_destination(self) -> None:
        gw, _ext = await start(
            self, {"external_homeservers[0].addresses": {f"{PARTNER_HOST}:8448": "127.0.0.1:9"}}
        )
        _a, [resp], _ = await gw.outbound(CONNECT, [signed("PUT", TXN, txn())])
        self.assertEqual(resp.status, 502)
        self.assertEqual(gw.last_audit()["code"], "upstream_connect")

    async def test_kill_switch_closes_open_tunnel(self) -> None:
        import socket
        import ssl

        from twisted.internet import defer, reactor, threads

        gw, ext = await start(self)

        def open_tunnel() -> ssl.SSLSocket:
            raw = socket.create_connection(("127.0.0.1", gw.ports["outbound"]), timeout=10)
            raw.sendall(b"CONNECT " + CONNECT + b" HTTP/1.0\r\n\r\n")
            assert raw.recv(4096).startswith(b"HTTP/1.0 200")
            ctx = ssl.create_default_context(cafile=gw.material.outbound_ca.certificate)
            return ctx.wrap_socket(raw, server_hostname=PARTNER_HOST)

        sock = await threads.deferToThread(open_tunnel)
        self.addCleanup(sock.close)
        gw.service.killswitch.engage(PARTNER_SERVER, "outbound")
        await defer.Deferred(lambda d: None).addTimeout(0.2, reactor).addErrback(lambda f: None)

        def use() -> bytes:
            try:
                sock.sendall(signed("PUT", TXN, txn()))
                return sock.recv(4096)
            except OSError:
                return b""

        self.assertEqual(await threads.deferToThread(use), b"")
        assert_nothing_sent(self, ext)


class NonMatrixTests(TestCase):
    async def test_allowed_url_exact_match_only(self) -> None:
        holder: dict[str, int] = {}
        push = StandinState()

        def build(m: Material) -> dict[str, Any]:
            _state, port = start_standin(
                push, tls=(m.partner_tls.certificate, m.partner_tls.private_key)
            )
            self.addCleanup(port.stopListening)
            holder["port"] = port.getHost().port  # type: ignore[attr-defined]
            old = os.environ.get("SSL_CERT_FILE")
            os.environ["SSL_CERT_FILE"] = m.partner_ca.certificate
            self.addCleanup(_restore, "SSL_CERT_FILE", old)
            return {
                "outbound.proxy_auth": DELETE,
                "outbound.allowed_non_matrix_urls": [
                    {
                        "host": "127.0.0.1",
                        "port": holder["port"],
                        "path": "/_matrix/push/v1/notify",
                    },
                ],
            }

        gw = await start_gateway(self, build)
        target = f"127.0.0.1:{holder['port']}".encode()
        notify = build_request(b"POST", b"/_matrix/push/v1/notify", [(b"Host", target)], b"{}")
        near = build_request(b"POST", b"/_matrix/push/v1/notify?x=1", [(b"Host", target)], b"{}")
        other = build_request(b"POST", b"/_matrix/push/v1/notifyx", [(b"Host", target)], b"{}")
        answer, responses, _ = await gw.outbound(target, [notify, near, other], sni=None)
        self.assertEqual(answer.status, 200)
        # A refusal decided from the head of a request with a body is
        # answered before the body and ends the connection.
        self.assertEqual([r.status for r in responses], [200, 404, 0])  # 0: no answer
        self.assertEqual(responses[1].header(b"Connection"), b"close")
        _a, responses, _ = await gw.outbound(target, [other], sni=None)
        self.assertEqual([r.status for r in responses], [404])
        self.assertEqual(gw.last_audit()["code"], "non_matrix_not_allowed")
        self.assertEqual([s.uri for s in push.requests], [b"/_matrix/push/v1/notify"])
        # Another port of the same host is not allowed.
        answer, _, _ = await gw.outbound(b"127.0.0.1:1", [], sni=None)
        self.assertEqual(answer.status, 403)


def _restore(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
