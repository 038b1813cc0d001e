"""`ClusterKillSwitch`: one node's kill switch, shared with the others
through Redis.

It wraps the node's `KillSwitch` (the process that holds it: the gateway,
or the supervisor of `workers: N`, which publishes it to its workers) and
drives the `RedisLink` thread. On the reactor thread only.

- An engage takes effect here at once (memory, every worker, `state_dir`),
  is marked pending and goes to Redis as a new change; the answer says
  whether Redis took it (`"cluster": "connected"`) or not (`"unreachable"`:
  it stays pending and goes to Redis when Redis answers again).
- A lift goes to Redis first and only then takes effect here (on disk
  first, as a lift always does). Redis unreachable, or not confirming:
  503, nothing lifted anywhere.
- Every poll's snapshot is reconciled with what this node knows
  (`sbg.cluster.plan`): newer records from Redis are applied here, this
  node's newer ones (and its pending engages) are written to Redis.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from sbg import reasons
from sbg.cluster.ledger import Ledger
from sbg.cluster.link import Announcement, RedisLink, RedisUnavailable, Snapshot
from sbg.cluster.nodes import recent
from sbg.cluster.plan import reconcile
from sbg.cluster.records import Record
from sbg.config.model import ClusterSettings
from sbg.killswitch.control import Outcome, error, not_persisted
from sbg.killswitch.state import Switch, expand_direction
from sbg.killswitch.switch import KillSwitch, KillSwitchPersistError

logger = logging.getLogger(__name__)

CONNECTED, UNREACHABLE = "connected", "unreachable"
# How long a start waits for Redis's first answer before serving with the
# switches of state_dir.
START_WAIT = 2.5


def _name(switch: Switch) -> str:
    return f"server={switch[0] or '(global)'} direction={switch[1]}"


class ClusterKillSwitch:
    """The kill switch of one node of a cluster (see the module)."""

    def __init__(
        self,
        killswitch: KillSwitch,
        settings: ClusterSettings,
        reactor: Any,
        announcement: Announcement,
        *,
        on_problem: Callable[[str], None] | None = None,
        on_connected: Callable[[bool], None] | None = None,
        link_factory: Callable[..., RedisLink] = RedisLink,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._ks = killswitch
        self.settings = settings
        self._on_problem = on_problem
        self._on_connected = on_connected
        self._clock = clock
        self.ledger = Ledger(killswitch.file.state_dir, on_problem)
        self._link = link_factory(settings, reactor, announcement, self._snapshot, self._state)
        self.connected = False
        self._latest: Snapshot | None = None
        self._bad: tuple[str, ...] = ()
        self._twins: set[str] = set()
        self._first_ms: int | None = None
        # Switches with a change on its way to Redis.
        self._pushing: set[Switch] = set()
        self._merging: set[Switch] = set()
        self._lifting: set[Switch] = set()

    @property
    def killswitch(self) -> KillSwitch:
        return self._ks

    # -- lifecycle ---------------------------------------------------------

    def start(self, wait: float = START_WAIT) -> None:
        """(Before the listeners serve.) Read the ledger, apply every switch
        known engaged, and wait up to `wait` s for Redis's first answer."""
        self.ledger.load()
        missing = [
            r for r in self.ledger.known.values() if r.engaged and r.switch not in self._ks.engaged
        ]
        if missing:
            self._ks.put_entries(r.entry() for r in missing)
        if self.ledger.repair(self._ks.engaged):
            self.ledger.save()
        where = f"Redis at {self.settings.redis}"
        first = self._link.start(wait)
        if first is None:
            logger.warning(
                "cluster: %s did not answer at start: node %s serves with the %d kill switch(es) "
                "of its state_dir; engages go to Redis when it answers, lifts are refused until then",
                where,
                self.settings.node_name,
                len(self._ks.engaged),
            )
            self._set_connected(False)
            return
        logger.info("cluster: node %s connected to %s", self.settings.node_name, where)
        self._set_connected(True)
        self._snapshot(first)

    def stop(self) -> None:
        self._link.stop()

    def reconfigured(self, config_sha256: str) -> None:
        """A reload: announce the configuration now in force."""
        a = self._link.announcement
        self._link.announcement = Announcement(
            a.node, config_sha256, a.version, a.workers, a.instance, a.started_ts
        )

    # -- what the admin API and /health read ------------------------------

    @property
    def cluster_state(self) -> str:
        return CONNECTED if self.connected else UNREACHABLE

    def state(self) -> dict[str, Any]:
        return {**self._ks.as_json(), "cluster": self.cluster_state}

    def status(self) -> dict[str, Any]:
        """This node, Redis's reachability, and the nodes seen in the last
        30 s (as of the last poll), for `GET /_sbg/cluster` and `sbg status`."""
        nodes: list[dict[str, Any]] = []
        if self._latest is not None:
            now_ms = self._latest.redis_now_ms()
            nodes = [n.as_json() for n in recent(self._latest.nodes, now_ms)]
        pending = sorted(self.ledger.pending, key=lambda s: (s[0] or "", s[1]))
        return {
            "node": self.settings.node_name,
            "redis": self.settings.redis,
            "cluster": self.cluster_state,
            "nodes": nodes,
            "pending": [{"server": s, "direction": d} for s, d in pending],
        }

    # -- changes through the admin API ------------------------------------

    def engage(
        self, server: str | None, direction: str, reason: str | None, by: str | None
    ) -> defer.Deferred[Outcome]:
        persisted = self._ks.engage(server, direction, reason=reason, by=by)
        switches = [(server, d) for d in expand_direction(direction)]
        marks = self.ledger.mark_pending(switches)
        self.ledger.save()

        def answer(in_redis: bool) -> Outcome:
            cluster = CONNECTED if in_redis else UNREACHABLE
            if not persisted:
                return not_persisted(self._ks, cluster=cluster)
            return Outcome(200, {**self._ks.as_json(), "cluster": cluster}, True)

        if not self.connected:
            return defer.succeed(answer(False))
        return self._push_pending(marks).addCallback(answer)

    def lift(self, server: str | None, direction: str, by: str | None) -> defer.Deferred[Outcome]:
        switches = [(server, d) for d in expand_direction(direction)]
        if not self.connected:
            return defer.succeed(self._refused("Redis is unreachable"))
        for switch in switches:
            self.ledger.pending.pop(switch, None)
        self._lifting.update(switches)
        now = int(self._clock() * 1000)
        records = [
            Record(s, d, False, self._floor((s, d)), now, self.settings.node_name, by)
            for s, d in switches
        ]

        def lifted(held: list[Record]) -> Outcome:
            self._lifting.difference_update(switches)
            try:
                self._ks.lift_switches(r.switch for r in held if not r.engaged)
            except KillSwitchPersistError as e:
                self._reconcile()
                return error(
                    500,
                    "M_UNKNOWN",
                    f"lifted in the cluster, but this node cannot persist its state ({e}): the "
                    "switch stays engaged on this node until it can",
                    applied=False,
                    cluster=CONNECTED,
                )
            self.ledger.learn(held)
            self.ledger.save()
            self._reconcile()
            return Outcome(200, self.state(), True)

        def failed(failure: Failure) -> Outcome:
            failure.trap(RedisUnavailable)
            self._lifting.difference_update(switches)
            self._reconcile()
            return self._refused(f"Redis did not confirm the lift ({failure.value})")

        return self._link.submit("operation", records).addCallbacks(lifted, failed)

    def _refused(self, why: str) -> Outcome:
        reason = reasons.CLUSTER_UNREACHABLE
        return error(
            reason.status,
            reason.errcode,
            f"{why}: nothing was lifted (a lift on one node only would split the border); "
            "try again when GET /health says the cluster is connected",
            applied=False,
            cluster=UNREACHABLE,
        )

    # -- Redis's side ------------------------------------------------------

    def _floor(self, switch: Switch) -> int:
        known = self.ledger.known.get(switch)
        return known.version if known is not None else 0

    def _push_pending(self, marks: dict[Switch, int]) -> defer.Deferred[bool]:
        """Write these pending engages to Redis as new changes; True once it holds them."""
        entries = self._ks.entries
        now = int(self._clock() * 1000)
        node = self.settings.node_name
        records = []
        for switch in marks:
            e = entries.get(switch)
            if e is None:
                continue
            records.append(
                Record(
                    e.server,
                    e.direction,
                    True,
                    self._floor(switch),
                    now,
                    node,
                    e.by,
                    e.reason,
                    e.since_ts,
                )
            )
        switches = {r.switch for r in records}
        self._pushing.update(switches)

        def done(held: list[Record]) -> bool:
            self._pushing.difference_update(switches)
            for record in held:
                self.ledger.confirm(record, marks.get(record.switch))
            self.ledger.save()
            return True

        def failed(failure: Failure) -> bool:
            failure.trap(RedisUnavailable)
            self._pushing.difference_update(switches)
            return False

        return self._link.submit("operation", records).addCallbacks(done, failed)

    def _merge(self, records: Iterable[Record]) -> None:
        todo = [r for r in records if r.switch not in self._merging]
        if not todo:
            return
        switches = {r.switch for r in todo}
        self._merging.update(switches)

        def done(result: object) -> None:
            # What Redis holds now comes with the next poll.
            self._merging.difference_update(switches)
            if isinstance(result, Failure):
                result.trap(RedisUnavailable)

        self._link.submit("merge", todo).addBoth(done)

    def _snapshot(self, snapshot: Snapshot) -> None:
        self._latest = snapshot
        if snapshot.bad_fields != self._bad:
            self._bad = snapshot.bad_fields
            if self._bad:
                logger.error(
                    "cluster: Redis holds kill-switch entries that are not records (ignored, "
                    "never taken as a lift): %s",
                    ", ".join(self._bad),
                )
                if self._on_problem is not None:
                    self._on_problem("cluster")
        self._check_twins(snapshot)
        self._reconcile()

    def _check_twins(self, snapshot: Snapshot) -> None:
        # Another instance's announcement written after this one's first
        # poll is a live twin (an earlier run's is only overwritten late).
        if self._first_ms is None:
            self._first_ms = snapshot.now_ms
        mine = self._link.announcement
        for node in snapshot.nodes:
            twin = (
                node.node == mine.node
                and node.instance != mine.instance
                and node.last_seen_ts > self._first_ms
            )
            if twin and node.instance not in self._twins:
                self._twins.add(node.instance)
                logger.error(
                    "cluster: another process announces itself as node %s: give every "
                    "node its own cluster.node_name",
                    mine.node,
                )

    def _state(self, connected: bool, detail: str) -> None:
        if connected == self.connected:
            return
        if connected:
            logger.warning("cluster: Redis at %s answers again", self.settings.redis)
        else:
            logger.error(
                "cluster: Redis at %s is unreachable (%s): switches engaged here stay engaged, "
                "engages go to Redis when it answers, lifts are refused until then",
                self.settings.redis,
                detail,
            )
        self._set_connected(connected)

    def _set_connected(self, connected: bool) -> None:
        self.connected = connected
        if self._on_connected is not None:
            self._on_connected(connected)

    def _reconcile(self) -> None:
        if self._latest is None:
            return
        engaged = self._ks.engaged
        changed = self.ledger.repair(engaged, exclude=self._lifting)
        plan = reconcile(
            self.ledger.known,
            engaged,
            frozenset(self.ledger.pending),
            self._latest.records,
            busy=self._lifting | self._pushing,
        )
        if plan.engage:
            for r in plan.engage:
                logger.warning(
                    "kill switch engaged through the cluster (node %s): %s", r.node, _name(r.switch)
                )
            self._ks.put_entries(r.entry() for r in plan.engage)
            changed = self.ledger.learn(plan.engage) or changed
        if plan.lift:
            try:
                self._ks.lift_switches(r.switch for r in plan.lift)
            except KillSwitchPersistError:
                pass  # logged and counted; tried again at the next poll
            else:
                for r in plan.lift:
                    logger.warning(
                        "kill switch lifted through the cluster (node %s): %s",
                        r.node,
                        _name(r.switch),
                    )
                changed = self.ledger.learn(plan.lift) or changed
        changed = self.ledger.learn(plan.remember) or changed
        if changed:
            self.ledger.save()
        if not self.connected:
            return
        self._merge(plan.push)
        waiting = {s: m for s, m in self.ledger.pending.items() if s not in self._pushing}
        if waiting:
            self._push_pending(waiting)
