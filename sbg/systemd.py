"""systemd's service notification protocol, for `Type=notify` units.

systemd sets `NOTIFY_SOCKET` for a `Type=notify` service: a unix datagram
socket (a path, or `@name` in the abstract namespace) to which the service
sends newline-separated `KEY=value` assignments. sbg tells it:

- `READY=1` once every listener is bound and the signal handlers are in
  place (`systemctl start` returns then, and units ordered after sbg start);
- `RELOADING=1` when a SIGHUP reload begins and `READY=1` when it is over,
  whether the new file was applied or refused (`STATUS=` says which);
- `STOPPING=1` when SIGTERM starts the graceful stop.

Without `NOTIFY_SOCKET` (not under systemd) every call does nothing. With
`workers: N` only the supervisor talks to systemd: the workers are started
without `NOTIFY_SOCKET`, and the unit says `NotifyAccess=main`.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable

from twisted.internet import defer
from twisted.python.failure import Failure

logger = logging.getLogger(__name__)

ENVIRONMENT_VARIABLE = "NOTIFY_SOCKET"
READY = "READY=1"
RELOADING = "RELOADING=1"
STOPPING = "STOPPING=1"


def notify(*assignments: str) -> bool:
    """Send ASSIGNMENTS (`KEY=value` each) in one datagram to systemd.

    True if it was sent; False without `NOTIFY_SOCKET` or when sending
    failed (a warning is logged: the gateway goes on either way)."""
    where = os.environ.get(ENVIRONMENT_VARIABLE)
    if not where:
        return False
    if where.startswith("@"):
        address = "\0" + where[1:]
    elif where.startswith("/"):
        address = where
    else:
        logger.warning(
            "%s=%s: not a unix socket path; systemd not notified", ENVIRONMENT_VARIABLE, where
        )
        return False
    message = "\n".join(assignments).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message)
    except OSError as e:
        logger.warning("could not notify systemd through %s: %s", where, e)
        return False
    return True


def ready(status: str = "serving") -> bool:
    """The listeners are bound and signals are handled."""
    return notify(READY, f"STATUS={status}")


def stopping() -> bool:
    """SIGTERM: the graceful stop has begun."""
    return notify(STOPPING, "STATUS=stopping: draining the requests in flight")


def reloading(reload: Callable[[], object]) -> object:
    """Run RELOAD between `RELOADING=1` and `READY=1`, and return its result.

    RELOAD returns False when it refused the new configuration (anything
    else, or a Deferred firing with anything else, means it was applied).
    `READY=1` follows in every case, a raised exception included: the
    gateway goes on serving its previous configuration, and systemd must
    not wait for it forever. `MONOTONIC_USEC` (CLOCK_MONOTONIC, which
    `time.monotonic_ns` reads on Linux) is what `Type=notify-reload`
    (systemd 253 and later) expects with `RELOADING=1`; older versions
    ignore it."""
    notify(RELOADING, f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
    try:
        result = reload()
    except BaseException:
        _reloaded(False)
        raise
    if isinstance(result, defer.Deferred):

        def done(outcome: object) -> object:
            _reloaded(outcome is not False and not isinstance(outcome, Failure))
            return outcome

        result.addBoth(done)
    else:
        _reloaded(result is not False)
    return result


def _reloaded(applied: bool) -> None:
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    if applied:
        ready(f"serving; configuration reloaded at {when}")
    else:
        ready(f"serving; reload refused at {when}: the previous configuration stays in force")
