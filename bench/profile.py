"""Profile the running sbg with py-spy while a workload runs; summarise the hot spots."""

from __future__ import annotations

import os
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from typing import Any


def _frames(line: str) -> tuple[list[str], int]:
    stack, _, count = line.rstrip("\n").rpartition(" ")
    return [f for f in stack.split(";") if f], int(count)


# Leaves of threads that wait (py-spy cannot tell a lock wait from work).
_IDLE = ("Condition.wait (threading.py)", "Queue.get (queue.py)", "Event.wait (threading.py)")


def _module(frame: str) -> str:
    path = frame.rpartition("(")[2].rstrip(")")
    return path.rsplit("/", 1)[0] + "/" if path.startswith("sbg/") else path.split("/", 1)[0]


def hot_spots(raw_file: str, top: int = 15) -> str:
    """Markdown tables: functions by own time, sbg functions by inclusive time, packages."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    modules: Counter[str] = Counter()
    total = 0
    with open(raw_file) as f:
        for line in f:
            if not line.strip():
                continue
            frames, count = _frames(line)
            if frames[-1] in _IDLE:
                continue
            total += count
            own[frames[-1]] += count
            modules[_module(frames[-1])] += count
            for frame in set(frames):
                inclusive[frame] += count
    if not total:
        return "(no samples)"
    lines = [
        f"{total} busy samples of the main thread (share of sbg's CPU time).",
        "",
        "| # | own time | function (file) |",
        "|---|---|---|",
    ]
    for n, (frame, count) in enumerate(own.most_common(top), 1):
        lines.append(f"| {n} | {100 * count / total:.1f}% | `{frame}` |")
    lines += ["", "| # | inclusive | sbg function |", "|---|---|---|"]
    mine = [(fr, c) for fr, c in inclusive.most_common() if "(sbg/" in fr][:top]
    for n, (frame, count) in enumerate(mine, 1):
        lines.append(f"| {n} | {100 * count / total:.1f}% | `{frame}` |")
    lines += ["", "| own time by package | share |", "|---|---|"]
    for name, count in modules.most_common(12):
        lines.append(f"| {name} | {100 * count / total:.1f}% |")
    return "\n".join(lines)


def profile_sbg(
    pid: int, py_spy: str, out_dir: str, seconds: float, load: Callable[[], Any]
) -> str:
    """Sample PID for SECONDS while LOAD runs; write the raw stacks and return the summary."""
    os.makedirs(out_dir, exist_ok=True)
    raw = os.path.join(out_dir, "sbg-w1.txt")
    spy = subprocess.Popen(
        [py_spy, "record", "--pid", str(pid), "--format", "raw", "--nolineno", "--rate", "200",
         "--duration", str(int(seconds)), "--output", raw],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        time.sleep(1.0)
        load()
        _, err = spy.communicate(timeout=seconds + 60)
    finally:
        if spy.poll() is None:
            spy.terminate()
            spy.wait(10)
    if not os.path.exists(raw):
        return f"(py-spy failed: {err.decode(errors='replace')[-500:]})"
    return f"**Profile of sbg under W1** (py-spy, raw stacks in {raw})\n\n" + hot_spots(raw)
