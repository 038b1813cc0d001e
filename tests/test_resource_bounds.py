"""Resource bounds and failing closed, from the attacker's side.

An attacker who knows only public names (a trusted server's name, the
internal destination, a federation host) must not make sbg hold bodies it
will refuse, parse what nobody signed, keep connections forever, or forward
what monitor mode should not soften. Every test checks the answer and that
nothing reached the upstream.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from typing import Any

from canonicaljson import encode_canonical_json
from twisted.internet import threads

from sbg.matrix.xmatrix import CANONICAL_FALLBACK_MAX
from testbed.configtools import DELETE, INTERNAL_HOST, PARTNER_SERVER, PROXY_USERNAME
from tests.asynctest import TestCase
from tests.gateway import Gateway, assert_refused, start_gateway
from tests.inbound_requests import TXN, txn_body
from tests.rawhttp import RawResponse, _read_response, build_request

# A signature that is well formed and verifies nothing.
GARBAGE_SIG = "A" * 86


def forged_headers(gw: Gateway, length: int, **extra: str) -> bytes:
    """A PUT /send head with a valid-looking X-Matrix header (trusted
    origin, right destination, pinned key id, garbage signature)."""
    params = {
        "origin": PARTNER_SERVER,
        "destination": "internal.example",
        "key": gw.material.partner_key_id,
        "sig": GARBAGE_SIG,
    }
    params.update(extra)
    auth = "X-Matrix " + ",".join(f'{k}="{v}"' for k, v in params.items())
    return (
        b"PUT " + TXN + b" HTTP/1.1\r\nHost: " + INTERNAL_HOST.encode() + b"\r\n"
        b"Authorization: " + auth.encode() + b"\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % length
    )


def _tls(gw: Gateway, timeout: float = 10.0) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", gw.ports["inbound"]), timeout=timeout)
    ctx = ssl.create_default_context(cafile=gw.material.internal_ca.certificate)
    return ctx.wrap_socket(raw, server_hostname=INTERNAL_HOST)


def head_only(gw: Gateway, head: bytes) -> tuple[RawResponse, float]:
    """Send a head announcing a body, and read the answer without sending it."""
    sock = _tls(gw)
    try:
        started = time.monotonic()
        sock.sendall(head)
        resp = _read_response(sock, b"PUT")
        return resp, time.monotonic() - started
    finally:
        sock.close()


class DecideBeforeReadingTests(TestCase):
    async def test_head_refusals_answered_before_the_body(self) -> None:
        gw = await start_gateway(self)
        cases: list[tuple[dict[str, str], int, str]] = [
            ({"origin": "stranger.example"}, 403, "unknown_origin"),
            ({"destination": "elsewhere.example"}, 401, "bad_destination"),
            ({"key": "ed25519:not_pinned"}, 401, "unknown_key"),
        ]
        for extra, status, code in cases:
            head = forged_headers(gw, 16 * 1024 * 1024, **extra)
            resp, elapsed = await threads.deferToThread(head_only, gw, head)
            self.assertEqual(resp.status, status, (code, resp.body))
            self.assertEqual(gw.last_audit()["code"], code)
            self.assertEqual(resp.header(b"Connection"), b"close")
            self.assertLess(elapsed, 5.0)
        # Declared too large for max_body_size: 413 from the head alone.
        head = forged_headers(gw, gw.config.inbound.max_body_size + 1)
        resp, _ = await threads.deferToThread(head_only, gw, head)
        self.assertEqual(resp.status, 413)
        self.assertEqual(gw.upstream.requests, [])
        self.assertEqual(gw.service.runtime.body_budget.held, 0)

    async def test_refused_body_is_read_and_dropped_not_kept(self) -> None:
        gw = await start_gateway(self)
        body = b'{"pdus": [' + b"{}," * 300_000 + b"{}]}"
        head = forged_headers(gw, len(body), origin="stranger.example")

        def send_all() -> tuple[RawResponse, bytes]:
            sock = _tls(gw)
            try:
                sock.sendall(head + body)
                resp = _read_response(sock, b"PUT")
                # sbg closes the connection once it has read (and dropped)
                # the body.
                return resp, sock.recv(1)
            finally:
                sock.close()

        resp, after = await threads.deferToThread(send_all)
        self.assertEqual(resp.status, 403)
        self.assertEqual(after, b"")
        self.assertEqual(gw.upstream.requests, [])
        self.assertEqual(gw.service.runtime.body_budget.held, 0)
        self.assertEqual(gw.last_audit()["code"], "unknown_origin")


class VerifyBeforeParsingTests(TestCase):
    async def test_forged_large_body_is_never_parsed(self) -> None:
        # Not JSON at all, over the fallback bound: a parse would say 400;
        # the signature check over the bytes says 401 without one.
        gw = await start_gateway(self)
        body = b"{" * (CANONICAL_FALLBACK_MAX + 10)
        request = forged_headers(gw, len(body)) + body
        resp = await gw.inbound(request)
        assert_refused(self, gw, resp, 401, "M_UNAUTHORIZED", code="bad_signature")
        self.assertEqual(gw.last_audit()["code"], "bad_signature")

    async def test_small_forged_body_gets_the_bounded_fallback(self) -> None:
        gw = await start_gateway(self)
        body = b"{not json"
        resp = await gw.inbound(forged_headers(gw, len(body)) + body)
        assert_refused(self, gw, resp, 400, "M_NOT_JSON", code="bad_json")
        body = encode_canonical_json(txn_body())
        resp = await gw.inbound(forged_headers(gw, len(body)) + body)
        assert_refused(self, gw, resp, 401, "M_UNAUTHORIZED", code="bad_signature")

    async def test_non_canonical_sender_within_and_beyond_the_bound(self) -> None:
        gw = await start_gateway(self)

        def padded(size: int) -> dict[str, Any]:
            content = txn_body()
            content["pad"] = "x" * size
            return content

        # Within the bound: a sender of non-canonical JSON still verifies.
        small = padded(1000)
        body = json.dumps(small, indent=2).encode()
        headers = gw.signed_headers("PUT", TXN, small)
        resp = await gw.inbound(build_request(b"PUT", TXN, headers, body))
        self.assertEqual(resp.status, 200, resp.body)
        # Beyond it, only canonical JSON (what Synapse sends) is checked.
        big = padded(CANONICAL_FALLBACK_MAX)
        body = json.dumps(big, indent=2).encode()
        headers = gw.signed_headers("PUT", TXN + b"2", big)
        resp = await gw.inbound(build_request(b"PUT", TXN + b"2", headers, body))
        self.assertEqual(resp.status, 401, resp.body)
        self.assertIn("canonical", resp.json()["error"])
        canonical = encode_canonical_json(big)
        resp = await gw.inbound(build_request(b"PUT", TXN + b"2", headers, canonical))
        self.assertEqual(resp.status, 200, resp.body)
        self.assertEqual(len(gw.upstream.requests), 2)

    async def test_unauthenticated_bodies_are_capped_at_one_mebibyte(self) -> None:
        gw = await start_gateway(
            self, {"trust_levels.external.inbound": ["discovery", "keys", "key_query"]}
        )
        body = b'{"server_keys": {"x": "' + b"y" * (1024 * 1024) + b'"}}'
        req = build_request(
            b"POST", b"/_matrix/key/v2/query", [(b"Host", INTERNAL_HOST.encode())], body
        )
        resp = await gw.inbound(req)
        assert_refused(self, gw, resp, 413, "M_TOO_LARGE", code="body_too_large")


class BodyBudgetTests(TestCase):
    async def test_bodies_held_at_once_are_capped(self) -> None:
        gw = await start_gateway(self, {"limits.max_buffered_bytes": "100K"})
        content = txn_body()
        content["pad"] = "x" * 70_000
        first = gw.signed_request("PUT", TXN, content)
        head, _, body = first.partition(b"\r\n\r\n")

        def hold_then_finish(second: bytes) -> tuple[RawResponse, RawResponse]:
            a = _tls(gw)
            try:
                # The first request holds 70 KB of the 100 KB budget...
                a.sendall(head + b"\r\n\r\n" + body[:1000])
                time.sleep(0.3)
                b = _tls(gw)
                try:
                    b.sendall(second)
                    refused = _read_response(b, b"PUT")
                finally:
                    b.close()
                a.sendall(body[1000:])
                return _read_response(a, b"PUT"), refused
            finally:
                a.close()

        second = gw.signed_request("PUT", TXN + b"2", content)
        done, refused = await threads.deferToThread(hold_then_finish, second)
        # ...so a second one does not fit: 503 with Retry-After, at once.
        self.assertEqual(refused.status, 503, refused.body)
        self.assertEqual(refused.json()["errcode"], "M_UNKNOWN")
        self.assertEqual(refused.header(b"Retry-After"), b"5")
        self.assertEqual(done.status, 200, done.body)
        self.assertEqual([s.uri for s in gw.upstream.requests], [TXN])
        codes = [r["code"] for r in gw.audit.records]
        self.assertIn("buffer_full", codes)
        self.assertEqual(gw.service.runtime.body_budget.held, 0)
        # Released: the second one fits now.
        resp = await gw.inbound(second)
        self.assertEqual(resp.status, 200, resp.body)


UNAUTHENTICATED = [
    ("discovery", b"GET", b"/_matrix/federation/v1/version", None),
    ("keys", b"GET", b"/_matrix/key/v2/server", None),
    ("key_query", b"GET", b"/_matrix/key/v2/query/partner.example", None),
    ("key_query", b"POST", b"/_matrix/key/v2/query", b'{"server_keys": {}}'),
    ("openid", b"GET", b"/_matrix/federation/v1/openid/userinfo?access_token=x", None),
    ("third_party_invites", b"POST", b"/_matrix/federation/v1/3pid/onbind", b"{}"),
    ("legacy_media", b"GET", b"/_matrix/media/v3/download/partner.example/abc", None),
]


class MonitorModeTests(TestCase):
    async def test_unauthenticated_endpoints_refused_in_monitor_as_in_enforce(self) -> None:
        # No trust level allows any of these groups: an unknown peer asks.
        level = {"inbound": ["transactions"], "outbound": ["transactions"]}
        answers: dict[str, list[tuple[int, str]]] = {}
        for mode in ("enforce", "monitor"):
            gw = await start_gateway(
                self,
                {"mode": mode, "trust_levels.external": dict(level, mode=mode)},
            )
            seen = []
            for _group, method, target, body in UNAUTHENTICATED:
                req = build_request(method, target, [(b"Host", INTERNAL_HOST.encode())], body)
                resp = await gw.inbound(req)
                seen.append((resp.status, gw.last_audit()["decision"]))
                self.assertEqual(gw.last_audit()["code"], "group_not_allowed", target)
            self.assertEqual(gw.upstream.requests, [], mode)
            answers[mode] = seen
        self.assertEqual(answers["monitor"], answers["enforce"])
        self.assertEqual(set(answers["monitor"]), {(403, "deny")})


class ForwardingHeaderTests(TestCase):
    async def test_forwarding_headers_from_outside_never_reach_synapse(self) -> None:
        gw = await start_gateway(self)
        content = txn_body()
        headers = [
            *gw.signed_headers("PUT", TXN, content),
            (b"Forwarded", b"for=10.0.0.1;proto=http"),
            (b"X-Forwarded-Proto", b"http"),
            (b"X-Forwarded-Host", b"admin.internal"),
            (b"X-Real-IP", b"10.0.0.1"),
            (b"X-Forwarded-For", b"10.0.0.1"),
        ]
        resp = await gw.inbound(build_request(b"PUT", TXN, headers, json.dumps(content).encode()))
        self.assertEqual(resp.status, 200, resp.body)
        [seen] = gw.upstream.requests
        names = {k.lower() for k, _v in seen.headers}
        for name in (b"forwarded", b"x-forwarded-proto", b"x-forwarded-host", b"x-real-ip"):
            self.assertNotIn(name, names)
        got = {k.lower(): v for k, v in seen.headers}
        self.assertEqual(got[b"x-forwarded-for"], [b"127.0.0.1"])


class ProxyOrderTests(TestCase):
    async def test_credentials_before_the_plain_http_refusal(self) -> None:
        gw = await start_gateway(self)
        self.assertIsNotNone(gw.config.outbound.proxy_auth)
        plain = (
            b"GET http://matrix.partner.example/ HTTP/1.1\r\nHost: matrix.partner.example\r\n\r\n"
        )

        def ask(extra: bytes) -> bytes:
            sock = socket.create_connection(("127.0.0.1", gw.ports["outbound"]), timeout=5)
            try:
                sock.sendall(plain.replace(b"\r\n\r\n", b"\r\n" + extra + b"\r\n", 1))
                return sock.recv(4096)
            finally:
                sock.close()

        answer = await threads.deferToThread(ask, b"X: y\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 407 "), answer)
        self.assertIn(b"Proxy-Authenticate: Basic", answer)
        import base64

        creds = base64.b64encode(f"{PROXY_USERNAME}:{gw.material.proxy_password}".encode())
        answer = await threads.deferToThread(ask, b"Proxy-Authorization: Basic " + creds + b"\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 403 "), answer)
        self.assertEqual(gw.last_audit()["code"], "plain_http")


class ConnectHeadTimerTests(TestCase):
    async def test_idle_connect_connections_are_closed_while_inbound_answers(self) -> None:
        n = 500
        gw = await start_gateway(
            self,
            {
                "limits.header_timeout": "1s",
                "limits.max_connections_per_ip": 2 * n,
                "limits.max_connections": 2 * n,
            },
        )

        def idle() -> tuple[int, list[int], float]:
            socks = [
                socket.create_connection(("127.0.0.1", gw.ports["outbound"]), timeout=10)
                for _ in range(n)
            ]
            opened = time.monotonic()
            try:
                # Meanwhile the inbound listener answers.
                resp = _inbound_key_request(gw)
                closed = []
                for s in socks:
                    s.settimeout(10)
                    try:
                        closed.append(len(s.recv(1)))
                    except ConnectionResetError:
                        closed.append(0)
                return resp, closed, time.monotonic() - opened
            finally:
                for s in socks:
                    s.close()

        status, closed, elapsed = await threads.deferToThread(idle)
        self.assertEqual(status, 200)
        self.assertEqual(closed, [0] * n)  # every one closed by sbg
        self.assertLess(elapsed, 9.0)
        timeouts = [r for r in gw.audit.records if r["code"] == "header_timeout"]
        self.assertEqual(len(timeouts), n)


def _inbound_key_request(gw: Gateway) -> int:
    req = build_request(b"GET", b"/_matrix/key/v2/server", [(b"Host", INTERNAL_HOST.encode())])
    sock = _tls(gw)
    try:
        sock.sendall(req)
        return _read_response(sock, b"GET").status
    finally:
        sock.close()


class NonMatrixHygieneTests(TestCase):
    async def test_dot_segments_and_methods(self) -> None:
        holder: dict[str, Any] = {}

        def build(m: Any) -> dict[str, Any]:
            from tests.standin import StandinState, start_standin

            push = StandinState()
            _state, port = start_standin(
                push, tls=(m.partner_tls.certificate, m.partner_tls.private_key)
            )
            self.addCleanup(port.stopListening)
            holder["port"] = port.getHost().port  # type: ignore[attr-defined]
            holder["push"] = push
            return {
                "outbound.proxy_auth": DELETE,
                "outbound.allowed_non_matrix_urls": [
                    {"host": "127.0.0.1", "port": holder["port"], "path": "/push/.*"},
                    {
                        "host": "127.0.0.1",
                        "port": holder["port"],
                        "path": "/only-post",
                        "methods": ["POST"],
                    },
                ],
            }

        gw = await start_gateway(self, build)
        target = f"127.0.0.1:{holder['port']}".encode()
        host = [(b"Host", target)]
        cases = [
            (b"GET", b"/push/../admin", 400, "malformed_target"),
            (b"GET", b"/push/%2e%2e/admin", 400, "malformed_target"),
            (b"GET", b"/push/%2E/x", 400, "malformed_target"),
            (b"GET", b"/push/./x", 400, "malformed_target"),
            (b"DELETE", b"/push/x", 405, "method_not_allowed"),
            (b"GET", b"/only-post", 405, "method_not_allowed"),
        ]
        for method, path, status, code in cases:
            _a, responses, _ = await gw.outbound(
                target, [build_request(method, path, host)], sni=None
            )
            self.assertEqual(responses[0].status, status, (method, path))
            self.assertEqual(gw.last_audit()["code"], code, (method, path))
        self.assertEqual(holder["push"].requests, [])
