"""Instructions per request under callgrind: a figure a busy machine does not blur.

`python -m bench.run --callgrind ...` starts each sbg target under
`valgrind --tool=callgrind --instr-atstart=no` (about 50 times slower) and,
around every measured run, switches the instrumentation on, dumps the
counts and switches it off again: the figure covers the requests of that run
only, not the start-up or the warm-up. Other processes on the machine change
the CPU time a request takes, not the instructions it executes, so two
revisions compare to within a percent where CPU µs/req scatters by ten.
What it does not see: system calls (the kernel's side) and stalls (cache
misses, contention).
"""

from __future__ import annotations

import glob
import re
import shutil
import subprocess
from collections.abc import Callable
from typing import Any

_TOTALS = re.compile(r"^totals:\s+(\d+)", re.M)


def available() -> bool:
    return shutil.which("valgrind") is not None and shutil.which("callgrind_control") is not None


def valgrind_argv(out_file: str) -> list[str]:
    """The prefix that runs a command under callgrind, counting nothing yet."""
    return [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out_file}",
    ]


def _control(pid: int, *args: str) -> None:
    subprocess.run(
        ["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=120
    )


def _dumps(out_file: str) -> set[str]:
    return set(glob.glob(glob.escape(out_file) + ".*"))


def counted(pid: int, out_file: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """RUN with PID's instrumentation on; add `instructions`, the count of the run.

    The counters are zeroed first and the instrumentation is off between
    runs, so the new dump's `totals` (the sum of the costs it lists) are
    this run's. (Its `summary` line is not: after a dump, callgrind may
    report a negative difference there.)
    """
    before = _dumps(out_file)
    _control(pid, "-z")
    _control(pid, "-i", "on")
    try:
        result = run()
    finally:
        _control(pid, "-d")
        _control(pid, "-i", "off")
    new = sorted(_dumps(out_file) - before, key=lambda name: int(name.rsplit(".", 1)[1]))
    if not new:
        raise RuntimeError(f"callgrind wrote no dump for pid {pid}")
    with open(new[-1], errors="replace") as f:
        match = _TOTALS.search(f.read())
    if match is None:
        raise RuntimeError(f"no totals line in {new[-1]}")
    result["instructions"] = int(match.group(1))
    return result
