"""`workers: N`: a supervisor and N worker processes sharing the sockets.

Real `twistd -n sbg` processes, as in tests/test_process.py. Each check
that matters per process (kill switch, reload) is made against every
worker: the others are stopped (SIGSTOP) so that the kernel can only hand
the connection to the one under test.
"""

from __future__ import annotations

import os
import signal
import time

from twisted.internet import defer

from testbed.configtools import PARTNER_SERVER
from tests.inbound_requests import TXN, txn_body
from tests.processes import (
    WORKERS,
    Process,
    Setup,
    alive,
    make_setup,
    ready,
    run_gateway,
    sleep,
    wait_until,
    worker_pids,
)
from tests.workers import WorkersCase, counter, each_worker, only


class WorkersTests(WorkersCase):
    async def test_every_worker_serves_and_metrics_are_summed(self) -> None:
        # What a SIGKILLed earlier run left in state_dir/metrics is wiped.
        stale = os.path.abspath(os.path.join(self.mktemp(), "state", "metrics"))
        os.makedirs(stale)
        with open(os.path.join(stale, "counter_1.db"), "wb") as f:
            f.write(b"not a metrics file")
        setup, proc = await self.start(state_dir=os.path.dirname(stale))
        self.assertFalse(os.path.exists(os.path.join(stale, "counter_1.db")))
        served: list[int] = []

        async def check(index: int) -> None:
            for i in range(3):
                self.assertEqual(await self.send(setup, index * 10 + i), 200)
            served.append(index)

        await each_worker(proc, check)
        self.assertEqual(served, list(range(WORKERS)))
        self.assertEqual(len(setup.upstream.requests), 3 * WORKERS)
        metrics = (await setup.admin("GET", "/metrics", token=False)).body
        self.assertEqual(
            counter(metrics, "sbg_requests_total", direction="inbound", decision="allow"),
            3 * WORKERS,
        )
        # One family each, not one per process.
        self.assertEqual(metrics.count(b"# TYPE sbg_requests_total counter"), 1)
        self.assertIn(b"sbg_config_reloads_total", metrics)

    async def test_kill_switch_holds_in_every_worker_at_once(self) -> None:
        setup, proc = await self.start()
        resp = await setup.admin(
            "POST", "/_sbg/kill", {"server": PARTNER_SERVER, "direction": "inbound"}
        )
        self.assertEqual(resp.status, 200, resp.body)
        # No wait: the next request in each worker is refused.

        async def refused(index: int) -> None:
            resp = await setup.inbound(setup.signed("PUT", TXN + b"k%d" % index, txn_body()))
            self.assertEqual(resp.status, 403, resp.body)
            self.assertEqual(resp.json()["errcode"], "M_FORBIDDEN")

        await each_worker(proc, refused)
        self.assertEqual(setup.upstream.requests, [])
        metrics = (await setup.admin("GET", "/metrics", token=False)).body
        self.assertEqual(
            counter(metrics, "sbg_refusals_total", direction="inbound", reason="killswitch"),
            WORKERS,
        )
        self.assertIn(
            b'sbg_killswitch_engaged{direction="inbound",server="partner.example"} 1.0', metrics
        )

        await setup.admin("POST", "/_sbg/unkill", {"server": PARTNER_SERVER, "direction": "both"})

        async def allowed(index: int) -> None:
            self.assertEqual(await self.send(setup, 100 + index), 200)

        await each_worker(proc, allowed)
        self.assertEqual(len(setup.upstream.requests), WORKERS)

    async def test_reload_reaches_every_worker_and_bad_file_none(self) -> None:
        setup, proc = await self.start()
        setup.write({"workers": WORKERS, "external_homeservers[0].enabled": False})
        proc.signal(signal.SIGHUP)
        # The supervisor's line and one per worker.
        await wait_until(
            lambda: proc.output().count("configuration reloaded from") == WORKERS + 1,
            15,
            "the workers' reloads",
            proc,
        )

        async def refused(index: int) -> None:
            self.assertEqual(await self.send(setup, 200 + index), 403)

        await each_worker(proc, refused)
        self.assertEqual(setup.upstream.requests, [])

        with open(setup.path, "a", encoding="utf-8") as f:
            f.write("no_such_key: 1\n")
        proc.signal(signal.SIGHUP)
        await wait_until(lambda: "reload refused" in proc.output(), 10, "refusal", proc)
        await sleep(0.5)
        # Checked once, by the supervisor; the workers were left alone.
        self.assertEqual(proc.output().count("no_such_key"), 1)
        self.assertEqual(proc.output().count("configuration reloaded from"), WORKERS + 1)
        metrics = (await setup.admin("GET", "/metrics", token=False)).body
        self.assertIn(b'sbg_config_reloads_total{result="failure"} 1.0', metrics)

    async def test_dead_worker_restarted_counts_kept(self) -> None:
        setup, proc = await self.start()
        pids = worker_pids(proc)
        async with only(pids, 0):
            self.assertEqual(await self.send(setup, 1), 200)
        os.kill(pids[0], signal.SIGKILL)
        await wait_until(lambda: ready(proc) == WORKERS + 1, 30, "a new worker 0", proc)
        self.assertIn(f"worker 0 (pid {pids[0]}) exited", proc.output())
        new = worker_pids(proc)
        self.assertEqual(new[1], pids[1])
        async with only(new, 0):
            self.assertEqual(await self.send(setup, 2), 200)
        metrics = (await setup.admin("GET", "/metrics", token=False)).body
        # The dead worker's count is still in the sum: counters never drop.
        self.assertEqual(
            counter(metrics, "sbg_requests_total", direction="inbound", decision="allow"), 2
        )

    async def test_sigterm_drains_every_worker_and_exits_0(self) -> None:
        setup, proc = await self.start()
        setup.upstream.delay = 1.0
        pids = worker_pids(proc)
        async with only(pids, 1):
            pending = setup.inbound(setup.signed("PUT", TXN, txn_body()))
            await wait_until(lambda: bool(setup.upstream.requests), 10, "the upstream request")
        sent = time.monotonic()
        proc.signal(signal.SIGTERM)
        resp = await pending
        self.assertEqual(resp.status, 200, resp.body)
        self.assertEqual(await proc.wait(), 0, proc.output() + proc.errors())
        self.assertGreater(time.monotonic() - sent, 0.5)
        for pid in pids.values():
            self.assertFalse(alive(pid), pid)
        self.assertNotIn("Traceback", proc.output() + proc.errors())
        # The workers' metric files are gone with them.
        self.assertFalse(os.path.exists(os.path.join(setup.material.directory, "state", "metrics")))

    async def test_supervisor_killed_workers_exit(self) -> None:
        _setup, proc = await self.start()
        pids = worker_pids(proc)
        proc.signal(signal.SIGKILL)
        await proc.wait()
        await wait_until(
            lambda: not any(alive(p) for p in pids.values()), 15, "the orphaned workers to exit"
        )

    async def test_sighup_while_workers_start(self) -> None:
        # The workers take a second to import: a SIGHUP in that window must
        # neither kill them (SIGHUP's default action) nor be lost.
        setup = make_setup(self, {"workers": WORKERS})
        proc = await run_gateway(self, setup)
        self.addCleanup(lambda: defer.ensureDeferred(self.stopped(proc)))
        self.assertLess(ready(proc), WORKERS, "workers ready too early for this test")
        setup.write({"workers": WORKERS, "external_homeservers[0].enabled": False})
        proc.signal(signal.SIGHUP)
        await wait_until(lambda: ready(proc) == WORKERS, 30, "the workers", proc)
        self.assertNotIn("exited", proc.output())

        async def refused(index: int) -> None:
            self.assertEqual(await self.send(setup, 300 + index), 403)

        await each_worker(proc, refused)
        self.assertEqual(setup.upstream.requests, [])


class WorkersKillSwitchFailsClosedTests(WorkersCase):
    """Nothing that happens to `state_dir` lifts a switch in any worker."""

    async def refused_everywhere(self, setup: Setup, proc: Process, tag: bytes) -> None:
        async def refused(index: int) -> None:
            resp = await setup.inbound(setup.signed("PUT", TXN + tag + b"%d" % index, txn_body()))
            self.assertEqual(resp.status, 403, resp.body)

        await each_worker(proc, refused)

    async def test_damaged_state_file_and_restarted_worker(self) -> None:
        setup, proc = await self.start()
        resp = await setup.admin("POST", "/_sbg/kill", {"server": PARTNER_SERVER, "reason": "t"})
        self.assertEqual(resp.status, 200, resp.body)
        path = os.path.join(setup.material.directory, "state", "killswitch.json")
        for n, damage in enumerate(("delete", "truncate", "corrupt")):
            if damage == "delete":
                os.remove(path)
            elif damage == "truncate":
                with open(path, "r+") as f:
                    f.truncate(0)
            else:
                with open(path, "w") as f:
                    f.write('{"engaged": ')
            await self.refused_everywhere(setup, proc, b"d%d-" % n)
            # The admin API tells the truth: still engaged.
            state = (await setup.admin("GET", "/_sbg/kill")).json()
            self.assertEqual(len(state["engaged"]), 2, state)
            # Within a second the supervisor notices and writes it again.
            await wait_until(
                lambda: _engaged_on_disk(path) == 2, 5, "the state file rewritten", proc
            )
        self.assertEqual(proc.output().count("deleted, damaged or replaced"), 3)
        metrics = (await setup.admin("GET", "/metrics", token=False)).body
        self.assertEqual(counter(metrics, "sbg_killswitch_state_errors_total", kind="file"), 3)
        # A worker started again follows the switch from its first request.
        pids = worker_pids(proc)
        os.kill(pids[0], signal.SIGKILL)
        await wait_until(lambda: ready(proc) == WORKERS + 1, 30, "a new worker 0", proc)
        await self.refused_everywhere(setup, proc, b"r")
        self.assertEqual(setup.upstream.requests, [])

    async def test_unwritable_state_dir_still_engages_every_worker(self) -> None:
        setup, proc = await self.start()
        state_dir = os.path.join(setup.material.directory, "state")
        os.rename(state_dir, state_dir + ".moved")
        with open(state_dir, "w") as f:
            f.write("not a directory")
        resp = await setup.admin("POST", "/_sbg/kill", {"direction": "inbound"})
        self.assertEqual(resp.status, 500, resp.body)
        self.assertIn("engaged but not persisted", resp.json()["error"])
        await self.refused_everywhere(setup, proc, b"u")
        self.assertIn("ERROR: kill switch: cannot write", proc.output())
        self.assertEqual(setup.upstream.requests, [])


def _engaged_on_disk(path: str) -> int:
    import json

    try:
        with open(path, encoding="utf-8") as f:
            return len(json.load(f)["engaged"])
    except (OSError, ValueError, KeyError):
        return -1
