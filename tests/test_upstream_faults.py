"""Upstream faults: the client gets 502/504 `M_UNKNOWN`, sbg stays healthy.

The faulty upstream is a stand-in (a real misbehaving homeserver cannot be
had on demand): per request path it closes at once, answers garbage,
stalls, resets the connection, or cuts a response in the middle of its
body. A loop of faulty requests checks that no file descriptor and no
memory is left behind (`SBG_FAULT_REQUESTS`, default 10,000, as in
`make fuzz`).
"""

from __future__ import annotations

import os
import resource
import socket
import struct
from typing import Any

from twisted.internet import protocol, reactor

from testbed.configtools import INTERNAL_HOST
from tests.asynctest import TestCase
from tests.gateway import start_gateway
from tests.rawhttp import build_request, exchange_sync

FAULTS = (b"close", b"garbage", b"reset", b"midbody", b"badlength")


class _Faulty(protocol.Protocol):
    def __init__(self) -> None:
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        line = self.buffer.split(b"\r\n", 1)[0]
        target = line.split(b" ")[1]
        fault = target.rsplit(b"/", 1)[-1]
        t: Any = self.transport
        if fault == b"close":
            t.loseConnection()
        elif fault == b"garbage":
            t.write(b"\x00\x01 this is not HTTP\r\n\r\n")
            t.loseConnection()
        elif fault == b"reset":
            sock = t.getHandle()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            t.loseConnection()
        elif fault == b"midbody":
            t.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
            t.loseConnection()
        elif fault == b"badlength":
            t.write(b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n")
            t.loseConnection()
        # "stall": say nothing, forever


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class UpstreamFaultTests(TestCase):
    async def start(self, overrides: dict[str, Any] | None = None) -> Any:
        port = reactor.listenTCP(  # type: ignore[attr-defined]
            0, protocol.Factory.forProtocol(_Faulty), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        settings = {"internal_homeservers[0].upstream": f"http://127.0.0.1:{port.getHost().port}"}
        settings.update(overrides or {})
        return await start_gateway(self, settings)

    async def test_each_fault(self) -> None:
        gw = await self.start(
            {
                "inbound.request_timeout": "1s",
                "trust_levels.external.inbound": ["discovery", "keys", "legacy_media"],
            }
        )
        expected = {b"close": 502, b"garbage": 502, b"reset": 502, b"badlength": 502, b"stall": 504}
        for fault, status in expected.items():
            target = b"/_matrix/media/v3/download/internal.example/" + fault
            req = build_request(b"GET", target, [(b"Host", INTERNAL_HOST.encode())])
            resp = await gw.inbound(req)
            self.assertEqual(resp.status, status, fault)
            self.assertEqual(resp.json()["errcode"], "M_UNKNOWN", fault)

    async def test_cut_response_is_seen_as_cut(self) -> None:
        gw = await self.start(
            {"trust_levels.external.inbound": ["discovery", "keys", "legacy_media"]}
        )
        target = b"/_matrix/media/v3/download/internal.example/midbody"
        req = build_request(b"GET", target, [(b"Host", INTERNAL_HOST.encode())])
        resp = await gw.inbound(req)
        # The status was already relayed: the client must see a truncated
        # body (the connection cut), never a complete-looking one.
        self.assertEqual(resp.status, 200)
        self.assertTrue(resp.closed)
        self.assertLess(len(resp.body), 100000)
        self.assertEqual(gw.last_audit()["reason"], "response body cut short")

    async def test_no_leak_over_many_faulty_requests(self) -> None:
        from twisted.internet import threads

        gw = await self.start(
            {"trust_levels.external.inbound": ["discovery", "keys", "legacy_media"]}
        )
        n = int(os.environ.get("SBG_FAULT_REQUESTS", "10000"))
        faults = [f for f in FAULTS if f != b"midbody"]
        requests = [
            build_request(
                b"GET",
                b"/_matrix/media/v3/download/internal.example/" + faults[i % len(faults)],
                [(b"Host", INTERNAL_HOST.encode())],
            )
            for i in range(n)
        ]

        def run(batch: list[bytes]) -> list[int]:
            statuses = []
            for i in range(0, len(batch), 50):
                for resp in exchange_sync(
                    "127.0.0.1",
                    gw.ports["inbound"],
                    batch[i : i + 50],
                    tls=True,
                    sni=INTERNAL_HOST,
                    ca_file=gw.material.internal_ca.certificate,
                ):
                    statuses.append(resp.status)
            return statuses

        # Warm up (pools, caches, lazily imported modules), then measure.
        await threads.deferToThread(run, requests[:200])
        fds, rss = _fd_count(), _rss_kib()
        statuses = await threads.deferToThread(run, requests)
        self.assertEqual(set(statuses), {502})
        self.assertEqual(len(statuses), n)
        self.assertLessEqual(_fd_count(), fds + 5)
        grown = _rss_kib() - rss
        print(f"\n{n} faulty requests: fds {fds} -> {_fd_count()}, RSS +{grown} KiB")
        self.assertLess(grown, 20 * 1024)
        # And sbg still answers, with the documented error.
        resp = await gw.inbound(requests[0])
        self.assertEqual(resp.status, 502)
        self.assertEqual(resp.json()["errcode"], "M_UNKNOWN")
