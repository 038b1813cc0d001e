"""Several gateway nodes, real processes: one kill switch across them.

Every node is a real `twistd -n sbg` supervisor with `workers: 2`, its own
listeners and state_dir, all sharing one real `redis-server` on loopback.
What is checked is what the border does: a partner's signed transaction
(inbound) and an internal homeserver's CONNECT to the partner (outbound),
through every worker of every node. The propagation and convergence times
measured are printed.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess

from twisted.internet import defer

from testbed.configtools import PARTNER_SERVER
from testbed.tcpproxy import TCPProxy
from tests.asynctest import TestCase
from tests.cluster_gateways import (
    Gateway,
    connect_status,
    inbound_status,
    seconds_until,
    start_gateways,
)
from tests.cluster_nodes import Node, start_redis
from tests.processes import ROOT, TWISTD, make_setup, sleep, wait_until

KILL = {"server": PARTNER_SERVER, "direction": "both"}
OPEN, CLOSED = (200, 200), (403, 403)


def report(what: str, seconds: float) -> None:
    print(f"[cluster] {what}: {seconds * 1000:.0f} ms")


class ClusterCase(TestCase):
    timeout = 180

    async def refused_by_every_worker(self, *gateways: Gateway) -> None:
        for gw in gateways:
            await gw.every_worker(gw.both, CLOSED)

    async def unreachable(self, *gateways: Gateway) -> None:
        for gw in gateways:
            await seconds_until(
                lambda gw=gw: gw.health(),
                {"status": "ok", "cluster": "unreachable"},
                3.0,
                f"{gw.name} sees Redis unreachable",
            )


class TwoNodesTests(ClusterCase):
    async def test_kill_on_one_node_holds_on_the_other_within_a_second(self) -> None:
        redis = start_redis(self)
        a, b = await start_gateways(self, [redis.url, redis.url])
        self.assertEqual(await b.both(), OPEN)
        resp = await a.admin("POST", "/_sbg/kill", {**KILL, "reason": "drill"})
        self.assertEqual(resp.status, 200, resp.body)
        self.assertEqual(resp.json()["cluster"], "connected")
        report("kill on gw-a, refused on gw-b", await seconds_until(b.both, CLOSED, 1.0, "b"))
        await self.refused_by_every_worker(a, b)
        entry = (await b.admin("GET", "/_sbg/kill")).json()["engaged"][0]
        self.assertEqual((entry["reason"], entry["by"]), ("drill", "127.0.0.1"))

        lifted = await b.cli("unkill", "--server", PARTNER_SERVER)
        self.assertEqual(lifted.returncode, 0, lifted.stderr)
        report("sbg unkill on gw-b, open on gw-a", await seconds_until(a.both, OPEN, 1.0, "a"))
        await a.every_worker(a.both, OPEN)
        await b.every_worker(b.both, OPEN)

        for gw in (a, b):
            self.assertEqual(await gw.health(), {"status": "ok", "cluster": "connected"})
            metrics = (await gw.setup.admin("GET", "/metrics", token=False)).body
            self.assertIn(b"sbg_cluster_connected 1.0", metrics)

        async def listed() -> list[str]:
            return sorted(
                n["node"] for n in (await a.admin("GET", "/_sbg/cluster")).json()["nodes"]
            )

        await seconds_until(listed, ["gw-a", "gw-b"], 6.0, "both nodes listed")  # read every 5 s
        status = (await a.admin("GET", "/_sbg/cluster")).json()
        digests = {n["node"]: n["config_sha256"] for n in status["nodes"]}
        for gw in (a, b):
            with open(gw.setup.path, "rb") as f:
                self.assertEqual(digests[gw.name], hashlib.sha256(f.read()).hexdigest())
        self.assertEqual((await a.setup.admin("GET", "/_sbg/cluster", token=False)).status, 401)

    async def test_redis_stopped_engage_reaches_the_other_node_when_it_is_back(self) -> None:
        redis = start_redis(self)
        a, b = await start_gateways(self, [redis.url, redis.url])
        redis.stop()
        await self.unreachable(a, b)
        metrics = (await a.setup.admin("GET", "/metrics", token=False)).body
        self.assertIn(b"sbg_cluster_connected 0.0", metrics)
        resp = await a.admin("POST", "/_sbg/kill", KILL)
        self.assertEqual(resp.status, 200, resp.body)
        self.assertEqual(resp.json()["cluster"], "unreachable")
        await self.refused_by_every_worker(a)  # at once, here
        self.assertEqual(await b.both(), OPEN)  # b cannot know yet
        redis.start()
        report("Redis back, gw-a's engage on gw-b", await seconds_until(b.both, CLOSED, 5.0, "b"))
        await self.refused_by_every_worker(a, b)

    async def test_lift_refused_and_nothing_opens_while_redis_is_stopped(self) -> None:
        redis = start_redis(self)
        a, b = await start_gateways(self, [redis.url, redis.url])
        self.assertEqual((await a.admin("POST", "/_sbg/kill", KILL)).status, 200)
        await seconds_until(b.both, CLOSED, 1.0, "b")
        redis.stop()
        await self.unreachable(a, b)
        for gw in (a, b):
            resp = await gw.admin("POST", "/_sbg/unkill", KILL)
            self.assertEqual(resp.status, 503, resp.body)
            self.assertEqual(resp.json()["errcode"], "M_UNKNOWN")
            self.assertEqual(resp.json()["cluster"], "unreachable")
            refused = await gw.cli("unkill", "--server", PARTNER_SERVER)
            self.assertEqual(refused.returncode, 1)
            self.assertIn("503", refused.stderr)
        await sleep(1.0)
        await self.refused_by_every_worker(a, b)

    async def test_node_restarted_while_redis_is_stopped_keeps_its_switches(self) -> None:
        redis = start_redis(self)
        a, b = await start_gateways(self, [redis.url, redis.url])
        self.assertEqual((await a.admin("POST", "/_sbg/kill", KILL)).status, 200)
        await seconds_until(b.both, CLOSED, 1.0, "b")
        redis.stop()
        await b.restart()
        self.assertIn("did not answer at start", b.proc.output())
        self.assertEqual(await b.health(), {"status": "ok", "cluster": "unreachable"})
        await self.refused_by_every_worker(b)
        self.assertEqual(
            await b.engaged(), {(PARTNER_SERVER, "inbound"), (PARTNER_SERVER, "outbound")}
        )

    async def test_redis_killed_mid_operation(self) -> None:
        redis = start_redis(self)
        a, b = await start_gateways(self, [redis.url, redis.url])
        self.assertEqual((await a.admin("POST", "/_sbg/kill", KILL)).status, 200)
        await seconds_until(b.both, CLOSED, 1.0, "b")
        changes = [
            defer.ensureDeferred(b.admin("POST", "/_sbg/unkill", KILL)),
            defer.ensureDeferred(a.admin("POST", "/_sbg/kill", {"direction": "inbound"})),
        ]
        redis.kill()  # SIGKILL, nothing saved: Redis comes back empty
        lift, engage = await defer.gatherResults(changes)
        self.assertEqual(engage.status, 200, engage.body)
        self.assertEqual(await a.inbound(), 403)  # the global inbound switch, at once
        if lift.status != 200:
            self.assertEqual(lift.status, 503, lift.body)
            await self.refused_by_every_worker(a, b)
        redis.start()

        async def agree() -> bool:
            return await a.engaged() == await b.engaged()

        report(
            "Redis SIGKILLed and back, nodes agree",
            await seconds_until(agree, True, 5.0, "agreement"),
        )
        engaged = await a.engaged()
        self.assertIn((None, "inbound"), engaged)
        if lift.status != 200:
            self.assertLessEqual(
                {(PARTNER_SERVER, "inbound"), (PARTNER_SERVER, "outbound")}, engaged
            )
        for gw in (a, b):
            await gw.every_worker(gw.inbound, 403)

    async def test_a_node_cut_off_from_redis_never_lifts(self) -> None:
        redis = start_redis(self)
        proxy = TCPProxy(("127.0.0.1", 0), [(redis.host, redis.port)]).start()
        self.addCleanup(proxy.stop)
        a, b = await start_gateways(self, [f"redis://127.0.0.1:{proxy.address[1]}/0", redis.url])
        self.assertEqual((await b.admin("POST", "/_sbg/kill", KILL)).status, 200)
        await seconds_until(a.both, CLOSED, 1.0, "a")
        proxy.cut()
        await self.unreachable(a)
        self.assertEqual((await b.health())["cluster"], "connected")
        self.assertEqual((await b.admin("POST", "/_sbg/unkill", KILL)).status, 200)
        self.assertEqual(await b.both(), OPEN)
        global_in = await a.admin("POST", "/_sbg/kill", {"direction": "inbound"})
        self.assertEqual(global_in.json()["cluster"], "unreachable")
        await sleep(1.5)
        await self.refused_by_every_worker(a)  # cut off, a lifts nothing
        proxy.heal()

        async def converged() -> tuple[tuple[int, int], tuple[int, int]]:
            return await a.both(), await b.both()

        seconds = await seconds_until(converged, ((403, 200), (403, 200)), 5.0, "converged")
        report("partition healed: engaged meanwhile minus lifted through Redis", seconds)


class ThreeNodesTests(ClusterCase):
    async def test_three_nodes_one_switch(self) -> None:
        redis = start_redis(self)
        a, b, c = await start_gateways(self, [redis.url] * 3)
        done = await c.cli("kill", "--server", PARTNER_SERVER, "--direction", "inbound")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("partner.example inbound", done.stdout)
        for gw in (a, b):
            seconds = await seconds_until(gw.both, (403, 200), 1.0, gw.name)
            report(f"sbg kill on gw-c, inbound refused on {gw.name}", seconds)
        for gw in (a, b, c):
            await gw.every_worker(gw.both, (403, 200))
        resp = await a.admin("POST", "/_sbg/unkill", {"server": PARTNER_SERVER})
        self.assertEqual(resp.status, 200, resp.body)
        for gw in (b, c):
            report(
                f"unkill on gw-a, open on {gw.name}",
                await seconds_until(gw.both, OPEN, 1.0, gw.name),
            )

        async def listed() -> list[str]:
            return sorted(
                n["node"] for n in (await b.admin("GET", "/_sbg/cluster")).json()["nodes"]
            )

        await seconds_until(listed, ["gw-a", "gw-b", "gw-c"], 6.0, "every node listed")
        status = (await b.admin("GET", "/_sbg/cluster")).json()
        self.assertEqual({n["workers"] for n in status["nodes"]}, {2})


class DaemonTests(ClusterCase):
    async def test_a_daemonised_node_follows_the_cluster(self) -> None:
        # twistd without -n forks before it starts the service: the thread
        # that talks to Redis must be started in the process that serves.
        redis = start_redis(self)
        setup = make_setup(self, {"cluster": {"redis": redis.url, "node_name": "gw-d"}})
        pidfile = os.path.join(setup.directory, "twistd.pid")
        logfile = os.path.join(setup.directory, "twistd.log")
        argv = [TWISTD, "--pidfile", pidfile, "--logfile", logfile, "sbg", "-c", setup.path]
        env = dict(os.environ, PYTHONPATH=ROOT)
        done = subprocess.run(argv, cwd=setup.directory, env=env, capture_output=True, timeout=30)
        self.assertEqual(done.returncode, 0, done.stderr)
        await wait_until(lambda: os.path.exists(pidfile), 10, "the pid file")
        with open(pidfile) as f:
            pid = int(f.read())
        self.addCleanup(_kill, pid)

        async def health() -> object:
            try:
                return (await setup.admin("GET", "/health", token=False)).json()
            except OSError:
                return None

        await seconds_until(health, {"status": "ok", "cluster": "connected"}, 15.0, "healthy")

        async def both() -> tuple[int, int]:
            return await inbound_status(setup), await connect_status(setup)

        self.assertEqual(await both(), OPEN)
        other = Node(self, redis.url, "gw-e")
        await other.engage()
        seconds = await seconds_until(both, CLOSED, 1.0, "the daemon refuses")
        report("engaged on another node, refused by a daemonised one", seconds)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
