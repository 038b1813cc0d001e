"""The facts the room rules decide on: servers, rooms, events, requests.

Plain values built from what Synapse knows (`sbg.synapse.facts`), read by
the rules of `sbg.policy.rooms` and the corrections of
`sbg.policy.room_repair`. Nothing here knows Synapse, Twisted, a clock or
a file.

Vocabulary:

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
from collections.abc import Mapping
from dataclasses import dataclass, field
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
