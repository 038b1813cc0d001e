"""Kill-switch records as the cluster's Redis holds them (pure).

Redis holds one record per switch (`(server, direction)`, `server` None for
the global switch) in the hash `sbg:killswitch`: the field is the switch as
JSON (`["partner.example", "inbound"]`, `[null, "outbound"]`), the value a
JSON object saying whether it is engaged or lifted and at which `version`.

Versions order the changes of one switch: a change made through Redis takes
the version above every version that switch had (in Redis or on the node
that makes it), in one Redis transaction. Of two records of a switch, the
one with the higher version is newer; at equal versions an engaged record
is newer than a lifted one, so that no disagreement ever resolves into a
lift. A lift is always such an explicit record (a tombstone, kept): a switch
that Redis does not know of is never lifted by its absence.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sbg.killswitch.state import DIRECTIONS, Direction, Entry, Switch

# Larger than any version that can be reached; below 2**53 (JSON numbers).
MAX_VERSION = 2**52
MAX_TEXT = 1000


class RecordError(ValueError):
    """A field or value of the hash that is not a kill-switch record."""


def field_name(switch: Switch) -> str:
    """The hash field of a switch: `["server-or-null", "direction"]`."""
    return json.dumps([switch[0], switch[1]], separators=(",", ":"))


@dataclass(frozen=True)
class Record:
    """One switch's last change, as Redis (or this node) knows it.

    Attributes:
        engaged: engaged (True) or lifted (False) by this change.
        version: the change's place in this switch's history.
        ts: when the change was made, ms since the epoch.
        node: the node whose admin API took it.
        by: the admin client's address.
        reason, since_ts: of an engaged switch, as its `Entry` has them.
    """

    server: str | None
    direction: Direction
    engaged: bool
    version: int
    ts: int
    node: str
    by: str | None = None
    reason: str | None = None
    since_ts: int = 0

    @property
    def switch(self) -> Switch:
        return (self.server, self.direction)

    @property
    def order(self) -> tuple[int, int]:
        """Compare with `>`: the newer record has the larger order."""
        return (self.version, 1 if self.engaged else 0)

    def entry(self) -> Entry:
        """The engaged switch's entry (for `KillSwitch`)."""
        return Entry(self.server, self.direction, self.reason, self.since_ts, self.by)

    def as_json(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "direction": self.direction,
            "state": "engaged" if self.engaged else "lifted",
            "version": self.version,
            "ts": self.ts,
            "node": self.node,
            "by": self.by,
            "reason": self.reason,
            "since_ts": self.since_ts,
        }

    def encode(self) -> str:
        return json.dumps(self.as_json(), separators=(",", ":"), sort_keys=True)


def newer(a: Record | None, b: Record | None) -> bool:
    """Whether `a` is newer than `b` (anything is newer than nothing)."""
    if a is None:
        return False
    return b is None or a.order > b.order


def _text(item: dict[str, Any], key: str, *, optional: bool = True) -> str | None:
    value = item.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_TEXT:
        raise RecordError(f"{key}: not a string of 1 to {MAX_TEXT} characters")
    return value


def _number(item: dict[str, Any], key: str) -> int:
    value = item.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_VERSION:
        raise RecordError(f"{key}: not an integer between 0 and {MAX_VERSION}")
    return value


def from_json(item: Any) -> Record:
    """The record of a decoded JSON object (the inverse of `as_json`).

    Raises:
        RecordError: anything but that shape.
    """
    if not isinstance(item, dict):
        raise RecordError("not a JSON object")
    direction = item.get("direction")
    if direction not in DIRECTIONS:
        raise RecordError("direction: not inbound or outbound")
    state = item.get("state")
    if state not in ("engaged", "lifted"):
        raise RecordError("state: not engaged or lifted")
    node = _text(item, "node", optional=False)
    assert node is not None
    return Record(
        server=_text(item, "server"),
        direction=direction,
        engaged=state == "engaged",
        version=_number(item, "version"),
        ts=_number(item, "ts"),
        node=node,
        by=_text(item, "by"),
        reason=_text(item, "reason"),
        since_ts=_number(item, "since_ts"),
    )


def decode(field: bytes | str, value: bytes | str) -> Record:
    """The record of one hash field and value; the field must name the
    record's own switch.

    Raises:
        RecordError: not a record, or filed under another switch.
    """
    try:
        record = from_json(json.loads(value))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise RecordError(str(e)) from None
    name = field.decode("utf-8", "replace") if isinstance(field, bytes) else field
    if name != field_name(record.switch):
        raise RecordError(f"filed under {name!r}, not under its own switch")
    return record
