"""What the listeners share while sbg runs.

The `Runtime` holds the current `Snapshot` of the configuration (the
policy, the inbound TLS contexts and the interception CA, built whole by
a reload and swapped in one assignment), the kill switch, the audit log
and metrics, and the long-lived HTTP client machinery (connection pools,
TLS client contexts). Handlers read `runtime.policy` (or `snapshot`) once
per request and keep what they read to the end.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from zope.interface import implementer

from sbg.audit import AuditLog
from sbg.clients.keyfetch import KeyFetcher
from sbg.cluster.joins import SharedJoins
from sbg.config.model import Config, InternalHomeserver
from sbg.hosts import parse_authority
from sbg.http.budgets import BodyBudget, InflightBudget, RateLimiter
from sbg.http.upstream_pool import UpstreamPool, UpstreamPools
from sbg.joins import PreparedJoins
from sbg.killswitch.switch import KillSwitch
from sbg.metrics import Metrics
from sbg.policy.snapshot import Policy
from sbg.tls.ca import load_ca
from sbg.tls.client import ClientTLSPolicy
from sbg.tls.failures import HandshakeFailures
from sbg.tls.mint import CertMinter
from sbg.tls.server import SNIServerContextFactory, build_sni_server_context

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
        tcp = HostnameEndpoint(self._reactor, self._host, self._port, timeout=CONNECT_TIMEOUT)
        try:
            tls = self._tls.endpoint(
                tcp,
                self._host,
                [self._ca] if self._ca else None,
                "system",
                listener="inbound_upstream",
            )
        except Exception:
            return defer.fail()
        return tls.connect(protocolFactory)


@dataclass(frozen=True)
class Snapshot:
    """Everything one configuration puts into service.

    Attributes:
        policy: the compiled decisions' inputs.
        inbound_tls: the inbound certificates by SNI (None: no inbound
            listener terminates TLS).
        minter: the interception CA's certificate minter (None: no
            `outbound.ca`).
    """

    policy: Policy
    inbound_tls: SNIServerContextFactory | None
    minter: CertMinter | None

    @classmethod
    def build(cls, config: Config, inbound_tls: bool) -> Snapshot:
        """Read and build everything `config` names, files included (a
        renewed certificate or CA at the same path is read again).

        Raises:
            Exception: anything that cannot be put into service.
        """
        policy = Policy.build(config)
        tls = build_sni_server_context(inbound_tls_entries(config)) if inbound_tls else None
        ca = config.outbound.ca
        minter = CertMinter(load_ca(ca.certificate, ca.private_key)) if ca else None
        return cls(policy, tls, minter)


def inbound_tls_entries(config: Config) -> list[tuple[list[str], str, str]]:
    """(names, certificate file, key file) of every internal homeserver."""
    entries: list[tuple[list[str], str, str]] = []
    for hs in config.internal_homeservers:
        if hs.tls is None:
            continue
        names = [p.host for p in hs.federation_hosts]
        names.append(
            hs.server_name.rsplit(":", 1)[0] if "]" not in hs.server_name else hs.server_name
        )
        entries.append((names, hs.tls.certificate, hs.tls.private_key))
    return entries


class Runtime:
    """What every listener of one process shares while sbg runs."""

    def __init__(
        self,
        reactor: Any,
        snapshot: Snapshot,
        killswitch: KillSwitch,
        audit: AuditLog,
        metrics: Metrics,
    ) -> None:
        self.reactor = reactor
        self.snapshot = snapshot
        self.killswitch = killswitch
        self.audit = audit
        self.metrics = metrics
        self.tls_failures = HandshakeFailures(metrics.count_tls_failure)
        self.client_tls = ClientTLSPolicy(failures=self.tls_failures)
        # Idle connections close after 20 s, below the idle timeout of the
        # servers behind (Synapse: 60 s), so a request is not written to a
        # connection the server just closed.
        self.pool = UpstreamPools()
        self.inflight = InflightBudget()
        self.body_budget = BodyBudget(lambda: self.snapshot.policy.config.limits.max_buffered_bytes)
        self.rate_limiter = RateLimiter(reactor.seconds)
        # Fetched signing keys outlive policy snapshots.
        self.key_fetcher = KeyFetcher(reactor, self.client_tls)
        # The joins the internal homeservers prepared (make_join answered),
        # shared by the workers of this node through state_dir, and with a
        # cluster block by the nodes through Redis (started with the service).
        config = snapshot.policy.config
        local = PreparedJoins(config.state_dir, clock=reactor.seconds)
        self.prepared_joins: PreparedJoins | SharedJoins = (
            local if config.cluster is None else SharedJoins(local, config.cluster, reactor)
        )

    @property
    def policy(self) -> Policy:
        return self.snapshot.policy

    def swap(self, snapshot: Snapshot) -> None:
        """Put a reload's snapshot into service (one assignment): every new
        request and connection uses it; those in flight keep theirs."""
        self.snapshot = snapshot

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
