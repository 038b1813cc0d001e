"""The syntax of single configuration values.

Sizes: an integer number of bytes, or a whole number followed by `K`
(1024), `M` (1024²) or `G` (1024³), e.g. `16M`, `512K`.
Durations: a number of seconds, or a number followed by `ms`, `s`, `m`, `h`
or `d` (lower case: `M` is a size), e.g. `30s`, `5m`, `1.5h`.
Also host patterns, server names, `scheme://host:port` URLs and pinned
verify keys. Every parser raises ValueError with a message fit for an
operator.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import math
import re
from collections.abc import Collection

from sbg.config.model import HostPattern
from sbg.hosts import HostParseError, is_server_name, parse_authority

_SIZE = re.compile(r"([0-9]+)\s*([KMG]?)", re.IGNORECASE)
_SIZE_FACTORS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}

_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)?")
_DURATION_FACTORS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_URL = re.compile(r"([A-Za-z]+)://([^/?#@\s]+)/?")


def parse_size(value: object) -> int:
    """Return a size in bytes.

    Raises:
        ValueError: the value is not a size (message fit for an operator).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    if isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        if match:
            return int(match.group(1)) * _SIZE_FACTORS[match.group(2).upper()]
    raise ValueError(f"not a size: {value!r} (use e.g. 16M, 512K or a number of bytes)")


def parse_duration(value: object) -> float:
    """Return a duration in seconds.

    Raises:
        ValueError: the value is not a duration (message fit for an operator).
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
        if not math.isfinite(seconds):
            raise ValueError(f"not a duration: {value!r}")
        if seconds < 0:
            raise ValueError("must not be negative")
        return seconds
    if isinstance(value, str):
        match = _DURATION.fullmatch(value.strip())
        if match:
            unit = match.group(2) or "s"
            return float(match.group(1)) * _DURATION_FACTORS[unit]
    raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 5m, 1h or a number of seconds)")


def format_size(size: int) -> str:
    """The shortest exact spelling of SIZE in the units `parse_size` reads."""
    for suffix in ("G", "M", "K"):
        factor = _SIZE_FACTORS[suffix]
        if size and size % factor == 0:
            return f"{size // factor}{suffix}"
    return str(size)


def format_duration(seconds: float) -> str:
    """A short spelling of SECONDS in the units `parse_duration` reads."""
    for suffix in ("d", "h", "m"):
        factor = _DURATION_FACTORS[suffix]
        if seconds and seconds % factor == 0:
            return f"{int(seconds // factor)}{suffix}"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{seconds:g}s"


def parse_host_pattern(text: str) -> HostPattern:
    """Parse a `federation_hosts` / `client_hosts` entry.

    Accepts `host`, `host:port`, `[v6]`, `[v6]:port` and a bare `v6`
    literal (no port then).

    Raises:
        ValueError: not a host pattern.
    """
    if not text.startswith("[") and text.count(":") > 1:
        try:
            address = ipaddress.IPv6Address(text)
        except ValueError:
            raise ValueError(
                f"not a host or host:port: {text!r} (write IPv6 as [addr]:port)"
            ) from None
        return HostPattern(str(address), None)
    host, port = parse_authority(text)
    return HostPattern(host, port)


def parse_server_name(text: str) -> tuple[str, int | None]:
    """Check a Matrix server name (`host[:port]`); return its normalised host and port.

    Raises:
        ValueError: not a server name.
    """
    if not is_server_name(text):
        raise ValueError(f"not a server name: {text!r}")
    try:
        return parse_authority(text)
    except HostParseError as e:
        raise ValueError(f"not a server name: {e}") from None


def parse_url(text: str, schemes: Collection[str]) -> tuple[str, str, int]:
    """Parse `scheme://host:port` (no path, no user info); return (scheme, host, port).

    Raises:
        ValueError: not such a URL.
    """
    shape = " or ".join(f"{s}://host:port" for s in schemes)
    match = _URL.fullmatch(text)
    if not match or match.group(1).lower() not in schemes:
        raise ValueError(f"must be {shape} without a path, not {text!r}")
    try:
        host, port = parse_authority(match.group(2))
    except HostParseError as e:
        raise ValueError(f"must be {shape}: {e}") from None
    if port is None:
        raise ValueError(f"must be {shape}: the port is missing in {text!r}")
    return match.group(1).lower(), host, port


def decode_verify_key(text: str) -> bytes:
    """Decode a pinned ed25519 public key (unpadded base64; padding tolerated).

    Raises:
        ValueError: not 32 bytes of base64.
    """
    if _BASE64.fullmatch(text):
        try:
            raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except (binascii.Error, ValueError):
            pass
        else:
            if len(raw) == 32:
                return raw
    raise ValueError("not 32 bytes of unpadded base64")
