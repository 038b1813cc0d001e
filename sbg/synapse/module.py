"""`sbg.synapse.RoomRules`: the room rules (docs/room-rules.md) in Synapse.

Loaded by Synapse (`modules: [{module: sbg.synapse.RoomRules, config:
{sbg_config: FILE}}]`). This class only gathers facts from Synapse, asks
`sbg.policy.rooms` / `sbg.policy.room_repair` for the decision, and carries
it out: a refusal is logged (logger `sbg.synapse`, rule and reason code),
counted in `sbg_room_refusals_total{rule}` and answered 403 `M_FORBIDDEN`.

Which callback enforces which rule, and what no callback sees, is
documented in docs/room-rules.md. In short:

* `check_event_allowed`: every event this homeserver builds, server
  administrators' included, and the templates of `make_join`/`make_knock`
  and `send_knock` (R1, R2, R3 for rooms this server is in, R4, R5, R6, R7);
* `on_create_room`: a createRoom request, refused whole before the room
  exists;
* `federated_user_may_invite`: invites from other servers (R3, R7);
* `user_may_join_room`: joins of local users into rooms this server is not
  in yet (R3, from the servers the request names);
* `user_may_publish_room`: directory publication (R5), for every user;
* `check_threepid_can_be_invited`, `check_visibility_can_be_modified`: R6
  and R5 (both fail open on an exception in Synapse, so they never raise);
* `on_new_event`: what arrived over federation and broke a rule is undone
  (R8), and the server ACL of open rooms is kept (R7).

Synapse types are not imported for annotations: Synapse is an optional
extra of sbg, and the gateway's type checking runs without it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from synapse.module_api import NOT_SPAM, ModuleApi
from synapse.module_api.errors import Codes, ConfigError, SynapseError

from sbg.matrix.ids import server_of
from sbg.policy.room_facts import (
    ACCESS_RULES,
    CREATE,
    JOIN_RULES,
    MEMBER,
    POWER_LEVELS,
    SERVER_ACL,
    THIRD_PARTY_INVITE,
    Event,
)
from sbg.policy.room_repair import Leave, Repair, plan_repairs
from sbg.policy.rooms import (
    RoomRefusal,
    check_event,
    check_external_room,
    check_incoming_invite,
    check_join_servers,
    check_local_join,
    check_publication,
    check_room_request,
    check_third_party_invite,
    invite_state_facts,
)
from sbg.synapse.facts import (
    EventLike,
    event_facts,
    join_servers_from_url,
    room_facts,
    room_request,
    stripped_state,
)
from sbg.synapse.metrics import room_refusals
from sbg.synapse.repairs import Planner, RepairRunner, Trigger
from sbg.synapse.source import RulesError, RulesSource, parse_module_config
from sbg.synapse.synapse_ops import SynapseRoomOps, current_request_url, previous_content

logger = logging.getLogger("sbg.synapse")

# Event types the rules decide on; every other event passes untouched.
RULED_TYPES = frozenset(
    {CREATE, MEMBER, POWER_LEVELS, ACCESS_RULES, JOIN_RULES, THIRD_PARTY_INVITE, SERVER_ACL}
)
# Event types after which the repairs of R8 and R7's ACL upkeep look at the room.
REPAIRED_TYPES = RULED_TYPES | {"m.room.redaction"}
# How often the module checks whether sbg.yaml changed.
RELOAD_INTERVAL_MS = 2000


class RoomRules:
    """The Synapse module (one instance per Synapse process)."""

    def __init__(self, config: RulesSource, api: ModuleApi) -> None:
        self._api = api
        self._source = config
        self._local = str(api.server_name)
        self._source.with_local_server(self._local)
        self._counter = room_refusals()
        self._runner = RepairRunner(SynapseRoomOps(api), self._count)
        api.register_third_party_rules_callbacks(
            check_event_allowed=self.check_event_allowed,
            on_create_room=self.on_create_room,
            check_threepid_can_be_invited=self.check_threepid_can_be_invited,
            check_visibility_can_be_modified=self.check_visibility_can_be_modified,
            on_new_event=self.on_new_event,
        )
        api.register_spam_checker_callbacks(
            federated_user_may_invite=self.federated_user_may_invite,
            user_may_join_room=self.user_may_join_room,
            user_may_publish_room=self.user_may_publish_room,
        )
        api.looping_background_call(
            self._source.refresh,
            RELOAD_INTERVAL_MS,
            desc="sbg_room_rules_reload",
            run_on_all_instances=True,
        )
        servers = self._source.servers
        logger.info(
            "room rules: %s loaded (%d internal, %d external servers)",
            self._source.path,
            len(servers.internal),
            len(servers.external),
        )

    @staticmethod
    def parse_config(config: Mapping[str, Any]) -> RulesSource:
        """Read sbg.yaml now: any problem stops Synapse with one line."""
        try:
            return RulesSource.open(parse_module_config(config))
        except RulesError as e:
            raise ConfigError(str(e)) from None

    # ------------------------------------------------------------ refusals

    def _count(self, label: str) -> None:
        self._counter.labels(rule=label).inc()

    def _refused(self, refusal: RoomRefusal, what: str) -> None:
        self._count(refusal.label)
        logger.info("room rules: refused %s: %s (%s)", what, refusal, refusal.reason)

    def _forbid(self, refusal: RoomRefusal, what: str) -> SynapseError:
        self._refused(refusal, what)
        return SynapseError(403, f"{refusal.reason} (room rules {refusal})", Codes.FORBIDDEN)

    async def _published(self, room_id: str) -> bool:
        return bool(await self._api.public_room_list_manager.room_is_in_public_room_list(room_id))

    # ------------------------------------------------------------ callbacks

    async def check_event_allowed(
        self, event: EventLike, state_events: Mapping[tuple[str, str], EventLike]
    ) -> tuple[bool, None]:
        if event.type not in RULED_TYPES:
            return True, None
        facts = event_facts(event)
        if self._runner.is_repair(event.room_id, facts.type, facts.state_key, facts.content):
            return True, None
        try:
            room = room_facts(state_events, published=await self._published(event.room_id))
            refusal = check_event(self._source.servers, room, facts)
        except Exception:
            logger.exception("room rules: cannot decide on %s; refused", event.event_id)
            refusal = RoomRefusal(7, "unknown_server")
        if refusal is not None:
            key = f" {facts.state_key}" if facts.state_key else ""
            what = f"{facts.type}{key} by {facts.sender} in {event.room_id}"
            raise self._forbid(refusal, what)
        return True, None

    async def on_create_room(
        self, requester: Any, request: dict[str, Any], is_requester_admin: bool
    ) -> None:
        creator = requester.user.to_string()
        refusal = check_room_request(self._source.servers, room_request(creator, request))
        if refusal is not None:
            raise self._forbid(refusal, f"createRoom by {creator}")

    async def check_threepid_can_be_invited(
        self, medium: str, address: str, state_events: Mapping[tuple[str, str], EventLike]
    ) -> bool:
        # Synapse lets the invite through if this raises: never raise.
        try:
            refusal = check_third_party_invite(room_facts(state_events, published=False))
        except Exception:
            logger.exception("room rules: cannot decide on a third-party invite; refused")
            return False
        if refusal is not None:
            self._refused(refusal, f"a third-party invite ({medium})")
            return False
        return True

    async def check_visibility_can_be_modified(
        self, room_id: str, state_events: Mapping[tuple[str, str], EventLike], visibility: str
    ) -> bool:
        if visibility != "public":
            return True
        # Synapse lets the change through if this raises: never raise.
        try:
            refusal = check_publication(room_facts(state_events, published=False))
        except Exception:
            logger.exception("room rules: cannot decide on publishing %s; refused", room_id)
            return False
        if refusal is not None:
            self._refused(refusal, f"publishing {room_id} in the room directory")
            return False
        return True

    async def user_may_publish_room(self, user_id: str, room_id: str) -> Any:
        # Called for every user, server administrators too; answers
        # M_FORBIDDEN (check_visibility_can_be_modified, the backstop, cannot).
        state = await self._api.get_room_state(room_id, [(ACCESS_RULES, "")])
        refusal = check_publication(room_facts(state, published=False))
        if refusal is None:
            return NOT_SPAM
        self._refused(refusal, f"publishing {room_id} in the room directory (by {user_id})")
        return Codes.FORBIDDEN

    async def federated_user_may_invite(self, event: EventLike) -> Any:
        try:
            refusal = check_incoming_invite(
                self._source.servers, event.sender, stripped_state(event)
            )
        except Exception:
            logger.exception("room rules: cannot decide on invite %s; refused", event.event_id)
            refusal = RoomRefusal(7, "unknown_server")
        if refusal is None:
            return NOT_SPAM
        target = event.get_state_key()
        self._refused(refusal, f"invite of {target} by {event.sender} into {event.room_id}")
        return Codes.FORBIDDEN

    async def user_may_join_room(self, user_id: str, room_id: str, is_invited: bool) -> Any:
        servers = self._source.servers
        state = await self._api.get_room_state(room_id, [(CREATE, ""), (JOIN_RULES, "")])
        if (CREATE, "") in state:
            refusal = check_local_join(servers, room_facts(state, published=False))
        elif is_invited:
            refusal = None  # checked when the invite arrived; R8 after the join
        else:
            # Not in the room, not invited: the join goes through the servers
            # the client's request names (Synapse does not give them to modules).
            refusal = check_join_servers(servers, join_servers_from_url(current_request_url()))
        if refusal is None:
            return NOT_SPAM
        self._refused(refusal, f"join of {user_id} into {room_id}")
        return Codes.FORBIDDEN

    async def on_new_event(
        self, event: EventLike, state_events: Mapping[tuple[str, str], EventLike]
    ) -> None:
        if event.type not in REPAIRED_TYPES:
            return
        if not self._api.should_run_background_tasks():
            return  # one process repairs (the one running background tasks)
        trigger = Trigger(event.event_id, event.sender, event.type)
        self._api.run_as_background_process(
            "sbg_room_rules_repair", self._runner.run, event.room_id, trigger, self._planner(event)
        )

    # ------------------------------------------------------------ repairs

    def _planner(self, event: EventLike) -> Planner:
        """How to plan the repairs after EVENT, once its room's turn comes."""
        facts = event_facts(event)
        replaced = event.unsigned.get("replaces_state")
        knock_state = event.unsigned.get("knock_room_state")

        async def plan(room_id: str, trigger: Trigger) -> list[Repair]:
            state = await self._api.get_room_state(room_id)
            servers = self._source.servers
            if (CREATE, "") not in state:
                return self._plan_outside(facts, knock_state)
            current = state.get((facts.type, facts.state_key or ""))
            superseded = (
                facts.state_key is not None
                and current is not None
                and current.event_id != trigger.event_id
            )
            room = room_facts(state, published=await self._published(room_id))
            previous = await previous_content(self._api, replaced)
            return plan_repairs(servers, room, facts, previous, self._local, superseded=superseded)

        return plan

    def _plan_outside(self, facts: Event, knock_state: object) -> list[Repair]:
        """A local user's knock on a room this server is not in: R3, judged on
        the stripped state the knock got back."""
        user = facts.state_key
        if facts.type != MEMBER or facts.content.get("membership") != "knock" or not user:
            return []
        if not self._api.is_mine(user):
            return []
        items = knock_state if isinstance(knock_state, list | tuple) else []
        creator, _public = invite_state_facts(x for x in items if isinstance(x, Mapping))
        host = server_of(creator) if creator is not None else None
        refusal = check_external_room(self._source.servers, host, True)
        return [] if refusal is None else [Repair(Leave(user), user, refusal)]
