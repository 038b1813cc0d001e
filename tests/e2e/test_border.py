"""Phase 2: real Synapse homeservers federating through a running sbg.

hs-int.test:8448 sits behind sbg (inbound TLS termination at 127.0.0.10:8448,
outbound CONNECT proxy with interception at 127.0.0.10:3128); hs-ext.test:8448
is the trusted external server (pinned key and CA); hs-evil.test:8448 is not
in sbg's configuration. Every assertion is about what users see through the
client-server API, plus what sbg's audit log says crossed the border.

Scenario numbers follow the project's end-to-end issue: 1 invite and join,
2 messages both ways, 3 profile/device lists/e2e keys, 4 media, 5 leave and
rejoin, 6 untrusted server refused both ways, 7 kill switch, 8 restart during
a burst, 9 no trusted request refused by the endpoint table.
"""

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

from twisted.trial.unittest import TestCase

from testbed.e2e.border import (
    Record,
    describe,
    format_endpoint_table,
    invite_and_join,
    parse_ts,
    peer_server,
    send_concurrently,
    served_federation_requests,
    start_sending,
    summarise,
    trusted_refusals,
    wait_deliveries,
)
from testbed.e2e.harness import HS_EVIL, HS_EXT, HS_INT, Cluster, Sbg, start_cluster
from testbed.e2e.matrix_client import MatrixClient, MatrixError, q, wait_until

KILL_REASON = "kill switch"


@contextlib.contextmanager
def scenario(cluster: Cluster, name: str) -> Iterator[None]:
    """Name the scenario in any failure (with the processes' log tails); print its time."""
    started = time.monotonic()
    print(f"[e2e] scenario {name} ...")
    try:
        yield
    except Exception as e:
        raise AssertionError(f"scenario {name} failed: {e}\n{cluster.describe_logs()}") from e
    print(f"[e2e] scenario {name}: ok in {time.monotonic() - started:.1f}s")


def crossed(records: list[Record], direction: str, group: str, server: str) -> list[Record]:
    """The allowed records of GROUP in DIRECTION whose peer server is SERVER."""
    return [
        r
        for r in records
        if r.get("direction") == direction
        and r.get("group") == group
        and r.get("decision") == "allow"
        and peer_server(r) == server
    ]


class BorderTestCase(TestCase):
    timeout = 300

    def setUp(self) -> None:
        self.started = time.monotonic()

    def tearDown(self) -> None:
        print(f"[e2e] {self.id()} took {time.monotonic() - self.started:.1f}s")

    def assertCrossed(self, records: list[Record], direction: str, group: str, server: str) -> None:
        if not crossed(records, direction, group, server):
            seen = sorted({(r.get("direction"), r.get("group")) for r in records}, key=str)
            self.fail(f"no allowed {direction} {group} request for {server} in the audit: {seen}")

    def check_trusted_traffic(self, sbg: Sbg, trusted: str, excused: set[tuple[Any, ...]]) -> None:
        """Scenario 9: no trusted request was refused except the EXCUSED ones; print the table."""
        records = sbg.audit.records()
        refused = [r for r in trusted_refusals(records, trusted) if record_key(r) not in excused]
        print(f"[e2e] endpoints seen at the border ({len(records)} decisions):")
        print(format_endpoint_table(records))
        self.assertEqual(
            [describe(r) for r in refused],
            [],
            f"scenario 9: trusted traffic of {trusted} refused outside intended refusals",
        )
        self.assertTrue(records, "scenario 9: sbg wrote no audit records")


def record_key(record: Record) -> tuple[Any, ...]:
    return (
        record.get("ts"),
        record.get("direction"),
        record.get("method"),
        record.get("path"),
        record.get("decision"),
    )


class TrustedFederationTests(BorderTestCase):
    """Scenarios 1-5 and 9 between hs-int (behind sbg) and hs-ext."""

    def test_trusted_federation_through_the_border(self) -> None:
        cluster = start_cluster(self, behind_sbg=True, homeservers=(HS_INT, HS_EXT))
        assert cluster.sbg is not None
        sbg, audit = cluster.sbg, cluster.sbg.audit
        hs_int, hs_ext = cluster[HS_INT.key], cluster[HS_EXT.key]
        ext = hs_ext.server_name
        alice = hs_int.register("alice", password="alice-pw")
        bob = hs_ext.register("bob")

        with scenario(cluster, "1 (private room, invite to hs-ext, join)"):
            # Open to external users (room rules R1: a restricted room is not).
            room = alice.create_room(
                preset="private_chat", name="across the border", access_rule="unrestricted"
            )
            invite_state = invite_and_join(alice, bob, room, hs_int.server_name)
            inviters = [
                e["state_key"] for e in invite_state["events"] if e["type"] == "m.room.member"
            ]
            self.assertIn(alice.user_id, inviters)
            self.assertEqual(bob.joined_members(room), sorted([alice.user_id, bob.user_id]))
            records = audit.records()
            self.assertCrossed(records, "outbound", "invites", ext)
            self.assertCrossed(records, "inbound", "joins", ext)

        with scenario(cluster, "2 (20 messages each way, concurrently)"):
            from_alice = [f"alice to bob {i:02d}" for i in range(20)]
            from_bob = [f"bob to alice {i:02d}" for i in range(20)]
            send_concurrently(room, [(alice, from_alice), (bob, from_bob)])
            times = wait_deliveries(
                [
                    (bob, room, alice.user_id, from_alice),
                    (alice, room, bob.user_id, from_bob),
                    (alice, room, alice.user_id, from_alice),
                    (bob, room, bob.user_id, from_bob),
                ],
                timeout=60,
            )
            print(f"[e2e] 40 messages delivered, in order, in {max(times):.1f}s")
            records = audit.records()
            self.assertCrossed(records, "outbound", "transactions", ext)
            self.assertCrossed(records, "inbound", "transactions", ext)

        with scenario(cluster, "3 (profiles, device lists, e2e keys both ways)"):
            mark = audit.mark()
            alice.set_displayname("Alice (inside)")
            bob.set_displayname("Bob (outside)")
            self.assertEqual(bob.get_profile(alice.user_id)["displayname"], "Alice (inside)")
            self.assertEqual(alice.get_profile(bob.user_id)["displayname"], "Bob (outside)")

            for owner, reader in ((bob, alice), (alice, bob)):
                device_keys, otks = owner.make_device_keys(one_time_keys=2)
                owner.upload_keys(device_keys, otks)
                queried = reader.query_keys([owner.user_id])
                self.assertEqual(queried["failures"], {}, f"{reader.user_id} keys/query")
                self.assertEqual(
                    queried["device_keys"][owner.user_id][owner.device_id], device_keys
                )
                claimed = reader.claim_keys(owner.user_id, owner.device_id)
                self.assertEqual(claimed["failures"], {}, f"{reader.user_id} keys/claim")
                (otk,) = claimed["one_time_keys"][owner.user_id][owner.device_id].values()
                self.assertIn(otk, list(otks.values()))

            # Users sharing no room: their servers ask with federation keys/query.
            carol, dave = hs_ext.register("carol"), hs_int.register("dave")
            for owner, reader in ((carol, alice), (dave, bob)):
                device_keys, _ = owner.make_device_keys(one_time_keys=0)
                owner.upload_keys(device_keys, None)
                queried = reader.query_keys([owner.user_id])
                self.assertEqual(queried["failures"], {}, f"{reader.user_id} keys/query")
                answer = dict(queried["device_keys"][owner.user_id][owner.device_id])
                answer.pop("unsigned", None)  # added by the owner's server
                self.assertEqual(answer, device_keys)

            # Device list update: alice signs in on a second device; bob's server hears of it.
            bob.sync()
            alice2 = MatrixClient.login(hs_int.client_url, "alice", "alice-pw")
            keys2, _ = alice2.make_device_keys(one_time_keys=0)
            alice2.upload_keys(keys2, None)
            bob.wait_for_sync(
                lambda a: (
                    True if alice.user_id in a.get("device_lists", {}).get("changed", []) else None
                ),
                30,
                "alice's device list change",
            )
            wait_until(
                lambda: (
                    True
                    if alice2.device_id
                    in bob.query_keys([alice.user_id])["device_keys"].get(alice.user_id, {})
                    else None
                ),
                30,
                "alice's second device in bob's keys/query",
            )
            records = audit.records(mark)
            for direction in ("inbound", "outbound"):
                for group in ("queries_profile", "e2ee"):
                    self.assertCrossed(records, direction, group, ext)
                queries = [
                    r
                    for r in crossed(records, direction, "e2ee", ext)
                    if r["path"].endswith("/user/keys/query")
                ]
                self.assertTrue(queries, f"no {direction} keys/query crossed the border")
            print(
                f"[e2e] keys/query 503 retries: alice {alice.retries}, bob {bob.retries}; "
                f"devices requests: {len([r for r in records if r.get('group') == 'devices'])}"
            )

        with scenario(cluster, "4 (media both ways, authenticated federation media)"):
            mark = audit.mark()
            inside, outside = os.urandom(300_000), os.urandom(200_001)
            mxc_int = alice.upload_media(inside, "application/octet-stream", "inside.bin")
            mxc_ext = bob.upload_media(outside, "application/octet-stream", "outside.bin")
            self.assertTrue(mxc_int.startswith(f"mxc://{hs_int.server_name}/"), mxc_int)
            self.assertTrue(mxc_ext.startswith(f"mxc://{ext}/"), mxc_ext)
            self.assertEqual(bob.download_media(mxc_int)[1], inside)
            self.assertEqual(alice.download_media(mxc_ext)[1], outside)
            records = audit.records(mark)
            self.assertCrossed(records, "inbound", "media", ext)
            self.assertCrossed(records, "outbound", "media", ext)

        with scenario(cluster, "5 (leave, re-invite, rejoin)"):
            bob.leave(room)
            wait_until(
                lambda: True if alice.joined_members(room) == [alice.user_id] else None,
                30,
                "bob's leave to reach hs-int",
            )
            self.assertNotIn(room, bob.joined_rooms())
            invite_and_join(alice, bob, room, hs_int.server_name)
            # Rejecting an invite: hs-ext leaves through make_leave/send_leave.
            mark = audit.mark()
            other = alice.create_room(preset="private_chat", access_rule="unrestricted")
            bob.sync()
            alice.invite(other, bob.user_id)
            bob.wait_for_invite(other)
            bob.leave(other)
            state_url = f"/_matrix/client/v3/rooms/{q(other)}/state/m.room.member/{q(bob.user_id)}"
            wait_until(
                lambda: True if alice.call("GET", state_url)["membership"] == "leave" else None,
                30,
                "bob's rejection to reach hs-int",
            )
            self.assertCrossed(audit.records(mark), "inbound", "leaves", ext)

            again_a, again_b = ["alice after rejoin"], ["bob after rejoin"]
            send_concurrently(room, [(alice, again_a), (bob, again_b)])
            wait_deliveries(
                [(bob, room, alice.user_id, again_a), (alice, room, bob.user_id, again_b)], 30
            )

        with scenario(cluster, "9 (every trusted request allowed by the endpoint table)"):
            self.check_trusted_traffic(sbg, ext, excused=set())
            self.assertEqual(
                [describe(r) for r in audit.records() if r.get("decision") != "allow"], []
            )


class UntrustedServerTests(BorderTestCase):
    """Scenario 6: hs-evil (not in sbg's configuration) is refused in both directions."""

    def test_untrusted_server_refused_both_ways(self) -> None:
        cluster = start_cluster(self, behind_sbg=True, homeservers=(HS_INT, HS_EXT, HS_EVIL))
        assert cluster.sbg is not None
        audit = cluster.sbg.audit
        hs_int, hs_evil = cluster[HS_INT.key], cluster[HS_EVIL.key]
        evil = hs_evil.server_name
        alice = hs_int.register("alice")
        mallory = hs_evil.register("mallory")
        lobby = alice.create_room(preset="public_chat", public=True, alias_localpart="lobby")

        with scenario(cluster, "6a (hs-evil -> hs-int refused at the border)"):
            mark = audit.mark()
            with self.assertRaises(MatrixError) as profile_error:
                mallory.get_profile(alice.user_id)
            with self.assertRaises(MatrixError) as join_error:
                mallory.join(lobby, via=[hs_int.server_name])
            print(
                f"[e2e] mallory's profile lookup -> {profile_error.exception.status} "
                f"{profile_error.exception.errcode}; join -> {join_error.exception.status} "
                f"{join_error.exception.errcode}"
            )
            records = audit.records(mark)
            denials = [
                r for r in records if r["direction"] == "inbound" and r["decision"] == "deny"
            ]
            print(summarise(records))
            self.assertEqual({r["origin"] for r in denials}, {evil}, records)
            self.assertEqual({r["status"] for r in denials}, {403})
            self.assertTrue(all(r["reason"] for r in denials), denials)
            self.assertTrue({"queries_profile", "joins"} <= {r["group"] for r in denials}, denials)
            authenticated_allowed = [
                r
                for r in records
                if r["direction"] == "inbound" and r["decision"] == "allow" and r["origin"]
            ]
            self.assertEqual(authenticated_allowed, [])
            served = [x for x in served_federation_requests(hs_int.log_path) if evil in x]
            self.assertEqual(served, [], "hs-int served requests from hs-evil")
            self.assertEqual(alice.joined_members(lobby), [alice.user_id])

        with scenario(cluster, "6b (hs-int -> hs-evil refused at the outbound proxy)"):
            mark = audit.mark()
            private = alice.create_room(preset="private_chat")
            with self.assertRaises(MatrixError) as invite_error:
                alice.invite(private, mallory.user_id)
            with self.assertRaises(MatrixError):
                alice.get_profile(mallory.user_id)
            print(
                f"[e2e] alice's invite of {mallory.user_id} -> {invite_error.exception.status} "
                f"{invite_error.exception.body}"
            )
            self.assertGreaterEqual(invite_error.exception.status, 400)
            records = audit.records(mark)
            print(summarise(records))
            outbound = [r for r in records if r["direction"] == "outbound"]
            self.assertTrue(outbound, "hs-int never asked sbg for hs-evil")
            for r in outbound:
                self.assertEqual(
                    (r["method"], r["decision"], r["status"]), ("CONNECT", "deny", 403)
                )
                self.assertEqual(r["path"], "hs-evil.test:8448")
                self.assertTrue(r["reason"], r)
            self.assertEqual(served_federation_requests(hs_evil.log_path), [])
            invites = mallory.sync().get("rooms", {}).get("invite", {})
            self.assertEqual(invites, {}, "mallory received an invite")
            self.assertEqual(alice.joined_members(private), [alice.user_id])


class KillSwitchAndRestartTests(BorderTestCase):
    """Scenarios 7 (kill switch via the CLI), 8 (restart during a burst) and 9."""

    # The sbg configuration's extra keys (the subclass below runs workers).
    sbg_extra: dict[str, Any] = {}

    def test_kill_switch_and_restart(self) -> None:
        cluster = start_cluster(
            self, behind_sbg=True, homeservers=(HS_INT, HS_EXT), sbg_extra=self.sbg_extra
        )
        assert cluster.sbg is not None
        sbg, audit = cluster.sbg, cluster.sbg.audit
        hs_int, hs_ext = cluster[HS_INT.key], cluster[HS_EXT.key]
        ext = hs_ext.server_name
        alice, bob = hs_int.register("alice"), hs_ext.register("bob")

        with scenario(cluster, "1 (setup: invite, join, one message each way)"):
            room = alice.create_room(preset="private_chat", access_rule="unrestricted")
            invite_and_join(alice, bob, room, hs_int.server_name)
            send_concurrently(room, [(alice, ["warm-up a"]), (bob, ["warm-up b"])])
            wait_deliveries(
                [
                    (bob, room, alice.user_id, ["warm-up a"]),
                    (alice, room, bob.user_id, ["warm-up b"]),
                ],
                30,
            )

        excused: set[tuple[Any, ...]] = set()
        with scenario(cluster, "7 (kill switch for hs-ext, then unkill)"):
            mark_kill = audit.mark()
            cli_started = time.time()
            output = sbg.kill_cli(ext)
            killed_at = time.time()
            self.assertIn(ext, output)
            engaged = {(e["server"], e["direction"]) for e in sbg.kill_state()["engaged"]}
            self.assertEqual(engaged, {(ext, "inbound"), (ext, "outbound")})

            while_killed_a = [f"alice while killed {i}" for i in range(3)]
            while_killed_b = [f"bob while killed {i}" for i in range(3)]
            send_concurrently(room, [(alice, while_killed_a), (bob, while_killed_b)])
            first_out = audit.wait_for(
                lambda r: r["direction"] == "outbound" and r["destination"] == ext,
                timeout=5,
                since=mark_kill,
            )
            first_in = audit.wait_for(
                lambda r: r["direction"] == "inbound" and r["origin"] == ext,
                timeout=5,
                since=mark_kill,
            )
            for first in (first_out, first_in):
                self.assertEqual(first["decision"], "deny", describe(first))
                self.assertIn(KILL_REASON, first["reason"])
                self.assertLess(parse_ts(first["ts"]) - killed_at, 1.0, describe(first))
            print(
                f"[e2e] sbg kill took {killed_at - cli_started:.2f}s (CLI incl. start-up); "
                f"first refusals {parse_ts(first_out['ts']) - killed_at:.2f}s (outbound) and "
                f"{parse_ts(first_in['ts']) - killed_at:.2f}s (inbound) after it returned"
            )
            # Killed for 4 s: nothing crosses.
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline:
                self.assertFalse(
                    {b for _, b in bob.message_bodies(room)} & set(while_killed_a),
                    "a message reached hs-ext while killed",
                )
                self.assertFalse(
                    {b for _, b in alice.message_bodies(room)} & set(while_killed_b),
                    "a message reached hs-int while killed",
                )
                time.sleep(0.5)
            mark_unkill = audit.mark()
            killed = audit.records(mark_kill, mark_unkill)
            trusted = [r for r in killed if peer_server(r) == ext]
            self.assertEqual([describe(r) for r in trusted if r["decision"] == "allow"], [])
            self.assertTrue(all(KILL_REASON in r["reason"] for r in trusted))
            print(summarise(killed))

            unkilled_at = time.monotonic()
            sbg.unkill_cli(ext)
            self.assertEqual(sbg.kill_state()["engaged"], [])
            took = wait_deliveries(
                [
                    (bob, room, alice.user_id, ["warm-up a", *while_killed_a]),
                    (alice, room, bob.user_id, ["warm-up b", *while_killed_b]),
                ],
                timeout=90,
            )
            print(
                f"[e2e] after sbg unkill: hs-int -> hs-ext queue delivered in {took[0]:.1f}s, "
                f"hs-ext -> hs-int in {took[1]:.1f}s (unkill CLI at +0.0s, "
                f"{time.monotonic() - unkilled_at:.1f}s now)"
            )
            excused = {
                record_key(r)
                for r in audit.records(mark_kill)
                if r["decision"] != "allow" and KILL_REASON in r["reason"]
            }

        with scenario(cluster, "8 (sbg restarted during a burst: delivered exactly once)"):
            burst_a = [f"alice burst {i:02d}" for i in range(30)]
            burst_b = [f"bob burst {i:02d}" for i in range(30)]
            # Processes must be started from the main thread (see processes.py), so
            # the messages are sent from threads while this thread restarts sbg.
            finish = start_sending(room, [(alice, burst_a), (bob, burst_b)], pause=0.05)
            time.sleep(0.6)
            code, restart_seconds = sbg.restart()
            back_at = time.monotonic()
            self.assertEqual(code, 0, "sbg exit code on SIGTERM")
            finish()
            took = wait_deliveries(
                [
                    (bob, room, alice.user_id, burst_a),
                    (alice, room, bob.user_id, burst_b),
                    (alice, room, alice.user_id, burst_a),
                    (bob, room, bob.user_id, burst_b),
                ],
                timeout=90,
            )
            print(
                f"[e2e] sbg restart (SIGTERM, start, healthy) took {restart_seconds:.1f}s; "
                f"every burst message delivered exactly once, in order, "
                f"{time.monotonic() - back_at:.1f}s after sbg was back (waited {max(took):.1f}s)"
            )

        with scenario(cluster, "9 (every trusted request allowed by the endpoint table)"):
            self.check_trusted_traffic(sbg, ext, excused)


class KillSwitchAndRestartWorkersTests(KillSwitchAndRestartTests):
    """The same scenarios with `workers: 2`: the kill switch goes through the
    supervisor's admin listener and must hold in both workers, the restart
    drains both, and the audit records come through the supervisor's log."""

    sbg_extra = {"workers": 2}
