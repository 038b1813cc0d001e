"""What a node does with what Redis holds (pure: no I/O, no clock).

`reconcile` compares, switch by switch, the record this node last applied
or confirmed (`known`) with Redis's (`remote`):

- Redis's is newer: apply it here (engage, or lift a switch engaged here);
- this node's is newer, or Redis has none (Redis lost its data, or never
  got this node's change): write it into Redis again;
- the same: nothing.

A switch known here as engaged but not in force here (a state file written
by an earlier run that did not get as far as this node's records) is put
back in force.

Switches engaged here that Redis has not confirmed yet (`pending`: engaged
while Redis was unreachable, or not yet answered) are left out: they go to
Redis as new changes, above whatever Redis holds, so an engage made while
Redis was away outlasts a lift made meanwhile. Nothing here lifts a switch
because a record is missing: only a newer lifted record does.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass

from sbg.cluster.records import Record, newer
from sbg.killswitch.state import Switch


@dataclass(frozen=True)
class Plan:
    """What to change here and what to write into Redis.

    Attributes:
        engage: engaged records to put in force here.
        lift: lifted records for switches engaged here: lift them (on disk
            first) and then remember the records.
        remember: lifted records for switches not engaged here: only
            remembered (so that an older engage elsewhere is not taken).
        push: this node's records that Redis lacks or holds older.
    """

    engage: tuple[Record, ...] = ()
    lift: tuple[Record, ...] = ()
    remember: tuple[Record, ...] = ()
    push: tuple[Record, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.engage or self.lift or self.remember or self.push)


def reconcile(
    known: Mapping[Switch, Record],
    engaged: Set[Switch],
    pending: Set[Switch],
    remote: Mapping[Switch, Record],
    busy: Set[Switch] = frozenset(),
) -> Plan:
    """The plan that brings this node and Redis to the newer of each record.

    Args:
        known: the record last applied or confirmed here, per switch.
        engaged: the switches in force here.
        pending: engaged here, not yet confirmed by Redis (left out).
        remote: Redis's records.
        busy: switches with a change on its way to Redis (left out).
    """
    engage: list[Record] = []
    lift: list[Record] = []
    remember: list[Record] = []
    push: list[Record] = []
    for switch in sorted(set(known) | set(remote), key=_sort_key):
        if switch in pending or switch in busy:
            continue
        mine, theirs = known.get(switch), remote.get(switch)
        if newer(theirs, mine):
            assert theirs is not None
            if theirs.engaged:
                engage.append(theirs)
            elif switch in engaged:
                lift.append(theirs)
            else:
                remember.append(theirs)
            continue
        if mine is not None and mine.engaged and switch not in engaged:
            engage.append(mine)  # known engaged, yet not in force here: put it back
        if newer(mine, theirs):
            assert mine is not None
            push.append(mine)
    return Plan(tuple(engage), tuple(lift), tuple(remember), tuple(push))


def _sort_key(switch: Switch) -> tuple[str, str]:
    return (switch[0] or "", switch[1])
