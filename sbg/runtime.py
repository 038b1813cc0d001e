"""What the listeners share while sbg runs.

The `Runtime` holds the current `Policy` snapshot (swapped whole on reload),
the kill switch, the audit log and metrics, and the long-lived HTTP client
machinery (connection pools, TLS client contexts). Handlers read
`runtime.policy` once per request and keep that snapshot to the end.
"""

from __future__ import annotations

import logging
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from zope.interface import implementer

from sbg.audit import AuditLog
from sbg.clients.keyfetch import KeyFetcher
from sbg.config.model import InternalHomeserver
from sbg.hosts import parse_authority
from sbg.http.budgets import BodyBudget, InflightBudget, RateLimiter
from sbg.http.upstream import UpstreamPool, UpstreamPools
from sbg.killswitch.switch import KillSwitch
from sbg.metrics import Metrics
from sbg.policy.snapshot import Policy
from sbg.tls.client import ClientTLSPolicy

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 30.0
MAX_IDLE_PER_UPSTREAM = 32


@implementer(IStreamClientEndpoint)
class _InternalTLSEndpoint:
    """TLS to an internal upstream, trusting only its `upstream_ca`.

    The trust is looked up for each new connection, so a replaced CA file
    applies without a restart (the TLS policy caches it until it changes).
    """

    def __init__(
        self, reactor: Any, tls: ClientTLSPolicy, host: str, port: int, ca: str | None
    ) -> None:
        self._reactor = reactor
        self._tls = tls
        self._host = host
        self._port = port
        self._ca = ca

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[Any]:
        try:
            creator = self._tls.creator_for(self._host, [self._ca] if self._ca else None, "system")
        except Exception:
            return defer.fail()
        tcp = HostnameEndpoint(self._reactor, self._host, self._port, timeout=CONNECT_TIMEOUT)
        return wrapClientTLS(creator, tcp).connect(protocolFactory)


class Runtime:
    """What every listener of one process shares while sbg runs."""

    def __init__(
        self,
        reactor: Any,
        policy: Policy,
        killswitch: KillSwitch,
        audit: AuditLog,
        metrics: Metrics,
    ) -> None:
        self.reactor = reactor
        self._policy = policy
        self.killswitch = killswitch
        self.audit = audit
        self.metrics = metrics
        self.client_tls = ClientTLSPolicy()
        # Idle connections close after 20 s, below the idle timeout of the
        # servers behind (Synapse: 60 s), so a request is not written to a
        # connection the server just closed.
        self.pool = UpstreamPools()
        self.inflight = InflightBudget()
        self.body_budget = BodyBudget(lambda: self._policy.config.limits.max_buffered_bytes)
        self.rate_limiter = RateLimiter(reactor.seconds)
        # Fetched signing keys outlive policy snapshots (contract 5.2).
        self.key_fetcher = KeyFetcher(reactor, self.client_tls)

    @property
    def policy(self) -> Policy:
        return self._policy

    def swap_policy(self, policy: Policy) -> None:
        self._policy = policy

    def upstream_pool(self, internal: InternalHomeserver) -> UpstreamPool:
        """The connection pool to `internal`'s upstream (made on first use)."""
        key = (internal.upstream, internal.upstream_ca)
        pool = self.pool.get(key)
        if pool is None:
            scheme, _, authority = internal.upstream.partition("://")
            host, port = parse_authority(authority)
            endpoint: IStreamClientEndpoint
            if scheme == "https":
                endpoint = _InternalTLSEndpoint(
                    self.reactor, self.client_tls, host, port or 443, internal.upstream_ca
                )
            else:
                endpoint = HostnameEndpoint(self.reactor, host, port or 80, timeout=CONNECT_TIMEOUT)
            pool = UpstreamPool(self.reactor, endpoint, max_idle=MAX_IDLE_PER_UPSTREAM)
            self.pool.add(key, pool)
        return pool
