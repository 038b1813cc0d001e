"""`twistd sbg -c FILE`: the twistd plugin's options and service maker."""

from __future__ import annotations

import logging
import sys
from typing import IO, Any

from twisted.application.service import IService
from twisted.python import usage
from twisted.python.logfile import LogFile

from sbg.config.load import load_config
from sbg.errors import ConfigErrors
from sbg.killswitch.switch import KillSwitchStateError
from sbg.logsetup import LogWriter, TwistedObserver, install_stdlib, real_stdout

DEFAULT_CONFIG = "/etc/sbg/sbg.yaml"


class Options(usage.Options):
    synopsis = "[-c FILE]"
    optParameters = [
        ["config", "c", DEFAULT_CONFIG, "Path to the sbg configuration file (YAML)."],
    ]

    def opt_version(self) -> None:
        from sbg import __version__

        print(f"sbg {__version__}")
        sys.exit(0)


def _fail(lines: list[str]) -> SystemExit:
    # twistd (22.4) exits 0 on UsageError: print and exit 1 ourselves.
    for line in lines:
        print(line, file=sys.stderr)
    return SystemExit(1)


def _log_stream(options: usage.Options) -> IO[str]:
    parent: Any = getattr(options, "parent", None)
    logfile = parent.get("logfile") if parent is not None else None
    nodaemon = bool(parent.get("nodaemon")) if parent is not None else True
    if logfile and logfile != "-":
        return LogFile.fromFullPath(logfile)  # type: ignore[no-any-return]
    if logfile == "-" or nodaemon:
        return real_stdout()
    return LogFile.fromFullPath("twistd.log")  # type: ignore[no-any-return]


def makeService(options: usage.Options) -> IService:
    from twisted.internet import reactor

    from sbg.service import GatewayService

    path = options["config"]
    try:
        config = load_config(path)
    except ConfigErrors as e:
        raise _fail([f"sbg: invalid configuration {e.path}:", *e.lines()]) from None
    writer = LogWriter(_log_stream(options), config.log_format, config.log_level)
    install_stdlib(writer)
    for line in config.warnings:
        logging.getLogger("sbg.config").warning("%s", line)
    try:
        if config.workers > 1:
            from sbg.supervisor import SupervisorService

            return SupervisorService(
                config,
                reactor,
                writer,
                log_observer=TwistedObserver(writer),
                on_reconfigure=lambda c: writer.configure(c.log_format, c.log_level),
            )
        return GatewayService(
            config,
            reactor,
            log_observer=TwistedObserver(writer),
            on_reconfigure=lambda c: writer.configure(c.log_format, c.log_level),
        )
    except KillSwitchStateError as e:
        raise _fail([f"sbg: {e}"]) from None
    except ImportError as e:
        raise _fail([f"sbg: cluster: cannot import the Redis client library ({e})"]) from None
    except OSError as e:
        raise _fail([f"sbg: {e.filename or ''}: {e.strerror or e}"]) from None
