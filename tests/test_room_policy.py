"""The room rules R1-R7 (docs/room-rules.md) as tables: facts in, rule and code out."""

from __future__ import annotations

import math
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from sbg.policy.room_facts import Event, Room, RoomRequest, Servers, StateEvent, room_from_state
from sbg.policy.rooms import (
    REASONS,
    RoomRefusal,
    check_event,
    check_incoming_invite,
    check_publication,
    check_room_request,
    desired_acl,
    same_acl,
)
from tests.room_facts import (
    ACL_EVENTS,
    ALICE,
    BOB,
    CAROL,
    EVE,
    INT,
    NED,
    SERVERS,
    VIC,
)


def room(
    rule: str | None = None,
    join_rule: str = "invite",
    published: bool = False,
    members: dict[str, str] | None = None,
    creator: str = ALICE,
    users: dict[str, int] | None = None,
    users_default: int = 0,
) -> Room:
    return Room(
        rule=rule or "restricted",
        rule_declared=rule is not None,
        join_rule=join_rule,
        published=published,
        creator=creator,
        power_levels={
            "users": {creator: 100, **(users or {})},
            "users_default": users_default,
            "events": ACL_EVENTS,
        },
        members={creator: "join", **(members or {})},
    )


def member(sender: str, target: str, membership: str, **content: Any) -> Event:
    return Event("m.room.member", sender, {"membership": membership, **content}, target)


def state(event_type: str, sender: str, content: dict[str, Any], key: str = "") -> Event:
    return Event(event_type, sender, content, key)


def decision(refusal: RoomRefusal | None) -> str | None:
    return None if refusal is None else str(refusal)


class TableTestCase(SynchronousTestCase):
    def check_table(self, table: list[tuple[str, RoomRefusal | None, str | None]]) -> None:
        """Rows of (description, decision, expected "R<n> code" or None)."""
        wrong = [
            f"{name}: got {decision(got)}, want {want}"
            for name, got, want in table
            if decision(got) != want
        ]
        self.assertEqual(wrong, [])


class InviteTests(TableTestCase):
    """R1: who an internal user may invite where (and R7: unknown servers)."""

    def test_invites(self) -> None:
        open_room = room("unrestricted")
        dm = room("direct")
        full_dm = room("direct", members={CAROL: "invite"})
        public = room(join_rule="public")
        published = room(published=True)
        knock = room(join_rule="knock")
        self.check_table(
            [
                (
                    "internal into restricted",
                    check_event(SERVERS, room(), member(ALICE, CAROL, "invite")),
                    None,
                ),
                (
                    "V1 into restricted",
                    check_event(SERVERS, room(), member(ALICE, BOB, "invite")),
                    "R1 room_restricted",
                ),
                (
                    "V1 into absent rule",
                    check_event(SERVERS, room(None), member(ALICE, BOB, "invite")),
                    "R1 room_restricted",
                ),
                (
                    "V1 into unrestricted",
                    check_event(SERVERS, open_room, member(ALICE, BOB, "invite")),
                    None,
                ),
                ("V1 into direct", check_event(SERVERS, dm, member(ALICE, BOB, "invite")), None),
                (
                    "V1 into full direct",
                    check_event(SERVERS, full_dm, member(ALICE, BOB, "invite")),
                    "R1 direct_room_full",
                ),
                (
                    "internal into full direct",
                    check_event(SERVERS, full_dm, member(ALICE, f"@dan:{INT}", "invite")),
                    "R1 direct_room_full",
                ),
                (
                    "V1 into public restricted",
                    check_event(SERVERS, public, member(ALICE, BOB, "invite")),
                    "R1 room_public",
                ),
                (
                    "V1 into published",
                    check_event(SERVERS, published, member(ALICE, BOB, "invite")),
                    "R1 room_public",
                ),
                (
                    "V1 into knock room",
                    check_event(SERVERS, knock, member(ALICE, BOB, "invite")),
                    "R1 room_public",
                ),
                (
                    "V2 into restricted",
                    check_event(SERVERS, room(), member(ALICE, VIC, "invite")),
                    None,
                ),
                (
                    "V2 into public",
                    check_event(SERVERS, public, member(ALICE, VIC, "invite")),
                    "R1 room_public",
                ),
                (
                    "none-level into unrestricted",
                    check_event(SERVERS, open_room, member(ALICE, NED, "invite")),
                    "R1 never_invited",
                ),
                (
                    "unknown into unrestricted",
                    check_event(SERVERS, open_room, member(ALICE, EVE, "invite")),
                    "R1 unknown_server",
                ),
                (
                    "already invited",
                    check_event(
                        SERVERS, room(members={BOB: "invite"}), member(ALICE, BOB, "invite")
                    ),
                    None,
                ),
                (
                    "3pid-redeeming invite, open room",
                    check_event(
                        SERVERS, open_room, member(ALICE, CAROL, "invite", third_party_invite={})
                    ),
                    "R6 third_party_invite",
                ),
            ]
        )

    def test_a_disabled_server_is_unknown(self) -> None:
        servers = Servers(internal=frozenset({INT}), external={})
        refusal = check_event(servers, room("unrestricted"), member(ALICE, BOB, "invite"))
        self.assertEqual(refusal, RoomRefusal(1, "unknown_server"))


class JoinTests(TableTestCase):
    """R2: users of other servers joining our rooms (make_join templates, send_knock)."""

    def test_remote_joins_and_knocks(self) -> None:
        invited = {BOB: "invite", VIC: "invite"}
        self.check_table(
            [
                (
                    "V1 invited, unrestricted",
                    check_event(
                        SERVERS, room("unrestricted", members=invited), member(BOB, BOB, "join")
                    ),
                    None,
                ),
                (
                    "V1 not invited, unrestricted",
                    check_event(SERVERS, room("unrestricted"), member(BOB, BOB, "join")),
                    "R2 not_invited",
                ),
                (
                    "V1 restricted room, invited anyway",
                    check_event(SERVERS, room(members=invited), member(BOB, BOB, "join")),
                    "R2 room_restricted",
                ),
                (
                    "V1 public room",
                    check_event(SERVERS, room(join_rule="public"), member(BOB, BOB, "join")),
                    "R2 public_room_not_allowed",
                ),
                (
                    "V1 public room, invited",
                    check_event(
                        SERVERS, room(join_rule="public", members=invited), member(BOB, BOB, "join")
                    ),
                    "R2 public_room_not_allowed",
                ),
                (
                    "V1 published room",
                    check_event(SERVERS, room(published=True), member(BOB, BOB, "join")),
                    "R2 public_room_not_allowed",
                ),
                (
                    "V2 public room",
                    check_event(SERVERS, room(join_rule="public"), member(VIC, VIC, "join")),
                    None,
                ),
                (
                    "V2 restricted, invited",
                    check_event(SERVERS, room(members=invited), member(VIC, VIC, "join")),
                    None,
                ),
                (
                    "V2 restricted, not invited",
                    check_event(SERVERS, room(), member(VIC, VIC, "join")),
                    "R2 not_invited",
                ),
                (
                    "V1 already joined (profile)",
                    check_event(SERVERS, room(members={BOB: "join"}), member(BOB, BOB, "join")),
                    None,
                ),
                (
                    "unknown joins public",
                    check_event(SERVERS, room(join_rule="public"), member(EVE, EVE, "join")),
                    "R7 unknown_server",
                ),
                (
                    "V1 knocks",
                    check_event(SERVERS, room(join_rule="knock"), member(BOB, BOB, "knock")),
                    "R2 knock_not_allowed",
                ),
                (
                    "V2 knocks",
                    check_event(SERVERS, room(join_rule="knock"), member(VIC, VIC, "knock")),
                    None,
                ),
                (
                    "leave is always allowed",
                    check_event(SERVERS, room(members={BOB: "join"}), member(BOB, BOB, "leave")),
                    None,
                ),
            ]
        )


class ExternalRoomTests(TableTestCase):
    """R3: internal users and rooms hosted on external servers."""

    def test_local_joins(self) -> None:
        def hosted(creator: str, join_rule: str = "public", **kw: Any) -> Room:
            return room(join_rule=join_rule, creator=creator, **kw)

        self.check_table(
            [
                (
                    "V1 public room",
                    check_event(SERVERS, hosted(BOB), member(ALICE, ALICE, "join")),
                    "R3 external_public_room",
                ),
                (
                    "V1 published room",
                    check_event(
                        SERVERS, hosted(BOB, "invite", published=True), member(ALICE, ALICE, "join")
                    ),
                    "R3 external_public_room",
                ),
                (
                    "V1 private room (invited)",
                    check_event(SERVERS, hosted(BOB, "invite"), member(ALICE, ALICE, "join")),
                    None,
                ),
                (
                    "V2 public room",
                    check_event(SERVERS, hosted(VIC), member(ALICE, ALICE, "join")),
                    None,
                ),
                (
                    "internal public room",
                    check_event(SERVERS, hosted(CAROL), member(ALICE, ALICE, "join")),
                    None,
                ),
                (
                    "unknown server's room",
                    check_event(SERVERS, hosted(EVE, "invite"), member(ALICE, ALICE, "join")),
                    "R7 unknown_server_room",
                ),
                (
                    "knock on V1 room",
                    check_event(SERVERS, hosted(BOB, "knock"), member(ALICE, ALICE, "knock")),
                    "R3 external_public_room",
                ),
                (
                    "knock on V2 room",
                    check_event(SERVERS, hosted(VIC, "knock"), member(ALICE, ALICE, "knock")),
                    None,
                ),
            ]
        )

    def test_incoming_invites(self) -> None:
        def stripped(creator: str, join_rule: str) -> list[dict[str, Any]]:
            return [
                {"type": "m.room.create", "sender": creator, "state_key": "", "content": {}},
                {
                    "type": "m.room.join_rules",
                    "sender": creator,
                    "state_key": "",
                    "content": {"join_rule": join_rule},
                },
            ]

        self.check_table(
            [
                (
                    "V1 invites into V1 public room",
                    check_incoming_invite(SERVERS, BOB, stripped(BOB, "public")),
                    "R3 external_public_room",
                ),
                (
                    "V1 invites into V1 knock room",
                    check_incoming_invite(SERVERS, BOB, stripped(BOB, "knock")),
                    "R3 external_public_room",
                ),
                (
                    "V1 invites into V1 private room",
                    check_incoming_invite(SERVERS, BOB, stripped(BOB, "invite")),
                    None,
                ),
                (
                    "V1 invites into our public room",
                    check_incoming_invite(SERVERS, BOB, stripped(CAROL, "public")),
                    None,
                ),
                (
                    "V2 invites into V2 public room",
                    check_incoming_invite(SERVERS, VIC, stripped(VIC, "public")),
                    None,
                ),
                (
                    "V2 invites into unknown's room",
                    check_incoming_invite(SERVERS, VIC, stripped(EVE, "invite")),
                    "R7 unknown_server_room",
                ),
                (
                    "no create event: the inviter's server",
                    check_incoming_invite(SERVERS, BOB, stripped(BOB, "public")[1:]),
                    "R3 external_public_room",
                ),
                ("no stripped state", check_incoming_invite(SERVERS, BOB, []), None),
                (
                    "garbage stripped state",
                    check_incoming_invite(SERVERS, BOB, [1, "x", {"type": 3}]),
                    None,
                ),  # type: ignore[list-item]
                ("unknown inviter", check_incoming_invite(SERVERS, EVE, []), "R7 unknown_server"),
            ]
        )


class PowerLevelTests(TableTestCase):
    """R4: power levels of external users, users_default, creators."""

    def test_power_levels(self) -> None:
        members = {BOB: "join", VIC: "join"}

        def pl(users: dict[str, int], users_default: int = 0) -> Event:
            return state(
                "m.room.power_levels",
                ALICE,
                {
                    "users": {ALICE: 100, **users},
                    "users_default": users_default,
                    "events": ACL_EVENTS,
                },
            )

        open_room = room("unrestricted", members=members)
        self.check_table(
            [
                ("V1 at 0", check_event(SERVERS, open_room, pl({BOB: 0})), None),
                (
                    "V1 at 1",
                    check_event(SERVERS, open_room, pl({BOB: 1})),
                    "R4 power_level_above_max",
                ),
                (
                    "V1 at 100",
                    check_event(SERVERS, open_room, pl({BOB: 100})),
                    "R4 power_level_above_max",
                ),
                ("V2 at 50", check_event(SERVERS, open_room, pl({VIC: 50})), None),
                (
                    "V2 at 51",
                    check_event(SERVERS, open_room, pl({VIC: 51})),
                    "R4 power_level_above_max",
                ),
                (
                    "unknown at 10",
                    check_event(SERVERS, open_room, pl({EVE: 10})),
                    "R4 power_level_above_max",
                ),
                ("internal at 100", check_event(SERVERS, open_room, pl({CAROL: 100})), None),
                (
                    "users_default 10, open room",
                    check_event(SERVERS, open_room, pl({}, 10)),
                    "R4 power_level_above_max",
                ),
                (
                    "users_default 10, open room, no external member",
                    check_event(SERVERS, room("unrestricted"), pl({}, 10)),
                    "R4 users_default_above_zero",
                ),
                (
                    "users_default 10, restricted internal room",
                    check_event(SERVERS, room(), pl({}, 10)),
                    None,
                ),
                (
                    "users_default 60, restricted room with V2",
                    check_event(SERVERS, room(members={VIC: "join"}), pl({}, 60)),
                    "R4 power_level_above_max",
                ),
                (
                    "users_default 60, V2 pinned at 50",
                    check_event(SERVERS, room(members={VIC: "join"}), pl({VIC: 50}, 60)),
                    None,
                ),
                (
                    "V1 level not a number",
                    check_event(SERVERS, open_room, pl({BOB: "1"})),
                    "R4 power_level_above_max",
                ),  # type: ignore[dict-item]
            ]
        )

    def test_the_acl_stays_out_of_external_users_reach(self) -> None:
        """R7: where the rules keep the ACL, changing it needs more than any
        admitted external user may hold (V2: 50)."""
        open_room = room("unrestricted", members={VIC: "join"})

        def acl_at(level: int | None, state_default: int | None = None) -> Event:
            content: dict[str, Any] = {"users": {ALICE: 100}}
            if level is not None:
                content["events"] = {"m.room.server_acl": level}
            if state_default is not None:
                content["state_default"] = state_default
            return state("m.room.power_levels", ALICE, content)

        self.check_table(
            [
                ("ACL at 100", check_event(SERVERS, open_room, acl_at(100)), None),
                ("ACL at 51", check_event(SERVERS, open_room, acl_at(51)), None),
                ("ACL at 50", check_event(SERVERS, open_room, acl_at(50)), "R7 acl_unprotected"),
                (
                    "ACL by state_default 50",
                    check_event(SERVERS, open_room, acl_at(None)),
                    "R7 acl_unprotected",
                ),
                (
                    "ACL by state_default 60",
                    check_event(SERVERS, open_room, acl_at(None, 60)),
                    None,
                ),
                ("internal-only room", check_event(SERVERS, room(), acl_at(0)), None),
                (
                    "opening a room whose ACL needs 50",
                    check_event(
                        SERVERS,
                        Room(**{**room().__dict__, "power_levels": {"state_default": 50}}),
                        state("im.vector.room.access_rules", ALICE, {"rule": "unrestricted"}),
                    ),
                    "R7 acl_unprotected",
                ),
            ]
        )

    def test_a_violation_already_there_does_not_block_other_changes(self) -> None:
        broken = room("unrestricted", members={BOB: "join"}, users={BOB: 50})
        keeps = state(
            "m.room.power_levels",
            ALICE,
            {"users": {ALICE: 100, BOB: 50}, "ban": 60, "events": ACL_EVENTS},
        )
        raises = state(
            "m.room.power_levels", ALICE, {"users": {ALICE: 100, BOB: 60}, "events": ACL_EVENTS}
        )
        self.assertIsNone(check_event(SERVERS, broken, keeps))
        self.assertEqual(
            check_event(SERVERS, broken, raises), RoomRefusal(4, "power_level_above_max")
        )

    def test_creators(self) -> None:
        def create(extra: list[Any]) -> Event:
            return Event(
                "m.room.create", ALICE, {"room_version": "12", "additional_creators": extra}, ""
            )

        self.check_table(
            [
                ("internal creators", check_event(SERVERS, Room(), create([CAROL])), None),
                ("V2 creator", check_event(SERVERS, Room(), create([VIC])), "R4 external_creator"),
                (
                    "V1 creator",
                    check_event(SERVERS, Room(), create([CAROL, BOB])),
                    "R4 external_creator",
                ),
                (
                    "garbage creator",
                    check_event(SERVERS, Room(), create([3])),
                    "R4 external_creator",
                ),
                ("none", check_event(SERVERS, Room(), Event("m.room.create", ALICE, {}, "")), None),
            ]
        )

    def test_power_as_synapse_computes_it(self) -> None:
        r = room_from_state(
            {
                ("m.room.create", ""): StateEvent(ALICE, {"additional_creators": [CAROL]}),
                ("m.room.power_levels", ""): StateEvent(
                    ALICE, {"users": {BOB: 10}, "users_default": 5}
                ),
            },
            creator_power=True,
        )
        self.assertEqual((r.power(ALICE), r.power(CAROL)), (math.inf, math.inf))
        self.assertEqual((r.power(BOB), r.power(VIC)), (10, 5))
        old = room_from_state({("m.room.create", ""): StateEvent(ALICE, {})})
        self.assertEqual((old.power(ALICE), old.power(BOB)), (100, 0))


class AccessRulesTests(TableTestCase):
    """R5: room classes only go from restricted to unrestricted, never public."""

    def test_transitions(self) -> None:
        def rules(value: Any, sender: str = ALICE) -> Event:
            return state("im.vector.room.access_rules", sender, {"rule": value})

        self.check_table(
            [
                (
                    "absent -> unrestricted",
                    check_event(SERVERS, room(None), rules("unrestricted")),
                    None,
                ),
                (
                    "absent -> direct (new room)",
                    check_event(SERVERS, room(None), rules("direct")),
                    None,
                ),
                (
                    "absent -> direct (three members)",
                    check_event(
                        SERVERS,
                        room(None, members={CAROL: "join", f"@d:{INT}": "invite"}),
                        rules("direct"),
                    ),
                    "R5 direct_room_full",
                ),
                (
                    "restricted -> unrestricted",
                    check_event(SERVERS, room("restricted"), rules("unrestricted")),
                    None,
                ),
                (
                    "restricted -> restricted",
                    check_event(SERVERS, room("restricted"), rules("restricted")),
                    None,
                ),
                (
                    "unrestricted -> restricted",
                    check_event(SERVERS, room("unrestricted"), rules("restricted")),
                    "R5 rule_change_not_allowed",
                ),
                (
                    "restricted -> direct",
                    check_event(SERVERS, room("restricted"), rules("direct")),
                    "R5 rule_change_not_allowed",
                ),
                (
                    "direct -> unrestricted",
                    check_event(SERVERS, room("direct"), rules("unrestricted")),
                    "R5 rule_change_not_allowed",
                ),
                ("direct -> direct", check_event(SERVERS, room("direct"), rules("direct")), None),
                ("invalid value", check_event(SERVERS, room(), rules("open")), "R5 invalid_rule"),
                (
                    "missing value",
                    check_event(SERVERS, room(), state("im.vector.room.access_rules", ALICE, {})),
                    "R5 invalid_rule",
                ),
                (
                    "by a V2 user",
                    check_event(SERVERS, room(), rules("unrestricted", VIC)),
                    "R5 external_sender",
                ),
                (
                    "public room -> unrestricted",
                    check_event(SERVERS, room(join_rule="public"), rules("unrestricted")),
                    "R5 unrestricted_room_public",
                ),
                (
                    "published room -> unrestricted",
                    check_event(SERVERS, room(published=True), rules("unrestricted")),
                    "R5 unrestricted_room_public",
                ),
                (
                    "-> unrestricted with users_default 10",
                    check_event(SERVERS, room(users_default=10), rules("unrestricted")),
                    "R4 users_default_above_zero",
                ),
            ]
        )

    def test_join_rules_and_directory(self) -> None:
        def join_rule(value: str) -> Event:
            return state("m.room.join_rules", ALICE, {"join_rule": value})

        self.check_table(
            [
                (
                    "unrestricted -> public",
                    check_event(SERVERS, room("unrestricted"), join_rule("public")),
                    "R5 unrestricted_room_public",
                ),
                (
                    "unrestricted -> knock",
                    check_event(SERVERS, room("unrestricted"), join_rule("knock")),
                    "R5 unrestricted_room_public",
                ),
                (
                    "direct -> knock_restricted",
                    check_event(SERVERS, room("direct"), join_rule("knock_restricted")),
                    "R5 unrestricted_room_public",
                ),
                (
                    "unrestricted -> restricted",
                    check_event(SERVERS, room("unrestricted"), join_rule("restricted")),
                    None,
                ),
                ("restricted -> public", check_event(SERVERS, room(), join_rule("public")), None),
                (
                    "publish unrestricted",
                    check_publication(room("unrestricted")),
                    "R5 unrestricted_room_public",
                ),
                (
                    "publish direct",
                    check_publication(room("direct")),
                    "R5 unrestricted_room_public",
                ),
                ("publish restricted", check_publication(room()), None),
            ]
        )


class ThirdPartyInviteTests(TableTestCase):
    """R6: third-party invites only in restricted rooms."""

    def test_third_party_invites(self) -> None:
        invite = state("m.room.third_party_invite", ALICE, {"display_name": "x@example.org"}, "tok")
        revoke = state("m.room.third_party_invite", ALICE, {}, "tok")
        self.check_table(
            [
                ("restricted", check_event(SERVERS, room(), invite), None),
                (
                    "unrestricted",
                    check_event(SERVERS, room("unrestricted"), invite),
                    "R6 third_party_invite",
                ),
                ("direct", check_event(SERVERS, room("direct"), invite), "R6 third_party_invite"),
                ("revocation", check_event(SERVERS, room("unrestricted"), revoke), None),
            ]
        )


class AclTests(TableTestCase):
    """R7: the server ACL the rules keep."""

    def test_desired_acl(self) -> None:
        self.assertEqual(
            desired_acl(SERVERS, room("unrestricted")),
            {
                "allow": [
                    "int.example",
                    "other-ministry.example",
                    "other-ministry.example:8448",
                    "v1.example",
                    "v2.example",
                ],
                "deny": [],
                "allow_ip_literals": False,
            },
        )
        self.assertEqual(
            desired_acl(SERVERS, room(members={VIC: "join"}))["allow"],
            ["int.example", "other-ministry.example", "other-ministry.example:8448", "v2.example"],
        )
        self.assertEqual(
            desired_acl(SERVERS, room(join_rule="public", members={VIC: "join"}))["allow"],
            ["int.example", "other-ministry.example", "other-ministry.example:8448", "v2.example"],
        )

    def test_acl_events(self) -> None:
        wanted = desired_acl(SERVERS, room("unrestricted"))
        wider = {**wanted, "allow": [*wanted["allow"], "evil.example"]}
        reordered = {**wanted, "allow": list(reversed(wanted["allow"]))}
        self.check_table(
            [
                (
                    "the wanted ACL",
                    check_event(
                        SERVERS, room("unrestricted"), state("m.room.server_acl", ALICE, wanted)
                    ),
                    None,
                ),
                (
                    "reordered",
                    check_event(
                        SERVERS, room("unrestricted"), state("m.room.server_acl", ALICE, reordered)
                    ),
                    None,
                ),
                (
                    "wider",
                    check_event(
                        SERVERS, room("unrestricted"), state("m.room.server_acl", ALICE, wider)
                    ),
                    "R7 acl_managed",
                ),
                (
                    "internal-only room: anything",
                    check_event(SERVERS, room(), state("m.room.server_acl", ALICE, wider)),
                    None,
                ),
                (
                    "external room: not ours",
                    check_event(
                        SERVERS,
                        room("unrestricted", creator=VIC),
                        state("m.room.server_acl", ALICE, wider),
                    ),
                    None,
                ),
            ]
        )
        self.assertFalse(same_acl(None, wanted))
        self.assertFalse(same_acl({"allow": wanted["allow"]}, wanted))  # IP literals allowed


class RoomRequestTests(TableTestCase):
    """createRoom requests, refused whole before the room exists."""

    def test_requests(self) -> None:
        def req(**kw: Any) -> RoomRequest:
            return RoomRequest(**{"creator": ALICE, "rule": None, "public": False, **kw})

        self.check_table(
            [
                ("plain room", check_room_request(SERVERS, req()), None),
                (
                    "restricted, invite V1",
                    check_room_request(SERVERS, req(invitees=(BOB,))),
                    "R1 room_restricted",
                ),
                (
                    "unrestricted, invite V1",
                    check_room_request(SERVERS, req(rule="unrestricted", invitees=(BOB,))),
                    None,
                ),
                (
                    "direct, invite two",
                    check_room_request(SERVERS, req(rule="direct", invitees=(BOB, CAROL))),
                    "R1 direct_room_full",
                ),
                (
                    "unrestricted and public",
                    check_room_request(SERVERS, req(rule="unrestricted", public=True)),
                    "R5 unrestricted_room_public",
                ),
                ("invalid rule", check_room_request(SERVERS, req(rule="wide")), "R5 invalid_rule"),
                (
                    "3pid invite, unrestricted",
                    check_room_request(SERVERS, req(rule="unrestricted", third_party_invites=1)),
                    "R6 third_party_invite",
                ),
                (
                    "3pid invite, restricted",
                    check_room_request(SERVERS, req(third_party_invites=1)),
                    None,
                ),
                (
                    "V1 made a creator",
                    check_room_request(
                        SERVERS, req(rule="unrestricted", invitees=(BOB,), privileged=(BOB,))
                    ),
                    "R4 external_creator",
                ),
                (
                    "V1 at 100 by override",
                    check_room_request(
                        SERVERS,
                        req(
                            rule="unrestricted", invitees=(BOB,), power_levels={"users": {BOB: 100}}
                        ),
                    ),
                    "R4 power_level_above_max",
                ),
                (
                    "unknown invitee",
                    check_room_request(SERVERS, req(rule="unrestricted", invitees=(EVE,))),
                    "R1 unknown_server",
                ),
            ]
        )


class FactsTests(SynchronousTestCase):
    def test_room_from_state(self) -> None:
        r = room_from_state(
            {
                ("m.room.create", ""): StateEvent(ALICE, {}),
                ("im.vector.room.access_rules", ""): StateEvent(ALICE, {"rule": "unrestricted"}),
                ("m.room.join_rules", ""): StateEvent(ALICE, {"join_rule": "knock"}),
                ("m.room.member", ALICE): StateEvent(ALICE, {"membership": "join"}),
                ("m.room.member", BOB): StateEvent(ALICE, {"membership": "invite"}),
                ("m.room.member", VIC): StateEvent(VIC, {"membership": 3}),
            },
            published=False,
        )
        self.assertEqual(
            (r.rule, r.rule_declared, r.join_rule, r.public), ("unrestricted", True, "knock", True)
        )
        self.assertEqual(r.host, INT)
        self.assertEqual(r.members, {ALICE: "join", BOB: "invite", VIC: "leave"})
        self.assertEqual(r.member_count(), 2)

    def test_unknown_or_missing_rule_is_restricted(self) -> None:
        for content in ({"rule": "open"}, {"rule": 1}, {}):
            r = room_from_state({("im.vector.room.access_rules", ""): StateEvent(ALICE, content)})
            self.assertEqual(r.rule, "restricted")
        self.assertEqual(room_from_state({}).rule, "restricted")
        self.assertFalse(room_from_state({}).rule_declared)

    def test_every_code_has_a_reason(self) -> None:
        for code, text in REASONS.items():
            self.assertRegex(code, r"^[a-z_]+$")
            self.assertTrue(text and "\n" not in text, code)
        with self.assertRaises(AssertionError):
            RoomRefusal(1, "no_such_code")
