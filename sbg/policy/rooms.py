"""Room rules R1-R7 (contract section 13) as pure decisions.

Facts in, decision out: every function here takes plain values (which
servers are internal or external and with which room settings, a room's
state, the event or request under decision) and returns None (allowed) or
a `Refusal` naming the rule and a short fixed reason code. Nothing here
knows Synapse, Twisted, a clock or a file: `sbg.synapse` gathers the facts
from Synapse and carries the decision out, and `sbg.policy.room_repair`
plans the corrections of rule R8 from the same facts.

Vocabulary (contract section 13):

* A server is *internal* (in `internal_homeservers`), *external* (an
  enabled `external_homeservers` entry, whose trust level's `rooms:` block
  applies) or *unknown*. A user's server is the part of the user id after
  its first `:`, compared exactly, as Synapse does.
* A room's class is the `rule` of its `im.vector.room.access_rules` state
  event: `restricted` (also when the event is absent, or holds anything
  else), `unrestricted` or `direct`.
* A room is *public* when its join rule is `public`, `knock` or
  `knock_restricted`, or when it is published in the room directory.
* A room is *hosted* on the server of the user who created it (the sender
  of its `m.room.create` event).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from sbg.config.model import RoomSettings
from sbg.matrix.ids import server_of
from sbg.policy.snapshot import Policy

ACCESS_RULES = "im.vector.room.access_rules"
CREATE = "m.room.create"
MEMBER = "m.room.member"
POWER_LEVELS = "m.room.power_levels"
JOIN_RULES = "m.room.join_rules"
SERVER_ACL = "m.room.server_acl"
THIRD_PARTY_INVITE = "m.room.third_party_invite"

RESTRICTED = "restricted"
UNRESTRICTED = "unrestricted"
DIRECT = "direct"
ROOM_CLASSES = (RESTRICTED, UNRESTRICTED, DIRECT)
PUBLIC_JOIN_RULES = frozenset({"public", "knock", "knock_restricted"})
# Memberships that make a user part of a room for these rules.
PRESENT = frozenset({"join", "invite", "knock"})
DIRECT_MAX_MEMBERS = 2

ServerKind = Literal["internal", "external", "unknown"]

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
class Refusal:
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


Decision = Refusal | None


# ---------------------------------------------------------------- servers


@dataclass(frozen=True)
class Servers:
    """Which servers are internal, and the room settings of the external ones."""

    internal: frozenset[str]
    # Enabled external servers only: a disabled one is unknown here.
    external: Mapping[str, RoomSettings]

    @classmethod
    def from_policy(cls, policy: Policy) -> Servers:
        """The servers of the gateway's own policy snapshot."""
        external: dict[str, RoomSettings] = {}
        for name in policy.enabled_external_names:
            level = policy.trust_levels.get(policy.external_by_name[name].trust_level)
            if level is not None:
                external[name] = level.rooms
        return cls(internal=policy.internal_names, external=external)

    def kind(self, server: str | None) -> ServerKind:
        if server is not None and server in self.internal:
            return "internal"
        if server is not None and server in self.external:
            return "external"
        return "unknown"

    def user_kind(self, user_id: str) -> ServerKind:
        return self.kind(server_of(user_id))

    def settings(self, server: str | None) -> RoomSettings | None:
        """The room settings of an enabled external server, else None."""
        return None if server is None else self.external.get(server)

    def user_settings(self, user_id: str) -> RoomSettings | None:
        return self.settings(server_of(user_id))

    def max_power(self, user_id: str) -> float:
        """The highest power level USER_ID may hold (unbounded if internal)."""
        kind = self.user_kind(user_id)
        if kind == "internal":
            return math.inf
        settings = self.user_settings(user_id)
        return settings.max_power_level if settings is not None else 0


# ---------------------------------------------------------------- rooms


@dataclass(frozen=True)
class StateEvent:
    """The part of a state event the rules read."""

    sender: str
    content: Mapping[str, Any]


State = Mapping[tuple[str, str], StateEvent]


def _int(value: object, default: int = 0) -> int:
    """A power level as Synapse reads it (int(); garbage counts as DEFAULT)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return default
    return default


@dataclass(frozen=True)
class Room:
    """What the rules need to know about one room at one point of its history."""

    rule: str = RESTRICTED
    # Whether an access-rules event is in the state at all.
    rule_declared: bool = False
    join_rule: str | None = None
    published: bool = False
    creator: str | None = None
    # Users whose power is unlimited (room creators where the room version
    # says so: room version 12). Empty for older versions.
    creators: frozenset[str] = frozenset()
    power_levels: Mapping[str, Any] | None = None
    members: Mapping[str, str] = field(default_factory=dict)
    acl: Mapping[str, Any] | None = None

    @property
    def public(self) -> bool:
        return self.published or self.join_rule in PUBLIC_JOIN_RULES

    @property
    def host(self) -> str | None:
        """The server the room was created on."""
        return None if self.creator is None else server_of(self.creator)

    def present(self) -> list[str]:
        """Users joined, invited or knocking, sorted."""
        return sorted(u for u, m in self.members.items() if m in PRESENT)

    def member_count(self) -> int:
        """Joined and invited users (what a direct chat is limited by)."""
        return sum(1 for m in self.members.values() if m in ("join", "invite"))

    def power(self, user_id: str) -> float:
        """USER_ID's power level (as Synapse's event_auth computes it)."""
        if user_id in self.creators:
            return math.inf
        pl = self.power_levels
        if pl is None:
            return 100 if user_id == self.creator else 0
        return user_power(pl, user_id)

    def level_for(self, event_type: str, *, state: bool = True) -> int:
        """The power level needed to send an event of EVENT_TYPE."""
        pl = self.power_levels
        if pl is None:
            return 0
        events = pl.get("events")
        if isinstance(events, Mapping) and event_type in events:
            return _int(events[event_type])
        if state:
            return _int(pl.get("state_default"), 50)
        return _int(pl.get("events_default"), 0)

    def named_level(self, name: str, default: int) -> int:
        """`kick`, `ban`, `invite`, `redact`... (defaults as in the spec)."""
        pl = self.power_levels
        if pl is None or name not in pl:
            return default
        return _int(pl.get(name), default)


def user_power(pl: Mapping[str, Any], user_id: str) -> int:
    """A user's level in power-levels content PL (explicit entry, else users_default)."""
    users = pl.get("users")
    if isinstance(users, Mapping) and user_id in users:
        return _int(users[user_id])
    return _int(pl.get("users_default"), 0)


def room_from_state(state: State, *, published: bool = False, creator_power: bool = False) -> Room:
    """The facts of a room from its state map ((type, state key) -> event).

    PUBLISHED: whether the room is in this server's room directory.
    CREATOR_POWER: whether the room version gives its creators unlimited
    power (room version 12 and later).
    """
    access = state.get((ACCESS_RULES, ""))
    rule = RESTRICTED
    if access is not None:
        value = access.content.get("rule")
        rule = value if isinstance(value, str) and value in ROOM_CLASSES else RESTRICTED
    join_rules = state.get((JOIN_RULES, ""))
    join_rule = None
    if join_rules is not None:
        value = join_rules.content.get("join_rule")
        join_rule = value if isinstance(value, str) else None
    create = state.get((CREATE, ""))
    creator = create.sender if create is not None else None
    creators: frozenset[str] = frozenset()
    if create is not None and creator_power:
        extra = create.content.get("additional_creators")
        more = [u for u in extra if isinstance(u, str)] if isinstance(extra, list) else []
        creators = frozenset([create.sender, *more])
    pl = state.get((POWER_LEVELS, ""))
    members = {}
    for (event_type, key), event in state.items():
        if event_type == MEMBER:
            membership = event.content.get("membership")
            members[key] = membership if isinstance(membership, str) else "leave"
    acl = state.get((SERVER_ACL, ""))
    return Room(
        rule=rule,
        rule_declared=access is not None,
        join_rule=join_rule,
        published=published,
        creator=creator,
        creators=creators,
        power_levels=pl.content if pl is not None else None,
        members=members,
        acl=acl.content if acl is not None else None,
    )


@dataclass(frozen=True)
class Event:
    """An event under decision."""

    type: str
    sender: str
    content: Mapping[str, Any]
    state_key: str | None = None


# ---------------------------------------------------------------- R1, R2: admission


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
    return Refusal(7, "unknown_server") if settings is None else settings


def check_invite(servers: Servers, room: Room, inviter: str, invitee: str) -> Decision:
    """R1 (and R7 for the inviter): may INVITER invite INVITEE into ROOM?"""
    if servers.user_kind(inviter) == "unknown":
        return Refusal(7, "unknown_server")
    if room.members.get(invitee) in ("join", "invite"):
        return None  # nothing changes (Synapse refuses or deduplicates it)
    kind = servers.user_kind(invitee)
    if kind == "unknown":
        return Refusal(1, "unknown_server")
    if kind == "external":
        settings = servers.user_settings(invitee)
        assert settings is not None
        code = admission(settings, room)
        if code is not None:
            return Refusal(1, code)
    if room.rule == DIRECT and room.member_count() >= DIRECT_MAX_MEMBERS:
        return Refusal(1, "direct_room_full")
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
        return None if settings.join_public else Refusal(2, "public_room_not_allowed")
    if before != "invite":
        return Refusal(2, "not_invited")
    code = admission(settings, room)
    return None if code is None else Refusal(2, code)


def check_remote_knock(servers: Servers, user: str) -> Decision:
    """R2 (and R7): may USER, of another server, knock on our room?"""
    settings = other_server(servers, user)
    if not isinstance(settings, RoomSettings):
        return settings
    return None if settings.join_public else Refusal(2, "knock_not_allowed")


# ---------------------------------------------------------------- R3: internal users outside


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
        return Refusal(7, "unknown_server_room")
    if public and not settings.join_public:
        return Refusal(3, "external_public_room")
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
            return Refusal(3, "external_public_room")
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
        return Refusal(7, "unknown_server")
    creator, public = invite_state_facts(stripped)
    host = server_of(creator) if creator is not None else server_of(inviter)
    return check_external_room(servers, host, public)


# ---------------------------------------------------------------- R4: power levels


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
            return Refusal(4, "power_level_above_max")
    if room.rule != RESTRICTED:
        default = _int(content.get("users_default"), 0)
        if default > 0 and default > _int(old.get("users_default"), 0):
            return Refusal(4, "users_default_above_zero")
    if acl_unprotected(servers, room, content) and (not old or acl_level(content) < acl_level(old)):
        return Refusal(7, "acl_unprotected")
    return None


def check_create(servers: Servers, content: Mapping[str, Any]) -> Decision:
    """R4: room creators (room version 12) have unlimited power: internal only."""
    extra = content.get("additional_creators")
    if isinstance(extra, list):
        for user in extra:
            if not isinstance(user, str) or servers.user_kind(user) != "internal":
                return Refusal(4, "external_creator")
    return None


# ---------------------------------------------------------------- R5: class and publicity


def check_access_rules(servers: Servers, room: Room, event: Event) -> Decision:
    """R5: may EVENT (an access-rules event) replace ROOM's class?"""
    if servers.user_kind(event.sender) != "internal":
        return Refusal(5, "external_sender")
    new = event.content.get("rule")
    if not isinstance(new, str) or new not in ROOM_CLASSES:
        return Refusal(5, "invalid_rule")
    if room.rule_declared and new != room.rule:
        if (room.rule, new) != (RESTRICTED, UNRESTRICTED):
            return Refusal(5, "rule_change_not_allowed")
    elif not room.rule_declared and new == DIRECT and room.member_count() > DIRECT_MAX_MEMBERS:
        return Refusal(5, "direct_room_full")
    if new != RESTRICTED:
        if room.public:
            return Refusal(5, "unrestricted_room_public")
        pl = room.power_levels
        if pl is not None and _int(pl.get("users_default")) > 0:
            return Refusal(4, "users_default_above_zero")
        if pl is not None and acl_unprotected(servers, replace(room, rule=new), pl):
            return Refusal(7, "acl_unprotected")
    return None


def check_join_rules(room: Room, content: Mapping[str, Any]) -> Decision:
    """R5: a room that is not restricted may not become public."""
    if room.rule != RESTRICTED and content.get("join_rule") in PUBLIC_JOIN_RULES:
        return Refusal(5, "unrestricted_room_public")
    return None


def check_publication(room: Room) -> Decision:
    """R5: a room that is not restricted may not be published in the directory."""
    return Refusal(5, "unrestricted_room_public") if room.rule != RESTRICTED else None


# ---------------------------------------------------------------- R6: third-party invites


def check_third_party_invite(room: Room) -> Decision:
    """R6: third-party (email) invites only in restricted rooms."""
    return Refusal(6, "third_party_invite") if room.rule != RESTRICTED else None


# ---------------------------------------------------------------- R7: the server ACL


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
        return Refusal(7, "acl_managed")
    return None


# ---------------------------------------------------------------- every event


def check_event(servers: Servers, room: Room, event: Event) -> Decision:
    """Every rule on EVENT, built by this homeserver, against ROOM's state before it.

    This is what Synapse's `check_event_allowed` asks: local users' events
    (server administrators included), the templates of `make_join` and
    `make_knock` that remote users ask for, and `send_knock`.
    """
    if servers.user_kind(event.sender) == "unknown":
        return Refusal(7, "unknown_server")
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
            return Refusal(6, "third_party_invite")
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


# ---------------------------------------------------------------- createRoom


@dataclass(frozen=True)
class RoomRequest:
    """What a createRoom request would make (read before any event exists)."""

    creator: str
    rule: str | None  # the initial access rule, None when not given
    public: bool  # join rule public/knock..., or visibility public
    invitees: tuple[str, ...] = ()
    third_party_invites: int = 0
    # Users the request would make room creators (room version 12), or give
    # power level 100 (trusted_private_chat in older versions).
    privileged: tuple[str, ...] = ()
    power_levels: Mapping[str, Any] | None = None


def check_room_request(servers: Servers, request: RoomRequest) -> Decision:
    """Every rule a createRoom request would break, before the room exists."""
    rule = request.rule if request.rule is not None else RESTRICTED
    if rule not in ROOM_CLASSES:
        return Refusal(5, "invalid_rule")
    if rule != RESTRICTED and request.public:
        return Refusal(5, "unrestricted_room_public")
    if request.third_party_invites and rule != RESTRICTED:
        return Refusal(6, "third_party_invite")
    for user in request.privileged:
        if servers.user_kind(user) != "internal":
            return Refusal(4, "external_creator")
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
