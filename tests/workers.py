"""Helpers for the tests of `workers: N` (real supervisor and worker processes).

`only` leaves one worker accepting connections (the others stopped with
SIGSTOP), so that the kernel can only hand a connection to the one under
test; `WorkersCase.start` runs a supervisor with `WORKERS` workers.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from twisted.internet import defer

from tests.asynctest import TestCase
from tests.inbound_requests import TXN, txn_body
from tests.processes import (
    WORKERS,
    Process,
    Setup,
    make_setup,
    ready,
    run_gateway,
    sleep,
    stop,
    wait_until,
    worker_pids,
)


@asynccontextmanager
async def only(pids: dict[int, int], index: int) -> AsyncIterator[None]:
    """Only worker `index` accepts connections meanwhile (the others stopped)."""
    stopped = [pid for i, pid in pids.items() if i != index]
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)


async def each_worker(proc: Process, check: Callable[[int], Awaitable[None]]) -> None:
    pids = worker_pids(proc)
    assert len(pids) == WORKERS, proc.output()
    for index in sorted(pids):
        async with only(pids, index):
            await check(index)


def counter(metrics: bytes, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in metrics.decode().splitlines():
        if not line.startswith(name + "{"):
            continue
        head, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


class WorkersCase(TestCase):
    """A supervisor with `WORKERS` workers, stopped at the end of the test."""

    async def start(self, **overrides: Any) -> tuple[Setup, Process]:
        setup = make_setup(self, {"workers": WORKERS, **overrides})
        proc = await run_gateway(self, setup)
        self.addCleanup(lambda: defer.ensureDeferred(self.stopped(proc)))
        await wait_until(lambda: ready(proc) == WORKERS, 30, "the workers", proc)
        return setup, proc

    async def stopped(self, proc: Process) -> None:
        """Cleanup: the workers' kept-alive upstream connections close in
        this process's reactor too before the test ends."""
        stop(proc.popen)
        await sleep(0.3)

    async def send(self, setup: Setup, n: int) -> int:
        resp = await setup.inbound(setup.signed("PUT", TXN + str(n).encode(), txn_body()))
        return resp.status
