"""Inbound: the steps of docs/decisions.md, one by one, from the attacker's side.

sbg runs in-process on real loopback sockets with real TLS (its inbound
listener presents the internal homeserver's certificate); the upstream is a
recording stand-in. Every refusal asserts the status, the errcode, the
audit decision *and* that the stand-in received nothing.
"""

from __future__ import annotations

import json
from typing import Any

from signedjson.key import generate_signing_key
from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol

from testbed.configtools import INTERNAL_HOST, INTERNAL_SERVER, PARTNER_SERVER, Material
from testbed.tlstools import issue_cert
from tests.asynctest import TestCase
from tests.gateway import assert_refused, start_gateway
from tests.inbound_requests import TXN, txn_body
from tests.rawhttp import build_request


class AllowedTests(TestCase):
    async def test_signed_transaction_forwarded_byte_identical(self) -> None:
        gw = await start_gateway(self)
        content = txn_body()
        body = json.dumps(content, indent=1).encode()  # whitespace must survive
        headers = gw.signed_headers("PUT", TXN, content)
        headers += [
            (b"Connection", b"keep-alive, X-Drop-Me"),
            (b"X-Drop-Me", b"1"),
            (b"Proxy-Authorization", b"Basic c2VjcmV0"),
            (b"X-Forwarded-For", b"6.6.6.6"),
            (b"X-Keep", b"kept"),
        ]
        resp = await gw.inbound(build_request(b"PUT", TXN, headers, body))
        self.assertEqual(resp.status, 200, resp.body)
        self.assertEqual(resp.json(), {"ok": True})
        self.assertEqual(resp.header(b"X-Standin"), b"yes")
        [seen] = gw.upstream.requests
        self.assertEqual(seen.method, b"PUT")
        self.assertEqual(seen.uri, TXN)
        self.assertEqual(seen.body, body)
        raw = gw.upstream.raw_bytes
        self.assertTrue(raw.startswith(b"PUT " + TXN + b" HTTP/1.1\r\n"), raw[:80])
        got = {k.lower(): v for k, v in seen.headers}
        sent_auth = dict(headers)[b"Authorization"]
        self.assertEqual(got[b"authorization"], [sent_auth])
        self.assertEqual(got[b"host"], [INTERNAL_HOST.encode()])
        self.assertEqual(got[b"x-keep"], [b"kept"])
        # The client's X-Forwarded-For is replaced by the TCP peer.
        self.assertEqual(got[b"x-forwarded-for"], [b"127.0.0.1"])
        for hop in (b"x-drop-me", b"proxy-authorization", b"connection"):
            self.assertNotIn(hop, got)
        self.assertEqual(got[b"content-length"], [str(len(body)).encode()])
        record = gw.last_audit()
        self.assertEqual(record["decision"], "allow")
        self.assertEqual(record["origin"], PARTNER_SERVER)
        self.assertEqual(record["destination"], INTERNAL_SERVER)
        self.assertEqual(record["group"], "transactions")
        self.assertEqual(record["path"], TXN.decode())

    async def test_raw_encoded_target_forwarded_unchanged(self) -> None:
        gw = await start_gateway(self)
        target = b"/_matrix/federation/v1/event/%24abc%2Fdef%2Bghi?x=%2F..%2F&y=1+2"
        resp = await gw.inbound(gw.signed_request("GET", target))
        self.assertEqual(resp.status, 200, resp.body)
        self.assertEqual(gw.upstream.requests[0].uri, target)
        self.assertIn(b"GET " + target + b" HTTP/1.1\r\n", gw.upstream.raw_bytes)
        # The query string never reaches the audit log.
        self.assertEqual(gw.last_audit()["path"], target.split(b"?")[0].decode())

    async def test_unauthenticated_key_request_allowed(self) -> None:
        gw = await start_gateway(self)
        req = build_request(b"GET", b"/_matrix/key/v2/server", [(b"Host", INTERNAL_HOST.encode())])
        resp = await gw.inbound(req)
        self.assertEqual(resp.status, 200)
        self.assertEqual(len(gw.upstream.requests), 1)

    async def test_well_known_on_server_name_host(self) -> None:
        gw = await start_gateway(self)
        req = build_request(
            b"GET", b"/.well-known/matrix/server", [(b"Host", INTERNAL_SERVER.encode())]
        )
        resp = await gw.inbound(req, sni=INTERNAL_SERVER)
        self.assertEqual(resp.status, 200)

    async def test_every_request_on_a_kept_alive_connection_is_checked(self) -> None:
        gw = await start_gateway(self)
        good = gw.signed_request("PUT", TXN, txn_body())
        forged = gw.signed_request(
            "PUT",
            TXN + b"2",
            txn_body(),
            signing_key=gw.forged_key(),
        )
        first, second = await gw.inbound_many([good, forged])
        self.assertEqual(first.status, 200)
        self.assertEqual(second.status, 401)
        self.assertEqual(len(gw.upstream.requests), 1)

    async def test_draining_closes_kept_alive_connections(self) -> None:
        gw = await start_gateway(self)
        # What a graceful stop (SIGTERM) sets before it waits for requests.
        gw.service.tracker.draining = True
        first, second = await gw.inbound_many(
            [gw.signed_request("PUT", TXN, txn_body()), gw.signed_request("PUT", TXN, txn_body())]
        )
        self.assertEqual(first.status, 200)
        self.assertEqual(first.header(b"Connection"), b"close")
        self.assertTrue(second.closed)
        self.assertEqual(len(gw.upstream.requests), 1)


class RefusalTests(TestCase):
    """One test per refusing step of the inbound order (docs/decisions.md),
    named by its step."""

    async def test_step4_unknown_host(self) -> None:
        gw = await start_gateway(self)
        req = gw.signed_request("PUT", TXN, txn_body(), host=b"matrix.elsewhere.example")
        assert_refused(self, gw, await gw.inbound(req), 404, "M_UNRECOGNIZED", code="unknown_host")

    async def test_step4_no_host(self) -> None:
        gw = await start_gateway(self)
        headers = [
            h
            for h in gw.signed_headers("GET", b"/_matrix/federation/v1/version")
            if h[0] != b"Host"
        ]
        req = build_request(b"GET", b"/_matrix/federation/v1/version", headers, version=b"HTTP/1.0")
        assert_refused(self, gw, await gw.inbound(req), 404, "M_UNRECOGNIZED", code="unknown_host")

    async def test_step5_server_name_host_is_discovery_only(self) -> None:
        gw = await start_gateway(self)
        req = gw.signed_request("PUT", TXN, txn_body(), host=INTERNAL_SERVER.encode())
        assert_refused(self, gw, await gw.inbound(req), 404, "M_UNRECOGNIZED", code="unknown_host")

    async def test_step4_sni_names_another_internal_server(self) -> None:
        def other(m: Material) -> dict[str, Any]:
            tls = issue_cert(m.internal_ca, m.directory, "other", ["matrix.other.example"])
            return {
                "internal_homeservers[1]": {
                    "server_name": "other.example",
                    "federation_hosts": ["matrix.other.example"],
                    "upstream": "http://127.0.0.1:9",
                    "tls": {"certificate": tls.certificate, "private_key": tls.private_key},
                },
            }

        gw = await start_gateway(self, other)
        req = gw.signed_request("PUT", TXN, txn_body())
        # Domain fronting: TLS for one internal server, Host for another.
        resp = await gw.inbound(req, sni="matrix.other.example", check_hostname=False)
        assert_refused(self, gw, resp, 404, "M_UNRECOGNIZED", code="sni_mismatch")

    async def test_step5_unknown_endpoint(self) -> None:
        gw = await start_gateway(self)
        target = b"/_synapse/admin/v1/users"
        assert_refused(
            self,
            gw,
            await gw.inbound(gw.signed_request("GET", target)),
            404,
            "M_UNRECOGNIZED",
            code="unknown_endpoint",
        )

    async def test_step5_wrong_method(self) -> None:
        gw = await start_gateway(self)
        assert_refused(
            self,
            gw,
            await gw.inbound(gw.signed_request("GET", TXN)),
            405,
            "M_UNRECOGNIZED",
            code="method_not_allowed",
        )

    async def test_step5_path_traversal(self) -> None:
        gw = await start_gateway(self)
        for target in (
            b"/_matrix/federation/v1/send/../../../_synapse/admin/v1/users",
            b"/_matrix/federation/v1/send/%2e%2e/x",
            b"/_matrix/federation//v1/version",
        ):
            resp = await gw.inbound(gw.signed_request("GET", target))
            assert_refused(self, gw, resp, 400, "M_UNRECOGNIZED", code="malformed_target")

    async def test_step5_query_string_is_not_part_of_the_match(self) -> None:
        gw = await start_gateway(self)
        target = b"/_matrix/client/v3/login?x=/_matrix/key/v2/server"
        req = build_request(b"GET", target, [(b"Host", INTERNAL_HOST.encode())])
        assert_refused(
            self, gw, await gw.inbound(req), 404, "M_UNRECOGNIZED", code="unknown_endpoint"
        )

    async def test_step6_global_kill_switch(self) -> None:
        gw = await start_gateway(self)
        gw.service.killswitch.engage(None, "inbound")
        resp = await gw.inbound(gw.signed_request("PUT", TXN, txn_body()))
        assert_refused(self, gw, resp, 403, "M_FORBIDDEN", code="killswitch")
        # Unauthenticated endpoints obey it too.
        req = build_request(b"GET", b"/_matrix/key/v2/server", [(b"Host", INTERNAL_HOST.encode())])
        assert_refused(self, gw, await gw.inbound(req), 403, "M_FORBIDDEN", code="killswitch")

    async def test_step9_missing_authorization(self) -> None:
        gw = await start_gateway(self)
        body = json.dumps(txn_body()).encode()
        req = build_request(b"PUT", TXN, [(b"Host", INTERNAL_HOST.encode())], body)
        assert_refused(self, gw, await gw.inbound(req), 401, "M_UNAUTHORIZED", code="missing_auth")

    async def test_step9_two_authorization_headers(self) -> None:
        gw = await start_gateway(self)
        content = txn_body()
        headers = gw.signed_headers("PUT", TXN, content)
        auth = dict(headers)[b"Authorization"]
        evil = auth.replace(PARTNER_SERVER.encode(), b"evil.example")
        headers.append((b"Authorization", evil))
        req = build_request(b"PUT", TXN, headers, json.dumps(content).encode())
        assert_refused(self, gw, await gw.inbound(req), 401, "M_UNAUTHORIZED", code="multiple_auth")

    async def test_step9_malformed_authorization(self) -> None:
        gw = await start_gateway(self)
        headers = [
            (b"Host", INTERNAL_HOST.encode()),
            (b"Authorization", b'X-Matrix origin="a,b",key="ed25519:x",sig="abc"'),
        ]
        req = build_request(b"GET", b"/_matrix/federation/v1/user/devices/%40a%3Ab", headers)
        assert_refused(
            self, gw, await gw.inbound(req), 401, "M_UNAUTHORIZED", code="malformed_auth"
        )

    async def test_step10_unknown_origin(self) -> None:
        gw = await start_gateway(self)
        evil_key = generate_signing_key("evil")
        req = gw.signed_request(
            "PUT", TXN, txn_body("evil.example"), origin="evil.example", signing_key=evil_key
        )
        assert_refused(self, gw, await gw.inbound(req), 403, "M_FORBIDDEN", code="unknown_origin")
        self.assertEqual(gw.last_audit()["origin"], "evil.example")

    async def test_step10_disabled_origin(self) -> None:
        gw = await start_gateway(self, {"external_homeservers[0].enabled": False})
        resp = await gw.inbound(gw.signed_request("PUT", TXN, txn_body()))
        assert_refused(self, gw, resp, 403, "M_FORBIDDEN", code="unknown_origin")

    async def test_step10_killed_origin(self) -> None:
        gw = await start_gateway(self)
        gw.service.killswitch.engage(PARTNER_SERVER, "inbound")
        resp = await gw.inbound(gw.signed_request("PUT", TXN, txn_body()))
        assert_refused(self, gw, resp, 403, "M_FORBIDDEN", code="killswitch")

    async def test_step10_source_ips(self) -> None:
        gw = await start_gateway(self, {"external_homeservers[0].source_ips": ["192.0.2.0/24"]})
        resp = await gw.inbound(gw.signed_request("PUT", TXN, txn_body()))
        assert_refused(self, gw, resp, 403, "M_FORBIDDEN", code="source_ip")

    async def test_step11_wrong_destination(self) -> None:
        gw = await start_gateway(self)
        req = gw.signed_request("PUT", TXN, txn_body(), destination="other.example")
        assert_refused(
            self, gw, await gw.inbound(req), 401, "M_UNAUTHORIZED", code="bad_destination"
        )

    async def test_step11_missing_destination(self) -> None:
        gw = await start_gateway(self)
        content = txn_body()
        headers = gw.signed_headers("PUT", TXN, content)
        auth = dict(headers)[b"Authorization"]
        no_dest = b",".join(p for p in auth.split(b",") if not p.startswith(b"destination="))
        headers = [(k, no_dest if k == b"Authorization" else v) for k, v in headers]
        req = build_request(b"PUT", TXN, headers, json.dumps(content).encode())
        assert_refused(
            self, gw, await gw.inbound(req), 401, "M_UNAUTHORIZED", code="bad_destination"
        )

    async def test_step13_body_too_large(self) -> None:
        gw = await start_gateway(self, {"inbound.max_body_size": "1K"})
        content = txn_body()
        content["padding"] = "x" * 2000
        resp = await gw.inbound(gw.signed_request("PUT", TXN, content))
        assert_refused(self, gw, resp, 413, "M_TOO_LARGE", code="body_too_large")

    async def test_step14_chunked_body_too_large(self) -> None:
        gw = await start_gateway(self, {"inbound.max_body_size": "1K"})
        content = txn_body()
        content["padding"] = "x" * 5000
        body = json.dumps(content).encode()
        headers = [*gw.signed_headers("PUT", TXN, content), (b"Transfer-Encoding", b"chunked")]
        chunked = (
            b"".join(
                b"%x\r\n" % len(body[i : i + 1000]) + body[i : i + 1000] + b"\r\n"
                for i in range(0, len(body), 1000)
            )
            + b"0\r\n\r\n"
        )
        req = build_request(b"PUT", TXN, headers, chunked, content_length=False)
        assert_refused(self, gw, await gw.inbound(req), 413, "M_TOO_LARGE", code="body_too_large")

    async def test_step17_duplicate_keys(self) -> None:
        # The origin's own key signed these very bytes, duplicate and all:
        # the signature holds, the strict parse refuses.
        gw = await start_gateway(self)
        body = json.dumps(txn_body()).encode()[:-1] + b', "origin": "internal.example"}'
        headers = gw.raw_signed_headers("PUT", TXN, body)
        req = build_request(b"PUT", TXN, headers, body)
        assert_refused(self, gw, await gw.inbound(req), 400, "M_NOT_JSON", code="bad_json")
        self.assertEqual(gw.last_audit()["code"], "bad_json")

    async def test_step16_before_step17_duplicate_keys_under_a_forged_signature(self) -> None:
        # The signature is checked over the body as received before the
        # strict parse: a body nobody signed is refused for its signature
        # (Synapse, reading the last duplicate, would not verify it either).
        gw = await start_gateway(self)
        content = txn_body()
        headers = gw.signed_headers("PUT", TXN, content)
        body = json.dumps(content).encode()[:-1] + b', "origin": "internal.example"}'
        req = build_request(b"PUT", TXN, headers, body)
        assert_refused(self, gw, await gw.inbound(req), 401, "M_UNAUTHORIZED", code="bad_signature")
        self.assertEqual(gw.last_audit()["code"], "bad_signature")

    async def test_step17_not_json(self) -> None:
        gw = await start_gateway(self)
        headers = gw.signed_headers("PUT", TXN, {"a": 1})
        req = build_request(b"PUT", TXN, headers, b'{"a": NaN}')
        assert_refused(self, gw, await gw.inbound(req), 400, "M_NOT_JSON", code="bad_json")

    async def test_step16_forged_signature(self) -> None:
        gw = await start_gateway(self)
        version = gw.material.partner_key_id.split(":")[1]
        forger = generate_signing_key(version)  # same key id, other key
        req = gw.signed_request("PUT", TXN, txn_body(), signing_key=forger)
        assert_refused(self, gw, await gw.inbound(req), 401, "M_UNAUTHORIZED", code="bad_signature")

    async def test_step16_tampered_body(self) -> None:
        gw = await start_gateway(self)
        content = txn_body()
        headers = gw.signed_headers("PUT", TXN, content)
        content["edus"] = []
        req = build_request(b"PUT", TXN, headers, json.dumps(content).encode())
        assert_refused(self, gw, await gw.inbound(req), 401, "M_UNAUTHORIZED", code="bad_signature")

    async def test_step16_tampered_query(self) -> None:
        gw = await start_gateway(self)
        target = b"/_matrix/federation/v1/state_ids/%21r%3Ainternal.example?event_id=%24a"
        headers = gw.signed_headers("GET", target)
        req = build_request(b"GET", target + b"b", headers)
        assert_refused(self, gw, await gw.inbound(req), 401, "M_UNAUTHORIZED", code="bad_signature")

    async def test_step12_unknown_key_id(self) -> None:
        gw = await start_gateway(self)
        req = gw.signed_request("PUT", TXN, txn_body(), signing_key=generate_signing_key("rotated"))
        assert_refused(self, gw, await gw.inbound(req), 401, "M_UNAUTHORIZED", code="unknown_key")

    async def test_step19_group_not_in_trust_level(self) -> None:
        gw = await start_gateway(self)
        target = b"/_matrix/federation/v1/publicRooms"
        resp = await gw.inbound(gw.signed_request("GET", target))
        assert_refused(self, gw, resp, 403, "M_FORBIDDEN", code="group_not_allowed")
        self.assertIn("public_rooms", resp.json()["error"])

    async def test_step8_unauthenticated_group_no_level_allows(self) -> None:
        gw = await start_gateway(self)
        req = build_request(
            b"POST",
            b"/_matrix/key/v2/query",
            [(b"Host", INTERNAL_HOST.encode())],
            b'{"server_keys": {}}',
        )
        assert_refused(
            self, gw, await gw.inbound(req), 403, "M_FORBIDDEN", code="group_not_allowed"
        )

    async def test_step20_origin_speaks_for_an_internal_user(self) -> None:
        gw = await start_gateway(self)
        content = txn_body()
        content["edus"] = [
            {
                "edu_type": "m.typing",
                "content": {
                    "room_id": "!r:internal.example",
                    "user_id": "@alice:internal.example",
                    "typing": True,
                },
            }
        ]
        resp = await gw.inbound(gw.signed_request("PUT", TXN, content))
        assert_refused(self, gw, resp, 403, "M_FORBIDDEN", code="impersonates_internal_user")


class _Silent(Protocol):
    def dataReceived(self, data: bytes) -> None:
        pass


class UpstreamFailureTests(TestCase):
    async def test_upstream_unreachable(self) -> None:
        gw = await start_gateway(self, {"internal_homeservers[0].upstream": "http://127.0.0.1:9"})
        resp = await gw.inbound(gw.signed_request("PUT", TXN, txn_body()))
        self.assertEqual(resp.status, 502)
        self.assertEqual(resp.json()["errcode"], "M_UNKNOWN")

    async def test_upstream_timeout(self) -> None:
        silent = reactor.listenTCP(0, Factory.forProtocol(_Silent), interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        url = f"http://127.0.0.1:{silent.getHost().port}"
        gw = await start_gateway(
            self, {"internal_homeservers[0].upstream": url, "inbound.request_timeout": "1s"}
        )
        resp = await gw.inbound(gw.signed_request("PUT", TXN, txn_body()))
        self.assertEqual(resp.status, 504)
        self.assertEqual(resp.json()["errcode"], "M_UNKNOWN")
        self.assertEqual(gw.last_audit()["status"], 504)


class StreamingTests(TestCase):
    async def test_large_media_streams_with_backpressure(self) -> None:
        from tests.standin import StandinState

        size = 256 * 1024 * 1024
        gw = await start_gateway(self, upstream=StandinState(media_size=size))
        target = b"/_matrix/federation/v1/media/download/abcdef"
        request = gw.signed_request("GET", target)
        result = await _slow_download(gw, request)
        self.assertEqual(result["status"], 200)
        self.assertEqual(result["length"], size)
        # While the client was not reading, the upstream was held back: sbg
        # did not read the 256 MiB into memory.
        self.assertLess(result["sent_while_paused"], 32 * 1024 * 1024)


def _slow_download(gw: object, request: bytes) -> defer.Deferred[dict[str, int]]:
    import socket
    import ssl
    import time

    from twisted.internet import threads

    g = gw  # type: ignore[assignment]

    def run() -> dict[str, int]:
        ctx = ssl.create_default_context(cafile=g.material.internal_ca.certificate)
        raw = socket.create_connection(("127.0.0.1", g.ports["inbound"]), timeout=30)
        sock = ctx.wrap_socket(raw, server_hostname=INTERNAL_HOST)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(request)
        buf = sock.recv(65536)
        time.sleep(1.5)  # a slow client
        sent_while_paused = g.upstream.media_sent
        total = len(buf)
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if b"\r\n\r\n" in buf and total - buf.index(b"\r\n\r\n") - 4 >= 256 * 1024 * 1024:
                break
        sock.close()
        head = buf.split(b"\r\n\r\n")[0]
        status = int(head.split(b" ")[1])
        return {
            "status": status,
            "length": total - len(head) - 4,
            "sent_while_paused": sent_while_paused,
        }

    return threads.deferToThread(run)


class ParserRefusalTests(TestCase):
    async def test_a_bare_400_from_the_http_parser_is_audited_and_counted(self) -> None:
        gw = await start_gateway(self)
        for raw in (
            # A control byte inside a header line.
            b"GET /_matrix/key/v2/server HTTP/1.1\r\nHost: x\x01y\r\n\r\n",
            # A request line that is not METHOD SP target SP HTTP/1.x.
            b"GET  /_matrix/key/v2/server HTTP/1.1\r\nHost: x\r\n\r\n",
        ):
            before = len(gw.audit.records)
            resp = await gw.inbound(raw)
            self.assertEqual(resp.status, 400)
            self.assertEqual(len(gw.audit.records), before + 1)
            record = gw.last_audit()
            self.assertEqual((record["decision"], record["code"]), ("deny", "malformed_request"))
        self.assertEqual(gw.upstream.requests, [])
        value = gw.service.metrics.registry.get_sample_value(
            "sbg_refusals_total",
            {"direction": "inbound", "server": "unknown", "reason": "malformed_request"},
        )
        self.assertEqual(value, 2.0)
