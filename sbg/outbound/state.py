"""Outbound state shared by all tunnels of one process: the open tunnels,
the interception certificates and the upstream HTTP clients.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint

from sbg.clients.connect import HTTPConnectEndpoint
from sbg.hosts import format_authority
from sbg.http.upstream_pool import UpstreamPool
from sbg.killswitch.state import Switch
from sbg.policy.outbound import Tunnel
from sbg.policy.snapshot import Policy
from sbg.tls.mint import InterceptingServerContextFactory

if TYPE_CHECKING:
    from sbg.http.pipeline import InflightTracker
    from sbg.runtime import Runtime

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 30.0
MAX_UPSTREAM_CLIENTS = 256
# Idle connections kept per destination: as many as the requests a busy
# homeserver has in flight to one partner, or every request beyond them
# pays a new TCP connection and TLS handshake (W3 in docs/performance.md:
# 8 -> 32 cut the CPU per request about fourfold).
MAX_IDLE_PER_DESTINATION = 32


class TunnelConnection(Protocol):
    """An open tunnel, as the kill switch and a graceful stop see it."""

    tunnel: Tunnel | None
    active_requests: int

    def close(self) -> None: ...

    def close_if_idle(self) -> None: ...


class OutboundState:
    """The open tunnels, the interception CA's minter and the upstream pools."""

    def __init__(self, runtime: Runtime, tracker: InflightTracker) -> None:
        self.runtime = runtime
        self.tracker = tracker
        self._tunnels: set[TunnelConnection] = set()
        self._clients: OrderedDict[tuple[Any, ...], UpstreamPool] = OrderedDict()

    # -- configuration -----------------------------------------------------

    def reconfigure(self) -> None:
        """After a reload: connections made under the old trust are closed
        once idle, never reused for a new request."""
        for pool in self._clients.values():
            pool.closeCachedConnections()
        self._clients.clear()

    @property
    def has_ca(self) -> bool:
        return self.runtime.snapshot.minter is not None

    def interception_context(self, fallback_name: str) -> InterceptingServerContextFactory:
        """TLS towards the internal homeserver, minted by the CA in service."""
        minter = self.runtime.snapshot.minter
        assert minter is not None, "a tunnel is accepted only with a CA"
        return InterceptingServerContextFactory(minter, fallback_name)

    # -- open tunnels ------------------------------------------------------

    @property
    def open_tunnels(self) -> int:
        return len(self._tunnels)

    def register(self, conn: TunnelConnection) -> None:
        self._tunnels.add(conn)
        self.runtime.metrics.tunnels.set(len(self._tunnels))

    def unregister(self, conn: TunnelConnection) -> None:
        self._tunnels.discard(conn)
        self.runtime.metrics.tunnels.set(len(self._tunnels))

    def killswitch_changed(self, engaged: frozenset[Switch]) -> None:
        """Close the open tunnels a newly engaged switch covers."""
        ks = self.runtime.killswitch
        for conn in list(self._tunnels):
            t = conn.tunnel
            if t is None:
                continue
            if ks.is_killed(t.server_name, "outbound"):
                logger.warning("kill switch: closing %s", t.describe())
                conn.close()

    def close_all_tunnels(self) -> None:
        for conn in list(self._tunnels):
            conn.close()

    def close(self) -> defer.Deferred[None]:
        """Close every upstream connection pool."""
        pools = [pool.closeCachedConnections() for pool in self._clients.values()]
        self._clients.clear()
        d = defer.gatherResults(pools, consumeErrors=True)
        return d.addCallback(_discard)

    def close_idle_tunnels(self) -> None:
        for conn in list(self._tunnels):
            conn.close_if_idle()

    # -- upstream clients --------------------------------------------------

    def pool_for(
        self,
        policy: Policy,
        tunnel: Tunnel,
        tls_name: str,
        ca_files: tuple[str, ...] | None,
        default_trust: str,
    ) -> UpstreamPool:
        """The upstream connections for one (target, TLS name, trust) combination.

        Each has its own connection pool, so a connection made for one
        destination is never reused for another.
        """
        proxy = policy.config.outbound.upstream_proxy
        addresses = _addresses_for(tunnel)
        key = (
            tunnel.connect_host,
            tunnel.connect_port,
            tls_name,
            ca_files,
            default_trust,
            addresses,
            proxy,
        )
        hit = self._clients.get(key)
        if hit is not None:
            self._clients.move_to_end(key)
            return hit
        host, port = addresses or (tunnel.connect_host, tunnel.connect_port)
        reactor = self.runtime.reactor
        tcp: IStreamClientEndpoint
        if proxy is not None:
            tcp = HTTPConnectEndpoint(
                HostnameEndpoint(reactor, proxy[0], proxy[1], timeout=CONNECT_TIMEOUT),
                host,
                port,
            )
        else:
            tcp = HostnameEndpoint(reactor, host, port, timeout=CONNECT_TIMEOUT)
        tls = self.runtime.client_tls.endpoint(
            tcp,
            tls_name,
            list(ca_files) if ca_files else None,
            default_trust,
            listener="outbound_upstream",
        )
        pool = UpstreamPool(reactor, tls, max_idle=MAX_IDLE_PER_DESTINATION)
        self._clients[key] = pool
        while len(self._clients) > MAX_UPSTREAM_CLIENTS:
            _k, old = self._clients.popitem(last=False)
            old.closeCachedConnections()
        return pool


def _addresses_for(tunnel: Tunnel) -> tuple[str, int] | None:
    if tunnel.server is None:
        return None
    target = format_authority(tunnel.connect_host, tunnel.connect_port)
    for name, addr in tunnel.server.addresses:
        if name == target:
            return addr
    return None


def _discard(_: object) -> None:
    return None
