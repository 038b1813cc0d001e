"""Synapse's objects turned into the plain facts of `sbg.policy.rooms`.

Nothing here imports Synapse: events are read through the few attributes
every `EventBase` has (`EventLike`), so this module is typed by mypy and
tested without Synapse.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from sbg.matrix.ids import server_of
from sbg.policy.room_facts import (
    ACCESS_RULES,
    CREATE,
    JOIN_RULES,
    PUBLIC_JOIN_RULES,
    Event,
    Room,
    RoomRequest,
    State,
    StateEvent,
    room_from_state,
)


class RoomVersionLike(Protocol):
    @property
    def msc4289_creator_power_enabled(self) -> bool: ...


class EventLike(Protocol):
    """What the rules read of a Synapse event."""

    @property
    def type(self) -> str: ...

    @property
    def sender(self) -> str: ...

    @property
    def content(self) -> Mapping[str, Any]: ...

    @property
    def room_id(self) -> str: ...

    @property
    def event_id(self) -> str: ...

    @property
    def unsigned(self) -> Mapping[str, Any]: ...

    def get_state_key(self) -> str | None: ...


def event_facts(event: EventLike) -> Event:
    return Event(
        type=event.type,
        sender=event.sender,
        content=event.content,
        state_key=event.get_state_key(),
    )


def state_facts(state: Mapping[tuple[str, str], EventLike]) -> State:
    return {key: StateEvent(ev.sender, ev.content) for key, ev in state.items()}


def creator_power(state: Mapping[tuple[str, str], EventLike]) -> bool:
    """Whether the room's version gives its creators unlimited power."""
    create = state.get((CREATE, ""))
    version = getattr(create, "room_version", None)
    return bool(getattr(version, "msc4289_creator_power_enabled", False))


def room_facts(state: Mapping[tuple[str, str], EventLike], *, published: bool) -> Room:
    return room_from_state(
        state_facts(state), published=published, creator_power=creator_power(state)
    )


def stripped_state(event: EventLike) -> list[Mapping[str, Any]]:
    """An incoming invite's `invite_room_state` (unauthenticated), as a list."""
    value = event.unsigned.get("invite_room_state")
    if not isinstance(value, list | tuple):
        return []
    return [item for item in value if isinstance(item, Mapping)]


def join_servers_from_url(url: str) -> list[str]:
    """The servers a client's join or knock request names.

    `/join/{roomIdOrAlias}` and `/knock/{roomIdOrAlias}` (any API version)
    with `via` and `server_name` query parameters; an alias's server, and a
    room id's server where it has one (room versions before 12). Empty for
    anything else.
    """
    parts = urllib.parse.urlsplit(url)
    segments = parts.path.split("/")
    target: str | None = None
    for i, segment in enumerate(segments[:-1]):
        if segment in ("join", "knock") and i >= 3 and segments[1] == "_matrix":
            target = urllib.parse.unquote(segments[i + 1])
    servers: list[str] = []
    if segments[-1] == "join" and len(segments) > 2 and segments[-3] == "rooms":
        target = urllib.parse.unquote(segments[-2])
    if target is None:
        return []
    query = urllib.parse.parse_qs(parts.query)
    for key in ("via", "server_name"):
        servers += query.get(key, [])
    if target[:1] in ("#", "!"):
        server = server_of(target)
        if server:
            servers.append(server)
    return _unique(servers)


def _unique(items: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for item in items:
        seen.setdefault(item, None)
    return list(seen)


def room_request(creator: str, body: Mapping[str, Any]) -> RoomRequest:
    """What a createRoom request body would make (Synapse's own defaults).

    The preset defaults to `public_chat` for `visibility: public`, else
    `private_chat`; `trusted_private_chat` makes every invitee a creator
    (room version 12) or gives them power level 100 (earlier versions).
    """
    visibility = body.get("visibility", "private")
    preset = body.get("preset")
    if preset is None:
        preset = "public_chat" if visibility == "public" else "private_chat"
    public = visibility == "public" or preset == "public_chat"
    rule: str | None = None
    initial = body.get("initial_state")
    for item in initial if isinstance(initial, list) else []:
        if not isinstance(item, Mapping) or item.get("state_key", "") != "":
            continue
        content = item.get("content")
        content = content if isinstance(content, Mapping) else {}
        if item.get("type") == ACCESS_RULES:
            value = content.get("rule")
            rule = value if isinstance(value, str) else ""
        elif item.get("type") == JOIN_RULES:
            public = public or content.get("join_rule") in PUBLIC_JOIN_RULES
    invite = body.get("invite")
    invitees = tuple(u for u in invite if isinstance(u, str)) if isinstance(invite, list) else ()
    third_party = body.get("invite_3pid")
    privileged = list(invitees) if preset == "trusted_private_chat" else []
    creation = body.get("creation_content")
    if isinstance(creation, Mapping) and isinstance(creation.get("additional_creators"), list):
        privileged += [str(u) for u in creation["additional_creators"]]
    override = body.get("power_level_content_override")
    return RoomRequest(
        creator=creator,
        rule=rule,
        public=public,
        invitees=invitees,
        third_party_invites=len(third_party) if isinstance(third_party, list) else 0,
        privileged=tuple(privileged),
        power_levels=override if isinstance(override, Mapping) else None,
    )
