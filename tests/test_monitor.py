"""Monitor mode and per-server budgets: what passes, what is still enforced."""

from __future__ import annotations

from typing import Any

from tests.asynctest import TestCase
from tests.outbound_tunnels import CONNECT, TXN, signed, start, txn


class OutboundMonitorTests(TestCase):
    async def test_trust_level_refusal_becomes_would_deny(self) -> None:
        gw, ext = await start(self, {"trust_levels.external.mode": "monitor"})
        target = b"/_matrix/federation/v1/hierarchy/%21r%3Apartner.example"
        _a, [resp], _ = await gw.outbound(CONNECT, [signed("GET", target)])
        self.assertEqual(resp.status, 200)
        self.assertEqual([s.uri for s in ext.requests], [target])
        record = gw.last_audit()
        self.assertEqual(record["decision"], "would_deny")
        self.assertIn("hierarchy", record["reason"])

    async def test_authentication_still_enforced_in_monitor_mode(self) -> None:
        gw, ext = await start(self, {"mode": "monitor"})
        _a, [resp], _ = await gw.outbound(
            CONNECT, [signed("PUT", TXN, txn(), destination="elsewhere.example")]
        )
        self.assertEqual(resp.status, 403)
        self.assertEqual(ext.requests, [])
        gw.service.killswitch.engage(None, "outbound")
        answer, _, _ = await gw.outbound(CONNECT, [])
        self.assertEqual(answer.status, 403)

    async def test_tunnel_count_bounded(self) -> None:
        import socket

        from twisted.internet import threads

        gw, _ext = await start(self, {"limits.max_tunnels": 2})

        def open_many() -> list[bytes]:
            socks: list[Any] = []
            answers = []
            for _ in range(3):
                s = socket.create_connection(("127.0.0.1", gw.ports["outbound"]), timeout=5)
                s.sendall(b"CONNECT " + CONNECT + b" HTTP/1.0\r\n\r\n")
                answers.append(s.recv(64).split(b"\r\n")[0])
                socks.append(s)
            for s in socks:
                s.close()
            return answers

        answers = await threads.deferToThread(open_many)
        self.assertEqual(answers[:2], [b"HTTP/1.0 200 Connection established"] * 2)
        self.assertTrue(answers[2].startswith(b"HTTP/1.1 503"), answers[2])


class InboundMonitorTests(TestCase):
    async def test_origin_check_would_deny_in_monitor_mode(self) -> None:
        from tests.gateway import start_gateway
        from tests.inbound_requests import TXN as IN_TXN
        from tests.inbound_requests import txn_body

        gw = await start_gateway(self, {"trust_levels.external.mode": "monitor"})
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
        resp = await gw.inbound(gw.signed_request("PUT", IN_TXN, content))
        self.assertEqual(resp.status, 200)
        self.assertEqual(len(gw.upstream.requests), 1)
        self.assertEqual(gw.last_audit()["decision"], "would_deny")
        # Authentication is never relaxed: a forged signature is still refused.
        forger = gw.forged_key()
        resp = await gw.inbound(gw.signed_request("PUT", IN_TXN, txn_body(), signing_key=forger))
        self.assertEqual(resp.status, 401)
        self.assertEqual(len(gw.upstream.requests), 1)

    async def test_origin_rate_limit(self) -> None:
        from tests.gateway import start_gateway
        from tests.inbound_requests import TXN as IN_TXN
        from tests.inbound_requests import txn_body

        gw = await start_gateway(
            self, {"trust_levels.external.rate_limit": {"per_second": 0.5, "burst": 2}}
        )
        statuses = []
        for i in range(3):
            resp = await gw.inbound(gw.signed_request("PUT", IN_TXN + b"%d" % i, txn_body()))
            statuses.append(resp.status)
        self.assertEqual(statuses, [200, 200, 429])
        self.assertEqual(resp.json()["errcode"], "M_LIMIT_EXCEEDED")
        self.assertGreater(resp.json()["retry_after_ms"], 0)
        self.assertEqual(len(gw.upstream.requests), 2)

    async def test_forged_requests_do_not_spend_the_partners_budget(self) -> None:
        from tests.gateway import start_gateway
        from tests.inbound_requests import TXN as IN_TXN
        from tests.inbound_requests import txn_body

        gw = await start_gateway(
            self, {"trust_levels.external.rate_limit": {"per_second": 0.1, "burst": 1}}
        )
        forger = gw.forged_key()
        for _ in range(5):
            resp = await gw.inbound(
                gw.signed_request("PUT", IN_TXN, txn_body(), signing_key=forger)
            )
            self.assertEqual(resp.status, 401)
        resp = await gw.inbound(gw.signed_request("PUT", IN_TXN, txn_body()))
        self.assertEqual(resp.status, 200)

    async def test_peer_rate_limit(self) -> None:
        from testbed.configtools import INTERNAL_HOST
        from tests.gateway import start_gateway
        from tests.rawhttp import build_request

        gw = await start_gateway(
            self, {"limits.rate_limit_per_ip": {"per_second": 0.5, "burst": 3}}
        )
        req = build_request(b"GET", b"/_matrix/key/v2/server", [(b"Host", INTERNAL_HOST.encode())])
        statuses = [r.status for r in await gw.inbound_many([req] * 5)]
        self.assertEqual(statuses, [200, 200, 200, 429, 429])
        self.assertEqual(len(gw.upstream.requests), 3)
