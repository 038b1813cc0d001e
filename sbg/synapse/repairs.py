"""Carrying out the repairs `sbg.policy.room_repair` plans (rule R8, R7's ACL).

`RepairRunner` runs them one room at a time (events of one room that
arrive together are handled in order, never concurrently), re-plans each
event against the room's state as it is when its turn comes, logs every
correction (logger `sbg.synapse`, the rule and reason code it restores) and
counts it in `sbg_room_refusals_total{rule="R8"}`.

The Synapse side is behind `RoomOps`, so this module has no Synapse import.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from sbg.policy.room_repair import Kick, Leave, Repair, SetState

logger = logging.getLogger("sbg.synapse")

REASON = "room rules"
# A repair that failed is not tried again in the same room for this long
# (it would fail the same way on every event of the room).
RETRY_AFTER = 60.0
MAX_REMEMBERED_FAILURES = 10_000


class RoomOps(Protocol):
    """What a repair does to a room, as a local user."""

    async def kick(self, room_id: str, actor: str, user: str, reason: str) -> None: ...

    async def leave(self, room_id: str, user: str, reason: str) -> None: ...

    async def set_state(
        self, room_id: str, actor: str, event_type: str, state_key: str, content: Mapping[str, Any]
    ) -> None: ...


@dataclass(frozen=True)
class Trigger:
    """The persisted event that a room's repairs follow."""

    event_id: str
    sender: str
    type: str


Planner = Callable[[str, Trigger], Awaitable[list[Repair]]]


class RepairRunner:
    """Carries out the corrections of rule R8, one room at a time."""

    def __init__(self, ops: RoomOps, count: Callable[[str], None]) -> None:
        self._ops = ops
        self._count = count
        self._queues: dict[str, list[tuple[Trigger, Planner]]] = {}
        # (room, type, state key) -> content of the state events being sent
        # by a repair, which the rules let through (see `is_repair`).
        self._sending: dict[tuple[str, str, str], Mapping[str, Any]] = {}
        # (room, repair description) -> when it last failed (monotonic).
        self._failed: dict[tuple[str, str], float] = {}

    def is_repair(
        self, room_id: str, event_type: str, state_key: str | None, content: Mapping[str, Any]
    ) -> bool:
        """Whether this state event is one a repair is sending right now."""
        if state_key is None:
            return False
        return self._sending.get((room_id, event_type, state_key)) == content

    async def run(self, room_id: str, trigger: Trigger, plan: Planner) -> None:
        """Plan and carry out the repairs after TRIGGER, in ROOM_ID's turn."""
        queue = self._queues.get(room_id)
        if queue is not None:
            queue.append((trigger, plan))
            return
        queue = self._queues[room_id] = [(trigger, plan)]
        try:
            while queue:
                current, planner = queue.pop(0)
                started = time.monotonic()
                for repair in await planner(room_id, current):
                    await self._carry_out(room_id, current, repair, started)
        finally:
            del self._queues[room_id]

    async def _carry_out(
        self, room_id: str, trigger: Trigger, repair: Repair, started: float
    ) -> None:
        what = describe(repair)
        failed_at = self._failed.get((room_id, what))
        if failed_at is not None and time.monotonic() - failed_at < RETRY_AFTER:
            return
        refusal = repair.refusal
        broke = f"{refusal} by {trigger.sender} ({trigger.event_id})" if refusal else None
        if repair.actor is None:
            if refusal is not None:
                self._count("R8")
            self._remember_failure(room_id, what)
            logger.error(
                "room rules: R8 cannot undo %s in %s: no local member may %s",
                broke or "the ACL upkeep",
                room_id,
                what,
            )
            return
        try:
            await self._act(room_id, repair)
        except Exception as e:  # a failed repair must not stop the others
            self._remember_failure(room_id, what)
            logger.error(
                "room rules: R8 failed to %s as %s in %s (after %s): %s",
                what,
                repair.actor,
                room_id,
                broke or "the ACL upkeep",
                e,
            )
            return
        self._failed.pop((room_id, what), None)
        took = time.monotonic() - started
        if refusal is None:
            logger.info("room rules: R7 %s as %s in %s", what, repair.actor, room_id)
            return
        self._count("R8")
        logger.warning(
            "room rules: R8 undid %s in %s: %s as %s (%.2fs)",
            broke,
            room_id,
            what,
            repair.actor,
            took,
        )

    async def _act(self, room_id: str, repair: Repair) -> None:
        """The kick, leave or state event a repair stands for."""
        assert repair.actor is not None
        refusal = repair.refusal
        reason = f"{REASON}: {refusal}" if refusal else REASON
        action = repair.action
        if isinstance(action, Kick):
            await self._ops.kick(room_id, repair.actor, action.user, reason)
        elif isinstance(action, Leave):
            await self._ops.leave(room_id, action.user, reason)
        else:
            key = (room_id, action.type, action.state_key)
            self._sending[key] = action.content
            try:
                await self._ops.set_state(
                    room_id, repair.actor, action.type, action.state_key, action.content
                )
            finally:
                self._sending.pop(key, None)

    def _remember_failure(self, room_id: str, what: str) -> None:
        now = time.monotonic()
        if len(self._failed) >= MAX_REMEMBERED_FAILURES:
            for key, at in list(self._failed.items()):
                if now - at >= RETRY_AFTER:
                    del self._failed[key]
        if len(self._failed) < MAX_REMEMBERED_FAILURES:
            self._failed[(room_id, what)] = now


def describe(repair: Repair) -> str:
    action = repair.action
    if isinstance(action, Kick):
        return f"kick {action.user}"
    if isinstance(action, Leave):
        return f"make {action.user} leave"
    assert isinstance(action, SetState)
    key = f" {action.state_key}" if action.state_key else ""
    return f"set {action.type}{key}"
