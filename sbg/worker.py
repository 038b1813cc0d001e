"""One worker of `workers: N`, started by the supervisor (sbg.supervisor).

`python -m sbg.worker --config FILE --index K --sockets JSON`, where JSON
lists `[listener index, bind address, fd]` for every inherited listening
socket. The worker runs a whole `GatewayService` on those sockets and
writes its log lines to stdout, which the supervisor relays. Its stdin is
a lifeline: when the supervisor is gone, the worker drains and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from typing import Any

from sbg.config.load import load_config
from sbg.errors import ConfigErrors
from sbg.logsetup import LogWriter, TwistedObserver, install_stdlib, real_stdout


def _sockets(text: str) -> dict[tuple[int, str], int]:
    out: dict[tuple[int, str], int] = {}
    for index, address, fd in json.loads(text):
        out[(int(index), str(address))] = int(fd)
    return out


def _watch_lifeline(reactor: Any, stop: Any) -> None:
    """Drain and exit when the supervisor's end of stdin closes."""

    def wait() -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        reactor.callFromThread(stop)

    threading.Thread(target=wait, name="sbg-lifeline", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    # The supervisor starts this process with SIGHUP blocked. One received
    # before the service's own handler is in place must neither kill this
    # process (the default action) nor be lost: it is applied once the
    # service runs.
    early_hup: list[int] = []
    signal.signal(signal.SIGHUP, lambda signum, frame: early_hup.append(signum))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    p = argparse.ArgumentParser(prog="sbg.worker")
    p.add_argument("--config", required=True)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--sockets", required=True)
    p.add_argument("--killswitch-fd", type=int, required=True)
    args = p.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigErrors as e:
        for line in [f"invalid configuration {e.path}:", *e.lines()]:
            print(line, file=sys.stderr)
        return 1

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    from sbg.service import GatewayService

    writer = LogWriter(real_stdout(), config.log_format, config.log_level)
    install_stdlib(writer)
    globalLogBeginner.beginLoggingTo([TwistedObserver(writer)], redirectStandardIO=False)
    service = GatewayService(
        config,
        reactor,
        on_reconfigure=lambda c: writer.configure(c.log_format, c.log_level),
        adopted=_sockets(args.sockets),
        killswitch_fd=args.killswitch_fd,
        share_dir=os.environ.get("PROMETHEUS_MULTIPROC_DIR"),
    )
    service.privilegedStartService()
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    _watch_lifeline(reactor, service.graceful_shutdown)

    def apply_early_hup() -> None:
        if early_hup:
            service.reload()

    # After the service's own callWhenRunning, which installs its handlers.
    reactor.callWhenRunning(apply_early_hup)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
