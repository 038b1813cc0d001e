"""What the listeners share while sbg runs.

The `Runtime` holds the current `Policy` snapshot (swapped whole on reload),
the kill switch, the audit log and metrics, and the long-lived HTTP client
machinery (connection pools, TLS client contexts). Handlers read
`runtime.policy` once per request and keep that snapshot to the end.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.interfaces import IReactorTime
from twisted.web.client import HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from sbg.audit import AuditLog
from sbg.config.model import InternalHomeserver
from sbg.http.agent import RawTargetAgent
from sbg.matrix.keyfetch import KeyFetcher
from sbg.metrics import Metrics
from sbg.policy.killswitch import KillSwitch
from sbg.policy.ratelimit import InflightBudget, RateLimiter
from sbg.policy.snapshot import Policy
from sbg.tls.client import ClientTLSPolicy

logger = logging.getLogger(__name__)


@implementer(IPolicyForHTTPS)
class _FixedTrust:
    """HTTPS to an internal upstream, trusting only its `upstream_ca`."""

    def __init__(self, tls: ClientTLSPolicy, ca_file: str | None) -> None:
        self._tls = tls
        self._ca = ca_file

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return self._tls.creator_for(
            hostname.decode("ascii"), [self._ca] if self._ca else None, "system"
        )


class Runtime:
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
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 32
        # Below the idle timeout of the servers behind (Synapse: 60 s), so
        # a request is not written to a connection the server just closed.
        self.pool.cachedConnectionTimeout = 20
        self.inflight = InflightBudget()
        self.rate_limiter = RateLimiter(reactor.seconds)
        self._upstream_agents: dict[tuple[str, str | None], RawTargetAgent] = {}
        # Fetched signing keys outlive policy snapshots (contract 5.2).
        self.key_fetcher = KeyFetcher(reactor, self.client_tls)

    @property
    def policy(self) -> Policy:
        return self._policy

    def swap_policy(self, policy: Policy) -> None:
        self._policy = policy

    @property
    def clock(self) -> IReactorTime:
        return self.reactor  # type: ignore[no-any-return]

    def upstream_agent(self, internal: InternalHomeserver) -> RawTargetAgent:
        key = (internal.upstream, internal.upstream_ca)
        agent = self._upstream_agents.get(key)
        if agent is None:
            scheme = urlsplit(internal.upstream).scheme
            if scheme == "https":
                agent = RawTargetAgent(
                    self.reactor,
                    contextFactory=_FixedTrust(self.client_tls, internal.upstream_ca),
                    pool=self.pool,
                )
            else:
                agent = RawTargetAgent(self.reactor, pool=self.pool)
            self._upstream_agents[key] = agent
        return agent
