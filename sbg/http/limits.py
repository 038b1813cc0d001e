"""Connection limits per listener and per peer address.

`LimitedFactory` wraps a listener's factory: a connection beyond
`max_connections`, or beyond `max_connections_per_ip` from one address, is
closed at once, before any byte is read, and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from sbg import reasons
from sbg.config.model import Limits
from sbg.reasons import Reason

logger = logging.getLogger(__name__)


class LimitedFactory(WrappingFactory):
    """A listener's factory behind connection limits (checked at accept)."""

    noisy = False

    def __init__(
        self,
        wrapped: Any,
        limits: Callable[[], Limits],
        on_refused: Callable[[Reason], None] | None = None,
    ) -> None:
        super().__init__(wrapped)
        self._limits = limits
        self._on_refused = on_refused
        self._per_ip: dict[str, int] = {}
        self._peers: dict[ProtocolWrapper, str] = {}
        self._total = 0
        self._closed_waiters: list[defer.Deferred[None]] = []

    def buildProtocol(self, addr: IAddress | None) -> Any:
        limits = self._limits()
        host = str(getattr(addr, "host", ""))
        if self._total >= limits.max_connections:
            return self._refuse(reasons.MAX_CONNECTIONS, host)
        if self._per_ip.get(host, 0) >= limits.max_connections_per_ip:
            return self._refuse(reasons.MAX_CONNECTIONS_PER_IP, host)
        self._total += 1
        self._per_ip[host] = self._per_ip.get(host, 0) + 1
        protocol = super().buildProtocol(addr)
        if protocol is None:
            self._release(host)
            return None
        self._peers[protocol] = host
        return protocol

    def _refuse(self, reason: Reason, host: str) -> None:
        logger.warning("connection from %s refused: %s reached", host, reason.code)
        if self._on_refused is not None:
            self._on_refused(reason)
        return None

    def _release(self, host: str) -> None:
        self._total -= 1
        left = self._per_ip.get(host, 1) - 1
        if left:
            self._per_ip[host] = left
        else:
            self._per_ip.pop(host, None)

    def unregisterProtocol(self, p: ProtocolWrapper) -> None:
        super().unregisterProtocol(p)
        host = self._peers.pop(p, None)
        if host is not None:
            self._release(host)
        if not self._peers:
            waiters, self._closed_waiters = self._closed_waiters, []
            for d in waiters:
                d.callback(None)

    def close_all(self, clock: IReactorTime, grace: float = 1.0) -> defer.Deferred[None]:
        """Close every open connection (what is written is sent first, for
        at most `grace` seconds); fires once all of them are gone."""
        if not self._peers:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._closed_waiters.append(d)
        for protocol in list(self._peers):
            if protocol.transport is not None:
                protocol.transport.loseConnection()

        def cut() -> None:
            for protocol in list(self._peers):
                transport = protocol.transport
                if transport is not None:
                    transport.abortConnection()  # type: ignore[attr-defined]

        timer = clock.callLater(grace, cut)

        def done(result: None) -> None:
            if timer.active():
                timer.cancel()
            return result

        return d.addBoth(done)
