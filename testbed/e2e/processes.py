"""Child processes for the end-to-end tests: start by PID, bounded waits, no orphans.

Each process runs in its own session (so its whole process group can be
signalled) and gets SIGKILL from the kernel if the test runner dies first
(``PR_SET_PDEATHSIG``), so a crashed test run leaves nothing behind.
"""

import ctypes
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence

_PR_SET_PDEATHSIG = 1

PROXY_VARIABLES = (
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
)


class ProcessError(Exception):
    """A child process died or did not become ready in time."""


def clean_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The runner's environment without proxy variables or PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARIABLES}
    env.pop("PYTHONPATH", None)
    env.setdefault("LANG", "C.UTF-8")
    env.update(extra or {})
    return env


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def tail(path: str, lines: int = 60) -> str:
    """The last LINES lines of the file at PATH ('' if it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


class ManagedProcess:
    """One child process (and its process group) with log files in the run dir."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        stdout_path: str,
        stderr_path: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.stdout_path = stdout_path
        self.stderr_path = stderr_path
        self.env = dict(env) if env is not None else clean_environment()
        self.cwd = cwd
        self._proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the process; logs are appended to (so restarts keep history)."""
        if self.running():
            raise ProcessError(f"{self.name} is already running (pid {self.pid})")
        if threading.current_thread() is not threading.main_thread():
            # PR_SET_PDEATHSIG fires when the *thread* that forked the child
            # ends: a process started from a short-lived thread would be killed
            # as soon as that thread returns.
            raise ProcessError(f"{self.name}: start processes from the main thread only")
        out = open(self.stdout_path, "ab")  # noqa: SIM115 - handed to the child
        err = open(self.stderr_path, "ab") if self.stderr_path else None  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err if err is not None else subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        finally:
            out.close()
            if err is not None:
                err.close()
        self.returncode = None

    def wait_ready(self, probe: Callable[[], bool], timeout: float, interval: float = 0.1) -> float:
        """Poll PROBE until it returns True; return the seconds it took.

        Raises ProcessError (with the log tail) if the process exits or the
        deadline passes first.
        """
        started = time.monotonic()
        deadline = started + timeout
        while True:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise ProcessError(
                    f"{self.name} exited (code {code}) before it was ready\n{self.describe_logs()}"
                )
            try:
                if probe():
                    return time.monotonic() - started
            except OSError:
                pass
            if time.monotonic() >= deadline:
                raise ProcessError(
                    f"{self.name} not ready after {timeout:.0f}s\n{self.describe_logs()}"
                )
            time.sleep(interval)

    def signal(self, signum: int) -> None:
        """Send SIGNUM to the main process only."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signum)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after TIMEOUT; return the exit code."""
        proc = self._proc
        if proc is None:
            return self.returncode
        pgid = proc.pid  # session leader: its pid is the process group id
        if proc.poll() is None:
            _killpg(pgid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _killpg(pgid, signal.SIGKILL)
                proc.wait(timeout=10)
        # Whatever the leader left behind in its group goes too.
        _killpg(pgid, signal.SIGKILL)
        self.returncode = proc.returncode
        self._proc = None
        return self.returncode

    def describe_logs(self, lines: int = 60) -> str:
        parts = [
            f"--- {self.name}: last lines of {self.stdout_path} ---",
            tail(self.stdout_path, lines),
        ]
        if self.stderr_path:
            parts += [
                f"--- {self.name}: last lines of {self.stderr_path} ---",
                tail(self.stderr_path, lines),
            ]
        return "\n".join(parts)


def _killpg(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass
