"""Outbound state shared by all tunnels: CONNECT decisions, open tunnels,
interception certificates and upstream HTTP clients.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint

from sbg.config.model import Config, ExternalHomeserver, NonMatrixURL
from sbg.errors import SbgError
from sbg.hosts import format_authority
from sbg.http.upstream import UpstreamPool
from sbg.outbound.chain import HTTPConnectEndpoint
from sbg.policy.killswitch import Switch
from sbg.policy.snapshot import Policy
from sbg.tls.ca import load_ca
from sbg.tls.mint import CertMinter, InterceptingServerContextFactory

if TYPE_CHECKING:
    from sbg.http.pipeline import InflightTracker
    from sbg.runtime import Runtime

logger = logging.getLogger(__name__)

TunnelKind = Literal["federation", "client", "discovery", "non_matrix"]
CONNECT_TIMEOUT = 30.0
MAX_UPSTREAM_CLIENTS = 256
# Idle connections kept per destination: as many as the requests a busy
# homeserver has in flight to one partner, or every request beyond them
# pays a new TCP connection and TLS handshake (W3 in docs/performance.md:
# 8 -> 32 cut the CPU per request about fourfold).
MAX_IDLE_PER_DESTINATION = 32


class TunnelRefused(SbgError):
    """A refused CONNECT; carries the configured server it was about, if any."""

    def __init__(
        self, reason: str, code: str, destination: str | None = None, status: int = 403
    ) -> None:
        super().__init__(status, "M_FORBIDDEN", reason, code)
        self.destination = destination


@dataclass
class Tunnel:
    """One accepted CONNECT, with the policy snapshot it was accepted under."""

    policy: Policy
    connect_host: str
    connect_port: int
    kind: TunnelKind
    server: ExternalHomeserver | None = None
    non_matrix: tuple[NonMatrixURL, ...] = ()
    active_requests: int = 0
    idle_timeout: float = 60.0

    @property
    def server_name(self) -> str | None:
        return self.server.server_name if self.server is not None else None

    @property
    def metric_server(self) -> str:
        return self.server.server_name if self.server is not None else "unknown"

    @property
    def fallback_name(self) -> str:
        """Certificate name when the client sends no SNI (IP literals)."""
        return self.connect_host

    def describe(self) -> str:
        target = format_authority(self.connect_host, self.connect_port)
        if self.kind == "non_matrix":
            return f"tunnel to {target} (allowed non-Matrix URL)"
        return f"tunnel to {target} ({self.kind} host of {self.server_name})"


class TunnelConnection(Protocol):
    tunnel: Tunnel | None

    def close(self) -> None: ...

    def close_if_idle(self) -> None: ...


class OutboundState:
    def __init__(self, runtime: Runtime, tracker: InflightTracker) -> None:
        self.runtime = runtime
        self.tracker = tracker
        self._minter: CertMinter | None = None
        self._ca_paths: tuple[str, str] | None = None
        self._tunnels: set[TunnelConnection] = set()
        self._clients: OrderedDict[tuple[Any, ...], UpstreamPool] = OrderedDict()
        self.reconfigure(runtime.policy.config)

    # -- configuration -----------------------------------------------------

    def _build_minter(self, config: Config) -> tuple[CertMinter | None, tuple[str, str] | None]:
        ca = config.outbound.ca
        if ca is None:
            return None, None
        paths = (ca.certificate, ca.private_key)
        if paths == self._ca_paths and self._minter is not None:
            return self._minter, paths
        return CertMinter(load_ca(ca.certificate, ca.private_key)), paths

    def check_config(self, config: Config) -> None:
        """Raise if `config`'s outbound part cannot be put into service."""
        ca = config.outbound.ca
        if ca is not None:
            load_ca(ca.certificate, ca.private_key)

    def reconfigure(self, config: Config) -> None:
        self._minter, self._ca_paths = self._build_minter(config)
        for pool in self._clients.values():
            pool.closeCachedConnections()
        self._clients.clear()

    def interception_context(self, fallback_name: str) -> InterceptingServerContextFactory:
        if self._minter is None:
            raise TunnelRefused("no interception CA configured", "no_ca")
        return InterceptingServerContextFactory(self._minter, fallback_name)

    # -- CONNECT decisions (contract 7, row 2) -----------------------------

    def classify(self, policy: Policy, host: str, port: int) -> Tunnel | None:
        """What a CONNECT to host:port is under `policy`, or None if refused.

        Pure: no kill switch, no limits. The handler calls it again for each
        request in a tunnel, so a reload applies to new requests at once.
        """
        idle = policy.config.outbound.idle_timeout
        kind: TunnelKind = "federation"
        server = policy.external_for_federation_host(host, port)
        if server is None:
            server = policy.external_for_client_host(host, port)
            kind = "client"
        if server is None and port == 443:
            server = policy.external_for_server_name(host, port)
            kind = "discovery"
        if server is not None and server.enabled:
            return Tunnel(policy, host, port, kind, server=server, idle_timeout=idle)
        entries = tuple(
            e
            for e in policy.config.outbound.allowed_non_matrix_urls
            if e.host == host and e.port == port
        )
        if entries:
            return Tunnel(policy, host, port, "non_matrix", non_matrix=entries, idle_timeout=idle)
        return None

    def open_tunnel(self, policy: Policy, host: str, port: int) -> Tunnel:
        """Row 2 of contract 7: the CONNECT decision."""
        if len(self._tunnels) >= policy.config.limits.max_tunnels:
            raise TunnelRefused("too many open tunnels", "overloaded", status=503)
        tunnel = self.classify(policy, host, port)
        if tunnel is None:
            raise TunnelRefused(
                f"{format_authority(host, port)} is not a trusted destination",
                "unknown_destination",
            )
        if self.runtime.killswitch.is_killed(tunnel.server_name, "outbound"):
            raise TunnelRefused(
                f"{tunnel.server_name or 'the border'} is cut off (kill switch)",
                "killswitch",
                tunnel.server_name,
            )
        if self._minter is None:  # every tunnel is intercepted
            raise TunnelRefused("no interception CA configured", "no_ca")
        return tunnel

    # -- open tunnels ------------------------------------------------------

    def register(self, conn: TunnelConnection, tunnel: Tunnel) -> None:
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
        tunnel: Tunnel,
        tls_name: str,
        ca_files: tuple[str, ...] | None,
        default_trust: str,
    ) -> UpstreamPool:
        """The upstream connections for one (target, TLS name, trust) combination.

        Each has its own connection pool, so a connection made for one
        destination is never reused for another.
        """
        policy = tunnel.policy
        proxy = policy.config.outbound.upstream_proxy
        key = (
            tunnel.connect_host,
            tunnel.connect_port,
            tls_name,
            ca_files,
            default_trust,
            _addresses_for(tunnel),
            proxy,
        )
        hit = self._clients.get(key)
        if hit is not None:
            self._clients.move_to_end(key)
            return hit
        creator = self.runtime.client_tls.creator_for(
            tls_name, list(ca_files) if ca_files else None, default_trust
        )
        host, port = _addresses_for(tunnel) or (tunnel.connect_host, tunnel.connect_port)
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
        pool = UpstreamPool(reactor, wrapClientTLS(creator, tcp), max_idle=MAX_IDLE_PER_DESTINATION)
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
