"""One kill switch for several nodes, through a real Redis.

The nodes here live in the test's process (each a `KillSwitch` with its
`ClusterKillSwitch`, the real thread and redis client, a `state_dir` of its
own); tests/test_cluster_nodes.py runs the same scenarios with real gateway
processes. Every test is written from the fault's side: Redis stopped,
killed, emptied, holding garbage or cut off from one node must never lift a
switch a node holds, and once Redis answers every node converges.
"""

from __future__ import annotations

import json
import os

import redis
from twisted.internet import defer

from sbg.cluster.link import KILLSWITCH_KEY
from sbg.cluster.records import field_name
from sbg.killswitch.store import StateFile
from testbed.redisserver import RedisSentinel, RedisServer
from testbed.tcpproxy import TCPProxy
from tests.asynctest import TestCase
from tests.cluster_nodes import BOTH, PARTNER, Node, holds, start_redis, within

GLOBAL_OUT = (None, "outbound")
PARTNER_IN = (PARTNER, "inbound")
PARTNER_OUT = (PARTNER, "outbound")


def client(url: str, password: str | None = None) -> redis.Redis:
    return redis.Redis.from_url(url, password=password, socket_timeout=2)


def report(what: str, seconds: float) -> None:
    print(f"[cluster] {what}: {seconds * 1000:.0f} ms")


class PropagationTests(TestCase):
    async def test_engage_and_lift_reach_every_node_within_a_second(self) -> None:
        server = start_redis(self)
        a, b, c = (Node(self, server.url, n) for n in ("gw-a", "gw-b", "gw-c"))
        outcome = await a.engage()
        self.assertEqual(outcome.status, 200, outcome.body)
        self.assertEqual(outcome.body["cluster"], "connected")
        self.assertLessEqual(BOTH, a.engaged)  # here at once
        report("engage a -> b", await within(lambda: b.engaged >= BOTH, 1.0, "b engaged"))
        report("engage a -> c", await within(lambda: c.engaged >= BOTH, 1.0, "c engaged"))
        # Each node mirrors the cluster's switches into its own state_dir.
        for node in (b, c):
            self.assertLessEqual(BOTH, set(StateFile(node.state_dir).read()))
            entry = node.ks.entries[PARTNER_IN]
            self.assertEqual((entry.reason, entry.by), ("test", "127.0.0.1"))

        outcome = await c.lift()
        self.assertEqual(outcome.status, 200, outcome.body)
        self.assertFalse(BOTH & c.engaged)
        report("lift c -> a", await within(lambda: not BOTH & a.engaged, 1.0, "a lifted"))
        report("lift c -> b", await within(lambda: not BOTH & b.engaged, 1.0, "b lifted"))
        self.assertFalse(BOTH & set(StateFile(a.state_dir).read()))
        self.assertEqual(a.problems + b.problems + c.problems, [])

    async def test_nodes_announce_themselves(self) -> None:
        server = start_redis(self)
        a, b = Node(self, server.url, "gw-a"), Node(self, server.url, "gw-b")

        def names() -> set[str]:
            return {n["node"] for n in a.cluster.status()["nodes"]}

        # Each node reads the others' announcements every 5 s.
        await within(lambda: names() == {"gw-a", "gw-b"}, 6.0, "both nodes listed")
        status = b.cluster.status()
        self.assertEqual((status["node"], status["cluster"]), ("gw-b", "connected"))
        self.assertEqual(status["redis"], server.url)
        for node in a.cluster.status()["nodes"]:
            self.assertEqual(node["config_sha256"], "0" * 64)
            self.assertGreater(node["last_seen_ts"], 0)

    async def test_password_and_unix_socket(self) -> None:
        server = start_redis(self, password="s3cret", unix_socket=True)
        tcp_url = f"redis://{server.host}:{server.port}/0"
        a = Node(self, server.url, "gw-a", password="s3cret")  # unix:///...
        b = Node(self, tcp_url, "gw-b", password="s3cret")
        self.assertTrue(a.cluster.connected and b.cluster.connected)
        await a.engage(None, "inbound")
        await within(lambda: (None, "inbound") in b.engaged, 1.0, "b engaged")
        wrong = Node(self, tcp_url, "gw-c", password="wrong")
        self.assertFalse(wrong.cluster.connected)
        self.assertEqual(wrong.engaged, frozenset())
        outcome = await wrong.lift(None, "inbound")
        self.assertEqual(outcome.status, 503)
        self.assertIn((None, "inbound"), b.engaged)


class RedisDownTests(TestCase):
    async def down(self, server: object, *nodes: Node) -> None:
        await within(
            lambda: not any(n.cluster.connected for n in nodes), 3.0, "Redis seen unreachable"
        )

    async def test_lift_refused_while_redis_is_down(self) -> None:
        server = start_redis(self)
        a, b = Node(self, server.url, "gw-a"), Node(self, server.url, "gw-b")
        await a.engage()
        await within(lambda: b.engaged >= BOTH, 1.0, "b engaged")
        server.stop()
        await self.down(server, a, b)
        for node in (a, b):
            outcome = await node.lift()
            self.assertEqual(outcome.status, 503, outcome.body)
            self.assertEqual(outcome.body["errcode"], "M_UNKNOWN")
            self.assertEqual(outcome.body["cluster"], "unreachable")
        await holds(lambda: a.engaged >= BOTH and b.engaged >= BOTH, 1.5, "still engaged")
        self.assertLessEqual(BOTH, set(StateFile(b.state_dir).read()))
        # Back, and empty (no persistence): the nodes write their switches again.
        server.start()
        await within(lambda: a.cluster.connected and b.cluster.connected, 5.0, "reconnected")
        stored = client(server.url).hgetall(KILLSWITCH_KEY)
        await within(
            lambda: len(client(server.url).hgetall(KILLSWITCH_KEY)) == 2, 5.0, "records again"
        )
        del stored
        outcome = await b.lift()
        self.assertEqual(outcome.status, 200, outcome.body)
        await within(lambda: not BOTH & a.engaged, 1.0, "a lifted")

    async def test_engages_while_down_make_a_union_when_redis_is_back(self) -> None:
        server = start_redis(self)
        a, b = Node(self, server.url, "gw-a"), Node(self, server.url, "gw-b")
        await a.engage(PARTNER, "inbound")
        await within(lambda: PARTNER_IN in b.engaged, 1.0, "b engaged")
        server.stop()
        await self.down(server, a, b)
        first = await a.engage(None, "outbound")
        second = await b.engage(PARTNER, "outbound")
        for outcome in (first, second):
            self.assertEqual(outcome.status, 200, outcome.body)
            self.assertEqual(outcome.body["cluster"], "unreachable")
        self.assertIn(GLOBAL_OUT, a.engaged)  # at once, here
        self.assertNotIn(GLOBAL_OUT, b.engaged)  # b cannot know yet
        self.assertEqual(a.cluster.status()["pending"], [{"server": None, "direction": "outbound"}])
        server.start()
        union = {PARTNER_IN, GLOBAL_OUT, PARTNER_OUT}
        seconds = await within(
            lambda: union <= a.engaged and union <= b.engaged, 5.0, "the union everywhere"
        )
        report("converged on the union after Redis restarted", seconds)
        self.assertEqual(len(client(server.url).hgetall(KILLSWITCH_KEY)), 3)
        self.assertEqual(a.cluster.status()["pending"], [])

    async def test_an_engage_into_an_empty_cluster_goes_out_at_the_first_poll(self) -> None:
        # Nothing engaged before the outage: Redis comes back as empty as it
        # left, and the pending engage still goes out at once (not at the
        # next full read, 5 s later).
        server = start_redis(self)
        a, b = Node(self, server.url, "gw-a"), Node(self, server.url, "gw-b")
        server.stop()
        await self.down(server, a, b)
        await a.engage(None, "inbound")
        server.start()
        seconds = await within(lambda: (None, "inbound") in b.engaged, 2.0, "b engaged")
        report("Redis back, an engage made meanwhile reaches the other node", seconds)

    async def test_redis_killed_during_changes(self) -> None:
        server = start_redis(self)
        a, b = Node(self, server.url, "gw-a"), Node(self, server.url, "gw-b")
        await a.engage(PARTNER, "both")
        await within(lambda: b.engaged >= BOTH, 1.0, "b engaged")
        changes = [
            defer.ensureDeferred(b.lift(PARTNER, "inbound")),
            defer.ensureDeferred(a.engage(None, "inbound")),
            defer.ensureDeferred(b.engage(None, "outbound")),
            defer.ensureDeferred(a.lift(PARTNER, "outbound")),
        ]
        server.kill()
        outcomes = await defer.gatherResults(changes)
        lift_in, _, _, lift_out = outcomes
        # Engages hold at once on the node that took them, whatever Redis did.
        self.assertIn((None, "inbound"), a.engaged)
        self.assertIn((None, "outbound"), b.engaged)
        # A lift is in force only where it was confirmed: refused ones changed nothing.
        if lift_in.status != 200:
            self.assertIn(PARTNER_IN, b.engaged)
            self.assertIn(PARTNER_IN, a.engaged)
        if lift_out.status != 200:
            self.assertIn(PARTNER_OUT, a.engaged)
        server.start()
        seconds = await within(
            lambda: a.cluster.connected and b.cluster.connected and a.engaged == b.engaged,
            5.0,
            "the nodes agree",
        )
        report("converged after SIGKILL of Redis", seconds)
        await holds(lambda: a.engaged == b.engaged, 1.0, "still agreeing")
        self.assertLessEqual({(None, "inbound"), (None, "outbound")}, a.engaged)
        for outcome, switch in ((lift_in, PARTNER_IN), (lift_out, PARTNER_OUT)):
            if outcome.status != 200:
                self.assertIn(switch, a.engaged, outcome.body)


class PartitionTests(TestCase):
    async def test_a_partitioned_node_never_lifts_and_converges_when_healed(self) -> None:
        server = start_redis(self)
        proxy = TCPProxy(("127.0.0.1", 0), [(server.host, server.port)]).start()
        self.addCleanup(proxy.stop)
        a = Node(self, f"redis://127.0.0.1:{proxy.address[1]}/0", "gw-a")
        b = Node(self, server.url, "gw-b")
        await b.engage(PARTNER, "inbound")
        await within(lambda: PARTNER_IN in a.engaged, 1.0, "a engaged")
        proxy.cut()
        await within(lambda: not a.cluster.connected, 3.0, "a sees Redis unreachable")
        self.assertTrue(b.cluster.connected)
        engaged_meanwhile = await a.engage(None, "outbound")
        self.assertEqual(engaged_meanwhile.body["cluster"], "unreachable")
        refused = await a.lift(PARTNER, "inbound")
        self.assertEqual(refused.status, 503)
        lifted_elsewhere = await b.lift(PARTNER, "inbound")
        self.assertEqual(lifted_elsewhere.status, 200)
        # Cut off, a keeps what it holds.
        await holds(lambda: PARTNER_IN in a.engaged, 2.0, "a keeps the switch")
        self.assertNotIn(GLOBAL_OUT, b.engaged)
        proxy.heal()
        seconds = await within(
            lambda: (
                GLOBAL_OUT in b.engaged and GLOBAL_OUT in a.engaged and PARTNER_IN not in a.engaged
            ),
            5.0,
            "converged: engaged meanwhile, minus lifted through Redis",
        )
        report("partition healed, converged", seconds)
        self.assertEqual(a.engaged, b.engaged)

    async def test_an_engage_made_while_cut_off_outlasts_a_lift_made_meanwhile(self) -> None:
        server = start_redis(self)
        proxy = TCPProxy(("127.0.0.1", 0), [(server.host, server.port)]).start()
        self.addCleanup(proxy.stop)
        a = Node(self, f"redis://127.0.0.1:{proxy.address[1]}/0", "gw-a")
        b = Node(self, server.url, "gw-b")
        proxy.cut()
        await within(lambda: not a.cluster.connected, 3.0, "a cut off")
        await a.engage(PARTNER, "outbound")
        # b lifts the same switch (not knowing of a's engage): the engage wins.
        self.assertEqual((await b.lift(PARTNER, "outbound")).status, 200)
        proxy.heal()
        await within(lambda: PARTNER_OUT in b.engaged, 5.0, "a's engage reaches b")
        await holds(lambda: PARTNER_OUT in a.engaged and PARTNER_OUT in b.engaged, 1.0, "held")


class RedisContentTests(TestCase):
    """What Redis holds is shared, but only an explicit, newer lift lifts."""

    async def test_flushed_redis_never_lifts(self) -> None:
        server = start_redis(self)
        a, b = Node(self, server.url, "gw-a"), Node(self, server.url, "gw-b")
        await a.engage()
        await within(lambda: b.engaged >= BOTH, 1.0, "b engaged")
        client(server.url).flushall()
        await holds(lambda: a.engaged >= BOTH and b.engaged >= BOTH, 1.0, "engaged")
        await within(
            lambda: len(client(server.url).hgetall(KILLSWITCH_KEY)) == 2, 5.0, "written again"
        )
        self.assertEqual((await b.lift()).status, 200)
        await within(lambda: not BOTH & a.engaged, 1.0, "a lifted")

    async def test_records_that_do_not_parse_are_ignored_and_repaired(self) -> None:
        server = start_redis(self)
        a, b = Node(self, server.url, "gw-a"), Node(self, server.url, "gw-b")
        await a.engage()
        await within(lambda: b.engaged >= BOTH, 1.0, "b engaged")
        c = client(server.url)
        lifted = json.dumps({"state": "lifted", "version": 10**9})
        c.hset(KILLSWITCH_KEY, field_name(PARTNER_IN), "not json")
        c.hset(KILLSWITCH_KEY, field_name(PARTNER_OUT), lifted)  # not a whole record
        c.hset(KILLSWITCH_KEY, "garbage", "{}")
        await holds(lambda: a.engaged >= BOTH and b.engaged >= BOTH, 1.5, "engaged")
        self.assertIn("cluster", a.problems)
        for switch in BOTH:
            raw = c.hget(KILLSWITCH_KEY, field_name(switch))
            assert raw is not None
            self.assertEqual(json.loads(raw)["state"], "engaged")

    async def test_only_a_newer_lift_lifts(self) -> None:
        server = start_redis(self)
        a = Node(self, server.url, "gw-a")
        await a.engage(PARTNER, "inbound")
        c = client(server.url)
        current = json.loads(c.hget(KILLSWITCH_KEY, field_name(PARTNER_IN)) or b"{}")
        older = {**current, "state": "lifted", "version": current["version"] - 1}
        c.hset(KILLSWITCH_KEY, field_name(PARTNER_IN), json.dumps(older))
        same = {**current, "state": "lifted"}  # a tie never resolves into a lift
        await holds(lambda: PARTNER_IN in a.engaged, 1.0, "an older lift is ignored")
        c.hset(KILLSWITCH_KEY, field_name(PARTNER_IN), json.dumps(same))
        await holds(lambda: PARTNER_IN in a.engaged, 1.0, "a lift at the same version too")
        newer = {**current, "state": "lifted", "version": current["version"] + 1}
        c.hset(KILLSWITCH_KEY, field_name(PARTNER_IN), json.dumps(newer))
        await within(lambda: PARTNER_IN not in a.engaged, 1.0, "a newer lift applies")


class RestartTests(TestCase):
    async def test_node_restarted_while_redis_is_down_keeps_its_switches(self) -> None:
        server = start_redis(self)
        a = Node(self, server.url, "gw-a")
        await a.engage()
        server.stop()
        again = a.restart()
        self.assertFalse(again.cluster.connected)
        self.assertLessEqual(BOTH, again.engaged)
        self.assertEqual((await again.lift()).status, 503)
        self.assertLessEqual(BOTH, again.engaged)

    async def test_node_started_after_a_lift_through_redis_applies_it(self) -> None:
        server = start_redis(self)
        a, b = Node(self, server.url, "gw-a"), Node(self, server.url, "gw-b")
        await a.engage()
        await within(lambda: b.engaged >= BOTH, 1.0, "b engaged")
        a.cluster.stop()  # a is down
        self.assertEqual((await b.lift()).status, 200)
        again = a.restart()
        # The lift is newer than what a's ledger knows: applied before serving.
        self.assertFalse(BOTH & again.engaged)

    async def test_node_started_misses_nothing_engaged_while_it_was_down(self) -> None:
        server = start_redis(self)
        a, b = Node(self, server.url, "gw-a"), Node(self, server.url, "gw-b")
        a.cluster.stop()
        await b.engage(None, "inbound")
        again = a.restart()
        self.assertIn((None, "inbound"), again.engaged)  # before it serves

    async def test_a_damaged_ledger_can_only_reengage(self) -> None:
        server = start_redis(self)
        a, b = Node(self, server.url, "gw-a"), Node(self, server.url, "gw-b")
        await a.engage()
        await within(lambda: b.engaged >= BOTH, 1.0, "b engaged")
        a.cluster.stop()
        with open(os.path.join(a.state_dir, "cluster.json"), "w") as f:
            f.write("{damaged")
        self.assertEqual((await b.lift()).status, 200)
        again = a.restart()
        self.assertIn("persist", again.problems)
        await within(lambda: b.engaged >= BOTH, 5.0, "re-engaged (fail closed)")
        self.assertLessEqual(BOTH, again.engaged)


class ConcurrencyTests(TestCase):
    async def test_interleaved_changes_end_in_agreement(self) -> None:
        server = start_redis(self)
        a, b = Node(self, server.url, "gw-a"), Node(self, server.url, "gw-b")
        changes = []
        for n in range(20):
            node = a if n % 2 else b
            direction = "inbound" if n % 3 else "outbound"
            if n % 4 == 3:
                changes.append(defer.ensureDeferred(node.lift(PARTNER, direction)))
            else:
                changes.append(defer.ensureDeferred(node.engage(PARTNER, direction)))
        outcomes = await defer.gatherResults(changes)
        self.assertEqual({o.status for o in outcomes}, {200})
        await within(lambda: a.engaged == b.engaged, 2.0, "agreement")
        stored = {
            json.loads(v)["direction"]
            for v in client(server.url).hgetall(KILLSWITCH_KEY).values()
            if json.loads(v)["state"] == "engaged"
        }
        self.assertEqual({d for _, d in a.engaged}, stored)


class SentinelTests(TestCase):
    async def test_failover_keeps_every_switch_and_the_cluster_goes_on(self) -> None:
        primary = start_redis(self, password="pw")
        replica = RedisServer(
            os.path.abspath(self.mktemp()), password="pw", replica_of=(primary.host, primary.port)
        )
        replica.start()
        self.addCleanup(replica.stop)
        replicated = client(replica.url, "pw")
        await within(
            lambda: replicated.info("replication").get("master_link_status") == "up",
            10.0,
            "the replica in sync",
        )
        sentinel = RedisSentinel(
            os.path.abspath(self.mktemp()), (primary.host, primary.port), password="pw"
        )
        sentinel.start()
        self.addCleanup(sentinel.stop)
        await within(lambda: sentinel.replicas() == 1, 15.0, "the sentinel knows the replica")
        a = Node(self, sentinel.url(), "gw-a", password="pw")
        b = Node(self, sentinel.url(), "gw-b", password="pw")
        self.assertTrue(a.cluster.connected and b.cluster.connected)
        await a.engage()
        await within(lambda: b.engaged >= BOTH, 1.0, "b engaged")
        await within(lambda: len(replicated.hgetall(KILLSWITCH_KEY)) == 2, 5.0, "replicated")
        primary.kill()
        failed_over = await within(
            lambda: sentinel.primary() == (replica.host, replica.port), 20.0, "failover"
        )
        report("Sentinel failover", failed_over)
        self.assertLessEqual(BOTH, a.engaged & b.engaged)  # nothing lifted meanwhile
        await within(
            lambda: a.cluster.connected and b.cluster.connected, 5.0, "both on the new primary"
        )
        self.assertEqual((await b.lift()).status, 200)
        await within(lambda: not BOTH & a.engaged, 1.0, "a lifted through the new primary")
