"""Rule R8 and the ACL upkeep of R7 as tables: a persisted event in, repairs out."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from sbg.policy.room_facts import Event, Room
from sbg.policy.room_repair import (
    Kick,
    Leave,
    Repair,
    SetState,
    choose_actor,
    corrected_power_levels,
    plan_repairs,
)
from sbg.policy.rooms import RoomRefusal, desired_acl
from tests.room_facts import ACL_EVENTS, ALICE, BOB, CAROL, EVE, INT, NED, SERVERS, V1, VIC

MOD = f"@mod:{INT}"  # a local moderator (power 50)


def room(rule: str = "unrestricted", join_rule: str = "invite", **kw: Any) -> Room:
    users = {ALICE: 100, MOD: 50, **kw.pop("users", {})}
    members = {ALICE: "join", MOD: "join", **kw.pop("members", {})}
    r = Room(
        rule=rule,
        rule_declared=True,
        join_rule=join_rule,
        creator=kw.pop("creator", ALICE),
        power_levels={
            "users": users,
            "users_default": kw.pop("users_default", 0),
            "events": ACL_EVENTS,
        },
        members=members,
        **kw,
    )
    # Rooms the rules keep an ACL in have the right one unless a test says otherwise.
    if "acl" not in kw:
        r = Room(**{**r.__dict__, "acl": desired_acl(SERVERS, r)})
    return r


def member(sender: str, target: str, membership: str, **content: Any) -> Event:
    return Event("m.room.member", sender, {"membership": membership, **content}, target)


def describe(repairs: list[Repair]) -> list[tuple[str, str | None, str | None]]:
    out = []
    for r in repairs:
        a = r.action
        if isinstance(a, Kick):
            what = f"kick {a.user}"
        elif isinstance(a, Leave):
            what = f"leave {a.user}"
        else:
            what = f"set {a.type}"
        out.append((what, r.actor, None if r.refusal is None else str(r.refusal)))
    return out


def plan(
    r: Room, event: Event, previous: dict[str, Any] | None = None
) -> list[tuple[str, str | None, str | None]]:
    return describe(plan_repairs(SERVERS, r, event, previous, INT))


class MembershipRepairTests(SynchronousTestCase):
    def test_members_that_may_not_be_there_are_kicked(self) -> None:
        rows = [
            # (room after, event, previous, expected)
            (
                "V1 relayed join, public room",
                room("restricted", "public", members={BOB: "join"}),
                member(BOB, BOB, "join"),
                None,
                [(f"kick {BOB}", ALICE, "R2 public_room_not_allowed")],
            ),
            (
                "V1 restricted join rule (no invite)",
                room(members={BOB: "join"}),
                member(BOB, BOB, "join", join_authorised_via_users_server=VIC),
                None,
                [(f"kick {BOB}", ALICE, "R2 not_invited")],
            ),
            (
                "V1 joined after invite",
                room(members={BOB: "join"}),
                member(BOB, BOB, "join"),
                {"membership": "invite"},
                [],
            ),
            (
                "V1 profile change",
                room("restricted", "public", members={BOB: "join"}),
                member(BOB, BOB, "join"),
                {"membership": "join"},
                [],
            ),
            (
                "V2 invites V1 into restricted",
                room("restricted", members={VIC: "join", BOB: "invite"}),
                member(VIC, BOB, "invite"),
                None,
                [(f"kick {BOB}", ALICE, "R1 room_restricted")],
            ),
            (
                "V2 invites unknown",
                room(members={VIC: "join", EVE: "invite"}),
                member(VIC, EVE, "invite"),
                None,
                [(f"kick {EVE}", ALICE, "R7 unknown_server")],
            ),
            (
                "unknown joins (relayed)",
                room(members={EVE: "join"}),
                member(EVE, EVE, "join"),
                None,
                [(f"kick {EVE}", ALICE, "R7 unknown_server")],
            ),
            (
                "none-level invited",
                room(members={VIC: "join", NED: "invite"}),
                member(VIC, NED, "invite"),
                None,
                [(f"kick {NED}", ALICE, "R1 never_invited")],
            ),
            (
                "V1 knocks",
                room("restricted", "knock", members={BOB: "knock"}),
                member(BOB, BOB, "knock"),
                None,
                [(f"kick {BOB}", ALICE, "R2 knock_not_allowed")],
            ),
            (
                "V2 knocks",
                room("restricted", "knock", members={VIC: "knock"}),
                member(VIC, VIC, "knock"),
                None,
                [],
            ),
            (
                "third member of a direct chat",
                room("direct", members={VIC: "join", BOB: "invite"}, acl=None),
                member(VIC, BOB, "invite"),
                None,
                # The ACL is set after the kick, on the repaired room.
                [(f"kick {BOB}", ALICE, "R1 direct_room_full")],
            ),
            ("leaves are fine", room(members={BOB: "leave"}), member(BOB, BOB, "leave"), None, []),
        ]
        wrong = [
            (name, got, want)
            for name, r, event, previous, want in rows
            if (got := plan(r, event, previous)) != want
        ]
        self.assertEqual(wrong, [])

    def test_the_kicker_must_outrank_the_sender(self) -> None:
        # VIC (a V2 moderator at 50) invited BOB into a restricted room: MOD (50)
        # does not outrank VIC, ALICE (100) does.
        r = room("restricted", members={VIC: "join", BOB: "invite"}, users={VIC: 50})
        self.assertEqual(
            plan(r, member(VIC, BOB, "invite")), [(f"kick {BOB}", ALICE, "R1 room_restricted")]
        )
        alone = room(
            "restricted", members={ALICE: "leave", VIC: "join", BOB: "invite"}, users={VIC: 50}
        )
        self.assertEqual(
            plan(alone, member(VIC, BOB, "invite")), [(f"kick {BOB}", None, "R1 room_restricted")]
        )

    def test_internal_users_leave_public_rooms_of_v1_servers(self) -> None:
        theirs = room("restricted", "public", creator=BOB, members={BOB: "join"}, acl=None)
        self.assertEqual(
            plan(theirs, member(ALICE, ALICE, "join")),
            [(f"leave {ALICE}", ALICE, "R3 external_public_room")],
        )
        private = room("restricted", "invite", creator=BOB, members={BOB: "join"}, acl=None)
        self.assertEqual(plan(private, member(ALICE, ALICE, "join")), [])
        v2 = room("restricted", "public", creator=VIC, members={VIC: "join"}, acl=None)
        self.assertEqual(plan(v2, member(ALICE, ALICE, "join")), [])
        # Not our room: no kicks of other servers' users there.
        self.assertEqual(plan(private, member(BOB, EVE, "invite")), [])


class PowerLevelRepairTests(SynchronousTestCase):
    def test_remote_power_levels_are_undone(self) -> None:
        before = {
            "users": {ALICE: 100, MOD: 50, VIC: 50, BOB: 0},
            "users_default": 0,
            "events": ACL_EVENTS,
        }
        after = {
            "users": {ALICE: 100, MOD: 50, VIC: 50, BOB: 50},
            "users_default": 0,
            "events": ACL_EVENTS,
        }
        r = room(members={VIC: "join", BOB: "join"}, users=after["users"])
        repairs = plan_repairs(
            SERVERS, r, Event("m.room.power_levels", VIC, after, ""), before, INT
        )
        self.assertEqual(
            describe(repairs), [("set m.room.power_levels", ALICE, "R4 power_level_above_max")]
        )
        action = repairs[0].action
        assert isinstance(action, SetState)
        self.assertEqual(action.content, before)

    def test_users_default_back_to_zero(self) -> None:
        after = {"users": {ALICE: 100, MOD: 50}, "users_default": 20, "events": ACL_EVENTS}
        r = room(users_default=20)
        fixed = corrected_power_levels(
            SERVERS, r, after, {"users": {}, "users_default": 0, "events": ACL_EVENTS}
        )
        self.assertEqual(
            fixed, {"users": {ALICE: 100, MOD: 50}, "users_default": 0, "events": ACL_EVENTS}
        )
        repairs = plan_repairs(
            SERVERS, r, Event("m.room.power_levels", ALICE, after, ""), None, INT
        )
        self.assertEqual(
            describe(repairs), [("set m.room.power_levels", ALICE, "R4 users_default_above_zero")]
        )

    def test_clamped_to_the_maximum_when_the_previous_level_is_unknown(self) -> None:
        after = {"users": {ALICE: 100, VIC: 90, BOB: 5}, "events": ACL_EVENTS}
        r = room(members={VIC: "join", BOB: "join"}, users=after["users"])
        fixed = corrected_power_levels(SERVERS, r, after, None)
        self.assertEqual(fixed["users"], {ALICE: 100, VIC: 50, BOB: 0})

    def test_the_acl_level_goes_back_up(self) -> None:
        after = {"users": {ALICE: 100, MOD: 50, VIC: 50}, "events": {"m.room.server_acl": 50}}
        r = room(members={VIC: "join"}, users=after["users"])
        repairs = plan_repairs(SERVERS, r, Event("m.room.power_levels", VIC, after, ""), None, INT)
        self.assertEqual(
            describe(repairs), [("set m.room.power_levels", ALICE, "R7 acl_unprotected")]
        )
        action = repairs[0].action
        assert isinstance(action, SetState)
        self.assertEqual(action.content["events"], {"m.room.server_acl": 100})

    def test_compliant_power_levels_need_nothing(self) -> None:
        content = {
            "users": {ALICE: 100, MOD: 50, VIC: 50},
            "users_default": 0,
            "events": ACL_EVENTS,
        }
        r = room(members={VIC: "join"}, users=content["users"])
        self.assertEqual(plan(r, Event("m.room.power_levels", ALICE, content, "")), [])


class StateRepairTests(SynchronousTestCase):
    def test_access_rules(self) -> None:
        rows = [
            (
                "back to restricted",
                room("restricted"),
                Event("im.vector.room.access_rules", CAROL, {"rule": "restricted"}, ""),
                {"rule": "unrestricted"},
                ("set im.vector.room.access_rules", ALICE, "R5 rule_change_not_allowed"),
                {"rule": "unrestricted"},
            ),
            (
                "opened by a V2 user",
                room(),
                Event("im.vector.room.access_rules", VIC, {"rule": "unrestricted"}, ""),
                None,
                ("set im.vector.room.access_rules", ALICE, "R5 external_sender"),
                {"rule": "restricted"},
            ),
        ]
        for name, r, event, previous, want, restored in rows:
            repairs = plan_repairs(SERVERS, r, event, previous, INT)
            self.assertEqual(describe(repairs)[:1], [want], name)
            action = repairs[0].action
            assert isinstance(action, SetState)
            self.assertEqual(action.content, restored, name)
        legal = Event("im.vector.room.access_rules", ALICE, {"rule": "unrestricted"}, "")
        self.assertEqual(plan(room(), legal, {"rule": "restricted"}), [])

    def test_join_rules_and_third_party_invites(self) -> None:
        public = Event("m.room.join_rules", VIC, {"join_rule": "public"}, "")
        self.assertEqual(
            plan(room(join_rule="public"), public, {"join_rule": "invite"}),
            [("set m.room.join_rules", ALICE, "R5 unrestricted_room_public")],
        )
        self.assertEqual(plan(room("restricted", "public"), public, {"join_rule": "invite"}), [])
        tpi = Event("m.room.third_party_invite", VIC, {"display_name": "x"}, "tok")
        self.assertEqual(
            plan(room(), tpi), [("set m.room.third_party_invite", ALICE, "R6 third_party_invite")]
        )
        self.assertEqual(plan(room("restricted"), tpi), [])


class AclRepairTests(SynchronousTestCase):
    def test_acl_upkeep(self) -> None:
        opened = room(acl=None)
        rules = Event("im.vector.room.access_rules", ALICE, {"rule": "unrestricted"}, "")
        self.assertEqual(
            plan(opened, rules, {"rule": "restricted"}), [("set m.room.server_acl", ALICE, None)]
        )
        changed = room(acl={"allow": ["*"], "deny": []})
        acl_event = Event("m.room.server_acl", VIC, {"allow": ["*"]}, "")
        self.assertEqual(
            plan(changed, acl_event), [("set m.room.server_acl", ALICE, "R7 acl_managed")]
        )
        redacted = room(acl={})
        redaction = Event("m.room.redaction", VIC, {}, None)
        self.assertEqual(
            plan(redacted, redaction), [("set m.room.server_acl", ALICE, "R7 acl_managed")]
        )
        self.assertEqual(plan(room(), Event("m.room.message", BOB, {"body": "hi"})), [])
        # A restricted room with only internal users keeps no ACL.
        internal_only = Room(rule="restricted", creator=ALICE, members={ALICE: "join"})
        self.assertEqual(plan(internal_only, Event("m.room.message", ALICE, {})), [])

    def test_choose_actor(self) -> None:
        r = room(members={CAROL: "join"}, users={CAROL: 100})
        self.assertEqual(choose_actor(r, INT, 50, []), ALICE)  # CAROL is not local
        self.assertEqual(choose_actor(r, INT, 50, [100]), None)
        self.assertEqual(choose_actor(r, INT, 50, [60]), ALICE)
        self.assertEqual(choose_actor(r, INT, 0, [90, 99]), ALICE)
        self.assertEqual(choose_actor(r, f"{V1}", 0, []), None)


class RefusalLabelTests(SynchronousTestCase):
    def test_label(self) -> None:
        self.assertEqual(RoomRefusal(8, "power_level_above_max").label, "R8")
        self.assertEqual(str(RoomRefusal(2, "not_invited")), "R2 not_invited")
