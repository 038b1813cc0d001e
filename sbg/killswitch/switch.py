"""`KillSwitch`: the state the gateway checks and the admin API changes.

One process holds the authoritative state in memory: the gateway with
`workers: 1`, or the supervisor with `workers: N`, which also publishes it
to the workers through shared memory (`sbg.killswitch.shared`). A worker
only follows that memory. The state file in `state_dir` is where the state
survives a restart; while sbg runs, memory wins:

- an engage takes effect in memory (and for every worker) first, and is
  then written; a write that fails leaves the switch engaged and is
  reported (the admin API answers 500, saying so);
- a lift is written first, and refused (nothing changes) if it cannot be:
  memory and disk never disagree about a lifted switch, so what the
  operator saw lifted does not come back at the next start;
- a file deleted, truncated, damaged or replaced under a running gateway
  is noticed within a second (`check_file`), logged, counted and written
  again from memory: it never lifts a switch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from sbg.killswitch.shared import SharedState, SharedStateError
from sbg.killswitch.state import Direction, Entry, Switch, Switches, expand_direction, render
from sbg.killswitch.store import StateFile, StateFileError

logger = logging.getLogger(__name__)


class KillSwitchStateError(Exception):
    """The state file exists but cannot be read: refuse to start blind."""


class KillSwitchPersistError(Exception):
    """A change that could not be written to `state_dir` (an `OSError`)."""


class KillSwitch:
    """The engaged switches of this node, and their persistence.

    Args:
        state_dir: where the state file lives.
        shared: the supervisor's segment to publish to (`follower` False),
            or the one a worker follows (`follower` True).
        follower: a worker: read `shared` only, never the file.
        clock: seconds since the epoch (for `since_ts`).
        on_problem: called with a short kind (`persist`, `file`, `shared`)
            for every problem counted in `sbg_killswitch_state_errors_total`.
    """

    def __init__(
        self,
        state_dir: str,
        *,
        shared: SharedState | None = None,
        follower: bool = False,
        clock: Callable[[], float] = time.time,
        on_problem: Callable[[str], None] | None = None,
    ) -> None:
        if follower and shared is None:
            raise ValueError("a follower needs the shared state")
        self.file = StateFile(state_dir)
        self._shared = shared
        self._follower = follower
        self._clock = clock
        self._on_problem = on_problem
        self._switches: dict[Switch, Entry] = {}
        self._engaged: frozenset[Switch] = frozenset()
        self._listeners: list[Callable[[frozenset[Switch]], None]] = []
        self._notified: frozenset[Switch] = frozenset()
        self._file_ok = True

    @property
    def path(self) -> str:
        return self.file.path

    # -- start -------------------------------------------------------------

    def load(self) -> None:
        """Start from the persisted state (a worker: from shared memory).

        Raises:
            KillSwitchStateError: the state file cannot be read: starting
                without the switches it may hold would open the border.
        """
        if self._follower:
            assert self._shared is not None
            self._sync()
        else:
            self.file.ensure_dir()
            try:
                switches = self.file.read()
            except StateFileError as e:
                raise KillSwitchStateError(str(e)) from None
            self._set(dict(switches))
        self._notify()

    # -- checks ------------------------------------------------------------

    @property
    def engaged(self) -> frozenset[Switch]:
        if self._follower:
            self._follow()
        return self._engaged

    @property
    def entries(self) -> Switches:
        if self._follower:
            self._follow()
        return dict(self._switches)

    def is_killed(self, server: str | None, direction: Direction) -> bool:
        """Whether the global switch or `server`'s switch covers `direction`."""
        if self._follower:
            self._follow()
        e = self._engaged
        if (None, direction) in e:
            return True
        return server is not None and (server, direction) in e

    def as_json(self) -> dict[str, list[dict[str, object]]]:
        return render(self.entries)

    # -- changes -----------------------------------------------------------

    def engage(
        self,
        server: str | None,
        direction: str,
        *,
        reason: str | None = None,
        by: str | None = None,
    ) -> bool:
        """Engage a switch: in force at once (for every worker too); True
        when it is also persisted, False when `state_dir` could not be
        written (it stays engaged; the problem is logged and counted)."""
        self._writable()
        now = int(self._clock() * 1000)
        new = dict(self._switches)
        for d in expand_direction(direction):
            old = new.get((server, d))
            if old is None:
                new[(server, d)] = Entry(server, d, reason, now, by)
            elif reason is not None and reason != old.reason:
                new[(server, d)] = Entry(server, d, reason, old.since_ts, old.by)
        if new == self._switches:
            return self._persist_quietly()
        self._set(new)
        self._notify()
        return self._persist_quietly()

    def lift(self, server: str | None, direction: str) -> None:
        """Lift a switch, on disk first: nothing changes if it cannot be written.

        Raises:
            KillSwitchPersistError: `state_dir` could not be written.
        """
        self.lift_switches([(server, d) for d in expand_direction(direction)])

    def lift_switches(self, switches: Iterable[Switch]) -> None:
        """Lift these switches, on disk first (see `lift`)."""
        self._writable()
        new = dict(self._switches)
        for switch in switches:
            new.pop(switch, None)
        if new == self._switches:
            return
        try:
            self.file.write(new)
        except OSError as e:
            self._problem("persist", f"cannot write {self.path}: {e}; the switch stays engaged")
            raise KillSwitchPersistError(str(e)) from None
        self._file_ok = True
        self._set(new)
        self._notify()

    def put_entries(self, entries: Iterable[Entry]) -> bool:
        """Engage switches exactly as these entries say (reason, since_ts,
        by: e.g. as another node engaged them): in force at once, then
        persisted; False when `state_dir` could not be written."""
        self._writable()
        new = dict(self._switches)
        for entry in entries:
            new[entry.switch] = entry
        if new == self._switches:
            return self._file_ok
        self._set(new)
        self._notify()
        return self._persist_quietly()

    def on_change(self, callback: Callable[[frozenset[Switch]], None]) -> None:
        self._listeners.append(callback)

    # -- keeping it true ---------------------------------------------------

    def check_file(self) -> None:
        """(Every second, not in a worker.) Write the state file again if it
        was deleted, damaged or replaced, or if an earlier write failed."""
        if self._follower:
            return
        try:
            stamp = self.file.stamp()
        except OSError as e:
            stamp = ("unreadable", str(e))  # type: ignore[assignment]
        if stamp == self.file.written and self._file_ok:
            return
        if self._file_ok:
            self._problem(
                "file",
                f"{self.path} was deleted, damaged or replaced under the running gateway: "
                "the switches in force are unchanged; writing it again from memory",
            )
        self._persist_quietly()

    def refresh(self) -> None:
        """(Every second, in a worker.) Follow the shared state and tell the
        `on_change` callbacks (closing the tunnels a new switch covers)."""
        if self._follower:
            self._follow()
        if self._engaged != self._notified:
            self._notify()

    # -- internals ---------------------------------------------------------

    def _writable(self) -> None:
        if self._follower:
            raise RuntimeError("a worker's kill switch is changed by its supervisor")

    def _set(self, switches: dict[Switch, Entry]) -> None:
        self._switches = switches
        self._engaged = frozenset(switches)
        if self._shared is not None and not self._follower:
            self._shared.publish(switches)

    def _persist_quietly(self) -> bool:
        try:
            self.file.write(self._switches)
        except OSError as e:
            if self._file_ok:
                self._problem(
                    "persist",
                    f"cannot write {self.path}: {e}; the switches in force are unchanged "
                    "but would not survive a restart",
                )
            self._file_ok = False
            return False
        if not self._file_ok:
            logger.warning("kill switch: %s written again", self.path)
        self._file_ok = True
        return True

    def _follow(self) -> None:
        shared = self._shared
        assert shared is not None
        if shared.changed():
            self._sync()

    def _sync(self) -> None:
        shared = self._shared
        assert shared is not None
        try:
            switches = shared.read()
        except SharedStateError as e:
            # The last state read stays in force.
            self._problem("shared", f"{e}; keeping the last state")
            return
        self._switches = dict(switches or {})
        self._engaged = frozenset(self._switches)

    def _problem(self, kind: str, text: str) -> None:
        logger.error("kill switch: %s", text)
        if self._on_problem is not None:
            self._on_problem(kind)

    def _notify(self) -> None:
        self._notified = self._engaged
        for cb in self._listeners:
            cb(self._engaged)
