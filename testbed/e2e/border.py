"""Scenario steps and audit summaries shared by the border tests and the federation demo.

Everything here is synchronous and bounded: client calls carry timeouts and
every wait has a deadline.
"""

import datetime
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sbg.matrix.endpoints import match_target
from sbg.reasons import Refusal
from testbed.e2e.matrix_client import MatrixClient, wait_until

Record = dict[str, Any]


# ---------------------------------------------------------------- the room rules' log


class ModuleLog:
    """The room rules' lines in hs-int's log."""

    def __init__(self, path: str) -> None:
        self.path = path

    def mark(self) -> int:
        return os.path.getsize(self.path)

    def lines(self, since: int = 0) -> list[str]:
        with open(self.path, "rb") as f:
            f.seek(since)
            text = f.read().decode("utf-8", "replace")
        return [line for line in text.splitlines() if "room rules:" in line]

    def expect(self, since: int, *fragments: str, timeout: float = 10.0) -> str:
        """The first module line since SINCE holding every fragment (waits)."""
        return wait_until(
            lambda: next(
                (line for line in self.lines(since) if all(f in line for f in fragments)), None
            ),
            timeout,
            f"a room rules log line with {fragments}",
        )


# ---------------------------------------------------------------- scenario steps


def invite_and_join(
    inviter: MatrixClient, invitee: MatrixClient, room_id: str, via: str, timeout: float = 30.0
) -> Any:
    """INVITER invites INVITEE to ROOM_ID, INVITEE sees the invite and joins through VIA.

    Returns the invite_state INVITEE saw; waits until INVITER sees both joined.
    """
    invitee.sync()  # a sync position from before the invite
    inviter.invite(room_id, invitee.user_id)
    invite_state = invitee.wait_for_invite(room_id, timeout=timeout)
    joined = invitee.join(room_id, via=[via])
    if joined != room_id:
        raise AssertionError(f"{invitee.user_id} joined {joined}, not {room_id}")
    inviter.wait_for_members(room_id, [inviter.user_id, invitee.user_id], timeout=timeout)
    return invite_state


def send_bodies(
    client: MatrixClient, room_id: str, bodies: Sequence[str], pause: float = 0.0
) -> list[str]:
    """Send BODIES in order (PAUSE seconds apart); return the event ids."""
    ids = []
    for body in bodies:
        ids.append(client.send_message(room_id, body))
        if pause:
            time.sleep(pause)
    return ids


def start_sending(
    room_id: str, plans: Sequence[tuple[MatrixClient, Sequence[str]]], pause: float = 0.0
) -> Callable[[], list[list[str]]]:
    """Each (client, bodies) starts sending its bodies in order in its own thread.

    Returns a function that waits for every thread (at most 120 s) and returns
    the event ids per plan, re-raising the first error of any thread.
    """
    results: list[list[str]] = [[] for _ in plans]
    errors: list[BaseException] = []

    def run(i: int, client: MatrixClient, bodies: Sequence[str]) -> None:
        try:
            results[i] = send_bodies(client, room_id, bodies, pause)
        except BaseException as e:  # handed to the caller by finish()
            errors.append(e)

    threads = [
        threading.Thread(target=run, args=(i, c, b), daemon=True) for i, (c, b) in enumerate(plans)
    ]
    for t in threads:
        t.start()

    def finish() -> list[list[str]]:
        deadline = time.monotonic() + 120
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in threads):
            raise AssertionError("a sending thread did not finish within 120s")
        if errors:
            raise errors[0]
        return results

    return finish


def send_concurrently(
    room_id: str, plans: Sequence[tuple[MatrixClient, Sequence[str]]], pause: float = 0.0
) -> list[list[str]]:
    """Each (client, bodies) sends its bodies in order in its own thread, all at once.

    Returns the event ids per plan; re-raises the first error of any thread.
    """
    return start_sending(room_id, plans, pause)()


def delivery_problem(
    seen: Sequence[tuple[str, str]], sender: str, expected: Sequence[str]
) -> str | None:
    """Why SEEN (sender, body) does not hold EXPECTED from SENDER exactly once, in order."""
    wanted = set(expected)
    got = [b for s, b in seen if s == sender and b in wanted]
    if got == list(expected):
        return None
    counts = Counter(got)
    missing = [b for b in expected if b not in counts]
    dupes = sorted(b for b, n in counts.items() if n > 1)
    if missing or dupes:
        return f"from {sender}: missing {missing}, duplicated {dupes}"
    return f"from {sender}: out of order: {got}"


def absent_for(
    viewer: MatrixClient, room_id: str, bodies: Iterable[str], seconds: float
) -> float | None:
    """Watch for SECONDS; return when (seconds) one of BODIES showed up in ROOM_ID, else None."""
    wanted = set(bodies)
    started = time.monotonic()
    while True:
        if any(b in wanted for _, b in viewer.message_bodies(room_id)):
            return time.monotonic() - started
        if time.monotonic() - started >= seconds:
            return None
        time.sleep(0.5)


# ---------------------------------------------------------------- audit records


def parse_ts(ts: str) -> float:
    """An audit record's ISO 8601 ``ts`` as a POSIX timestamp."""
    return datetime.datetime.fromisoformat(ts).timestamp()


def template_of(record: Record) -> str:
    """The endpoint template of RECORD's path (``host:port`` for a CONNECT)."""
    method, path = str(record.get("method")), str(record.get("path"))
    if method == "CONNECT":
        return "(tunnel)"
    try:
        return match_target(method.encode("latin-1"), path.encode("latin-1")).endpoint.template
    except Refusal:
        return path
    except UnicodeEncodeError:
        return path


def peer_server(record: Record) -> str | None:
    """The other side of the border: the origin inbound, the destination outbound."""
    key = "origin" if record.get("direction") == "inbound" else "destination"
    value = record.get(key)
    return str(value) if value else None


def describe(record: Record) -> str:
    """One readable line for an audit record."""
    arrow = "->" if record.get("direction") == "outbound" else "<-"
    peer = peer_server(record) or (
        str(record.get("path")) if record.get("method") == "CONNECT" else "(unknown)"
    )
    group = record.get("group") or "-"
    line = (
        f"{record.get('direction'):8} {arrow} {peer:17} {record.get('decision'):5} "
        f"{record.get('status')} {record.get('method')} {record.get('path')} [{group}]"
    )
    if record.get("decision") != "allow":
        line += f"  reason: {record.get('reason')}"
    return line


@dataclass
class EndpointRow:
    direction: str
    method: str
    template: str
    group: str
    decisions: Counter[str] = field(default_factory=Counter)

    @property
    def count(self) -> int:
        return sum(self.decisions.values())


def endpoint_rows(records: Iterable[Record]) -> list[EndpointRow]:
    """Audit records grouped by direction, method and endpoint template."""
    rows: dict[tuple[str, str, str], EndpointRow] = {}
    for r in records:
        template = template_of(r)
        key = (str(r.get("direction")), str(r.get("method")), template)
        if key not in rows:
            rows[key] = EndpointRow(key[0], key[1], template, str(r.get("group") or "-"))
        rows[key].decisions[str(r.get("decision"))] += 1
    return sorted(rows.values(), key=lambda row: (row.direction, row.template, row.method))


def format_endpoint_table(records: Iterable[Record]) -> str:
    """A text table: direction, method, template, group, count, decisions."""
    rows = endpoint_rows(records)
    lines = [f"{'dir':8} {'method':7} {'group':16} {'count':>5}  decisions  template"]
    for row in rows:
        decisions = ",".join(f"{d}={n}" for d, n in sorted(row.decisions.items()))
        lines.append(
            f"{row.direction:8} {row.method:7} {row.group:16} {row.count:5}  "
            f"{decisions:9}  {row.template}"
        )
    return "\n".join(lines)


def summarise(records: Sequence[Record]) -> str:
    """A short readable summary: counts per direction, group and decision, then every refusal."""
    counts = Counter(
        (str(r.get("direction")), str(r.get("group") or r.get("method")), str(r.get("decision")))
        for r in records
    )
    lines = [
        f"  {n:3} x {direction:8} {group:16} {decision}"
        for (direction, group, decision), n in sorted(counts.items())
    ]
    refusals = [r for r in records if r.get("decision") != "allow"]
    if refusals:
        lines.append("  refusals:")
        lines += [f"    {describe(r)}" for r in refusals]
    return "\n".join(lines) if lines else "  (nothing crossed the border)"


def trusted_refusals(
    records: Iterable[Record],
    trusted: str,
    excused: Callable[[Record], bool] = lambda r: False,
) -> list[Record]:
    """Refusals of TRUSTED's traffic (origin inbound, destination outbound) not EXCUSED."""
    return [
        r
        for r in records
        if r.get("decision") != "allow" and peer_server(r) == trusted and not excused(r)
    ]


def wait_deliveries(
    viewer_checks: Sequence[tuple[MatrixClient, str, str, Sequence[str]]], timeout: float
) -> list[float]:
    """Poll every (viewer, room_id, sender, expected) until each holds EXPECTED exactly once,
    in order; return the seconds each took (measured from the call).

    Raises AssertionError naming what is still missing, duplicated or reordered.
    """
    started = time.monotonic()
    done: dict[int, float] = {}
    problems: dict[int, str | None] = {}
    while True:
        for i, (viewer, room_id, sender, expected) in enumerate(viewer_checks):
            if i in done:
                continue
            problems[i] = delivery_problem(viewer.message_bodies(room_id), sender, expected)
            if problems[i] is None:
                done[i] = time.monotonic() - started
        if len(done) == len(viewer_checks):
            return [done[i] for i in range(len(viewer_checks))]
        if time.monotonic() - started >= timeout:
            still = [
                f"{viewer_checks[i][0].user_id} sees {problems[i]}"
                for i in range(len(viewer_checks))
                if i not in done
            ]
            raise AssertionError(f"not delivered within {timeout}s: " + "; ".join(still))
        time.sleep(0.5)


def served_federation_requests(log_path: str) -> list[str]:
    """The access-log lines of federation and key requests a Synapse served."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return []
    return [
        line.rstrip("\n")
        for line in lines
        if "synapse.access" in line
        and "Processed request" in line
        and (" /_matrix/federation/" in line or " /_matrix/key/" in line)
    ]
