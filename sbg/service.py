"""The gateway as a Twisted service: listeners, reload, graceful stop.

`GatewayService` builds one listening port per (listener, bind address) of
the configuration, all sharing one `Runtime`. SIGHUP re-reads the file and
swaps the policy atomically (docs/configuration.md, "Reload and restart");
SIGTERM stops accepting, lets the requests in flight finish for at most
`shutdown_grace`, and stops the reactor so twistd exits 0.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import (
    AdoptedStreamServerEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
)
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IStreamServerEndpoint,
)
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver
from twisted.python.components import Componentized
from zope.interface import implementer

from sbg import systemd
from sbg.admin import admin_site
from sbg.audit import AuditLog
from sbg.certmetrics import update_certificate_expiry
from sbg.cluster.joins import SharedJoins
from sbg.cluster.wiring import control_for
from sbg.config.load import load_config
from sbg.config.model import Config, Listener
from sbg.errors import ConfigErrors
from sbg.http.limits import LimitedFactory
from sbg.http.pipeline import InflightTracker
from sbg.http.site import BorderHTTPFactory
from sbg.inbound.handler import InboundHandler
from sbg.killswitch.shared import SharedState
from sbg.killswitch.state import Switch
from sbg.killswitch.switch import KillSwitch
from sbg.metrics import Metrics
from sbg.outbound.proxy import OutboundProxyFactory
from sbg.outbound.state import OutboundState
from sbg.reasons import Reason
from sbg.runtime import Runtime, Snapshot
from sbg.status import StatusFacts, StatusState, build_status, publish_fetched_keys
from sbg.tls.failures import ObservedTLSFactory

logger = logging.getLogger(__name__)


@implementer(IOpenSSLServerConnectionCreator)
class _SnapshotServerTLS:
    """The inbound TLS contexts of the snapshot in service (a reload's
    renewed certificates apply to the next connection)."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    def serverConnectionForTLS(self, tlsProtocol: object) -> Any:
        tls = self._runtime.snapshot.inbound_tls
        assert tls is not None, "an inbound TLS listener has its contexts"
        return tls.serverConnectionForTLS(tlsProtocol)


def tcp_server_endpoint(reactor: Any, listener: Listener, address: str) -> IStreamServerEndpoint:
    """The plain TCP endpoint of one listener address. TLS, where a listener
    has it, is inside the factory, so connection limits apply before any
    handshake."""
    if ":" in address:
        return TCP6ServerEndpoint(reactor, listener.port, interface=address)
    return TCP4ServerEndpoint(reactor, listener.port, interface=address)


# What a reload cannot change (name in the log, Config attribute).
RESTART_ONLY = (
    ("listener", "listeners"),
    ("state_dir", "state_dir"),
    ("workers", "workers"),
    ("cluster", "cluster"),
)


def install_signal_handlers(
    reactor: Any, reload: Callable[[], object], shutdown: Callable[[], object]
) -> None:
    """SIGHUP reloads, SIGTERM stops gracefully, both on the reactor thread.

    Installed after the reactor's own (call from `callWhenRunning`): the
    reactor would record SIGTERM and twistd would re-raise it at exit
    (status -15)."""

    def on_hup(signum: int, frame: Any) -> None:
        reactor.callFromThread(systemd.reloading, reload)

    def on_term(signum: int, frame: Any) -> None:
        reactor.callFromThread(systemd.stopping)
        reactor.callFromThread(shutdown)

    signal.signal(signal.SIGHUP, on_hup)
    signal.signal(signal.SIGTERM, on_term)


def read_reload(started: Config, metrics: Metrics, inbound_tls: bool) -> Snapshot | None:
    """Read `started`'s file again and build what a reload puts into
    service, in full, before anything is swapped; None when it is refused
    (each problem logged as `reload refused: ...`, the failure counted).
    Changes only a restart applies are logged, every time, and left alone."""
    try:
        new = load_config(started.path)
    except ConfigErrors as e:
        for line in e.lines():
            logger.error("reload refused: %s", line)
        metrics.config_reloads.labels("failure").inc()
        return None
    for line in new.warnings:
        logging.getLogger("sbg.config").warning("%s", line)
    for label, attribute in RESTART_ONLY:
        if getattr(new, attribute) != getattr(started, attribute):
            logger.warning("%s changes need a restart; they were not applied", label)
    try:
        return Snapshot.build(new, inbound_tls)
    except Exception as e:
        logger.error("reload refused: %s", e)
        metrics.config_reloads.labels("failure").inc()
        return None


class GatewayService(MultiService):
    """The gateway of one process: its listeners, runtime, reload and stop."""

    def __init__(
        self,
        config: Config,
        reactor: Any,
        *,
        log_observer: ILogObserver | None = None,
        on_reconfigure: Callable[[Config], None] | None = None,
        install_signals: bool = True,
        adopted: Mapping[tuple[int, str], int] | None = None,
        killswitch_fd: int | None = None,
        share_dir: str | None = None,
    ) -> None:
        """`adopted` makes this a worker of `workers: N` (sbg.supervisor):
        (listener index, bind address) -> the listening socket's file
        descriptor, inherited from the supervisor; admin listeners are the
        supervisor's, the kill switch is followed in the memory the
        supervisor shares (`killswitch_fd`), and the fetched keys are
        published for its status in `share_dir`."""
        super().__init__()
        self.status_state = StatusState()
        self._adopted = adopted
        self.config = config
        self.reactor = reactor
        self._log_observer = log_observer
        self._on_reconfigure = on_reconfigure
        self._install_signals = install_signals
        self.metrics = Metrics()
        self.killswitch, tick = self._make_killswitch(config, killswitch_fd)
        self.killswitch.load()
        self.control, self.cluster = control_for(
            config, self.killswitch, reactor, self.metrics, self.status_state.sections,
            worker=adopted is not None,
        )  # fmt: skip
        self._ks_poll = LoopingCall(self._every_second, tick)
        self._ks_poll.clock = reactor
        self.tracker = InflightTracker()
        inbound_tls = any(li.type == "inbound" and li.tls for li in config.listeners)
        self.runtime = Runtime(
            reactor, Snapshot.build(config, inbound_tls), self.killswitch, AuditLog(), self.metrics
        )
        self.outbound = OutboundState(self.runtime, self.tracker)
        if adopted is None:
            self.metrics.add_process_metrics()
        elif share_dir is not None:
            fetcher = self.runtime.key_fetcher
            fetcher.on_change = lambda: publish_fetched_keys(
                share_dir, os.getpid(), fetcher.fetched()
            )
        self.killswitch.on_change(self._killswitch_changed)
        self._killswitch_changed(self.killswitch.engaged)
        self._update_certificate_expiry(config)
        self._inbound_tls = inbound_tls
        self._ports: list[StreamServerEndpointService] = []
        self._connections: list[LimitedFactory] = []
        self._port_owners: list[tuple[Listener, str]] = []
        self._stopping = False
        # What is in service until a restart, whatever later reloads say.
        self._started = config
        self._add_ports(config, adopted)

    # -- construction ------------------------------------------------------

    def _make_killswitch(
        self, config: Config, killswitch_fd: int | None
    ) -> tuple[KillSwitch, Callable[[], None]]:
        """This process's kill switch, and what it does every second."""
        count = self.metrics.killswitch_errors
        if self._adopted is None:
            ks = KillSwitch(config.state_dir, on_problem=lambda kind: count.labels(kind).inc())
            # A state file damaged or deleted under sbg is written again.
            return ks, ks.check_file
        if killswitch_fd is None:
            raise ValueError("a worker needs the supervisor's kill-switch memory")
        ks = KillSwitch(
            config.state_dir,
            shared=SharedState.attach(killswitch_fd),
            follower=True,
            on_problem=lambda kind: count.labels(kind).inc(),
        )
        # Requests check the shared state themselves; this closes the open
        # tunnels a switch covers even when no request comes.
        return ks, ks.refresh

    def _add_ports(self, config: Config, adopted: Mapping[tuple[int, str], int] | None) -> None:
        """One listening port per (listener, bind address), as child services
        (a worker adopts the supervisor's sockets and has no admin listener)."""
        for index, listener in enumerate(config.listeners):
            if adopted is not None and listener.type == "admin":
                continue
            factory = self._factory_for(listener)
            for address in listener.bind_addresses:
                endpoint = tcp_server_endpoint(self.reactor, listener, address)
                if adopted is not None:
                    family = socket.AF_INET6 if ":" in address else socket.AF_INET
                    endpoint = AdoptedStreamServerEndpoint(
                        self.reactor, adopted[(index, address)], family
                    )
                svc = StreamServerEndpointService(endpoint, factory)
                svc._raiseSynchronously = True
                svc.setServiceParent(self)
                self._ports.append(svc)
                self._port_owners.append((listener, address))

    def setServiceParent(self, parent: Any) -> None:
        # twistd asks the application for an ILogObserver before it starts
        # logging: this is how sbg's observer (text or JSON) replaces the
        # default one, so every line twistd writes has sbg's format.
        if self._log_observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self._log_observer)
        super().setServiceParent(parent)

    def _factory_for(self, listener: Listener) -> Any:
        if listener.type == "inbound":
            http_factory: Any = BorderHTTPFactory(
                InboundHandler(self.runtime, listener, self.tracker),
                self.reactor,
                idle_timeout=self.config.inbound.idle_timeout,
            )
            if listener.tls:
                http_factory = ObservedTLSFactory(
                    _SnapshotServerTLS(self.runtime),
                    False,
                    http_factory,
                    listener="inbound",
                    failures=self.runtime.tls_failures,
                )
            return self._limited(http_factory, "inbound")
        if listener.type == "outbound":
            return self._limited(OutboundProxyFactory(self.outbound), "outbound")
        return admin_site(
            self.control,
            lambda: self.runtime.policy,
            lambda: self.runtime.policy.config.admin_token,
            self.metrics.render,
            health=self.health,
            reactor=self.reactor,
            status=self.status,
            cluster_status=self.cluster.status if self.cluster is not None else None,
        )

    def _limited(self, factory: Any, direction: str) -> LimitedFactory:
        """Connection limits outside everything else (TLS included)."""

        def refused(reason: Reason) -> None:
            self.metrics.refusals.labels(direction, "unknown", reason.code).inc()

        limited = LimitedFactory(factory, lambda: self.runtime.policy.config.limits, refused)
        self._connections.append(limited)
        return limited

    # -- lifecycle ---------------------------------------------------------

    def privilegedStartService(self) -> None:
        if self.cluster is not None:
            # After twistd's fork (a daemon keeps no thread started before),
            # before the reactor runs: Redis's switches are in force before
            # the first connection is accepted.
            self.cluster.start()
        # twistd binds the ports here: a port in use is one line and exit 1,
        # not a traceback.
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            logger.error("sbg: %s", e)
            raise SystemExit(1) from None

    def startService(self) -> None:
        super().startService()
        if isinstance(self.runtime.prepared_joins, SharedJoins):
            self.runtime.prepared_joins.start()
        self._ks_poll.start(1.0, now=False)
        if self._install_signals:
            self.reactor.callWhenRunning(
                install_signal_handlers, self.reactor, self.reload, self.graceful_shutdown
            )
            # Listening, and SIGHUP and SIGTERM handled: tell systemd.
            self.reactor.callWhenRunning(systemd.ready)
        logger.info(
            "sbg started: %d listener(s), %d internal and %d external homeserver(s)",
            len(self.config.listeners),
            len(self.config.internal_homeservers),
            len(self.config.external_homeservers),
        )

    async def listening(self) -> list[tuple[Listener, str, IListeningPort]]:
        """The bound ports, once listening (listener, bind address, port)."""
        out = []
        for svc, (listener, address) in zip(self._ports, self._port_owners, strict=True):
            waiting = svc._waitingForPort
            assert waiting is not None, "service not started"
            # Observe the result without consuming it: stopService needs it.
            seen: defer.Deferred[IListeningPort] = defer.Deferred()

            def observe(p: IListeningPort, seen: defer.Deferred[IListeningPort] = seen) -> Any:
                seen.callback(p)
                return p

            waiting.addCallback(observe)
            out.append((listener, address, await seen))
        return out

    def reload(self) -> bool:
        """Re-read the configuration file; True if the new one took effect."""
        snapshot = read_reload(self._started, self.metrics, self._inbound_tls)
        if snapshot is None:
            return False
        self.runtime.swap(snapshot)
        new = snapshot.policy.config
        self.outbound.reconfigure()
        self.config = new
        self.status_state.config_reloaded()
        self._update_certificate_expiry(new)
        if self.cluster is not None:
            self.cluster.reconfigured(new.sha256)
        if self._on_reconfigure is not None:
            self._on_reconfigure(new)
        self.metrics.config_reloads.labels("success").inc()
        logger.info("configuration reloaded from %s", new.path)
        return True

    def health(self) -> tuple[int, dict[str, Any]]:
        """`/health`: one process serving is `ok`; a node of a cluster adds
        whether its Redis answers (`"cluster"`), which never makes it fail."""
        body: dict[str, Any] = {"status": "ok"}
        if self.cluster is not None:
            body["cluster"] = self.cluster.cluster_state
        return 200, body

    def status(self) -> dict[str, Any]:
        """The body of `GET /_sbg/status` (`sbg.status`)."""
        state = self.status_state
        self.metrics.flush_last_requests()
        return build_status(
            StatusFacts(
                now=state.now(),
                started=state.started,
                config=self.runtime.policy.config,
                config_loaded=state.config_loaded,
                killswitch=self.killswitch.entries,
                workers=None,
                metrics=self.metrics.registry.collect(),
                fetched_keys=self.runtime.key_fetcher.fetched(),
                sections=state.sections,
            )
        )

    def graceful_shutdown(self) -> defer.Deferred[None]:
        """Stop accepting, drain for at most `shutdown_grace`, stop the reactor."""
        if self._stopping:
            return defer.succeed(None)
        self._stopping = True
        grace = self.config.shutdown_grace
        logger.info("SIGTERM: no new connections; draining for at most %ss", grace)

        async def run() -> None:
            await defer.gatherResults(
                [defer.maybeDeferred(p.stopService) for p in self._ports], consumeErrors=True
            )
            self.tracker.draining = True
            self.outbound.close_idle_tunnels()
            drained = self.tracker.wait_idle()
            timer = self.reactor.callLater(grace, drained.cancel)
            try:
                await drained
                logger.info("all requests finished")
            except defer.CancelledError:
                logger.warning(
                    "shutdown grace of %ss over: %d request(s) cut", grace, self.tracker.count
                )
            finally:
                if timer.active():
                    timer.cancel()
            self.reactor.stop()

        return defer.ensureDeferred(run())

    def stopService(self) -> defer.Deferred[None]:
        """Stop listening, cut the tunnels, close the upstream connections."""
        if self._ks_poll.running:
            self._ks_poll.stop()
        if self.cluster is not None:
            self.cluster.stop()
        if isinstance(self.runtime.prepared_joins, SharedJoins):
            self.runtime.prepared_joins.stop()
        self.metrics.flush_last_requests()
        stopped = defer.maybeDeferred(super().stopService)
        self.outbound.close_all_tunnels()
        closing = [stopped, self.runtime.pool.closeCachedConnections(), self.outbound.close()]
        # Whatever a client still holds open (after a graceful drain: only
        # idle or refused connections) ends with the service.
        closing += [limited.close_all(self.reactor) for limited in self._connections]
        d = defer.gatherResults(closing, consumeErrors=True)
        return d.addCallback(_discard)

    def _every_second(self, tick: Callable[[], None]) -> None:
        tick()
        # With workers, how the request times reach the supervisor.
        self.metrics.flush_last_requests()

    def _killswitch_changed(self, engaged: frozenset[Switch]) -> None:
        # A worker's supervisor reports the switches and certificates.
        if self._adopted is None:
            set_killswitch_gauge(self.metrics, engaged)
        self.outbound.killswitch_changed(engaged)

    def _update_certificate_expiry(self, config: Config) -> None:
        if self._adopted is None:
            update_certificate_expiry(config, self.metrics)


def set_killswitch_gauge(metrics: Metrics, engaged: frozenset[Switch]) -> None:
    gauge = metrics.killswitch
    gauge.clear()
    for server, direction in engaged:
        gauge.labels(server or "global", direction).set(1)


def _discard(_: object) -> None:
    return None
