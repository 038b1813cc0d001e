"""Prometheus metrics (docs/metrics.md), in a registry of their own.

Label values come only from the configuration (server names), from fixed
sets (directions, groups, decisions, refusal codes) or `unknown`: never from
a Host header, an SNI or a path an attacker chose.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

from sbg import __version__
from sbg.tls.failures import LISTENERS, REASONS

UNKNOWN = "unknown"
# With `workers: N` these are the supervisor's own state; every other
# family is counted by the workers and summed from PROMETHEUS_MULTIPROC_DIR.
SUPERVISOR_FAMILIES = frozenset(
    {
        "sbg_config_reloads",
        "sbg_killswitch_engaged",
        "sbg_certificate_expiry_timestamp_seconds",
        "sbg_build_info",
        "sbg_cluster_connected",
    }
)
# Counted both by the supervisor and by the workers (with other labels):
# the supervisor's samples are added to the workers'.
SHARED_FAMILIES = frozenset({"sbg_killswitch_state_errors"})


class Metrics:
    """sbg's Prometheus metric families, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "sbg_requests",
            "Request decisions crossing the border.",
            ["direction", "server", "group", "decision"],
            registry=r,
        )
        self.duration = Histogram(
            "sbg_request_duration_seconds",
            "Time from the request's arrival to the end of its response.",
            ["direction"],
            buckets=(
                0.001,
                0.0025,
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                0.5,
                1,
                2.5,
                5,
                10,
                30,
                60,
                300,
                600,
            ),
            registry=r,
        )
        self.upstream_errors = Counter(
            "sbg_upstream_errors",
            "Failures reaching or reading from the upstream.",
            ["direction", "reason"],
            registry=r,
        )
        self.inflight = Gauge(
            "sbg_inflight_requests",
            "Requests being processed or forwarded.",
            ["direction"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.config_reloads = Counter(
            "sbg_config_reloads",
            "Configuration reloads (SIGHUP) by result.",
            ["result"],
            registry=r,
        )
        self.refusals = Counter(
            "sbg_refusals",
            "Refusals by short reason code.",
            ["direction", "server", "reason"],
            registry=r,
        )
        self.killswitch = Gauge(
            "sbg_killswitch_engaged",
            "1 while a kill switch is engaged (server is `global` for the global one).",
            ["server", "direction"],
            registry=r,
        )
        self.killswitch_errors = Counter(
            "sbg_killswitch_state_errors",
            "Kill-switch state problems (persist: state_dir not writable; file: the state "
            "file deleted, damaged or replaced under sbg; shared: a worker could not read "
            "the shared state). None of them lifts a switch.",
            ["kind"],
            registry=r,
        )
        self.cert_expiry = Gauge(
            "sbg_certificate_expiry_timestamp_seconds",
            "notAfter of every configured certificate and pinned CA (Unix time).",
            ["kind", "name", "path"],
            registry=r,
        )
        self.tunnels = Gauge(
            "sbg_outbound_tunnels",
            "Open outbound CONNECT tunnels.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.build_info = Gauge(
            "sbg_build_info",
            "Always 1; the version label is the running sbg's.",
            ["version"],
            registry=r,
            multiprocess_mode="max",
        )
        self.build_info.labels(__version__).set(1)
        # Exported only by a node of a cluster (`enable_cluster`): a node
        # alone has no Redis to be connected to.
        self.cluster_connected = Gauge(
            "sbg_cluster_connected",
            "1 while the cluster's Redis answers this node, 0 while it is unreachable.",
            registry=None,
        )
        self.last_request = Gauge(
            "sbg_last_request_timestamp_seconds",
            "When the last request of each decision was decided (Unix time), by direction "
            "and external server.",
            ["direction", "server", "decision"],
            registry=r,
            multiprocess_mode="max",
        )
        self.tls_failures = Counter(
            "sbg_tls_handshake_failures",
            "TLS handshakes that failed, by where (listener) and short reason code.",
            ["listener", "reason"],
            registry=r,
        )
        self._request_children: dict[tuple[str, str, str, str], tuple[Any, Any]] = {}
        # The last-request gauges' children -> the time to set them to at
        # the next `flush_last_requests` (a dict update per request).
        self._last_requests: dict[Any, float] = {}
        for listener in LISTENERS:
            for reason in REASONS:
                self.tls_failures.labels(listener, reason)
        for direction in ("inbound", "outbound"):
            self.inflight.labels(direction)
            self.duration.labels(direction)
        for result in ("success", "failure"):
            self.config_reloads.labels(result)

    def count_request(self, direction: str, server: str, group: str, decision: str) -> None:
        """`sbg_requests_total` += 1, with the labelled child cached: the label
        values come from the configuration and fixed sets, so the cache stays
        as small as the metric itself. The time is noted for
        `sbg_last_request_timestamp_seconds` (`flush_last_requests`)."""
        key = (direction, server, group, decision)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self.requests.labels(*key),
                self.last_request.labels(direction, server, decision),
            )
        children[0].inc()
        self._last_requests[children[1]] = time.time()

    def flush_last_requests(self) -> None:
        """Set `sbg_last_request_timestamp_seconds` to the times noted since
        the last flush (every second, and before the gauge is read)."""
        noted, self._last_requests = self._last_requests, {}
        for child, ts in noted.items():
            child.set(ts)

    def count_tls_failure(self, listener: str, reason: str) -> None:
        """`sbg_tls_handshake_failures_total` += 1."""
        self.tls_failures.labels(listener, reason).inc()

    def add_process_metrics(self) -> None:
        """`process_*` of this process in the registry (one process serving
        alone; a supervisor uses `ProcessesCollector`)."""
        ProcessCollector(registry=self.registry)

    def enable_cluster(self) -> None:
        """Export `sbg_cluster_connected` (a node with a `cluster` block)."""
        self.registry.register(self.cluster_connected)

    def render(self) -> bytes:
        self.flush_last_requests()
        return generate_latest(self.registry)


class ProcessesCollector:
    """`process_*` (CPU, memory, file descriptors, start time) of the
    supervisor and of every worker, each series labelled `worker`
    (`supervisor`, `0`, `1`, ...), read from /proc at each scrape:
    prometheus_client's multiprocess mode does not collect them."""

    def __init__(self, workers: Callable[[], Mapping[int, int]]) -> None:
        self._workers = workers

    def collect(self) -> Iterator[Metric]:
        processes = [("supervisor", os.getpid())]
        processes += [(str(index), pid) for index, pid in sorted(self._workers().items())]
        merged: dict[str, Metric] = {}
        for label, pid in processes:
            one = ProcessCollector(pid=lambda pid=pid: pid, registry=None)  # type: ignore[misc]
            for family in one.collect():
                out = merged.get(family.name)
                if out is None:
                    out = merged[family.name] = Metric(
                        family.name, family.documentation, family.type
                    )
                for sample in family.samples:
                    out.add_sample(sample.name, {**sample.labels, "worker": label}, sample.value)
        yield from merged.values()


class WorkersCollector:
    """The supervisor's view: its own families plus the workers' summed,
    and every process's `process_*`."""

    def __init__(
        self,
        own: Metrics,
        directory: str,
        workers: Callable[[], Mapping[int, int]] | None = None,
    ) -> None:
        self._own = own
        self._workers = MultiProcessCollector(None, path=directory)
        self._processes = ProcessesCollector(workers or dict)

    def collect(self) -> Iterator[Metric]:
        own = {f.name: f for f in self._own.registry.collect()}
        seen = set()
        for family in self._workers.collect():
            if family.name in SUPERVISOR_FAMILIES:
                continue
            if family.name in SHARED_FAMILIES and family.name in own:
                seen.add(family.name)
                family.samples = family.samples + own[family.name].samples
            yield family
        for name, family in own.items():
            if name in SUPERVISOR_FAMILIES or (name in SHARED_FAMILIES and name not in seen):
                yield family
        yield from self._processes.collect()

    def render(self) -> bytes:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        return generate_latest(registry)
