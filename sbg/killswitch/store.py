"""The kill-switch state file, `state_dir/killswitch.json`.

Written whole to a temporary file, fsynced and renamed over the old one,
then the directory fsynced: a switch acknowledged is on disk, and the file
is never seen half written. The file is the persistence of the state, not
its authority while sbg runs: a file that is deleted, truncated or damaged
under a running gateway is detected (`stamp`) and written again from
memory.
"""

from __future__ import annotations

import json
import os

from sbg.killswitch.state import StateFormatError, Switches, parse, render

STATE_FILE = "killswitch.json"

# What identifies one version of the file: it is replaced (renamed over),
# never rewritten in place, so a new version has a new inode or ctime.
Stamp = tuple[int, int, int, int] | None


class StateFileError(Exception):
    """The state file exists but cannot be read as a kill-switch state."""


def _stamp(st: os.stat_result) -> Stamp:
    return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)


class AtomicFile:
    """One file of `state_dir`, always replaced whole (write-then-rename,
    fsynced, the directory too), never seen half written."""

    def __init__(self, state_dir: str, name: str) -> None:
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, name)
        self.written: Stamp = None

    def ensure_dir(self) -> None:
        """Create `state_dir` (0700) if missing."""
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)

    def stamp(self) -> Stamp:
        """The current file's identity (None: no file). Raises OSError."""
        try:
            return _stamp(os.stat(self.path))
        except FileNotFoundError:
            return None

    def read_json(self) -> object:
        """The file's JSON document (None when there is no file).

        Raises:
            OSError, ValueError: it cannot be read, or is not JSON.
        """
        try:
            with open(self.path, encoding="utf-8") as f:
                stamp = _stamp(os.fstat(f.fileno()))
                data = json.load(f)
        except FileNotFoundError:
            self.written = None
            return None
        self.written = stamp
        return data

    def write_json(self, document: object) -> None:
        """Persist `document` (write-then-rename, fsynced). Raises OSError."""
        self.ensure_dir()
        tmp = self.path + ".tmp"
        data = json.dumps(document, indent=1).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        self.written = self.stamp()
        dfd = os.open(self.state_dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


class StateFile(AtomicFile):
    """Reads and writes the kill-switch state in one directory."""

    def __init__(self, state_dir: str) -> None:
        super().__init__(state_dir, STATE_FILE)

    def read(self) -> Switches:
        """The state in the file (empty when there is none).

        Raises:
            StateFileError: it cannot be read or is not a state.
        """
        try:
            data = self.read_json()
        except (OSError, ValueError) as e:
            raise StateFileError(f"{self.path}: cannot read kill-switch state: {e}") from None
        if data is None:
            return {}
        try:
            return parse(data)
        except StateFormatError as e:
            raise StateFileError(f"{self.path}: malformed kill-switch state: {e}") from None

    def write(self, switches: Switches) -> None:
        """Persist `switches` (write-then-rename, fsynced). Raises OSError."""
        self.write_json(render(switches))
