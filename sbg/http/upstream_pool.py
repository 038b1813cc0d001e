"""Kept-alive connections to one upstream, reused one request at a time."""

from __future__ import annotations

from collections.abc import Hashable

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.interfaces import IStreamClientEndpoint as _Endpoint
from twisted.python.failure import Failure

from sbg.http.upstream import UpstreamConnection, UpstreamResponse, _ConnectionFactory, _Exchange

IDLE_TIMEOUT = 20.0  # below Synapse's 60 s: never write to a connection it closed


class UpstreamPool:
    """Kept-alive connections to one upstream (one endpoint).

    Args:
        clock: the reactor's time functions.
        endpoint: connects to the upstream (TCP, TLS, through a proxy...).
        max_idle: at most this many idle connections are kept (LIFO reuse).
        idle_timeout: an idle connection is closed after this many seconds.
    """

    def __init__(
        self,
        clock: IReactorTime,
        endpoint: _Endpoint,
        *,
        max_idle: int,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self._clock = clock
        self._endpoint = endpoint
        self._max_idle = max_idle
        self._idle_timeout = idle_timeout
        self._idle: list[UpstreamConnection] = []  # oldest first
        self._timer: IDelayedCall | None = None
        self._factory = _ConnectionFactory(self)
        self._closing: list[defer.Deferred[None]] = []

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def request(
        self, method: bytes, head: bytes, body: bytes | None
    ) -> defer.Deferred[UpstreamResponse]:
        """Send `head` (request line and fields, ending CRLF CRLF) and `body`.

        Fires with the response once its head is parsed; fails with
        `UpstreamProtocolError`, `UpstreamClosed`, or the endpoint's
        connection error. Cancelling it aborts the connection.
        """
        exchange = _Exchange(self, method, head, body)
        idle = self._idle
        while idle:
            conn = idle.pop()
            if self._clock.seconds() - conn.released_at < self._idle_timeout:
                conn.send(exchange, reused=True)
                return exchange.result
            # Expired (the sweep is late): the rest are older still.
            for old in [conn, *idle]:
                old.close()
            idle.clear()
        self._connect(exchange)
        return exchange.result

    def _connect(self, exchange: _Exchange) -> None:
        d = self._endpoint.connect(self._factory)
        exchange.connecting = d
        d.addCallbacks(
            self._connected,
            self._connect_failed,
            callbackArgs=(exchange,),
            errbackArgs=(exchange,),
        )

    def _connected(self, conn: UpstreamConnection, exchange: _Exchange) -> None:
        exchange.connecting = None
        if exchange.done:
            conn.close()
            return
        conn.send(exchange, reused=False)

    def _connect_failed(self, failure: Failure, exchange: _Exchange) -> None:
        exchange.connecting = None
        if not exchange.done:
            exchange.done = True
            exchange.result.errback(failure)

    def _release(self, conn: UpstreamConnection) -> None:
        idle = self._idle
        if len(idle) >= self._max_idle:
            idle.pop(0).close()
        conn.released_at = self._clock.seconds()
        idle.append(conn)
        if self._timer is None:
            self._timer = self._clock.callLater(self._idle_timeout, self._sweep)

    def _forget(self, conn: UpstreamConnection) -> None:
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    def _sweep(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        idle = self._idle
        while idle and now - idle[0].released_at >= self._idle_timeout:
            idle.pop(0).close()
        if idle:
            wait = idle[0].released_at + self._idle_timeout - now
            self._timer = self._clock.callLater(max(wait, 0.0), self._sweep)

    def closeCachedConnections(self) -> defer.Deferred[None]:
        """Close every idle connection; fires once they are closed."""
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        idle, self._idle = self._idle, []
        d = defer.gatherResults([conn.close() for conn in idle], consumeErrors=True)
        return d.addCallback(_none)


class UpstreamPools:
    """Pools by key (an upstream and its trust), closed together."""

    def __init__(self) -> None:
        self._pools: dict[Hashable, UpstreamPool] = {}

    def get(self, key: Hashable) -> UpstreamPool | None:
        return self._pools.get(key)

    def add(self, key: Hashable, pool: UpstreamPool) -> None:
        self._pools[key] = pool

    def closeCachedConnections(self) -> defer.Deferred[None]:
        """Close every idle connection of every pool."""
        closing = [p.closeCachedConnections() for p in self._pools.values()]
        return defer.gatherResults(closing, consumeErrors=True).addCallback(_none)


def _none(_: object) -> None:
    return None
