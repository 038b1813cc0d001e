"""A request body held in memory, with room for what is signed around it.

The inbound signature check hashes `{"content":BODY,"destination":...}`
(`sbg.matrix.xmatrix.verify_spliced`). The body is received straight after
that prefix, in one `bytearray`, so checking the signature over the bytes
received needs no copy of a body of up to `max_body_size`: the suffix is
appended for the check and cut off again.
"""

from __future__ import annotations


class BodyBuffer:
    """A body as it arrives, after `prefix` (which is not part of it)."""

    def __init__(self, prefix: bytes = b"") -> None:
        self._buf = bytearray(prefix)
        self._start = len(prefix)

    def __len__(self) -> int:
        return len(self._buf) - self._start

    def append(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffer(self) -> bytearray:
        """The prefix and the body, to be extended (and cut back) in place."""
        return self._buf

    @property
    def start(self) -> int:
        """Where the body starts in `buffer`."""
        return self._start

    def bytes(self) -> bytes:
        """The body alone (one copy)."""
        return bytes(memoryview(self._buf)[self._start :])

    def clear(self) -> None:
        """Let the memory go."""
        self._buf = bytearray()
        self._start = 0
