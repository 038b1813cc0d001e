"""Kill switches as values: which are engaged, since when, by whom, why.

A switch is `(server, direction)`, `server` None for the global switch.
`Switches` maps each engaged switch to its `Entry`; its JSON form is the
state file's and the admin API's (`{"engaged": [...]}`, a `both` switch as
two entries).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Direction = Literal["inbound", "outbound"]
DIRECTIONS: tuple[Direction, Direction] = ("inbound", "outbound")

Switch = tuple[str | None, Direction]


def expand_direction(direction: str) -> tuple[Direction, ...]:
    """`inbound`, `outbound` or `both` as the directions it covers."""
    if direction == "both":
        return DIRECTIONS
    if direction == "inbound":
        return ("inbound",)
    if direction == "outbound":
        return ("outbound",)
    raise ValueError(f"direction must be inbound, outbound or both, not {direction!r}")


@dataclass(frozen=True)
class Entry:
    """One engaged switch and what is known of its engagement.

    Attributes:
        reason: why, as the operator said (None: not said).
        since_ts: when it was engaged, ms since the epoch (0: not known,
            e.g. a state file written by an older sbg).
        by: who engaged it: the admin client's address (None: not known).
    """

    server: str | None
    direction: Direction
    reason: str | None = None
    since_ts: int = 0
    by: str | None = None

    @property
    def switch(self) -> Switch:
        return (self.server, self.direction)

    def as_json(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "direction": self.direction,
            "reason": self.reason,
            "since_ts": self.since_ts,
            "by": self.by,
        }


Switches = Mapping[Switch, Entry]


def _order(entry: Entry) -> tuple[int, str, str]:
    return (0 if entry.server is None else 1, entry.server or "", entry.direction)


def render(switches: Switches) -> dict[str, list[dict[str, Any]]]:
    """The JSON form: `{"engaged": [entry, ...]}`, global switches first."""
    return {"engaged": [e.as_json() for e in sorted(switches.values(), key=_order)]}


class StateFormatError(ValueError):
    """A JSON document that is not a kill-switch state."""


def _optional_str(item: Mapping[str, Any], key: str) -> str | None:
    value = item.get(key)
    if value is not None and not isinstance(value, str):
        raise StateFormatError(f"{key} must be a string or null")
    return value


def parse(data: Any) -> dict[Switch, Entry]:
    """The switches of a decoded JSON state (the inverse of `render`).

    Raises:
        StateFormatError: anything but that shape.
    """
    if not isinstance(data, dict) or not isinstance(data.get("engaged"), list):
        raise StateFormatError('expected {"engaged": [...]}')
    out: dict[Switch, Entry] = {}
    for item in data["engaged"]:
        if not isinstance(item, dict):
            raise StateFormatError("an entry is not an object")
        server = _optional_str(item, "server")
        since = item.get("since_ts", 0)
        if isinstance(since, bool) or not isinstance(since, int) or since < 0:
            raise StateFormatError("since_ts must be a non-negative integer")
        try:
            directions = expand_direction(item.get("direction"))  # type: ignore[arg-type]
        except ValueError as e:
            raise StateFormatError(str(e)) from None
        for d in directions:
            out[(server, d)] = Entry(
                server, d, _optional_str(item, "reason"), since, _optional_str(item, "by")
            )
    return out
