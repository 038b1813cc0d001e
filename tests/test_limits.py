"""Resource bounds from the attacker's side: slow and flooding clients."""

from __future__ import annotations

import socket
import time

from twisted.internet import threads

from sbg.config.model import RateLimit
from sbg.http.budgets import InflightBudget, RateLimiter
from tests.asynctest import TestCase
from tests.gateway import start_gateway


class RateLimiterTests(TestCase):
    def test_bucket(self) -> None:
        now = [100.0]
        rl = RateLimiter(lambda: now[0])
        limit = RateLimit(per_second=2.0, burst=3)
        self.assertEqual([rl.take("a", limit) for _ in range(3)], [0.0, 0.0, 0.0])
        self.assertAlmostEqual(rl.take("a", limit), 0.5)
        # Other keys have their own bucket.
        self.assertEqual(rl.take("b", limit), 0.0)
        now[0] += 0.5
        self.assertEqual(rl.take("a", limit), 0.0)

    def test_keys_bounded(self) -> None:
        rl = RateLimiter(lambda: 0.0, max_keys=10)
        for i in range(100):
            rl.take(f"10.0.0.{i}", RateLimit(1.0, 1))
        self.assertEqual(len(rl._buckets), 10)

    def test_inflight_budget_per_server(self) -> None:
        b = InflightBudget()
        self.assertTrue(b.acquire("a", 3, 2))
        self.assertTrue(b.acquire("a", 3, 2))
        self.assertFalse(b.acquire("a", 3, 2))  # a's budget is spent
        self.assertTrue(b.acquire("b", 3, 2))  # b is not starved
        self.assertFalse(b.acquire(None, 3, 2))  # the total is spent
        b.release("a")
        self.assertTrue(b.acquire(None, 3, 2))


class ConnectionLimitTests(TestCase):
    async def test_connections_per_ip_bounded(self) -> None:
        gw = await start_gateway(self, {"limits.max_connections_per_ip": 3})
        port = gw.ports["inbound"]

        def flood() -> list[bool]:
            socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
            time.sleep(0.3)
            alive = []
            for s in socks:
                s.settimeout(0.5)
                try:
                    alive.append(s.recv(1) != b"")
                except TimeoutError:
                    alive.append(True)  # still open, nothing to read
                except OSError:
                    alive.append(False)
            for s in socks:
                s.close()
            return alive

        alive = await threads.deferToThread(flood)
        self.assertEqual(alive, [True, True, True, False, False])

    async def test_slow_request_cut_after_header_timeout(self) -> None:
        gw = await start_gateway(self, {"limits.header_timeout": "1s"})
        port = gw.ports["inbound"]

        def slowloris() -> float:
            import ssl

            ctx = ssl.create_default_context(cafile=gw.material.internal_ca.certificate)
            raw = socket.create_connection(("127.0.0.1", port), timeout=10)
            s = ctx.wrap_socket(raw, server_hostname="matrix.internal.example")
            start = time.monotonic()
            s.sendall(b"GET /_matrix/key/v2/server HTTP/1.1\r\n")
            try:
                # A header line every 0.3 s keeps the idle timeout happy.
                for i in range(30):
                    s.sendall(b"X-Slow-%d: 1\r\n" % i)
                    time.sleep(0.3)
            except OSError:
                pass
            try:
                s.recv(1)
            except OSError:
                pass
            s.close()
            return time.monotonic() - start

        elapsed = await threads.deferToThread(slowloris)
        self.assertLess(elapsed, 3.0)
        self.assertEqual(gw.upstream.requests, [])
