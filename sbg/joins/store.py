"""`PreparedJoins`: which joins a `make_join` prepared, for a few minutes.

One empty file per prepared join in `state_dir/joins`, named by its key
(`sbg.policy.joins.join_key`), its modification time the moment it was
prepared: every worker of a node sees what the others recorded (a
`make_join` and its `send_join` may reach different workers) and a restart
keeps what is still fresh. It touches the disk only for `make_join` and
`send_join` requests, and is bounded: files older than `ttl` count for
nothing and are removed, and beyond `capacity` the oldest go first.

A store that cannot be written or read fails open for the join (logged):
the room rules still undo a join they do not allow (rule R8); refusing
every join because a directory is unwritable would break the federation.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

DIRECTORY = "joins"
TTL = 600.0  # a send_join follows its make_join within seconds
CAPACITY = 10_000
# How many records between two sweeps of stale files.
SWEEP_EVERY = 256
_KEY = re.compile(r"[0-9a-f]{64}")


class PreparedJoins:
    """The `make_join`s the internal homeservers answered, for a while: one
    empty file each under `state_dir/joins`, shared by a node's workers."""

    def __init__(
        self,
        state_dir: str,
        *,
        ttl: float = TTL,
        capacity: int = CAPACITY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = os.path.join(state_dir, DIRECTORY)
        self._ttl = ttl
        self._capacity = capacity
        self._clock = clock
        self._since_sweep = 0

    def record(self, key: str) -> None:
        """A `make_join` answered 200 prepared the join KEY."""
        if not _KEY.fullmatch(key):
            raise ValueError("not a join key")
        path = os.path.join(self.directory, key)
        now = self._clock()
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.close(fd)
            os.utime(path, (now, now))
        except OSError as e:
            logger.error("prepared joins: cannot record in %s: %s", self.directory, e)
            return
        self._since_sweep += 1
        if self._since_sweep >= SWEEP_EVERY:
            self.sweep()

    def prepared(self, key: str) -> bool:
        """Whether a `make_join` prepared the join KEY within the last `ttl` seconds."""
        if not _KEY.fullmatch(key):
            return False
        try:
            prepared_at = os.stat(os.path.join(self.directory, key)).st_mtime
        except FileNotFoundError:
            return False
        except OSError as e:
            logger.error("prepared joins: cannot read %s: %s", self.directory, e)
            return True
        return self._clock() - prepared_at <= self._ttl

    async def is_prepared(self, key: str) -> bool:
        """`prepared`, as the request path asks it (a cluster's store may
        have to ask Redis: `sbg.cluster.joins`)."""
        return self.prepared(key)

    def sweep(self) -> None:
        """Remove stale records, and the oldest beyond `capacity`."""
        self._since_sweep = 0
        now = self._clock()
        try:
            names = [n for n in os.listdir(self.directory) if _KEY.fullmatch(n)]
        except OSError:
            return
        fresh: list[tuple[float, str]] = []
        for name in names:
            path = os.path.join(self.directory, name)
            try:
                at = os.stat(path).st_mtime
            except OSError:
                continue
            if now - at > self._ttl:
                _remove(path)
            else:
                fresh.append((at, path))
        if len(fresh) > self._capacity:
            fresh.sort()
            for _at, path in fresh[: len(fresh) - self._capacity]:
                _remove(path)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
