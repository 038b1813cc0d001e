"""The kill switch: runtime state, persisted in `state_dir` (contract 6).

A switch is `(server, direction)` with `server` None for the global switch.
The state file is written with write-then-rename and fsync before a change
is acknowledged, so a switch survives a crash and a restart. A reload of the
configuration never touches it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from typing import Literal

Direction = Literal["inbound", "outbound"]
DIRECTIONS: tuple[Direction, Direction] = ("inbound", "outbound")
STATE_FILE = "killswitch.json"

Switch = tuple[str | None, Direction]
# What identifies one version of the state file: it is replaced (renamed
# over), never rewritten in place, so a new version has a new ctime.
Stamp = tuple[int, int, int, int] | None

logger = logging.getLogger(__name__)


class KillSwitchStateError(Exception):
    """The state file exists but cannot be read: refuse to start blind."""


def expand_direction(direction: str) -> tuple[Direction, ...]:
    if direction == "both":
        return DIRECTIONS
    if direction == "inbound":
        return ("inbound",)
    if direction == "outbound":
        return ("outbound",)
    raise ValueError(f"direction must be inbound, outbound or both, not {direction!r}")


class KillSwitch:
    def __init__(self, state_dir: str) -> None:
        self._state_dir = state_dir
        self._engaged: frozenset[Switch] = frozenset()
        self._listeners: list[Callable[[frozenset[Switch]], None]] = []
        self._watching = False
        self._stamp: Stamp = None
        self._notified: frozenset[Switch] = frozenset()

    @property
    def path(self) -> str:
        return os.path.join(self._state_dir, STATE_FILE)

    def load(self) -> None:
        """Restore the persisted state (creating `state_dir` 0700 if missing)."""
        os.makedirs(self._state_dir, mode=0o700, exist_ok=True)
        self._stamp, self._engaged = self._read()
        self._notify()

    def _read(self) -> tuple[Stamp, frozenset[Switch]]:
        try:
            with open(self.path, encoding="utf-8") as f:
                stamp = _stamp(os.fstat(f.fileno()))
                data = json.load(f)
        except FileNotFoundError:
            return None, frozenset()
        except (OSError, ValueError) as e:
            raise KillSwitchStateError(f"{self.path}: cannot read kill-switch state: {e}")
        try:
            switches: set[Switch] = set()
            for item in data["engaged"]:
                server = item["server"]
                if server is not None and not isinstance(server, str):
                    raise ValueError("server must be a string or null")
                for d in expand_direction(item["direction"]):
                    switches.add((server, d))
        except (KeyError, TypeError, ValueError) as e:
            raise KillSwitchStateError(f"{self.path}: malformed kill-switch state: {e}")
        return stamp, frozenset(switches)

    def watch(self) -> None:
        """Follow a state file that another process writes (a worker of
        `workers: N` follows its supervisor's admin API): from now on every
        check first looks, with one `stat`, whether the file was replaced,
        and reads it again if so. A change is therefore in force for the
        next request after the admin call returned, in every process.

        The `on_change` callbacks (closing the tunnels a switch covers) run
        from `refresh`, which the worker calls every second, not from a
        check: the request being checked gets its 403 first, like every
        later request in a tunnel that is still open."""
        self._watching = True

    def _follow(self) -> None:
        try:
            stamp: Stamp = _stamp(os.stat(self.path))
        except FileNotFoundError:
            stamp = None
        except OSError as e:
            logger.error("kill switch: cannot stat %s: %s; keeping the last state", self.path, e)
            return
        if stamp == self._stamp:
            return
        try:
            self._stamp, self._engaged = self._read()
        except KillSwitchStateError as e:
            # Written whole (write-then-rename) by the supervisor: this is
            # someone else's damage. The last state read stays in force.
            logger.error("kill switch: %s; keeping the last state", e)

    def refresh(self) -> None:
        """Read the state file again if it was replaced since last read, and
        tell the `on_change` callbacks about any change not told yet."""
        self._follow()
        if self._engaged != self._notified:
            self._notify()

    def on_change(self, callback: Callable[[frozenset[Switch]], None]) -> None:
        self._listeners.append(callback)

    @property
    def engaged(self) -> frozenset[Switch]:
        return self._engaged

    def is_killed(self, server: str | None, direction: Direction) -> bool:
        """Whether the global switch or `server`'s switch covers `direction`."""
        if self._watching:
            self._follow()
        e = self._engaged
        if (None, direction) in e:
            return True
        return server is not None and (server, direction) in e

    def engage(self, server: str | None, direction: str) -> None:
        self._set(self._engaged | {(server, d) for d in expand_direction(direction)})

    def lift(self, server: str | None, direction: str) -> None:
        self._set(self._engaged - {(server, d) for d in expand_direction(direction)})

    def as_json(self) -> dict[str, list[dict[str, str | None]]]:
        return {"engaged": render(self._engaged)}

    def _set(self, new: frozenset[Switch]) -> None:
        if new != self._engaged:
            self._persist(new)
            self._engaged = new
            self._notify()

    def _persist(self, switches: frozenset[Switch]) -> None:
        os.makedirs(self._state_dir, mode=0o700, exist_ok=True)
        tmp = self.path + ".tmp"
        data = json.dumps({"engaged": render(switches)}, indent=1).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        self._stamp = _stamp(os.stat(self.path))
        dfd = os.open(self._state_dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _notify(self) -> None:
        self._notified = self._engaged
        for cb in self._listeners:
            cb(self._engaged)


def _stamp(st: os.stat_result) -> Stamp:
    return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)


def render(switches: Iterable[Switch]) -> list[dict[str, str | None]]:
    def key(s: Switch) -> tuple[int, str, str]:
        return (0 if s[0] is None else 1, s[0] or "", s[1])

    return [{"server": s, "direction": d} for s, d in sorted(switches, key=key)]
