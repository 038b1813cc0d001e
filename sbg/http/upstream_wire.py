"""The wire format of an upstream's response: strict parsing and framing.

Pure functions and one small decoder, shared by `sbg.http.upstream`'s
connection: nothing here touches a transport. Anything a reader could take
two ways (folded or control-laden header lines, duplicate or malformed
framing, a header block too large) is `UpstreamProtocolError`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Protocol

from twisted.python.failure import Failure

MAX_HEAD = 64 * 1024  # bytes of one response head (status line and fields)
MAX_HEADER_LINES = 100
MAX_INTERIM = 8  # 1xx responses skipped before the final one
MAX_CHUNK_LINE = 4096  # a chunk-size line, extensions included
MAX_TRAILERS = 64 * 1024

_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-5][0-9][0-9])(?: ([\t\x20-\x7e\x80-\xff]*))?")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Control bytes other than HTAB, CR and LF (those are checked apart), and DEL.
_CTL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[\t\x20-\x7e\x80-\xff]*)?")

# Body framings.
NONE = 0  # no body (HEAD, 204, 304, Content-Length: 0)
LENGTH = 1
CHUNKED = 2
UNTIL_CLOSE = 3

# Chunked decoder states.
_C_SIZE = 0
_C_DATA = 1
_C_DATA_END = 2
_C_TRAILER = 3


class UpstreamProtocolError(Exception):
    """The upstream's answer is not a response sbg may relay."""


class UpstreamClosed(Exception):
    """The connection ended before a complete response head arrived."""

    def __init__(self, reason: Failure) -> None:
        super().__init__(f"upstream closed the connection: {reason.getErrorMessage()}")
        self.reason = reason


class BodySink(Protocol):
    """Receives a response body as it arrives."""

    def data(self, data: bytes) -> None:
        """A piece of the body (never empty)."""

    def end(self, complete: bool) -> None:
        """The body ended; `complete` is False when it was cut short."""


def parse_head(head: bytes) -> tuple[int, int, bytes, list[tuple[bytes, bytes]]]:
    """Parse a response head (without its final CRLF CRLF) strictly.

    Returns (minor version, status, reason phrase, [(name, value)]).

    Raises:
        UpstreamProtocolError: anything but a clean HTTP/1.x response head.
    """
    # A bare CR or LF, a NUL or another control byte anywhere is refused
    # before splitting, so no line can smuggle one.
    if _CTL.search(head) is not None:
        raise UpstreamProtocolError("control byte in the response head")
    lines = head.split(b"\r\n")
    if head.count(b"\r") != len(lines) - 1 or head.count(b"\n") != len(lines) - 1:
        raise UpstreamProtocolError("bare CR or LF in the response head")
    if len(lines) - 1 > MAX_HEADER_LINES:
        raise UpstreamProtocolError("too many header lines")
    m = _STATUS_LINE.fullmatch(lines[0])
    if m is None:
        raise UpstreamProtocolError("malformed status line")
    fields: list[tuple[bytes, bytes]] = []
    token = _TOKEN.fullmatch
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or token(name) is None:
            # Also obs-fold and leading whitespace: the name is no token.
            raise UpstreamProtocolError("malformed header line")
        fields.append((name, value.strip(b" \t")))
    return int(m.group(1)), int(m.group(2)), m.group(3) or b"", fields


def framing(
    head_only: bool, minor: int, code: int, fields: list[tuple[bytes, bytes]]
) -> tuple[int, int | None, bool]:
    """(body framing, announced length, reusable) from a response head.

    Raises:
        UpstreamProtocolError: conflicting or malformed framing.
    """
    lengths: set[bytes] = set()
    te: list[bytes] = []
    close = minor == 0
    for name, value in fields:
        n = len(name)
        if n == 14 and name.lower() == b"content-length":
            lengths.add(value)
        elif n == 17 and name.lower() == b"transfer-encoding":
            te.append(value)
        elif (
            n == 10
            and name.lower() == b"connection"
            and any(t.strip().lower() == b"close" for t in value.split(b","))
        ):
            close = True
    length = _content_length(lengths)
    chunked = False
    if te:
        if length is not None:
            raise UpstreamProtocolError("both Transfer-Encoding and Content-Length")
        if len(te) != 1 or te[0].lower() != b"chunked":
            raise UpstreamProtocolError("unsupported Transfer-Encoding")
        chunked = True
    if head_only or code in (204, 304):
        return NONE, 0, not close
    if chunked:
        return CHUNKED, None, not close
    if length is None:
        return UNTIL_CLOSE, None, False
    return (LENGTH if length else NONE), length, not close


def _content_length(values: set[bytes]) -> int | None:
    if not values:
        return None
    if len(values) > 1:
        raise UpstreamProtocolError("conflicting Content-Length headers")
    (text,) = values
    if not text.isdigit() or len(text) > 18:
        raise UpstreamProtocolError("invalid Content-Length")
    return int(text)


class ChunkedDecoder:
    """Decodes a chunked body as it arrives: chunk data goes to `emit`;
    sizes, CRLFs and the trailer section are checked and dropped."""

    def __init__(self) -> None:
        self._state = _C_SIZE
        self._remaining = 0
        self._trailer_bytes = 0
        self._held = b""

    def feed(self, data: bytes, emit: Callable[[bytes], bool]) -> bytes | None:
        """Decode `data`; `emit` gets each piece of chunk data and returns
        False to stop (the consumer went away).

        Returns:
            None while the body goes on; once it ended, the bytes that
            followed it (empty for a clean end).

        Raises:
            UpstreamProtocolError: the chunked framing is broken.
        """
        if self._held:
            data = self._held + data
            self._held = b""
        pos = 0
        size = len(data)
        while pos < size:
            if self._state == _C_DATA:
                take = min(self._remaining, size - pos)
                piece = data if take == size else data[pos : pos + take]
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _C_DATA_END
                if not emit(piece):
                    return None
                continue
            if self._state == _C_DATA_END:
                if size - pos < 2:
                    self._held = data[pos:]
                    return None
                if data[pos : pos + 2] != b"\r\n":
                    raise UpstreamProtocolError("chunk data not followed by CRLF")
                pos += 2
                self._state = _C_SIZE
                continue
            eol = data.find(b"\r\n", pos)
            if eol < 0:
                rest = data[pos:]
                if len(rest) > MAX_CHUNK_LINE:
                    raise UpstreamProtocolError("chunk size line too long")
                self._held = rest
                return None
            line = data[pos:eol]
            pos = eol + 2
            if self._state == _C_SIZE:
                self._size_line(line)
            elif not line:
                return data[pos:]
            else:
                self._trailer_line(line)
        return None

    def _size_line(self, line: bytes) -> None:
        m = _CHUNK_SIZE.fullmatch(line) if len(line) <= MAX_CHUNK_LINE else None
        if m is None:
            raise UpstreamProtocolError("malformed chunk size line")
        chunk = int(m.group(1), 16)
        if chunk:
            self._remaining = chunk
            self._state = _C_DATA
        else:
            self._state = _C_TRAILER

    def _trailer_line(self, line: bytes) -> None:
        # The trailer section: read, checked, dropped; an empty line ends it.
        self._trailer_bytes += len(line) + 2
        if self._trailer_bytes > MAX_TRAILERS:
            raise UpstreamProtocolError("trailer section too large")
        name, colon, _value = line.partition(b":")
        if (
            not colon
            or _TOKEN.fullmatch(name) is None
            or _CTL.search(line) is not None
            or b"\r" in line
            or b"\n" in line
        ):
            raise UpstreamProtocolError("malformed trailer field")
