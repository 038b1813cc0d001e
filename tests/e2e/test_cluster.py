"""Two gateway nodes of one cluster behind a TCP load balancer, with real
Synapse homeservers on both sides (testbed.e2e.gateways).

A partner killed through one node (`sbg kill` against gw-a) is refused in
both directions by the other (gw-b, left alone once gw-a stops), which
learnt of the switch through Redis only; lifted through gw-b, the queued
messages cross again; gw-a started again has the lift.
"""

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

from twisted.trial.unittest import TestCase

from testbed.e2e.border import describe, invite_and_join, send_concurrently, wait_deliveries
from testbed.e2e.gateways import Gateways, engaged, records_of
from testbed.e2e.harness import HS_EXT, HS_INT, Cluster, require_synapse
from testbed.redisserver import RedisServer

KILL_REASON = "kill switch"


class TwoGatewayNodesTests(TestCase):
    timeout = 300

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        print(f"[e2e] cluster: {name} ...")
        try:
            yield
        except Exception as e:
            logs = self.cluster.describe_logs() + "\n" + self.gateways.describe_logs()
            raise AssertionError(f"cluster step {name!r} failed: {e}\n{logs}") from e
        print(f"[e2e] cluster: {name}: ok in {time.monotonic() - started:.1f}s")

    def start(self) -> None:
        require_synapse()
        run_dir = os.path.abspath(self.mktemp())
        redis = RedisServer(os.path.join(run_dir, "redis"))
        redis.start()
        self.addCleanup(redis.stop)
        self.cluster = Cluster(run_dir, behind_sbg=True, homeservers=(HS_INT, HS_EXT))
        self.addCleanup(self.cluster.stop)
        self.gateways = Gateways(self.cluster, redis.url)
        self.addCleanup(self.gateways.stop)
        self.gateways.start()
        self.cluster.start()

    def test_kill_through_one_node_refused_by_the_other_both_ways(self) -> None:
        self.start()
        a, b = self.gateways.nodes
        hs_int, hs_ext = self.cluster[HS_INT.key], self.cluster[HS_EXT.key]
        ext = hs_ext.server_name
        alice, bob = hs_int.register("alice"), hs_ext.register("bob")

        with self.step("federation through the load balancer and both nodes"):
            room = alice.create_room(preset="private_chat", access_rule="unrestricted")
            invite_and_join(alice, bob, room, hs_int.server_name)
            send_concurrently(room, [(alice, ["hello b"]), (bob, ["hello a"])])
            wait_deliveries(
                [(bob, room, alice.user_id, ["hello b"]), (alice, room, bob.user_id, ["hello a"])],
                60,
            )
            (in_a, in_b), (out_a, out_b) = self.gateways.connections()
            print(
                f"[e2e] cluster: connections to gw-a/gw-b: inbound {in_a}/{in_b}, "
                f"outbound {out_a}/{out_b}"
            )

        with self.step("sbg kill through gw-a; gw-b has it through Redis"):
            marks = {n.config_path: n.audit.mark() for n in (a, b)}
            output = a.kill_cli(ext)
            killed_at = time.monotonic()
            self.assertIn(ext, output)
            self.assertIn("every node", output)
            switches = {(ext, "inbound"), (ext, "outbound")}
            while engaged(b) != switches:
                self.assertLess(time.monotonic() - killed_at, 1.0, "gw-b did not follow gw-a")
                time.sleep(0.02)
            print(
                f"[e2e] cluster: gw-b engaged {time.monotonic() - killed_at:.2f}s after sbg kill on gw-a"
            )

        with self.step("gw-a stops: gw-b alone refuses hs-ext in both directions"):
            self.assertEqual(a.stop(), 0)
            while_killed_a = [f"alice while killed {i}" for i in range(3)]
            while_killed_b = [f"bob while killed {i}" for i in range(3)]
            send_concurrently(room, [(alice, while_killed_a), (bob, while_killed_b)])
            for direction, key in (("outbound", "destination"), ("inbound", "origin")):
                first = b.audit.wait_for(
                    lambda r, d=direction, k=key: r["direction"] == d and r[k] == ext,
                    timeout=30,
                    since=marks[b.config_path],
                )
                self.assertEqual(first["decision"], "deny", describe(first))
                self.assertIn(KILL_REASON, first["reason"])
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline:
                self.assertFalse({x for _, x in bob.message_bodies(room)} & set(while_killed_a))
                self.assertFalse({x for _, x in alice.message_bodies(room)} & set(while_killed_b))
                time.sleep(0.5)
            crossed = self.allowed_for(ext, records_of((a, b), marks))
            self.assertEqual(crossed, [], "hs-ext traffic crossed a node while killed")

        with self.step("sbg unkill through gw-b: the queued messages cross"):
            b.unkill_cli(ext)
            took = wait_deliveries(
                [
                    (bob, room, alice.user_id, ["hello b", *while_killed_a]),
                    (alice, room, bob.user_id, ["hello a", *while_killed_b]),
                ],
                timeout=90,
            )
            print(
                f"[e2e] cluster: after sbg unkill on gw-b, delivered in {took[0]:.1f}s / {took[1]:.1f}s"
            )

        with self.step("gw-a starts again with the lift"):
            a.start()
            self.assertEqual(engaged(a), set())
            health = a.kill_state()
            self.assertEqual(health["cluster"], "connected")

    @staticmethod
    def allowed_for(server: str, records: list[dict[str, Any]]) -> list[str]:
        return [
            describe(r)
            for r in records
            if r.get("decision") == "allow" and server in (r.get("origin"), r.get("destination"))
        ]
