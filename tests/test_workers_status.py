"""With `workers: N`: `/health`, `GET /_sbg/status` and `process_*` see every worker.

Real `twistd -n sbg` processes. A request is sent to one chosen worker
(the others stopped with SIGSTOP) and the supervisor's status must show
it; a worker killed once leaves `/health` ok, one that cannot start again
makes it 503 `degraded` until it can.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

from signedjson.key import generate_signing_key
from twisted.internet import threads

from sbg.matrix.xmatrix import sign_request
from testbed.configtools import (
    INTERNAL_HOST,
    INTERNAL_SERVER,
    PARTNER_HOST,
    PARTNER_SERVER,
    make_material,
)
from tests.inbound_requests import TXN, txn_body
from tests.keyserver import KeyServer, key_id, start_key_server
from tests.processes import (
    ROOT,
    WORKERS,
    Process,
    Setup,
    ready,
    sleep,
    wait_until,
    worker_pids,
)
from tests.rawhttp import build_request
from tests.workers import WorkersCase, counter, only


def now_ms() -> int:
    return int(time.time() * 1000)


def sbg_status(setup: Setup) -> dict[str, Any]:
    """`sbg status --json` as an operator runs it: a separate process."""
    out = subprocess.run(
        [sys.executable, "-m", "sbg.cli", "status", "-c", setup.path, "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ, PYTHONPATH=ROOT),
        check=False,
    )
    assert out.returncode == 0, out.stderr
    body: dict[str, Any] = json.loads(out.stdout)
    return body


def partner(body: dict[str, Any]) -> dict[str, Any]:
    (entry,) = [s for s in body["external_servers"] if s["server_name"] == PARTNER_SERVER]
    return entry


def samples(metrics: bytes, name: str) -> dict[str, float]:
    """worker label -> value of `name`."""
    out: dict[str, float] = {}
    for line in metrics.decode().splitlines():
        if line.startswith(name + "{"):
            head, value = line.rsplit(" ", 1)
            worker = head.split('worker="', 1)[1].split('"', 1)[0]
            out[worker] = float(value)
    return out


class WorkersStatusTests(WorkersCase):
    async def test_each_workers_requests_reach_the_status(self) -> None:
        setup, proc = await self.start()
        pids = worker_pids(proc)
        body = await threads.deferToThread(sbg_status, setup)
        self.assertEqual(body["workers"], {"alive": WORKERS, "configured": WORKERS})
        self.assertIsNone(partner(body)["inbound"]["last_allowed_ts"])
        # Worker 0 allows one request, worker 1 refuses one.
        t0 = now_ms()
        async with only(pids, 0):
            self.assertEqual(await self.send(setup, 1), 200)
        t1 = now_ms()
        # Signed by a key with the partner's key id that is not the partner's.
        version = setup.material.partner_key_id.split(":")[1]
        forged = _signed_by(generate_signing_key(version))
        async with only(pids, 1):
            resp = await setup.inbound(forged)
            self.assertEqual(resp.status, 401, resp.body)
        t2 = now_ms()
        # Each worker writes its times once a second.
        await sleep(1.2)
        body = await threads.deferToThread(sbg_status, setup)
        p = partner(body)
        self.assertTrue(t0 <= p["inbound"]["last_allowed_ts"] <= t1, (t0, p, t1))
        self.assertTrue(t1 <= p["inbound"]["last_refused_ts"] <= t2, (t1, p, t2))
        self.assertEqual(body["config"]["sha256"], _sha256(setup.path))
        # A worker that dies takes nothing away: the times stay.
        os.kill(pids[0], signal.SIGKILL)
        await wait_until(lambda: ready(proc) == WORKERS + 1, 30, "a new worker 0", proc)
        body = await threads.deferToThread(sbg_status, setup)
        self.assertEqual(partner(body)["inbound"], p["inbound"])

    async def test_fetched_keys_of_live_workers(self) -> None:
        k1 = generate_signing_key("k1")
        keys = KeyServer(PARTNER_SERVER, [k1])
        setup, proc = await self._start_fetching(keys)
        pids = worker_pids(proc)
        self.assertEqual(
            partner(await threads.deferToThread(sbg_status, setup))["fetched_keys"], []
        )
        async with only(pids, 1):
            resp = await setup.inbound(_signed_by(k1))
            self.assertEqual(resp.status, 200, resp.body)
        self.assertEqual(keys.hits, 1)
        fetched = partner(await threads.deferToThread(sbg_status, setup))["fetched_keys"]
        self.assertEqual(fetched, [{"key_id": key_id(k1), "valid_until_ts": keys.valid_until_ms}])
        # Worker 1's cache dies with it (worker 0 never fetched).
        os.kill(pids[1], signal.SIGKILL)
        await wait_until(lambda: ready(proc) == WORKERS + 1, 30, "a new worker 1", proc)
        fetched = partner(await threads.deferToThread(sbg_status, setup))["fetched_keys"]
        self.assertEqual(fetched, [])

    async def _start_fetching(self, keys: KeyServer) -> tuple[Setup, Process]:
        material = make_material(os.path.join(self.mktemp(), "keys"))
        port = start_key_server(self, keys, material.partner_tls)
        return await self.start(
            **{
                "external_homeservers[0].key_fetch": "fetch",
                "external_homeservers[0].tls_ca": material.partner_ca.certificate,
                "external_homeservers[0].addresses": {f"{PARTNER_HOST}:8448": f"127.0.0.1:{port}"},
            }
        )


class WorkersHealthTests(WorkersCase):
    async def test_health_counts_the_workers(self) -> None:
        setup, _proc = await self.start()
        resp = await setup.admin("GET", "/health", token=False)
        self.assertEqual(resp.status, 200)
        self.assertEqual(
            resp.json(), {"status": "ok", "workers": {"alive": WORKERS, "configured": WORKERS}}
        )

    async def test_one_restart_stays_ok(self) -> None:
        setup, proc = await self.start()
        pids = worker_pids(proc)
        os.kill(pids[0], signal.SIGKILL)
        seen: list[tuple[int, int]] = []
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            resp = await setup.admin("GET", "/health", token=False)
            seen.append((resp.status, resp.json()["workers"]["alive"]))
            await sleep(0.2)
        self.assertEqual({status for status, _ in seen}, {200}, seen)
        # It was seen one short, then whole again.
        self.assertIn(WORKERS - 1, [alive for _, alive in seen])
        self.assertEqual(seen[-1], (200, WORKERS))

    async def test_worker_that_cannot_start_makes_it_degraded(self) -> None:
        setup, proc = await self.start()
        pids = worker_pids(proc)
        await sleep(2.5)  # both workers count as serving (STABLE_AFTER)
        with open(setup.path, encoding="utf-8") as f:
            good = f.read()
        # The file on disk no longer loads (nobody reloads it): a worker
        # started now exits at once, again and again.
        with open(setup.path, "a", encoding="utf-8") as f:
            f.write("no_such_key: 1\n")
        os.kill(pids[1], signal.SIGKILL)
        started = time.monotonic()

        async def degraded() -> bool:
            resp = await setup.admin("GET", "/health", token=False)
            return bool(resp.status == 503)

        while not await degraded():
            self.assertLess(time.monotonic() - started, 15, "never degraded")
            await sleep(0.2)
        self.assertGreater(time.monotonic() - started, 4.5)
        resp = await setup.admin("GET", "/health", token=False)
        self.assertEqual(resp.json()["status"], "degraded")
        self.assertEqual(resp.json()["workers"]["configured"], WORKERS)
        self.assertLess(resp.json()["workers"]["alive"], WORKERS + 1)
        # Serving still works (worker 0) while degraded.
        self.assertEqual(await self.send(setup, 7), 200)
        # Fixed: the next start succeeds and health comes back.
        with open(setup.path, "w", encoding="utf-8") as f:
            f.write(good)
        await wait_until(lambda: ready(proc) == WORKERS + 1, 30, "worker 1 back", proc)
        deadline = time.monotonic() + 10
        while await degraded():
            self.assertLess(time.monotonic(), deadline, "still degraded")
            await sleep(0.2)
        resp = await setup.admin("GET", "/health", token=False)
        self.assertEqual(resp.json(), {"status": "ok", "workers": {"alive": 2, "configured": 2}})


class WorkersProcessMetricsTests(WorkersCase):
    async def test_every_process_has_its_process_metrics(self) -> None:
        setup, proc = await self.start()
        pids = worker_pids(proc)
        metrics = (await setup.admin("GET", "/metrics", token=False)).body
        for name in (
            "process_resident_memory_bytes",
            "process_cpu_seconds_total",
            "process_open_fds",
            "process_start_time_seconds",
        ):
            values = samples(metrics, name)
            self.assertEqual(set(values), {"supervisor", "0", "1"}, name)
            if name != "process_cpu_seconds_total":
                self.assertTrue(all(v > 0 for v in values.values()), (name, values))
        # The workers' own numbers, not the supervisor's read three times.
        rss = samples(metrics, "process_resident_memory_bytes")
        with open(f"/proc/{pids[0]}/statm", encoding="ascii") as f:
            worker_rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        self.assertLess(abs(rss["0"] - worker_rss), 16 * 1024 * 1024)
        start = samples(metrics, "process_start_time_seconds")
        self.assertLessEqual(start["supervisor"], start["0"])
        # A restarted worker is a new process.
        os.kill(pids[0], signal.SIGKILL)
        await wait_until(lambda: ready(proc) == WORKERS + 1, 30, "a new worker 0", proc)
        metrics = (await setup.admin("GET", "/metrics", token=False)).body
        self.assertGreater(samples(metrics, "process_start_time_seconds")["0"], start["0"])
        # The request counts are still summed across the workers.
        self.assertEqual(counter(metrics, "sbg_requests_total"), 0)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _signed_by(signing_key: Any) -> bytes:
    body = txn_body()
    auth = sign_request(signing_key, "PUT", TXN, PARTNER_SERVER, INTERNAL_SERVER, body)
    headers = [
        (b"Host", INTERNAL_HOST.encode()),
        (b"Authorization", auth),
        (b"Content-Type", b"application/json"),
    ]
    return build_request(b"PUT", TXN, headers, json.dumps(body).encode())
