"""Free TCP ports for the servers the tests, the demo and the benchmarks start.

A port taken with `bind(port 0)` and released comes from the kernel's
ephemeral range, the one every outgoing connection also takes its local
port from: between the pick and the server's own bind, a connection of any
process (a gateway to Redis, a client to a homeserver) may take it, and the
server then fails with "Address already in use". So ports are picked at
random below that range (above it when there is no room below), never the
same one twice in a process, and checked bindable at the time of the pick.
"""

from __future__ import annotations

import random
import socket
import threading

_RANDOM = random.SystemRandom()  # not the global generator tests may seed
_GIVEN: set[int] = set()
_LOCK = threading.Lock()
_LOWEST = 10000
_ATTEMPTS = 500


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
            low, high = (int(x) for x in f.read().split())
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
    return low, high


def _outside_ephemeral() -> tuple[int, int] | None:
    low, high = _ephemeral_range()
    if low - 1 - _LOWEST >= 2000:
        return _LOWEST, low - 1
    if 65535 - (high + 1) >= 2000:
        return high + 1, 65535
    return None


def _bindable(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on HOST now, outside the ephemeral range when it can
    be, and not handed out before by this process."""
    span = _outside_ephemeral()
    if span is not None:
        for _ in range(_ATTEMPTS):
            port = _RANDOM.randint(*span)
            with _LOCK:
                if port in _GIVEN:
                    continue
                _GIVEN.add(port)
            if _bindable(host, port):
                return port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port = int(s.getsockname()[1])
    with _LOCK:
        _GIVEN.add(port)
    return port
