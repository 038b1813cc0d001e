"""A `send_join` must follow a `make_join` this homeserver answered (pure).

A compliant homeserver joins a room by asking a resident server for a join
template (`make_join`) and sending it back signed (`send_join`). The room
rules refuse the template of a join they do not allow (rule R2: Synapse
runs the module's `check_event_allowed` on it), but Synapse runs no module
callback on `send_join` itself: a hostile trusted server that skips
`make_join` and hand-crafts the event joins any room whose authorization
rules let it in (a public room, for anyone), gets the room's state in the
answer, and is only kicked afterwards. The gateway closes that hole: it
remembers which (origin, room, user) had a `make_join` answered 200 by the
internal homeserver, and refuses a `send_join` of a membership that no
such `make_join` prepared (`join_not_prepared`).

`prepared_key` and `joining_key` read the facts; `check_send_join` decides.
Storing what was prepared is `sbg.joins.PreparedJoins`'s job.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from sbg import reasons
from sbg.policy.decision import Decision, Verdict
from sbg.reasons import Refusal

MAKE_JOIN = frozenset({"make_join"})
SEND_JOIN = frozenset({"send_join", "send_join_v1", "send_join_v2"})
JOIN_ENDPOINTS = MAKE_JOIN | SEND_JOIN


def join_key(origin: str, room_id: str, user_id: str) -> str:
    """A fixed-size name for one (origin, room, user) join (hex SHA-256)."""
    text = "\x00".join((origin, room_id, user_id))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def prepared_key(
    endpoint_name: str, params: Mapping[str, str], origin: str | None, status: int
) -> str | None:
    """The join a `make_join` answered 200 prepares (None for anything else)."""
    if endpoint_name not in MAKE_JOIN or origin is None or status != 200:
        return None
    room_id, user_id = params.get("roomId"), params.get("userId")
    if not room_id or not user_id:
        return None
    return join_key(origin, room_id, user_id)


def joining_key(
    endpoint_name: str,
    params: Mapping[str, str],
    origin: str | None,
    content: Mapping[str, Any] | None,
) -> str | None:
    """The join a `send_join` asks for (None for anything else).

    The user is the event's `sender` (its `state_key` is the same user, and
    the origin checks made sure the sender is the origin's); a body without
    one names no join and is left to the origin checks and the homeserver.
    """
    if endpoint_name not in SEND_JOIN or origin is None or content is None:
        return None
    room_id, sender = params.get("roomId"), content.get("sender")
    if not room_id or not isinstance(sender, str):
        return None
    return join_key(origin, room_id, sender)


def check_send_join(key: str | None, prepared: bool) -> Refusal | None:
    """Refuse a `send_join` (KEY) that no answered `make_join` prepared."""
    if key is None or prepared:
        return None
    return Refusal(
        reasons.JOIN_NOT_PREPARED,
        "send_join without a make_join answered by this homeserver for this room and user",
    )


def decide_send_join(monitor: bool, key: str | None, prepared: bool) -> Decision:
    """`check_send_join` as a decision monitor mode may soften (MONITOR: the
    origin's mode is monitor)."""
    verdict = Verdict(monitor)
    refusal = check_send_join(key, prepared)
    if refusal is not None:
        verdict.refuse(refusal)
    return verdict.decision()
