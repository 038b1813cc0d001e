"""Room rules R1-R7 as pure decisions.

Facts in (`sbg.policy.room_facts`), decision out: every function here
returns None (allowed) or a `RoomRefusal` naming the rule and a short fixed
reason code. Nothing here knows Synapse, Twisted, a clock or a file:
`sbg.synapse` gathers the facts and carries the decision out, and
`sbg.policy.room_repair` plans the corrections of rule R8 from the same
facts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from sbg.config.model import RoomSettings
from sbg.matrix.ids import server_of
from sbg.policy.room_facts import (
    ACCESS_RULES,
    CREATE,
    DIRECT,
    DIRECT_MAX_MEMBERS,
    JOIN_RULES,
    MEMBER,
    POWER_LEVELS,
    PUBLIC_JOIN_RULES,
    RESTRICTED,
    ROOM_CLASSES,
    SERVER_ACL,
    THIRD_PARTY_INVITE,
    UNRESTRICTED,
    Event,
    Room,
    RoomRequest,
    Servers,
    _int,
    user_power,
)

# Every reason code, with the human text sent to the refused user. These
# are the only values besides the rule number that a refusal carries.
REASONS: Mapping[str, str] = {
    # R1, R2: who may be invited, who may join
    "unknown_server": "users of this server are not allowed here",
    "never_invited": "users of this server may not be invited into rooms",
    "room_restricted": "this room is restricted to internal users",
    "room_public": "users of this server may not be in public rooms",
    "direct_room_full": "a direct chat has at most two members",
    "not_invited": "users of this server may join only when invited",
    "public_room_not_allowed": "users of this server may not join public rooms",
    "knock_not_allowed": "users of this server may not knock on rooms",
    # R3: internal users and the public rooms of external servers
    "external_public_room": "this public room is hosted on a server whose rooms are off limits",
    # R4: power levels
    "power_level_above_max": "a user of an external server would exceed its maximum power level",
    "users_default_above_zero": "users_default must stay 0 in a room open to external users",
    "external_creator": "a user of an external server may not be a room creator",
    # R5: room class and publicity
    "external_sender": "only internal users may change the room's access rules",
    "invalid_rule": "access rule must be restricted, unrestricted or direct",
    "rule_change_not_allowed": "access rules may only go from restricted to unrestricted",
    "unrestricted_room_public": "a room open to external users may not be public",
    # R6: third-party invites
    "third_party_invite": "third-party invites are refused in rooms open to external users",
    # R7: unknown servers and the server ACL
    "unknown_server_room": "this room is hosted on a server that is not trusted",
    "acl_managed": "the server ACL of this room is managed by the room rules",
    "acl_unprotected": "the server ACL must need a higher power level than external users may hold",
}


@dataclass(frozen=True)
class RoomRefusal:
    """Rule `rule` (1-8) refuses, for the reason `code` (a key of REASONS)."""

    rule: int
    code: str

    def __post_init__(self) -> None:
        assert self.code in REASONS, self.code
        assert 1 <= self.rule <= 8, self.rule

    @property
    def reason(self) -> str:
        return REASONS[self.code]

    @property
    def label(self) -> str:
        """`R4`: the `rule` label of sbg_room_refusals_total."""
        return f"R{self.rule}"

    def __str__(self) -> str:
        return f"{self.label} {self.code}"


Decision = RoomRefusal | None


def admission(settings: RoomSettings, room: Room) -> str | None:
    """Why a room does not admit a trust level's users by invitation (R1), or None."""
    if settings.invite == "none":
        return "never_invited"
    if room.public:
        return "room_public"
    if settings.invite == "open_rooms" and room.rule == RESTRICTED:
        return "room_restricted"
    return None


def other_server(servers: Servers, user: str) -> RoomSettings | Decision:
    """The room settings of USER's server when it is external; None (nothing
    to check) when it is internal; R7's refusal when it is unknown."""
    kind = servers.user_kind(user)
    if kind == "internal":
        return None
    settings = servers.user_settings(user)
    return RoomRefusal(7, "unknown_server") if settings is None else settings


def check_invite(servers: Servers, room: Room, inviter: str, invitee: str) -> Decision:
    """R1 (and R7 for the inviter): may INVITER invite INVITEE into ROOM?"""
    if servers.user_kind(inviter) == "unknown":
        return RoomRefusal(7, "unknown_server")
    if room.members.get(invitee) in ("join", "invite"):
        return None  # nothing changes (Synapse refuses or deduplicates it)
    kind = servers.user_kind(invitee)
    if kind == "unknown":
        return RoomRefusal(1, "unknown_server")
    if kind == "external":
        settings = servers.user_settings(invitee)
        assert settings is not None
        code = admission(settings, room)
        if code is not None:
            return RoomRefusal(1, code)
    if room.rule == DIRECT and room.member_count() >= DIRECT_MAX_MEMBERS:
        return RoomRefusal(1, "direct_room_full")
    return None


def check_remote_join(
    servers: Servers, room: Room, user: str, content: Mapping[str, Any]
) -> Decision:
    """R2 (and R7): may USER, of another server, join ROOM (our room)?

    `content` is the join event's content; the user's membership before the
    join is read from ROOM.
    """
    before = room.members.get(user)
    if before == "join":
        return None  # a profile change, not a join
    settings = other_server(servers, user)
    if not isinstance(settings, RoomSettings):
        return settings
    if room.public:
        return None if settings.join_public else RoomRefusal(2, "public_room_not_allowed")
    if before != "invite":
        return RoomRefusal(2, "not_invited")
    code = admission(settings, room)
    return None if code is None else RoomRefusal(2, code)


def check_remote_knock(servers: Servers, user: str) -> Decision:
    """R2 (and R7): may USER, of another server, knock on our room?"""
    settings = other_server(servers, user)
    if not isinstance(settings, RoomSettings):
        return settings
    return None if settings.join_public else RoomRefusal(2, "knock_not_allowed")


def check_external_room(servers: Servers, host: str | None, public: bool) -> Decision:
    """R3 (and R7): may an internal user join (knock on, be invited into) a room
    hosted on HOST, public or not?

    HOST None (not known) is not judged here.
    """
    if host is None:
        return None
    kind = servers.kind(host)
    if kind == "internal":
        return None
    settings = servers.settings(host)
    if kind == "unknown" or settings is None:
        return RoomRefusal(7, "unknown_server_room")
    if public and not settings.join_public:
        return RoomRefusal(3, "external_public_room")
    return None


def check_local_join(servers: Servers, room: Room) -> Decision:
    """R3: may an internal user join ROOM (whose state this server knows)?"""
    return check_external_room(servers, room.host, room.public)


def check_local_knock(servers: Servers, room: Room) -> Decision:
    """R3: a knock is only ever on a public room (join rule knock...)."""
    return check_external_room(servers, room.host, True)


def check_join_servers(servers: Servers, candidates: Iterable[str]) -> Decision:
    """R3: an internal user's join or knock, without an invite, into a room this
    homeserver is not in, goes through the servers the client names
    (CANDIDATES). Such a join only succeeds in a public room: it is refused
    when one of them is an external server whose level may not join public
    rooms.
    """
    for server in candidates:
        settings = servers.settings(server)
        if settings is not None and not settings.join_public:
            return RoomRefusal(3, "external_public_room")
    return None


def invite_state_facts(stripped: Iterable[Mapping[str, Any]]) -> tuple[str | None, bool]:
    """(creator, public) from an invite's stripped state (unauthenticated).

    The creator is the sender of the stripped `m.room.create` event (None
    when it is missing); public follows the stripped join rules.
    """
    creator: str | None = None
    join_rule: str | None = None
    for item in stripped:
        if not isinstance(item, Mapping):
            continue
        kind, sender, content = item.get("type"), item.get("sender"), item.get("content")
        if kind == CREATE and isinstance(sender, str):
            creator = sender
        if kind == JOIN_RULES and isinstance(content, Mapping):
            value = content.get("join_rule")
            join_rule = value if isinstance(value, str) else None
    return creator, join_rule in PUBLIC_JOIN_RULES


def check_incoming_invite(
    servers: Servers, inviter: str, stripped: Iterable[Mapping[str, Any]]
) -> Decision:
    """R3 (and R7): may INVITER, of another server, invite an internal user?

    The room's host is the creator named in the stripped state, else the
    inviter's server.
    """
    if servers.user_kind(inviter) == "unknown":
        return RoomRefusal(7, "unknown_server")
    creator, public = invite_state_facts(stripped)
    host = server_of(creator) if creator is not None else server_of(inviter)
    return check_external_room(servers, host, public)


def power_level_violations(
    servers: Servers, room: Room, content: Mapping[str, Any]
) -> dict[str, str]:
    """Every user POWER-LEVELS CONTENT would place above their maximum.

    Users named in `users`, and every user present in ROOM (joined, invited,
    knocking) through `users_default`. Maps user -> reason code.
    """
    found: dict[str, str] = {}
    users = content.get("users")
    named = users if isinstance(users, Mapping) else {}
    candidates = {u for u in named if isinstance(u, str)} | set(room.present())
    for user in sorted(candidates):
        if user_power(content, user) > servers.max_power(user):
            found[user] = "power_level_above_max"
    return found


def check_power_levels(servers: Servers, room: Room, content: Mapping[str, Any]) -> Decision:
    """R4: may a power-levels event with CONTENT replace ROOM's?

    Refused when it raises a user of an external (or unknown) server above
    its level's `max_power_level`, or `users_default` above 0 while the room
    is not restricted. A violation already in the room's current power
    levels (one that rule R8 is undoing) does not block other changes.
    """
    old = room.power_levels or {}
    for user in power_level_violations(servers, room, content):
        if user_power(content, user) > (user_power(old, user) if old else 0):
            return RoomRefusal(4, "power_level_above_max")
    if room.rule != RESTRICTED:
        default = _int(content.get("users_default"), 0)
        if default > 0 and default > _int(old.get("users_default"), 0):
            return RoomRefusal(4, "users_default_above_zero")
    if acl_unprotected(servers, room, content) and (not old or acl_level(content) < acl_level(old)):
        return RoomRefusal(7, "acl_unprotected")
    return None


def check_create(servers: Servers, content: Mapping[str, Any]) -> Decision:
    """R4: room creators (room version 12) have unlimited power: internal only."""
    extra = content.get("additional_creators")
    if isinstance(extra, list):
        for user in extra:
            if not isinstance(user, str) or servers.user_kind(user) != "internal":
                return RoomRefusal(4, "external_creator")
    return None


def check_access_rules(servers: Servers, room: Room, event: Event) -> Decision:
    """R5: may EVENT (an access-rules event) replace ROOM's class?"""
    if servers.user_kind(event.sender) != "internal":
        return RoomRefusal(5, "external_sender")
    new = event.content.get("rule")
    if not isinstance(new, str) or new not in ROOM_CLASSES:
        return RoomRefusal(5, "invalid_rule")
    if room.rule_declared and new != room.rule:
        if (room.rule, new) != (RESTRICTED, UNRESTRICTED):
            return RoomRefusal(5, "rule_change_not_allowed")
    elif not room.rule_declared and new == DIRECT and room.member_count() > DIRECT_MAX_MEMBERS:
        return RoomRefusal(5, "direct_room_full")
    if new != RESTRICTED:
        if room.public:
            return RoomRefusal(5, "unrestricted_room_public")
        pl = room.power_levels
        if pl is not None and _int(pl.get("users_default")) > 0:
            return RoomRefusal(4, "users_default_above_zero")
        if pl is not None and acl_unprotected(servers, replace(room, rule=new), pl):
            return RoomRefusal(7, "acl_unprotected")
    return None


def check_join_rules(room: Room, content: Mapping[str, Any]) -> Decision:
    """R5: a room that is not restricted may not become public."""
    if room.rule != RESTRICTED and content.get("join_rule") in PUBLIC_JOIN_RULES:
        return RoomRefusal(5, "unrestricted_room_public")
    return None


def check_publication(room: Room) -> Decision:
    """R5: a room that is not restricted may not be published in the directory."""
    return RoomRefusal(5, "unrestricted_room_public") if room.rule != RESTRICTED else None


def check_third_party_invite(room: Room) -> Decision:
    """R6: third-party (email) invites only in restricted rooms."""
    return RoomRefusal(6, "third_party_invite") if room.rule != RESTRICTED else None


def acl_managed(room: Room, servers: Servers) -> bool:
    """Whether the rules keep ROOM's server ACL: a room hosted here that is not
    restricted, or that has a user of a non-internal server in it."""
    if servers.kind(room.host) != "internal":
        return False
    if room.rule != RESTRICTED:
        return True
    return any(servers.user_kind(u) != "internal" for u in room.present())


def _acl_host(server: str) -> str:
    """The ACL entry for a server: its host name (server ACLs ignore ports)."""
    if server.startswith("["):
        return server[: server.index("]") + 1] if "]" in server else server
    return server.split(":", 1)[0].lower()


def admitted(servers: Servers, room: Room) -> dict[str, RoomSettings]:
    """The external servers whose users may be in ROOM (R1, R2)."""
    return {
        server: settings
        for server, settings in servers.external.items()
        if (room.public and settings.join_public)
        or (not room.public and admission(settings, room) is None)
    }


def desired_acl(servers: Servers, room: Room) -> dict[str, Any]:
    """The ACL rule R7 keeps: exactly the internal servers and the external
    servers whose users may be in ROOM."""
    allowed = {_acl_host(s) for s in servers.internal}
    # Servers compare the host of a request's origin (ports are ignored), but
    # Synapse refuses an ACL event unless it matches its own full server name,
    # port included: internal servers are listed both ways.
    allowed |= {s.lower() for s in servers.internal}
    allowed |= {_acl_host(s) for s in admitted(servers, room)}
    return {"allow": sorted(allowed), "deny": [], "allow_ip_literals": False}


def acl_level(content: Mapping[str, Any]) -> int:
    """The power level needed to send `m.room.server_acl` under power levels CONTENT."""
    events = content.get("events")
    if isinstance(events, Mapping) and SERVER_ACL in events:
        return _int(events[SERVER_ACL])
    return _int(content.get("state_default"), 50)


def acl_unprotected(servers: Servers, room: Room, content: Mapping[str, Any]) -> bool:
    """Whether, in ROOM, power levels CONTENT let an external user change the
    ACL the rules keep (its level is not above every admitted level's maximum)."""
    if not acl_managed(room, servers):
        return False
    top = max((s.max_power_level for s in admitted(servers, room).values()), default=None)
    return top is not None and acl_level(content) <= top


def same_acl(a: Mapping[str, Any] | None, b: Mapping[str, Any]) -> bool:
    """Whether ACL content A says what B says (order of the lists aside)."""
    if a is None:
        return False

    def norm(m: Mapping[str, Any]) -> tuple[object, ...]:
        allow, deny = m.get("allow"), m.get("deny")
        return (
            sorted(x for x in allow if isinstance(x, str)) if isinstance(allow, list) else None,
            sorted(x for x in deny if isinstance(x, str)) if isinstance(deny, list) else [],
            m.get("allow_ip_literals", True) is not False,
        )

    return norm(a) == norm(b)


def check_acl(servers: Servers, room: Room, content: Mapping[str, Any]) -> Decision:
    """R7: in a room whose ACL the rules keep, only that ACL may be set."""
    if acl_managed(room, servers) and not same_acl(content, desired_acl(servers, room)):
        return RoomRefusal(7, "acl_managed")
    return None


def check_event(servers: Servers, room: Room, event: Event) -> Decision:
    """Every rule on EVENT, built by this homeserver, against ROOM's state before it.

    This is what Synapse's `check_event_allowed` asks: local users' events
    (server administrators included), the templates of `make_join` and
    `make_knock` that remote users ask for, and `send_knock`.
    """
    if servers.user_kind(event.sender) == "unknown":
        return RoomRefusal(7, "unknown_server")
    if event.type == CREATE:
        return check_create(servers, event.content)
    if event.state_key is None:
        return None
    if event.type == MEMBER:
        return _check_membership(servers, room, event, event.state_key)
    if event.type == POWER_LEVELS:
        return check_power_levels(servers, room, event.content)
    if event.type == ACCESS_RULES:
        return check_access_rules(servers, room, event)
    if event.type == JOIN_RULES:
        return check_join_rules(room, event.content)
    if event.type == THIRD_PARTY_INVITE and event.content:
        return check_third_party_invite(room)
    if event.type == SERVER_ACL:
        return check_acl(servers, room, event.content)
    return None


def _check_membership(servers: Servers, room: Room, event: Event, target: str) -> Decision:
    membership = event.content.get("membership")
    internal = servers.user_kind(target) == "internal"
    if membership == "invite":
        if "third_party_invite" in event.content and room.rule != RESTRICTED:
            return RoomRefusal(6, "third_party_invite")
        return check_invite(servers, room, event.sender, target)
    if membership == "join":
        if room.members.get(target) == "join":
            return None
        if internal:
            return check_local_join(servers, room)
        return check_remote_join(servers, room, target, event.content)
    if membership == "knock":
        return check_local_knock(servers, room) if internal else check_remote_knock(servers, target)
    return None


def check_room_request(servers: Servers, request: RoomRequest) -> Decision:
    """Every rule a createRoom request would break, before the room exists."""
    rule = request.rule if request.rule is not None else RESTRICTED
    if rule not in ROOM_CLASSES:
        return RoomRefusal(5, "invalid_rule")
    if rule != RESTRICTED and request.public:
        return RoomRefusal(5, "unrestricted_room_public")
    if request.third_party_invites and rule != RESTRICTED:
        return RoomRefusal(6, "third_party_invite")
    for user in request.privileged:
        if servers.user_kind(user) != "internal":
            return RoomRefusal(4, "external_creator")
    members = {request.creator: "join"}
    room = Room(
        rule=rule,
        rule_declared=request.rule is not None,
        join_rule="public" if request.public else "invite",
        creator=request.creator,
        members=members,
    )
    for invitee in request.invitees:
        refusal = check_invite(servers, room, request.creator, invitee)
        if refusal is not None:
            return refusal
        members[invitee] = "invite"
    if request.power_levels is not None:
        room = Room(rule=rule, creator=request.creator, members=dict(members))
        return check_power_levels(servers, room, request.power_levels)
    return None
