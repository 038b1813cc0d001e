"""What a node knows of the cluster's kill-switch records, kept in
`state_dir/cluster.json` next to the switches themselves (`killswitch.json`).

`known` holds, per switch, the last record this node applied or had
confirmed by Redis: its version is what a newer change in Redis is compared
with. `pending` holds the switches engaged here that Redis has not
confirmed: engaged while Redis was unreachable, or not answered yet. They
are derived, never trusted from the file: every switch in force here whose
known record is not an engaged one is pending (`repair`). So a file that is
missing or damaged makes every engaged switch pending, and it goes to Redis
again as a new engage: a fault here can only re-engage, never lift.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Set

from sbg.cluster.records import Record, RecordError, from_json
from sbg.killswitch.state import Switch
from sbg.killswitch.store import AtomicFile

logger = logging.getLogger(__name__)

LEDGER_FILE = "cluster.json"


class Ledger:
    """This node's view of the cluster's records (reactor thread only)."""

    def __init__(self, state_dir: str, on_problem: Callable[[str], None] | None = None) -> None:
        self.file = AtomicFile(state_dir, LEDGER_FILE)
        self.known: dict[Switch, Record] = {}
        self.pending: dict[Switch, int] = {}
        self._on_problem = on_problem
        self._seq = 0
        self._saved_ok = True

    def load(self) -> None:
        """Read the file; one that cannot be read counts as empty (logged)."""
        try:
            data = self.file.read_json()
            records = _records(data)
        except (OSError, ValueError) as e:
            self._problem(
                f"cannot read {self.file.path} ({e}): every switch engaged here goes to "
                "Redis again as a new engage"
            )
            records = []
        self.known = {r.switch: r for r in records}

    def repair(self, engaged: Set[Switch], exclude: Set[Switch] = frozenset()) -> bool:
        """Make every switch engaged here either known as engaged or pending,
        and forget pending switches no longer engaged; True if anything changed."""
        changed = False
        for switch in engaged:
            record = self.known.get(switch)
            if switch in exclude or switch in self.pending:
                continue
            if record is None or not record.engaged:
                self._seq += 1
                self.pending[switch] = self._seq
                changed = True
        for switch in [s for s in self.pending if s not in engaged]:
            del self.pending[switch]
            changed = True
        return changed

    def mark_pending(self, switches: Iterable[Switch]) -> dict[Switch, int]:
        """A new engage of these switches, to go to Redis: their sequence numbers."""
        marks = {}
        for switch in switches:
            self._seq += 1
            self.pending[switch] = marks[switch] = self._seq
        return marks

    def confirm(self, record: Record, mark: int | None) -> None:
        """Redis holds `record`: remember it; the pending change `mark` is done."""
        self.learn([record])
        if mark is not None and self.pending.get(record.switch) == mark:
            del self.pending[record.switch]

    def learn(self, records: Iterable[Record]) -> bool:
        """Remember the records newer than what is known; True if any was."""
        changed = False
        for record in records:
            old = self.known.get(record.switch)
            if old is None or record.order > old.order:
                self.known[record.switch] = record
                changed = True
        return changed

    def save(self) -> bool:
        """Write the known records; False (logged once, counted) if it failed."""
        records = sorted(self.known.values(), key=lambda r: (r.server or "", r.direction))
        try:
            self.file.write_json({"records": [r.as_json() for r in records]})
        except OSError as e:
            if self._saved_ok:
                self._problem(
                    f"cannot write {self.file.path}: {e}; after a restart the switches engaged "
                    "here go to Redis again as new engages"
                )
            self._saved_ok = False
            return False
        self._saved_ok = True
        return True

    def _problem(self, text: str) -> None:
        logger.error("cluster: %s", text)
        if self._on_problem is not None:
            self._on_problem("persist")


def _records(data: object) -> list[Record]:
    if data is None:
        return []
    if not isinstance(data, dict) or not isinstance(data.get("records"), list):
        raise ValueError('expected {"records": [...]}')
    try:
        return [from_json(item) for item in data["records"]]
    except RecordError as e:
        raise ValueError(f"a record is malformed: {e}") from None
