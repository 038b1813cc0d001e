"""The kill-switch state a supervisor shares with its workers, in memory.

With `workers: N`, the supervisor creates one anonymous memory segment
(`memfd_create`) before it starts the workers, which inherit its file
descriptor and map it. The supervisor publishes every change there before
its admin API answers; a worker reads the segment's sequence number before
each decision (one 8-byte read) and the state again when it moved. So an
engaged switch holds for the next request in every process, and nothing on
disk (a deleted, truncated or damaged state file, an unwritable
`state_dir`) can lift it.

Layout: `seq` (u64, odd while a change is being written), `length` (u32),
`crc32` (u32) of the payload, then the payload (the state's JSON). A
reader retries until it sees the same even `seq` before and after, and a
payload that matches its CRC.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import zlib

from sbg.killswitch.state import StateFormatError, Switches, parse, render

SEGMENT_SIZE = 4 * 1024 * 1024
_HEADER = struct.Struct("<QII")
_SEQ = struct.Struct("<Q")
_MAX_PAYLOAD = SEGMENT_SIZE - _HEADER.size
_READ_ATTEMPTS = 1000


class SharedStateError(Exception):
    """The segment could not be read consistently, or the state is too big."""


class SharedState:
    """One mapping of the segment (the writer's or a reader's)."""

    def __init__(self, fd: int, *, writer: bool) -> None:
        self.fd = fd
        self._writer = writer
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writer else 0)
        self._map = mmap.mmap(fd, SEGMENT_SIZE, mmap.MAP_SHARED, prot)
        self._seen = -1

    @classmethod
    def create(cls) -> SharedState:
        """A new segment (the supervisor's), inheritable by its children."""
        fd = os.memfd_create("sbg-killswitch", 0)
        os.ftruncate(fd, SEGMENT_SIZE)
        os.set_inheritable(fd, True)
        return cls(fd, writer=True)

    @classmethod
    def attach(cls, fd: int) -> SharedState:
        """The segment inherited as `fd` (a worker's), read-only."""
        return cls(fd, writer=False)

    def publish(self, switches: Switches) -> None:
        """Make `switches` the state every reader sees from now on."""
        if not self._writer:
            raise SharedStateError("this mapping is read-only")
        payload = json.dumps(render(switches), separators=(",", ":")).encode()
        if len(payload) > _MAX_PAYLOAD:
            raise SharedStateError(f"kill-switch state of {len(payload)} bytes is too large")
        (seq,) = _SEQ.unpack_from(self._map, 0)
        _SEQ.pack_into(self._map, 0, seq + 1)  # odd: being written
        self._map[_HEADER.size : _HEADER.size + len(payload)] = payload
        _HEADER.pack_into(self._map, 0, seq + 1, len(payload), zlib.crc32(payload))
        _SEQ.pack_into(self._map, 0, seq + 2)

    def changed(self) -> bool:
        """Whether a state was published since the last `read`."""
        (seq,) = _SEQ.unpack_from(self._map, 0)
        return bool(seq != self._seen)

    def read(self) -> Switches | None:
        """The published state, None if nothing was published yet.

        Raises:
            SharedStateError: no consistent state after many attempts (a
                writer that died mid-change).
        """
        for _ in range(_READ_ATTEMPTS):
            seq, length, crc = _HEADER.unpack_from(self._map, 0)
            if seq == 0:
                self._seen = 0
                return None
            if seq % 2 or length > _MAX_PAYLOAD:
                continue
            payload = bytes(self._map[_HEADER.size : _HEADER.size + length])
            (after,) = _SEQ.unpack_from(self._map, 0)
            if after != seq or zlib.crc32(payload) != crc:
                continue
            try:
                switches = parse(json.loads(payload))
            except (ValueError, StateFormatError):
                continue
            self._seen = seq
            return switches
        raise SharedStateError("no consistent kill-switch state in shared memory")

    def close(self) -> None:
        self._map.close()
