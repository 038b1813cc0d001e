"""`outbound.upstream_proxy`: destinations reached through another proxy.

The other proxy is a small CONNECT relay written here (a stand-in: no
second proxy product is available on loopback); it records the CONNECT
lines it receives and pipes bytes both ways.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from testbed.configtools import PARTNER_HOST
from tests.asynctest import TestCase
from tests.outbound_tunnels import CONNECT, TXN, signed, start, txn


class _Pipe(protocol.Protocol):
    def __init__(self, peer: protocol.Protocol) -> None:
        self.peer = peer

    def dataReceived(self, data: bytes) -> None:
        self.peer.transport.write(data)  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = None) -> None:
        if self.peer.transport is not None:
            self.peer.transport.loseConnection()


class _Relay(protocol.Protocol):
    def __init__(self, seen: list[bytes], targets: dict[bytes, tuple[str, int]]) -> None:
        self.seen = seen
        self.targets = targets
        self.buffer = b""
        self.pipe: _Pipe | None = None

    def dataReceived(self, data: bytes) -> None:
        if self.pipe is not None:
            self.pipe.transport.write(data)  # type: ignore[union-attr]
            return
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        line = head.split(b"\r\n")[0]
        self.seen.append(line)
        target = line.split(b" ")[1]
        host, port = self.targets[target]
        pipe = _Pipe(self)
        d = connectProtocol(TCP4ClientEndpoint(reactor, host, port), pipe)

        def ready(_: object) -> None:
            self.pipe = pipe
            self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")  # type: ignore[union-attr]
            if rest:
                pipe.transport.write(rest)  # type: ignore[union-attr]

        d.addCallback(ready)

    def connectionLost(self, reason: Any = None) -> None:
        if self.pipe is not None and self.pipe.transport is not None:
            self.pipe.transport.loseConnection()


class UpstreamProxyTests(TestCase):
    async def test_forwarding_goes_through_the_upstream_proxy(self) -> None:
        seen: list[bytes] = []
        targets: dict[bytes, tuple[str, int]] = {}
        factory = protocol.Factory.forProtocol(lambda: _Relay(seen, targets))
        relay_port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(relay_port.stopListening)
        relay = relay_port.getHost().port
        # sbg believes the partner lives at an address only the relay knows.
        gw, ext = await start(
            self,
            {
                "outbound.upstream_proxy": f"http://127.0.0.1:{relay}",
                "external_homeservers[0].addresses": {f"{PARTNER_HOST}:8448": "192.0.2.1:8448"},
            },
        )
        # Only the relay knows where that documentation address really is.
        targets[b"192.0.2.1:8448"] = ("127.0.0.1", ext.port)
        answer, [resp], _ = await gw.outbound(CONNECT, [signed("PUT", TXN, txn())])
        self.assertEqual(answer.status, 200)
        self.assertEqual(resp.status, 200, resp.body)
        self.assertEqual(seen, [b"CONNECT 192.0.2.1:8448 HTTP/1.1"])
        self.assertEqual([s.uri for s in ext.requests], [TXN])


class _SlowProxy(protocol.Protocol):
    """Answers a CONNECT only when told to."""

    def connectionMade(self) -> None:
        self.factory.conns.append(self)  # type: ignore[attr-defined]
        self.lost: Any = None

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = reason


class ChainCancelTests(TestCase):
    async def test_cancelled_while_the_proxy_answers(self) -> None:
        from twisted.internet import defer, task

        from sbg.clients.connect import HTTPConnectEndpoint

        factory = protocol.Factory.forProtocol(_SlowProxy)
        factory.conns = []  # type: ignore[attr-defined]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        endpoint = HTTPConnectEndpoint(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), "partner.example", 8448
        )
        d = endpoint.connect(protocol.Factory.forProtocol(protocol.Protocol))
        while not factory.conns:  # type: ignore[attr-defined]
            await task.deferLater(reactor, 0.01, lambda: None)
        d.cancel()
        with self.assertRaises(defer.CancelledError):
            await d
        proxy = factory.conns[0]  # type: ignore[attr-defined]
        # The proxy's late answer must not fire the cancelled Deferred again
        # (AlreadyCalledError, logged as an unhandled error) nor open a tunnel.
        if proxy.transport.connected:
            proxy.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        for _ in range(50):
            if proxy.lost is not None:
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        self.assertIsNotNone(proxy.lost, "the connection to the proxy stayed open")
