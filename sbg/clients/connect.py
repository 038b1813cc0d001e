"""`outbound.upstream_proxy`: reach destinations through another HTTP proxy.

`HTTPConnectEndpoint` connects to the proxy, asks it for a `CONNECT` tunnel
to the destination, and only once the proxy answers 200 hands the
connection to the protocol (the TLS client towards the destination).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from sbg.hosts import format_authority

MAX_RESPONSE_HEAD = 16 * 1024


class ProxyConnectError(ConnectError):
    """The upstream proxy refused or botched the CONNECT."""


class _ConnectClient(Protocol):
    def __init__(self, target: bytes, wrapped: IProtocol, ready: defer.Deferred[IProtocol]) -> None:
        self._target = target
        self._wrapped = wrapped
        self._ready = ready
        self._buffer = b""
        self._tunnelled = False

    def connectionMade(self) -> None:
        self.transport.write(  # type: ignore[union-attr]
            b"CONNECT " + self._target + b" HTTP/1.1\r\nHost: " + self._target + b"\r\n\r\n"
        )

    def dataReceived(self, data: bytes) -> None:
        if self._tunnelled:
            self._wrapped.dataReceived(data)
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_RESPONSE_HEAD:
                self._fail("upstream proxy response head too large")
            return
        head, rest = self._buffer[:end], self._buffer[end + 4 :]
        self._buffer = b""
        status_line = head.split(b"\r\n", 1)[0].split(b" ")
        if len(status_line) < 2 or status_line[1] != b"200":
            self._fail(f"upstream proxy refused CONNECT: {head[:80]!r}")
            return
        if self._ready.called:
            # Cancelled while the proxy was answering: nobody wants it now.
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self._tunnelled = True
        self._wrapped.makeConnection(self.transport)  # type: ignore[arg-type]
        self._ready.callback(self._wrapped)
        if rest:
            self._wrapped.dataReceived(rest)

    def _fail(self, text: str) -> None:
        if not self._ready.called:
            self._ready.errback(Failure(ProxyConnectError(string=text)))
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = Failure(ConnectError())) -> None:  # noqa: B008
        if self._tunnelled:
            self._wrapped.connectionLost(reason)
        elif not self._ready.called:
            self._ready.errback(Failure(ProxyConnectError(string="upstream proxy closed")))


@implementer(IStreamClientEndpoint)
class HTTPConnectEndpoint:
    """A client endpoint reached through an HTTP proxy's `CONNECT` tunnel."""

    def __init__(self, proxy: IStreamClientEndpoint, host: str, port: int) -> None:
        self._proxy = proxy
        self._target = format_authority(host, port).encode("ascii")

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[Any]:
        wrapped = protocolFactory.buildProtocol(None)  # type: ignore[arg-type]
        if wrapped is None:
            return defer.fail(ConnectError(string="protocol factory refused"))
        clients: list[_ConnectClient] = []

        def cancel(_: defer.Deferred[IProtocol]) -> None:
            transport = clients[0].transport if clients else None
            if transport is not None:
                transport.abortConnection()  # type: ignore[attr-defined]

        ready: defer.Deferred[IProtocol] = defer.Deferred(cancel)
        client = _ConnectClient(self._target, wrapped, ready)
        clients.append(client)
        d = self._proxy.connect(Factory.forProtocol(lambda: client))

        def connected(_: object) -> defer.Deferred[IProtocol]:
            return ready

        d.addCallback(connected)
        return d
