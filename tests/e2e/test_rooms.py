"""The room rules (docs/room-rules.md) in real Synapse, seen from the clients.

hs-int runs the module `sbg.synapse.RoomRules` behind sbg; hs-ext is a
trusted external server at the V1 level `external` (invited into open rooms
only, no public rooms, power level 0), hs-partner one at the V2 level
`partner` (any non-public room, public rooms, power level up to 50), and
hs-evil is unknown to sbg. For each rule R1-R8 the allowed case works and
the refused case fails with the documented status, and every refusal is
checked from the refused side: refused, and nothing happened (no member, no
invite, no changed state). What Synapse does not let a module refuse
arrives and is undone (R8); the time it took is printed.

A third-party invite needs an identity server: `IdentityStub` stands in for
one (no real identity server is available here).
"""

import contextlib
import json
import os
import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import yaml
from twisted.trial.unittest import TestCase

from testbed.e2e.border import ModuleLog, served_federation_requests
from testbed.e2e.harness import (
    E2E_NET,
    HS_EVIL,
    HS_EXT,
    HS_INT,
    HS_PARTNER,
    Cluster,
    start_cluster,
)
from testbed.e2e.matrix_client import MatrixClient, MatrixError, q, wait_until
from testbed.pki import issue_server_cert
from tests.e2e.hostile import forge_join, send_join_path, send_signed
from tests.e2e.identity_stub import IdentityStub

ACCESS_RULES = "im.vector.room.access_rules"
ID_HOST, ID_ADDRESS, ID_PORT = "id.test", f"{E2E_NET}.6", 8090
# R8: what arrived over federation is undone within this (docs/room-rules.md).
UNDO_WITHIN = 5.0
# How long a refused party is watched for any effect of what it tried.
QUIET = 3.0


@contextlib.contextmanager
def scenario(cluster: Cluster, name: str) -> Iterator[None]:
    started = time.monotonic()
    print(f"[e2e] rooms: {name} ...")
    try:
        yield
    except Exception as e:
        raise AssertionError(f"scenario {name} failed: {e}\n{cluster.describe_logs()}") from e
    print(f"[e2e] rooms: {name}: ok in {time.monotonic() - started:.1f}s")


def refusal_counts(metrics_url: str) -> dict[str, float]:
    """sbg_room_refusals_total by rule, from hs-int's metrics listener."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    found = {}
    for m in re.finditer(r'^sbg_room_refusals_total\{rule="(R\d)"\} ([0-9.e+]+)$', text, re.M):
        found[m.group(1)] = float(m.group(2))
    return found


def open_room(client: MatrixClient, **kw: Any) -> str:
    """An `unrestricted` room (open to external users), not public."""
    return client.create_room(preset="private_chat", access_rule="unrestricted", **kw)


class RoomRulesTests(TestCase):
    timeout = 600

    def setUp(self) -> None:
        self.started = time.monotonic()

    def tearDown(self) -> None:
        print(f"[e2e] {self.id()} took {time.monotonic() - self.started:.1f}s")

    # -- assertions from the refused side

    def refused(self, call: Callable[..., Any], *args: Any, **kw: Any) -> MatrixError:
        """CALL fails with 403 M_FORBIDDEN (the status of R1-R6)."""
        with self.assertRaises(MatrixError) as e:
            call(*args, **kw)
        err = e.exception
        self.assertEqual((err.status, err.errcode), (403, "M_FORBIDDEN"), err.body)
        return err

    def never(self, check: Callable[[], bool], what: str, quiet: float = QUIET) -> None:
        """CHECK stays false for QUIET seconds."""
        deadline = time.monotonic() + quiet
        while time.monotonic() < deadline:
            self.assertFalse(check(), what)
            time.sleep(0.3)

    def no_invite(self, client: MatrixClient, room_id: str) -> None:
        self.never(
            lambda: room_id in client.sync().get("rooms", {}).get("invite", {}),
            f"{client.user_id} got an invite to {room_id}",
        )

    def undone_within(self, what: str, check: Callable[[], bool], since: float) -> float:
        """Wait until CHECK holds; assert it took at most UNDO_WITHIN seconds from SINCE."""
        wait_until(lambda: True if check() else None, 30, what)
        took = time.monotonic() - since
        print(f"[e2e] R8: {what}: undone {took:.2f}s after the offending call returned")
        self.assertLessEqual(took, UNDO_WITHIN, what)
        return took

    # -- the scenarios

    def test_room_rules(self) -> None:
        run_hosts = {HS_INT.key: {ID_HOST: ID_ADDRESS}}
        # The identity server stand-in: reached directly (not through sbg's
        # proxy, which is for federation), its test certificate accepted.
        extra = {
            HS_INT.key: {
                "use_insecure_ssl_client_just_for_testing_do_not_use": True,
                "no_proxy_hosts": [ID_HOST],
            }
        }
        cluster = start_cluster(
            self,
            behind_sbg=True,
            homeservers=(HS_INT, HS_EXT, HS_PARTNER, HS_EVIL),
            hosts_overrides=run_hosts,
            extra_config=extra,
        )
        assert cluster.sbg is not None
        sbg = cluster.sbg
        hs_int, hs_ext = cluster[HS_INT.key], cluster[HS_EXT.key]
        hs_partner, hs_evil = cluster[HS_PARTNER.key], cluster[HS_EVIL.key]
        log = ModuleLog(hs_int.log_path)
        id_tls = issue_server_cert(
            cluster.cas["internal"], os.path.join(cluster.run_dir, "pki", "id"), "id", [ID_HOST]
        )
        identity = IdentityStub(ID_ADDRESS, ID_PORT, id_tls)
        self.addCleanup(identity.close)
        via_int, via_ext, via_partner = (
            [hs_int.server_name],
            [hs_ext.server_name],
            [hs_partner.server_name],
        )

        alice = hs_int.register("alice")
        root = hs_int.register("root", admin=True)
        bob = hs_ext.register("bob")  # V1
        vic = hs_partner.register("vic")  # V2
        mallory = hs_evil.register("mallory")  # unknown

        with scenario(cluster, "R1 invites of external users"):
            restricted = alice.create_room(name="restricted (the default)")
            mark = log.mark()
            self.refused(alice.invite, restricted, bob.user_id)
            log.expect(mark, "R1 room_restricted", bob.user_id)
            # A server administrator is not exempt.
            alice.invite(restricted, root.user_id)
            root.join(restricted)
            self.refused(root.invite, restricted, bob.user_id)
            self.no_invite(bob, restricted)
            self.assertIsNone(alice.membership(restricted, bob.user_id))
            # An unrestricted room admits the V1 user.
            opened = open_room(alice, name="open to external users")
            bob.sync()
            alice.invite(opened, bob.user_id)
            bob.wait_for_invite(opened)
            bob.join(opened, via=via_int)
            alice.wait_for_members(opened, [alice.user_id, bob.user_id])
            # A V2 user may be invited into a restricted room (private_rooms).
            vic.sync()
            alice.invite(restricted, vic.user_id)
            vic.wait_for_invite(restricted)
            vic.join(restricted, via=via_int)
            alice.wait_for_members(restricted, [vic.user_id])
            # Users of unknown servers are never invited.
            mallory.sync()
            self.refused(alice.invite, opened, mallory.user_id)
            log.expect(mark, "R1 unknown_server", mallory.user_id)
            self.assertEqual(mallory.sync().get("rooms", {}).get("invite", {}), {})

        with scenario(cluster, "R2 external users joining internal rooms"):
            mark = log.mark()
            uninvited = open_room(alice, name="nobody invited bob")
            err = self.refused(bob.join, uninvited, via=via_int)
            print(f"[e2e] bob's uninvited join -> {err.status} {err.body}")
            log.expect(mark, "R2 not_invited", bob.user_id)
            public = alice.create_room(
                preset="public_chat", public=True, name="an internal public room"
            )
            self.refused(bob.join, public, via=via_int)
            log.expect(mark, "R2 public_room_not_allowed", bob.user_id)
            self.assertEqual(alice.joined_members(uninvited), [alice.user_id])
            self.assertEqual(alice.joined_members(public), [alice.user_id])
            self.assertNotIn(public, bob.joined_rooms())
            # A V2 user joins the internal public room.
            self.assertEqual(vic.join(public, via=via_int), public)
            alice.wait_for_members(public, [vic.user_id])
            # Knocks: refused for V1, allowed for V2.
            knock = alice.create_room(
                extra={
                    "initial_state": [
                        {
                            "type": "m.room.join_rules",
                            "state_key": "",
                            "content": {"join_rule": "knock"},
                        }
                    ]
                }
            )
            self.refused(bob.knock, knock, via=via_int)
            log.expect(mark, "R2 knock_not_allowed", bob.user_id)
            self.assertIsNone(alice.membership(knock, bob.user_id))
            vic.knock(knock, via=via_int)
            wait_until(
                lambda: True if alice.membership(knock, vic.user_id) == "knock" else None,
                30,
                "vic's knock to reach hs-int",
            )

        with scenario(cluster, "R3 internal users and rooms hosted outside"):
            mark = log.mark()
            theirs = bob.create_room(preset="public_chat", public=True, name="hs-ext's public room")
            self.refused(alice.join, theirs, via=via_ext)
            log.expect(mark, "R3 external_public_room", alice.user_id)
            self.never(
                lambda: alice.user_id in bob.joined_members(theirs), "alice is in hs-ext's room"
            )
            self.assertNotIn(theirs, alice.joined_rooms())
            # An invite into it never reaches alice.
            alice.sync()
            with self.assertRaises(MatrixError) as invite_error:
                bob.invite(theirs, alice.user_id)
            print(f"[e2e] bob's invite of alice into his public room -> {invite_error.exception}")
            log.expect(mark, "R3 external_public_room", f"invite of {alice.user_id}")
            self.no_invite(alice, theirs)
            # A server administrator bypasses Synapse's join check: the join
            # happens, and R8 makes it leave.
            joined_at = time.monotonic()
            root.join(theirs, via=via_ext)
            self.undone_within(
                "root (server admin) joined hs-ext's public room, then left",
                lambda: (
                    root.user_id not in bob.joined_members(theirs)
                    and theirs not in root.joined_rooms()
                ),
                joined_at,
            )
            log.expect(mark, "R8 undid R3 external_public_room", root.user_id)
            # A private room of hs-ext: invited, alice joins.
            private = bob.create_room(name="hs-ext's private room")
            alice.sync()
            bob.invite(private, alice.user_id)
            alice.wait_for_invite(private)
            alice.join(private, via=via_ext)
            bob.wait_for_members(private, [alice.user_id])
            # A V2 server's public room: alice joins.
            partner_public = vic.create_room(preset="public_chat", public=True)
            self.assertEqual(alice.join(partner_public, via=via_partner), partner_public)
            vic.wait_for_members(partner_public, [alice.user_id])

        with scenario(cluster, "R4 power levels"):
            mark = log.mark()
            levels = alice.state_content(opened, "m.room.power_levels")
            raised = {**levels, "users": {**levels["users"], bob.user_id: 50}}
            self.refused(alice.send_state, opened, "m.room.power_levels", raised)
            log.expect(mark, "R4 power_level_above_max")
            alice.send_state(
                opened,
                "m.room.power_levels",
                {**levels, "users": {**levels["users"], root.user_id: 100}},
            )
            alice.invite(opened, root.user_id)
            root.join(opened)
            levels = alice.state_content(opened, "m.room.power_levels")
            self.refused(
                root.send_state,
                opened,
                "m.room.power_levels",
                {**levels, "users": {**levels["users"], bob.user_id: 1}},
            )
            # users_default: bob would get it too (above his maximum) ...
            self.refused(
                alice.send_state, opened, "m.room.power_levels", {**levels, "users_default": 10}
            )
            # ... and an open room without external users yet keeps it at 0.
            empty = open_room(alice)
            empty_levels = alice.state_content(empty, "m.room.power_levels")
            self.refused(
                alice.send_state,
                empty,
                "m.room.power_levels",
                {**empty_levels, "users_default": 10},
            )
            log.expect(mark, "R4 users_default_above_zero")
            after = alice.state_content(opened, "m.room.power_levels")
            self.assertEqual(after, levels)
            self.assertEqual(after["users"].get(bob.user_id, 0), 0)
            self.assertEqual(after.get("users_default", 0), 0)
            # A V2 user up to 50, not above.
            alice.send_state(
                restricted,
                "m.room.power_levels",
                {
                    **(pl := alice.state_content(restricted, "m.room.power_levels")),
                    "users": {**pl["users"], vic.user_id: 50},
                },
            )
            self.refused(
                alice.send_state,
                restricted,
                "m.room.power_levels",
                {**pl, "users": {**pl["users"], vic.user_id: 51}},
            )

        # A room where the V2 user is a moderator (50) who may change power
        # levels (m.room.power_levels at 50) and most state (state_default 50),
        # but not the server ACL (100: rule R7 keeps it out of reach).
        shared = open_room(
            alice,
            name="shared with a partner moderator",
            extra={
                "power_level_content_override": {
                    "users": {vic.user_id: 50},  # alice, the creator, has no entry (v12)
                    "events": {"m.room.power_levels": 50, "m.room.server_acl": 100},
                }
            },
        )
        for user in (vic, bob):
            user.sync()
            alice.invite(shared, user.user_id)
            user.wait_for_invite(shared)
            user.join(shared, via=via_int)
        alice.wait_for_members(shared, [vic.user_id, bob.user_id])
        vic.wait_for_members(shared, [alice.user_id, bob.user_id])

        with scenario(cluster, "R4 and R8: a remote power-levels change is undone"):
            mark = log.mark()
            levels = vic.state_content(shared, "m.room.power_levels")
            sent_at = time.monotonic()
            vic.send_state(
                shared,
                "m.room.power_levels",
                {**levels, "users": {**levels["users"], bob.user_id: 50}},
            )
            took = self.undone_within(
                "vic (V2, hs-partner) raised bob (V1) to 50",
                lambda: (
                    alice.state_content(shared, "m.room.power_levels")["users"].get(bob.user_id, 0)
                    == 0
                    and vic.state_content(shared, "m.room.power_levels")["users"].get(
                        bob.user_id, 0
                    )
                    == 0
                ),
                sent_at,
            )
            line = log.expect(mark, "R8 undid R4 power_level_above_max", vic.user_id)
            print(f"[e2e] R4 remote change undone in {took:.2f}s: {line.split(' - ')[-1]}")

        with scenario(cluster, "R5 room classes and publicity"):
            mark = log.mark()
            self.refused(alice.send_state, opened, "m.room.join_rules", {"join_rule": "public"})
            self.refused(alice.set_room_visibility, opened, "public")
            log.expect(mark, "R5 unrestricted_room_public")
            self.assertEqual(
                alice.state_content(opened, "m.room.join_rules")["join_rule"], "invite"
            )
            listed = [r["room_id"] for r in alice.public_rooms()["chunk"]]
            self.assertNotIn(opened, listed)
            rooms_before = set(alice.joined_rooms())
            self.refused(
                alice.create_room, preset="public_chat", public=True, access_rule="unrestricted"
            )
            self.assertEqual(set(alice.joined_rooms()), rooms_before)
            # restricted -> unrestricted only, never back; a public room stays restricted.
            closed = alice.create_room()
            alice.send_state(closed, ACCESS_RULES, {"rule": "unrestricted"})
            self.refused(alice.send_state, closed, ACCESS_RULES, {"rule": "restricted"})
            self.refused(alice.send_state, public, ACCESS_RULES, {"rule": "unrestricted"})
            self.assertEqual(alice.state_content(closed, ACCESS_RULES)["rule"], "unrestricted")
            self.assertIsNone(alice.state_content(public, ACCESS_RULES))
            # From hs-partner (what no callback can refuse): undone.
            sent_at = time.monotonic()
            vic.send_state(shared, ACCESS_RULES, {"rule": "restricted"})
            self.undone_within(
                "vic (V2) made the shared room restricted",
                # hs-partner applied vic's change at once: its view turning
                # back is the undo arriving (hs-int's view is checked too).
                lambda: all(
                    (c.state_content(shared, ACCESS_RULES) or {}).get("rule") == "unrestricted"
                    for c in (vic, alice)
                ),
                sent_at,
            )
            log.expect(mark, "R8 undid R5 external_sender", vic.user_id)
            sent_at = time.monotonic()
            vic.send_state(shared, "m.room.join_rules", {"join_rule": "public"})
            self.undone_within(
                "vic (V2) made the shared room public",
                lambda: all(
                    c.state_content(shared, "m.room.join_rules")["join_rule"] == "invite"
                    for c in (vic, alice)
                ),
                sent_at,
            )
            log.expect(mark, "R8 undid R5 unrestricted_room_public", vic.user_id)

        with scenario(cluster, "R6 third-party invites"):
            mark = log.mark()
            id_server = f"{ID_HOST}:{ID_PORT}"
            self.refused(alice.invite_3pid, opened, "guest@example.org", id_server)
            log.expect(mark, "R6 third_party_invite")
            self.assertEqual(identity.requests, [])  # refused before the identity server
            alice.invite_3pid(restricted, "guest@example.org", id_server)
            invites = [
                e for e in alice.state(restricted) if e["type"] == "m.room.third_party_invite"
            ]
            self.assertEqual(len(invites), 1, invites)
            print(f"[e2e] identity server calls for the allowed invite: {identity.requests}")
            # From hs-partner, into the open shared room: revoked (emptied).
            token = "vic-invite-token"
            sent_at = time.monotonic()
            vic.send_state(
                shared,
                "m.room.third_party_invite",
                {
                    "display_name": "g***@e***.org",
                    "key_validity_url": f"https://{id_server}/_matrix/identity/v2/pubkey/isvalid",
                    "public_key": "ta8IQ0u1sp44HVpxYi7dFOdS/bfwDjcy4xLFlfY5KOA",
                },
                state_key=token,
            )
            self.undone_within(
                "vic (V2) made a third-party invite in the open shared room",
                lambda: all(
                    c.state_content(shared, "m.room.third_party_invite", token) == {}
                    for c in (vic, alice)
                ),
                sent_at,
            )
            log.expect(mark, "R8 undid R6 third_party_invite", vic.user_id)

        with scenario(cluster, "R7 an unknown server's user through a V2 server"):
            mark = log.mark()
            acl = alice.state_content(opened, "m.room.server_acl")
            self.assertEqual(
                sorted(acl["allow"]),
                sorted(["hs-int.test", "hs-int.test:8448", "hs-ext.test", "hs-partner.test"]),
            )
            self.assertEqual((acl["deny"], acl["allow_ip_literals"]), ([], False))
            mallory.sync()
            sent_at = time.monotonic()
            vic.invite(shared, mallory.user_id)
            self.undone_within(
                "vic (V2) invited mallory (unknown server)",
                lambda: alice.membership(shared, mallory.user_id) == "leave",
                sent_at,
            )
            log.expect(mark, "R8 undid R7 unknown_server", mallory.user_id)
            with contextlib.suppress(MatrixError):
                mallory.join(shared, via=via_partner)
            self.never(
                lambda: mallory.user_id in alice.joined_members(shared),
                "mallory joined the shared room",
            )
            self.assertNotIn(mallory.user_id, vic.joined_members(shared))
            # The ACL the module keeps: a local change is refused; a V2
            # moderator cannot change it at all (its level is above 50).
            self.refused(alice.send_state, opened, "m.room.server_acl", {**acl, "allow": ["*"]})
            log.expect(mark, "R7 acl_managed")
            with self.assertRaises(MatrixError):
                vic.send_state(shared, "m.room.server_acl", {"allow": ["*"]})
            self.assertNotIn("*", alice.state_content(shared, "m.room.server_acl")["allow"])
            levels = alice.state_content(opened, "m.room.power_levels")
            self.refused(
                alice.send_state,
                opened,
                "m.room.power_levels",
                {**levels, "events": {**levels["events"], "m.room.server_acl": 50}},
            )
            log.expect(mark, "R7 acl_unprotected")

        with scenario(cluster, "R2 against a hostile trusted server: a hand-crafted send_join"):
            # hs-ext builds bob's join into an internal public room itself,
            # skipping make_join (whose template the room rules refuse).
            mark, audit_mark = log.mark(), sbg.audit.mark()
            lobby = alice.create_room(preset="public_chat", public=True, name="no external user")
            forged: list[str] = []

            def hand_crafted_join(room: str) -> tuple[int, Any]:
                state = alice.state(room)
                ids = {(e["type"], e["state_key"]): e["event_id"] for e in state}
                create = next(e for e in state if e["type"] == "m.room.create")
                latest = alice.messages(room, "b", 1)["chunk"][0]["event_id"]
                auth = [ids[("m.room.power_levels", "")], ids[("m.room.join_rules", "")]]
                event, event_id = forge_join(
                    hs_ext,
                    bob.user_id,
                    room,
                    create["content"].get("room_version", "1"),
                    [latest],
                    auth,
                )
                forged.append(event_id)
                return send_signed(
                    hs_ext,
                    hs_int.server_name,
                    HS_INT.host,
                    cluster.cas[HS_INT.ca].certificate,
                    "PUT",
                    send_join_path(room, event_id),
                    event,
                )

            # 1. The gateway: no make_join prepared it.
            status, body = hand_crafted_join(lobby)
            print(f"[e2e] hand-crafted send_join -> {status} {body}")
            self.assertEqual((status, body.get("errcode")), (403, "M_FORBIDDEN"), body)
            record = sbg.audit.wait_for(lambda r: r.get("group") == "joins", since=audit_mark)
            self.assertEqual((record["decision"], record["code"]), ("deny", "join_not_prepared"))
            served = [x for x in served_federation_requests(hs_int.log_path) if "send_join" in x]
            self.assertNotIn(q(forged[0]), " ".join(served), "the send_join reached hs-int")
            self.never(
                lambda: alice.membership(lobby, bob.user_id) is not None,
                "bob has a membership in the public room",
            )
            # Without the gateway's check (monitor mode: logged, not refused):
            with open(sbg.config_path) as f:
                config = yaml.safe_load(f)
            sbg.write_config({**config, "mode": "monitor"})
            sbg.reload()
            time.sleep(1.0)
            # 2. the server ACL the room rules keep where a V2 user is (R7):
            # hs-int itself refuses hs-ext, which may not be in public rooms;
            status, body = hand_crafted_join(public)
            print(f"[e2e] ... into a room with a kept ACL -> {status} {body}")
            self.assertEqual(status, 403, body)
            self.assertIsNone(alice.membership(public, bob.user_id))
            # 3. a room without one: the join lands, and R8 undoes it.
            sent_at = time.monotonic()
            status, body = hand_crafted_join(lobby)
            self.assertEqual(status, 200, body)
            self.undone_within(
                "a hand-crafted send_join of bob (V1) into an internal public room",
                lambda: alice.membership(lobby, bob.user_id) == "leave",
                sent_at,
            )
            log.expect(mark, "R8 undid R2 public_room_not_allowed", bob.user_id)
            sbg.write_config(config)
            sbg.reload()
            time.sleep(1.0)

        with scenario(cluster, "the module re-reads sbg.yaml"):
            mark = log.mark()
            path = cluster.sbg_config_path
            with open(path) as f:
                original = f.read()
            config = yaml.safe_load(original)
            config["trust_levels"]["external"]["rooms"] = {"invite": "none"}
            with open(path, "w") as f:
                yaml.safe_dump(config, f)
            log.expect(mark, "re-read", timeout=15)
            later = open_room(alice)
            self.refused(alice.invite, later, bob.user_id)
            log.expect(mark, "R1 never_invited")
            with open(path, "w") as f:
                f.write("listeners: [\n")
            log.expect(mark, "the last good rules stay in force", timeout=15)
            self.refused(alice.invite, later, bob.user_id)
            with open(path, "w") as f:
                f.write(original)
            log.expect(mark, "re-read", "1 internal, 2 external", timeout=15)

        with scenario(cluster, "every refusal logged and counted"):
            counts = refusal_counts(hs_int.metrics_url)
            print(f"[e2e] sbg_room_refusals_total: {json.dumps(counts, sort_keys=True)}")
            for rule in ("R1", "R2", "R3", "R4", "R5", "R6", "R7", "R8"):
                self.assertGreater(counts.get(rule, 0), 0, f"{rule} never counted: {counts}")
            # Each of the seven violations above undone once, nothing failed.
            self.assertEqual(counts["R8"], 7, counts)
            self.assertEqual([x for x in log.lines() if "R8 failed" in x or "R8 cannot" in x], [])
            for line in log.lines():
                print(f"[e2e]   {line.split(' - ')[-1]}")
