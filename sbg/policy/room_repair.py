"""Rule R8 (undo what could not be refused) and the upkeep of rule R7's ACL.

Pure planning, like `sbg.policy.rooms`: given the state of a room right
after an event was persisted (the event itself, the content it replaced,
and which users are local), `plan_repairs` lists the state changes that
bring the room back within the rules, each with the local user able to make
it. `sbg.synapse` carries them out.

What can be undone, and how (each action is an ordinary event, authorised
by the room's own auth rules, so it holds on every server):

* a user of another server who became a member (invited, joined, knocking)
  in breach of R1, R2 or R7 is kicked (a kick also revokes an invite and
  rejects a knock);
* an internal user who joined a room R3 forbids leaves it;
* a power-levels event that breaks R4 is followed by one that restores the
  previous level of each user it raised (or their maximum) and
  `users_default` 0;
* an access-rules change that breaks R5 is reverted to the previous rule;
  a join-rules change that makes an open room public is reverted (to the
  previous join rule, else `invite`);
* a third-party invite in an open room (R6) is revoked (emptied);
* the server ACL of a room whose ACL the rules keep (R7) is set whenever it
  differs from the one wanted: that is its upkeep when a room opens, and
  the undoing of a change or redaction made by anyone else.

A correction is made by the local joined member with the highest power
level that the auth rules allow to make it and that outranks the sender of
the offending event; when there is none, the plan says so (actor None).
Corrections are planned only in rooms hosted on an internal server, except
for R3, which is about internal users in other servers' rooms.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sbg.config.model import RoomSettings
from sbg.matrix.ids import server_of
from sbg.policy.room_facts import (
    ACCESS_RULES,
    DIRECT_MAX_MEMBERS,
    JOIN_RULES,
    MEMBER,
    POWER_LEVELS,
    PRESENT,
    PUBLIC_JOIN_RULES,
    RESTRICTED,
    SERVER_ACL,
    THIRD_PARTY_INVITE,
    Event,
    Room,
    Servers,
    user_power,
)
from sbg.policy.rooms import (
    RoomRefusal,
    acl_managed,
    acl_unprotected,
    admission,
    check_access_rules,
    check_local_join,
    desired_acl,
    other_server,
    power_level_violations,
    same_acl,
)

REDACTION = "m.room.redaction"


@dataclass(frozen=True)
class Kick:
    """Set USER's membership to leave (by another user)."""

    user: str


@dataclass(frozen=True)
class Leave:
    """USER leaves the room."""

    user: str


@dataclass(frozen=True)
class SetState:
    """Send this state event (a reset, or the kept server ACL)."""

    type: str
    state_key: str
    content: Mapping[str, Any]


Action = Kick | Leave | SetState


@dataclass(frozen=True)
class Repair:
    """ACTION, by ACTOR (a local user; None: nobody here may do it).

    `refusal` names the rule the event broke; None for upkeep that undoes
    nothing (the first ACL of a room that opens to external users).
    """

    action: Action
    actor: str | None
    refusal: RoomRefusal | None


def local_members(room: Room, local_server: str) -> list[str]:
    """ROOM's joined members on LOCAL_SERVER, most powerful first."""
    users = [u for u, m in room.members.items() if m == "join" and server_of(u) == local_server]
    return sorted(users, key=lambda u: (-room.power(u), u))


def choose_actor(
    room: Room, local_server: str, needed: float, above: Iterable[float]
) -> str | None:
    """The most powerful local member with at least NEEDED and more than each ABOVE.

    NEEDED is what the auth rules ask of the sender; ABOVE are the levels
    the actor must exceed (the users it changes, the offending sender).
    """
    bar = max(above, default=-math.inf)
    for user in local_members(room, local_server):
        power = room.power(user)
        if power >= needed and power > bar:
            return user
    return None


def _remote_power(room: Room, sender: str, local_server: str) -> list[float]:
    """The sender's power, when the sender is not local (what a repair must outrank)."""
    return [] if server_of(sender) == local_server else [room.power(sender)]


def member_refusal(
    servers: Servers, room: Room, user: str, membership: str, content: Mapping[str, Any]
) -> RoomRefusal | None:
    """Why USER (of another server), now MEMBERSHIP in ROOM, may not be, or None.

    ROOM is the state after the membership event.
    """
    if membership not in PRESENT:
        return None
    settings = other_server(servers, user)
    if not isinstance(settings, RoomSettings):
        return settings
    if membership == "knock":
        return None if settings.join_public else RoomRefusal(2, "knock_not_allowed")
    rule = 1 if membership == "invite" else 2
    if room.public:
        if membership == "join":
            return None if settings.join_public else RoomRefusal(2, "public_room_not_allowed")
        return (
            RoomRefusal(1, "room_public")
            if settings.invite != "none"
            else RoomRefusal(1, "never_invited")
        )
    if membership == "join" and "join_authorised_via_users_server" in content:
        return RoomRefusal(2, "not_invited")
    code = admission(settings, room)
    if code is not None:
        return RoomRefusal(rule, code)
    if (
        membership == "invite"
        and room.rule == "direct"
        and room.member_count() > DIRECT_MAX_MEMBERS
    ):
        return RoomRefusal(1, "direct_room_full")
    return None


def corrected_power_levels(
    servers: Servers,
    room: Room,
    content: Mapping[str, Any],
    previous: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """CONTENT brought within R4: users_default back to 0 in an open room, and
    each user above their maximum back to their previous level when that was
    within it, else to their maximum."""
    fixed = dict(content)
    if room.rule != RESTRICTED and _default(content) > 0:
        before = _default(previous) if previous is not None else 0
        fixed["users_default"] = before if before <= 0 else 0
    if acl_unprotected(servers, room, fixed):
        events = fixed.get("events")
        fixed["events"] = {**(events if isinstance(events, Mapping) else {}), SERVER_ACL: 100}
    violations = power_level_violations(servers, room, fixed)
    if violations:
        users = content.get("users")
        new_users = dict(users) if isinstance(users, Mapping) else {}
        for user in violations:
            limit = servers.max_power(user)
            earlier = user_power(previous, user) if previous is not None else None
            new_users[user] = earlier if earlier is not None and earlier <= limit else int(limit)
        fixed["users"] = new_users
    return fixed


def _changed_users(
    old: Mapping[str, Any], new: Mapping[str, Any], users: Iterable[str]
) -> list[str]:
    return [u for u in users if user_power(old, u) != user_power(new, u)]


def plan_repairs(
    servers: Servers,
    room: Room,
    event: Event,
    previous: Mapping[str, Any] | None,
    local_server: str,
    *,
    superseded: bool = False,
) -> list[Repair]:
    """What to do after EVENT, now persisted, left ROOM (its current state) as it is.

    PREVIOUS is the content of the state event EVENT replaced (None when
    there was none or it is not known). SUPERSEDED: a later event replaced
    EVENT already; only the ACL upkeep applies.
    """
    if superseded:
        acl = acl_repair(servers, room, event, local_server, [])
        return [acl] if acl is not None else []
    key = event.state_key
    membership = _membership_change(event, previous)
    if membership == "join" and key is not None and server_of(key) == local_server:
        refusal = check_local_join(servers, room)
        if refusal is not None:
            return [Repair(Leave(key), key, refusal)]
    if servers.kind(room.host) != "internal":
        return []
    repair: Repair | None = None
    sender_power = _remote_power(room, event.sender, local_server)
    if membership is not None and key is not None:
        repair = _member_repair(servers, room, event, key, membership, local_server, sender_power)
    elif key == "" and event.type == POWER_LEVELS:
        repair = _power_levels_repair(servers, room, event, previous, local_server, sender_power)
    elif key == "" and event.type == ACCESS_RULES:
        repair = _access_rules_repair(servers, room, event, previous, local_server, sender_power)
    elif key == "" and event.type == JOIN_RULES:
        repair = _join_rules_repair(room, event, previous, local_server, sender_power)
    elif key is not None and event.type == THIRD_PARTY_INVITE and event.content:
        repair = _third_party_invite_repair(room, key, local_server, sender_power)
    if repair is not None:
        # The repair's own event brings the room here again: the ACL is
        # judged then, on the repaired state.
        return [repair]
    acl = acl_repair(servers, room, event, local_server, sender_power)
    return [acl] if acl is not None else []


def _membership_change(event: Event, previous: Mapping[str, Any] | None) -> str | None:
    """The membership EVENT sets, or None when it is not a membership change."""
    if event.type != MEMBER or event.state_key is None:
        return None
    membership = event.content.get("membership")
    if not isinstance(membership, str):
        return None
    if previous is not None and previous.get("membership") == membership:
        return None  # a profile change
    return membership


def _member_repair(
    servers: Servers,
    room: Room,
    event: Event,
    user: str,
    membership: str,
    local_server: str,
    sender_power: list[float],
) -> Repair | None:
    refusal = member_refusal(servers, room, user, membership, event.content)
    if refusal is None:
        return None
    needed = room.named_level("kick", 50)
    actor = choose_actor(room, local_server, needed, [room.power(user), *sender_power])
    return Repair(Kick(user), actor, refusal)


def _power_levels_repair(
    servers: Servers,
    room: Room,
    event: Event,
    previous: Mapping[str, Any] | None,
    local_server: str,
    sender_power: list[float],
) -> Repair | None:
    fixed = corrected_power_levels(servers, room, event.content, previous)
    if fixed == dict(event.content):
        return None
    refusal = RoomRefusal(4, "power_level_above_max")
    if not power_level_violations(servers, room, event.content):
        refusal = RoomRefusal(4, "users_default_above_zero")
        if _default(event.content) <= 0 or room.rule == RESTRICTED:
            refusal = RoomRefusal(7, "acl_unprotected")
    changed = _changed_users(event.content, fixed, set(room.present()) | _named(fixed))
    above = [room.power(u) for u in changed] + sender_power
    # Changing users_default needs at least its current value.
    needed = max(room.level_for(POWER_LEVELS), _default(event.content))
    actor = choose_actor(room, local_server, needed, above)
    return Repair(SetState(POWER_LEVELS, "", fixed), actor, refusal)


def _access_rules_repair(
    servers: Servers,
    room: Room,
    event: Event,
    previous: Mapping[str, Any] | None,
    local_server: str,
    sender_power: list[float],
) -> Repair | None:
    before = Room(
        rule=_rule(previous),
        rule_declared=previous is not None,
        join_rule=room.join_rule,
        published=room.published,
        creator=room.creator,
        creators=room.creators,
        power_levels=room.power_levels,
        members=room.members,
    )
    refusal = check_access_rules(servers, before, event)
    if refusal is None:
        return None
    restore = dict(previous) if previous is not None else {"rule": RESTRICTED}
    actor = choose_actor(room, local_server, room.level_for(ACCESS_RULES), sender_power)
    return Repair(SetState(ACCESS_RULES, "", restore), actor, refusal)


def _join_rules_repair(
    room: Room,
    event: Event,
    previous: Mapping[str, Any] | None,
    local_server: str,
    sender_power: list[float],
) -> Repair | None:
    if room.rule == RESTRICTED or event.content.get("join_rule") not in PUBLIC_JOIN_RULES:
        return None
    earlier = previous.get("join_rule") if previous is not None else None
    if not isinstance(earlier, str) or earlier in PUBLIC_JOIN_RULES:
        earlier = "invite"
    actor = choose_actor(room, local_server, room.level_for(JOIN_RULES), sender_power)
    restore = SetState(JOIN_RULES, "", {"join_rule": earlier})
    return Repair(restore, actor, RoomRefusal(5, "unrestricted_room_public"))


def _third_party_invite_repair(
    room: Room, key: str, local_server: str, sender_power: list[float]
) -> Repair | None:
    if room.rule == RESTRICTED:
        return None
    actor = choose_actor(room, local_server, room.level_for(THIRD_PARTY_INVITE), sender_power)
    revoke = SetState(THIRD_PARTY_INVITE, key, {})
    return Repair(revoke, actor, RoomRefusal(6, "third_party_invite"))


def acl_repair(
    servers: Servers, room: Room, event: Event, local_server: str, sender_power: list[float]
) -> Repair | None:
    """R7: set the ACL the rules keep when the room's differs from it."""
    if not acl_managed(room, servers):
        return None
    wanted = desired_acl(servers, room)
    if same_acl(room.acl, wanted):
        return None
    broke = room.acl is not None and (event.type in (SERVER_ACL, REDACTION))
    refusal = RoomRefusal(7, "acl_managed") if broke else None
    above = sender_power if broke else []
    actor = choose_actor(room, local_server, room.level_for(SERVER_ACL), above)
    return Repair(SetState(SERVER_ACL, "", wanted), actor, refusal)


def _default(content: Mapping[str, Any]) -> int:
    """The users_default of power-levels CONTENT, as the auth rules read it."""
    return user_power({"users_default": content.get("users_default")}, "")


def _named(content: Mapping[str, Any]) -> set[str]:
    users = content.get("users")
    return {u for u in users if isinstance(u, str)} if isinstance(users, Mapping) else set()


def _rule(content: Mapping[str, Any] | None) -> str:
    value = content.get("rule") if content is not None else None
    return value if isinstance(value, str) else RESTRICTED
