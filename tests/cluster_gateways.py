"""Gateway nodes of a cluster as real `twistd -n sbg` processes (each with
`workers: 2` by default), for the tests: what a partner's request and an
internal homeserver's CONNECT get from each node, the admin API and the
`sbg kill` command."""

from __future__ import annotations

import base64
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, threads

from testbed.configtools import PROXY_USERNAME
from tests.asynctest import TestCase
from tests.inbound_requests import TXN, txn_body
from tests.processes import (
    ROOT,
    WORKERS,
    Process,
    Setup,
    connect_head,
    make_setup,
    ready,
    sleep,
    spawn,
    stop,
    wait_healthy,
    wait_until,
)
from tests.workers import each_worker

_TXN_IDS = itertools.count(1)


@dataclass
class Gateway:
    """One node: its configuration and its running supervisor process."""

    test: TestCase
    name: str
    setup: Setup
    proc: Process

    async def inbound(self) -> int:
        return await inbound_status(self.setup)

    async def connect(self) -> int:
        return await connect_status(self.setup)

    async def both(self) -> tuple[int, int]:
        return await self.inbound(), await self.connect()

    async def admin(self, method: str, path: str, body: Any = None) -> Any:
        return await self.setup.admin(method, path, body)

    async def health(self) -> dict[str, Any]:
        """`/health`'s status and cluster (its workers left out)."""
        resp = await self.setup.admin("GET", "/health", token=False)
        body = resp.json()
        assert resp.status == 200, body
        return {k: body[k] for k in ("status", "cluster") if k in body}

    async def engaged(self) -> set[tuple[str | None, str]]:
        resp = await self.admin("GET", "/_sbg/kill")
        return {(e["server"], e["direction"]) for e in resp.json()["engaged"]}

    def cli(self, *args: str) -> Any:
        """Deferred: `sbg ARGS -c FILE` (the command, as an operator types it)."""
        argv = [sys.executable, "-m", "sbg.cli", *args, "-c", self.setup.path]
        env = dict(os.environ, PYTHONPATH=ROOT)
        return threads.deferToThread(
            subprocess.run, argv, capture_output=True, text=True, env=env, timeout=30
        )

    async def every_worker(self, check: Callable[[], Any], expected: Any) -> None:
        """`check()` gives `expected` in each worker (the other one stopped)."""

        async def one(index: int) -> None:
            got = await check()
            self.test.assertEqual(got, expected, f"{self.name} worker {index}")

        await each_worker(self.proc, one)

    async def restart(self) -> None:
        """SIGTERM (exit 0), then start again with the same state_dir."""
        self.proc.signal(signal.SIGTERM)
        self.test.assertEqual(await self.proc.wait(), 0, self.proc.output())
        self.proc = await _run(self.test, self.setup, self.name)


async def inbound_status(setup: Setup) -> int:
    """The status a partner's signed transaction gets (a new one each time)."""
    path = TXN + b"c%d" % next(_TXN_IDS)
    resp = await setup.inbound(setup.signed("PUT", path, txn_body()))
    return int(resp.status)


async def connect_status(setup: Setup) -> int:
    """The status an internal homeserver's CONNECT to the partner gets."""
    token = base64.b64encode(f"{PROXY_USERNAME}:{setup.material.proxy_password}".encode())
    head = await threads.deferToThread(connect_head, setup.ports["outbound"], b"Basic " + token)
    return int(head.split(b" ", 2)[1]) if head else 0


async def _run(test: TestCase, setup: Setup, name: str) -> Process:
    proc = spawn(test, setup, name=f"{name}-{time.monotonic_ns()}")
    await wait_healthy(setup, proc)
    workers = setup.overrides.get("workers", 1)
    await wait_until(lambda: ready(proc) == workers, 30, f"{name}'s workers", proc)

    async def stopped() -> None:
        stop(proc.popen)
        await sleep(0.3)

    test.addCleanup(lambda: defer.ensureDeferred(stopped()))
    return proc


async def start_gateways(
    test: TestCase, redis_urls: list[str], *, workers: int = WORKERS
) -> list[Gateway]:
    """One gateway per Redis URL (the same Redis, or a way to it), named
    gw-a, gw-b, ...; started at once, returned once all serve."""
    setups = []
    for n, url in enumerate(redis_urls):
        name = f"gw-{chr(ord('a') + n)}"
        cluster = {"redis": url, "node_name": name}
        setups.append((name, make_setup(test, {"workers": workers, "cluster": cluster})))
    procs = await defer.gatherResults(
        [defer.ensureDeferred(_run(test, setup, name)) for name, setup in setups]
    )
    return [
        Gateway(test, name, setup, proc) for (name, setup), proc in zip(setups, procs, strict=True)
    ]


async def seconds_until(
    check: Callable[[], Any], expected: Any, timeout: float, what: str
) -> float:
    """Seconds until `await check()` gives `expected` (polled); fails after `timeout`."""
    started = time.monotonic()
    while True:
        got = await check()
        if got == expected:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout}s: {what} (last: {got!r})")
        await sleep(0.02)
