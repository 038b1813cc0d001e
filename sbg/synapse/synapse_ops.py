"""The room rules' actions in Synapse, and the facts the module API does not give.

This is the one file that reaches past Synapse's stable module API, each
time for a stated reason (checked against Synapse 1.163):

* kicks go through the room member handler: the module API's
  `update_room_membership` first looks up the target's profile, which for a
  user of another server is a federation request that can take up to the
  federation timeout, and a repair must land within seconds;
* the content of the state event an event replaced (`unsigned.replaces_state`)
  is read from the event store: the module API has no "get event";
* the servers a client's join request names are read from the request the
  join is handled in (Synapse's logging context): `user_may_join_room` is
  not given them.

If one of these disappears in a later Synapse, the module degrades (no
previous content: power levels are clamped and access rules restored to
`restricted`; no request URL: the join is checked after it happened, R8)
rather than failing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from synapse.module_api import ModuleApi, UserID
from synapse.types import create_requester

logger = logging.getLogger("sbg.synapse")


class SynapseRoomOps:
    """`sbg.synapse.repairs.RoomOps` on a Synapse homeserver."""

    def __init__(self, api: ModuleApi) -> None:
        self._api = api

    async def kick(self, room_id: str, actor: str, user: str, reason: str) -> None:
        handler = self._api._hs.get_room_member_handler()
        await handler.update_membership(
            requester=create_requester(actor),
            target=UserID.from_string(user),
            room_id=room_id,
            action="kick",
            content={"reason": reason},
            ratelimit=False,
        )

    async def leave(self, room_id: str, user: str, reason: str) -> None:
        await self._api.update_room_membership(
            sender=user,
            target=user,
            room_id=room_id,
            new_membership="leave",
            content={"reason": reason},
        )

    async def set_state(
        self, room_id: str, actor: str, event_type: str, state_key: str, content: Mapping[str, Any]
    ) -> None:
        await self._api.create_and_send_event_into_room(
            {
                "type": event_type,
                "state_key": state_key,
                "room_id": room_id,
                "sender": actor,
                "content": dict(content),
            }
        )


async def previous_content(api: ModuleApi, event_id: object) -> Mapping[str, Any] | None:
    """The content of the state event EVENT_ID (None if unknown)."""
    if not isinstance(event_id, str):
        return None
    try:
        event = await api._store.get_event(event_id, allow_none=True)
    except Exception as e:
        logger.warning("room rules: cannot read the replaced state event %s: %s", event_id, e)
        return None
    return None if event is None else dict(event.content)


def current_request_url() -> str:
    """The URL of the client request being handled ("" outside a request)."""
    try:
        from synapse.logging.context import current_context

        request = getattr(current_context(), "request", None)
        url = getattr(request, "url", "")
    except Exception:
        return ""
    return url if isinstance(url, str) else ""
