"""`workers: N`: one supervising process and N workers sharing its sockets.

The supervisor (the twistd process) binds every inbound and outbound
listening socket itself and starts N worker processes (`python -m
sbg.worker`) that inherit them: the kernel hands each new connection to
one of the workers. Each worker is a whole `GatewayService` on the adopted
sockets; the supervisor keeps what must be one for all of them:

- the admin listener: the kill switch is written to `state_dir` and to the
  memory the workers share with the supervisor before the admin call
  returns, and every worker reads that memory before each decision, so a
  switch holds for the next request in every process; with a `cluster`
  block, the supervisor is also the process that follows and writes the
  switches in Redis (`sbg.cluster`);
- `/metrics`: the workers count into `PROMETHEUS_MULTIPROC_DIR`
  (`state_dir/metrics`, emptied at start) and the supervisor sums them;
- signals: SIGHUP is checked here first (an invalid file is refused once,
  with `sbg check-config`'s lines) and then passed to every worker; SIGTERM
  is passed on, and the supervisor exits 0 once every worker has drained;
- the log: the workers' lines are written out through the supervisor's own
  output (stdout, `--logfile` or the journal);
- a worker that dies is started again after a second;
- `/health` and `GET /_sbg/status` (`health`, `status`): the workers'
  request times come through the metric files, their fetched keys through
  one small file each (`sbg.status`), their `process_*` from /proc.

`/health` answers 503 `degraded` when a worker slot has had no process
serving for more than `HEALTH_GRACE` seconds: a worker counts as serving
once it has run for `STABLE_AFTER` seconds, so one restart (a second's
delay) stays `ok`, and a worker that keeps dying at start does not.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import multiprocess
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet import defer, error
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver
from twisted.python.components import Componentized
from twisted.python.failure import Failure

from sbg import systemd
from sbg.admin import admin_site
from sbg.certmetrics import update_certificate_expiry
from sbg.cluster.wiring import control_for
from sbg.config.model import Config
from sbg.killswitch.shared import SharedState
from sbg.killswitch.state import Switch
from sbg.killswitch.switch import KillSwitch
from sbg.logsetup import LogWriter
from sbg.metrics import Metrics, WorkersCollector
from sbg.policy.snapshot import Policy
from sbg.service import (
    install_signal_handlers,
    read_reload,
    set_killswitch_gauge,
    tcp_server_endpoint,
)
from sbg.status import (
    StatusFacts,
    StatusState,
    build_status,
    forget_fetched_keys,
    gather_fetched_keys,
)

logger = logging.getLogger(__name__)

WORKER_MODULE = "sbg.worker"
RESTART_DELAY = 1.0
# Under state_dir: the workers' metric files (PROMETHEUS_MULTIPROC_DIR).
METRICS_DIR = "metrics"
# First inherited socket in a worker: 0 is its lifeline, 1 and 2 its output.
FIRST_SOCKET_FD = 3
# /health: how long a worker slot may be without a serving process, and
# how long a new process must have run to count as serving.
HEALTH_GRACE = 5.0
STABLE_AFTER = 2.0


@dataclass
class BoundSocket:
    listener: int  # index in config.listeners
    address: str
    sock: socket.socket


def bind_sockets(config: Config) -> list[BoundSocket]:
    """Bind every inbound and outbound listener address (not the admin ones)."""
    bound: list[BoundSocket] = []
    try:
        for index, listener in enumerate(config.listeners):
            if listener.type == "admin":
                continue
            for address in listener.bind_addresses:
                family = socket.AF_INET6 if ":" in address else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_STREAM)
                bound.append(BoundSocket(index, address, sock))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((address, listener.port))
                    sock.listen(socket.SOMAXCONN)
                except OSError as e:
                    raise error.CannotListenError(address, listener.port, e) from None
    except BaseException:
        for b in bound:
            b.sock.close()
        raise
    return bound


class _Worker(ProcessProtocol):
    """One worker process: its output relayed, its end reported."""

    def __init__(self, index: int, writer: LogWriter, ended: Callable[[_Worker], None]) -> None:
        self.index = index
        self.pid: int | None = None
        self.started_at = 0.0
        self._writer = writer
        self._ended = ended
        self._buffers = {1: b"", 2: b""}
        self.done: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        transport: Any = self.transport
        self.pid = transport.pid

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        # Whole lines only, decoded once complete (a UTF-8 character may be
        # split between two reads).
        buffered = self._buffers.get(childFD, b"") + data
        complete, _, rest = buffered.rpartition(b"\n")
        self._buffers[childFD] = rest
        if complete:
            self._emit(childFD, complete.decode("utf-8", "replace") + "\n")

    def _emit(self, fd: int, text: str) -> None:
        if fd == 1:
            # Rendered by the worker in the configured format already.
            self._writer.relay(text)
        else:
            for line in text.splitlines():
                self._writer.write(
                    levelno=logging.ERROR,
                    logger="sbg.worker",
                    message=f"worker {self.index}: {line}",
                )

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self._buffers.items():
            if rest:
                self._emit(fd, rest.decode("utf-8", "replace") + "\n")
        self._buffers = {1: b"", 2: b""}
        self._ended(self)
        self.done.callback(None)


class SupervisorService(MultiService):
    """The process of `workers: N` that binds the sockets, holds the kill switches and the
    admin listener, and runs the workers."""

    def __init__(
        self,
        config: Config,
        reactor: Any,
        writer: LogWriter,
        *,
        log_observer: ILogObserver | None = None,
        on_reconfigure: Callable[[Config], None] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self._writer = writer
        self._log_observer = log_observer
        self._on_reconfigure = on_reconfigure
        self.metrics = Metrics()
        self.status_state = StatusState()
        count = self.metrics.killswitch_errors
        # The workers follow the switches in this memory: nothing on disk
        # can lift one under them.
        self.shared = SharedState.create()
        self.killswitch = KillSwitch(
            config.state_dir, shared=self.shared, on_problem=lambda kind: count.labels(kind).inc()
        )
        self.killswitch.load()
        self.control, self.cluster = control_for(
            config, self.killswitch, reactor, self.metrics, self.status_state.sections
        )
        self._ks_check = LoopingCall(self.killswitch.check_file)
        self._ks_check.clock = reactor
        self.killswitch.on_change(self._killswitch_changed)
        self._killswitch_changed(self.killswitch.engaged)
        self.policy = Policy.build(config)
        update_certificate_expiry(config, self.metrics)
        self._started = config
        self._sockets: list[BoundSocket] = []
        self._workers: dict[int, _Worker] = {}
        self._restarts: dict[int, IDelayedCall] = {}
        # Worker slot -> since when it has had no serving process.
        self._down_since: dict[int, float] = {}
        self._stopping = False
        self._metrics_dir: str | None = None
        self._collector: WorkersCollector | None = None
        self._admin_ports: list[StreamServerEndpointService] = []
        self._serve_admin(config)

    def _serve_admin(self, config: Config) -> None:
        """The admin listeners: the supervisor's own (the workers have none)."""
        site = admin_site(
            self.control,
            lambda: self.policy,
            lambda: self.policy.config.admin_token,
            self.render_metrics,
            health=self.health,
            reactor=self.reactor,
            status=self.status,
            cluster_status=self.cluster.status if self.cluster is not None else None,
        )
        for listener in config.listeners:
            if listener.type != "admin":
                continue
            for address in listener.bind_addresses:
                svc = StreamServerEndpointService(
                    tcp_server_endpoint(self.reactor, listener, address), site
                )
                svc._raiseSynchronously = True
                svc.setServiceParent(self)
                self._admin_ports.append(svc)

    def setServiceParent(self, parent: Any) -> None:
        if self._log_observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self._log_observer)
        super().setServiceParent(parent)

    # -- lifecycle ---------------------------------------------------------

    def privilegedStartService(self) -> None:
        if self.cluster is not None:
            # After twistd's fork (a daemon keeps no thread started before):
            # Redis's switches are in force (and shared) before any worker starts.
            self.cluster.start()
        try:
            self._sockets = bind_sockets(self.config)
            super().privilegedStartService()
        except error.CannotListenError as e:
            logger.error("sbg: %s", e)
            raise SystemExit(1) from None

    def startService(self) -> None:
        super().startService()
        # One sbg per state_dir (the kill switch lives there): whatever an
        # earlier run left (after SIGKILL) is this instance's to wipe.
        self._metrics_dir = os.path.join(self.config.state_dir, METRICS_DIR)
        shutil.rmtree(self._metrics_dir, ignore_errors=True)
        os.makedirs(self._metrics_dir, mode=0o700)
        self._collector = WorkersCollector(self.metrics, self._metrics_dir, self.workers_by_index)
        now = self.reactor.seconds()
        for index in range(self.config.workers):
            self._down_since[index] = now
            self._spawn(index)
        self._ks_check.start(1.0, now=False)
        self.reactor.callWhenRunning(
            install_signal_handlers, self.reactor, self.reload, self.graceful_shutdown
        )
        # Every socket bound, SIGHUP and SIGTERM handled: tell systemd.
        self.reactor.callWhenRunning(systemd.ready)
        logger.info(
            "sbg started: %d worker(s), %d listener(s), %d internal and %d external homeserver(s)",
            self.config.workers,
            len(self.config.listeners),
            len(self.config.internal_homeservers),
            len(self.config.external_homeservers),
        )

    def _spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        if self._stopping:
            return
        assert self._metrics_dir is not None
        child_fds: dict[int, int | str] = {0: "w", 1: "r", 2: "r"}
        sockets = []
        for n, b in enumerate(self._sockets):
            fd = FIRST_SOCKET_FD + n
            child_fds[fd] = b.sock.fileno()
            sockets.append([b.listener, b.address, fd])
        killswitch_fd = FIRST_SOCKET_FD + len(self._sockets)
        child_fds[killswitch_fd] = self.shared.fd
        env = dict(os.environ)
        env["PROMETHEUS_MULTIPROC_DIR"] = self._metrics_dir
        env.pop(systemd.ENVIRONMENT_VARIABLE, None)  # only the supervisor notifies systemd
        args = [
            sys.executable,
            "-m",
            WORKER_MODULE,
            "--config",
            self.config.path,
            "--index",
            str(index),
            "--sockets",
            json.dumps(sockets),
            "--killswitch-fd",
            str(killswitch_fd),
        ]
        worker = _Worker(index, self._writer, self._worker_ended)
        self._workers[index] = worker
        # The worker starts with SIGHUP blocked (the mask survives exec) and
        # unblocks it once it can handle it: a reload sent while it starts
        # is held, not fatal (SIGHUP's default action) and not lost.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            transport = self.reactor.spawnProcess(
                worker, sys.executable, args, env=env, path=os.getcwd(), childFDs=child_fds
            )
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        worker.pid = transport.pid
        worker.started_at = self.reactor.seconds()
        logger.info("worker %d started (pid %s)", index, worker.pid)

    def _worker_ended(self, worker: _Worker) -> None:
        if self._workers.get(worker.index) is worker:
            del self._workers[worker.index]
        if worker.pid is not None and self._metrics_dir is not None:
            multiprocess.mark_process_dead(worker.pid, self._metrics_dir)
            forget_fetched_keys(self._metrics_dir, worker.pid)
        now = self.reactor.seconds()
        if now - worker.started_at >= STABLE_AFTER or worker.index not in self._down_since:
            # It was serving: the slot is down from now. (One that never
            # got that far leaves the slot down since it last was up.)
            self._down_since[worker.index] = now
        if self._stopping:
            logger.info("worker %d (pid %s) stopped", worker.index, worker.pid)
            return
        logger.error(
            "worker %d (pid %s) exited; starting it again in %ss",
            worker.index,
            worker.pid,
            RESTART_DELAY,
        )
        self._restarts[worker.index] = self.reactor.callLater(
            RESTART_DELAY, self._spawn, worker.index
        )

    def worker_pids(self) -> list[int]:
        return [w.pid for w in self._workers.values() if w.pid is not None]

    def workers_by_index(self) -> dict[int, int]:
        """Worker index -> pid of its running process."""
        return {i: w.pid for i, w in self._workers.items() if w.pid is not None}

    def _signal_workers(self, signum: int) -> None:
        for worker in list(self._workers.values()):
            transport: Any = worker.transport
            try:
                transport.signalProcess(signum)
            except (error.ProcessExitedAlready, OSError):
                pass

    def reload(self) -> bool:
        """Check the file once here (the workers' own checks), then have
        every worker apply it: a refused file is refused once, never passed on."""
        inbound_tls = any(li.type == "inbound" and li.tls for li in self._started.listeners)
        snapshot = read_reload(self._started, self.metrics, inbound_tls)
        if snapshot is None:
            return False
        self.policy = snapshot.policy
        new = self.config = snapshot.policy.config
        self.status_state.config_reloaded()
        update_certificate_expiry(new, self.metrics)
        if self.cluster is not None:
            self.cluster.reconfigured(new.sha256)
        if self._on_reconfigure is not None:
            self._on_reconfigure(new)
        self._signal_workers(signal.SIGHUP)
        self.metrics.config_reloads.labels("success").inc()
        logger.info("configuration reloaded from %s; passed to the workers", new.path)
        return True

    def graceful_shutdown(self) -> defer.Deferred[None]:
        """SIGTERM: the workers stop accepting and drain; then exit 0."""
        if self._stopping:
            return defer.succeed(None)
        logger.info("SIGTERM: stopping %d worker(s)", len(self._workers))

        async def run() -> None:
            await self._stop_workers()
            self.reactor.stop()

        return defer.ensureDeferred(run())

    async def _stop_workers(self) -> None:
        self._stopping = True
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        # The workers hold the sockets now; closing ours lets the last
        # worker to stop close them for good.
        for b in self._sockets:
            b.sock.close()
        waiting = [w.done for w in self._workers.values()]
        self._signal_workers(signal.SIGTERM)
        if not waiting:
            return
        everyone = defer.DeferredList(waiting)
        # The workers enforce shutdown_grace themselves; this is the backstop.
        backstop = self.reactor.callLater(
            self.config.shutdown_grace + 10.0, self._signal_workers, signal.SIGKILL
        )
        await everyone
        if backstop.active():
            backstop.cancel()

    def stopService(self) -> defer.Deferred[None]:
        async def run() -> None:
            if self._ks_check.running:
                self._ks_check.stop()
            if self.cluster is not None:
                self.cluster.stop()
            await self._stop_workers()
            await defer.maybeDeferred(super(SupervisorService, self).stopService)
            if self._metrics_dir is not None:
                shutil.rmtree(self._metrics_dir, ignore_errors=True)

        return defer.ensureDeferred(run())

    # -- admin -------------------------------------------------------------

    def render_metrics(self) -> bytes:
        if self._collector is None:
            return self.metrics.render()
        return self._collector.render()

    def health(self) -> tuple[int, dict[str, Any]]:
        """`/health`: 200 `ok`, or 503 `degraded` (see the module docstring)."""
        now = self.reactor.seconds()
        degraded = False
        for index in range(self.config.workers):
            worker = self._workers.get(index)
            if worker is not None and now - worker.started_at >= STABLE_AFTER:
                continue
            if now - self._down_since.get(index, now) > HEALTH_GRACE:
                degraded = True
        body = {
            "status": "degraded" if degraded else "ok",
            "workers": {"alive": len(self.workers_by_index()), "configured": self.config.workers},
        }
        if self.cluster is not None:
            # Redis unreachable is not a degraded node: it serves, closed.
            body["cluster"] = self.cluster.cluster_state
        return (503 if degraded else 200), body

    def status(self) -> dict[str, Any]:
        """The body of `GET /_sbg/status` (`sbg.status`)."""
        state = self.status_state
        pids = self.workers_by_index()
        directory = self._metrics_dir
        families = self._collector.collect() if self._collector is not None else []
        return build_status(
            StatusFacts(
                now=state.now(),
                started=state.started,
                config=self.policy.config,
                config_loaded=state.config_loaded,
                killswitch=self.killswitch.entries,
                workers=(len(pids), self.config.workers),
                metrics=families,
                fetched_keys=gather_fetched_keys(directory, pids.values()) if directory else {},
                sections=state.sections,
            )
        )

    def _killswitch_changed(self, engaged: frozenset[Switch]) -> None:
        set_killswitch_gauge(self.metrics, engaged)
