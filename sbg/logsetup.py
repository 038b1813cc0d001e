"""Logging: one output, one format, for sbg's lines and Twisted's alike.

sbg logs through the stdlib `logging` module; Twisted logs through
`twisted.logger`. Both end in one `LogWriter`, which renders each line as
text or as exactly one JSON object (`log_format: json`), and writes it to the
real standard output (under `twistd -n`, `sys.stdout` is Twisted's own
redirect, which would loop back into the log) or to twistd's `--logfile`.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import ILogObserver, LogLevel, formatEvent
from zope.interface import implementer

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
_TWISTED_LEVELS = {
    LogLevel.debug: logging.DEBUG,
    LogLevel.info: logging.INFO,
    LogLevel.warn: logging.WARNING,
    LogLevel.error: logging.ERROR,
    LogLevel.critical: logging.CRITICAL,
}


def _now_iso(ts: float | None = None) -> str:
    t = datetime.fromtimestamp(ts, UTC) if ts is not None else datetime.now(UTC)
    return t.isoformat(timespec="milliseconds")


_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f]")
_CONTROLS_BUT_LF = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def _hex(m: re.Match[str]) -> str:
    return f"\\x{ord(m.group()):02x}"


def escape_controls(text: str, *, keep_newlines: bool = False) -> str:
    """`text` with every C0/C1 control character and DEL written as `\\xNN`
    (with `keep_newlines`, LF becomes a new indented line instead)."""
    if keep_newlines:
        return _CONTROLS_BUT_LF.sub(_hex, text).replace("\n", "\n    ")
    return _CONTROLS.sub(_hex, text)


class LogWriter:
    """Renders and writes log lines; thread-safe (the thread pool logs too)."""

    def __init__(self, stream: IO[str], fmt: str = "text", level: str = "info") -> None:
        self.stream = stream
        self.fmt = fmt
        self.level = _LEVELS.get(level, logging.INFO)
        self._lock = threading.Lock()

    def configure(self, fmt: str, level: str) -> None:
        self.fmt = fmt
        self.level = _LEVELS.get(level, logging.INFO)
        logging.getLogger().setLevel(self.level)

    def write(
        self,
        *,
        levelno: int,
        logger: str,
        message: str,
        ts: float | None = None,
        fields: dict[str, Any] | None = None,
        exc_text: str | None = None,
    ) -> None:
        if levelno < self.level:
            return
        level = logging.getLevelName(levelno).lower()
        if self.fmt == "json":
            obj: dict[str, Any] = {
                "ts": _now_iso(ts),
                "level": level,
                "logger": logger,
                "message": message,
            }
            if fields:
                obj.update(fields)
            if exc_text:
                obj["exception"] = exc_text
            line = json.dumps(obj, default=str, ensure_ascii=True)
        else:
            # One record, one line: a control character (from the wire or
            # anywhere else) is written escaped, never raw, so nothing in a
            # message can erase, recolour or fake a line. A traceback keeps
            # its lines, indented under the record.
            text = escape_controls(message)
            if exc_text:
                text += "\n    " + escape_controls(exc_text, keep_newlines=True)
            line = f"{_now_iso(ts)} [{logger}] {level.upper()}: {text}"
        with self._lock:
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass

    def relay(self, text: str) -> None:
        """Write whole lines another process (a worker) already rendered."""
        with self._lock:
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):
                pass


class WriterHandler(logging.Handler):
    """stdlib logging -> LogWriter."""

    def __init__(self, writer: LogWriter) -> None:
        super().__init__(logging.DEBUG)
        self.writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:
            message = str(record.msg)
        exc_text = None
        if record.exc_info:
            exc_text = logging.Formatter().formatException(record.exc_info)
        # Structured fields: an audit record's, or another line's (`sbg.tls`).
        fields = getattr(record, "sbg_audit", None) or getattr(record, "sbg_fields", None)
        self.writer.write(
            levelno=record.levelno,
            logger=record.name,
            message=message,
            ts=record.created,
            fields=fields if isinstance(fields, dict) else None,
            exc_text=exc_text,
        )


@implementer(ILogObserver)
class TwistedObserver:
    """twisted.logger events -> LogWriter."""

    def __init__(self, writer: LogWriter) -> None:
        self.writer = writer

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level", LogLevel.info)
        levelno = _TWISTED_LEVELS.get(level, logging.INFO)
        text = formatEvent(event)
        failure = event.get("log_failure")
        exc_text = failure.getTraceback() if failure is not None else None
        namespace = event.get("log_namespace") or "twisted"
        self.writer.write(
            levelno=levelno,
            logger=str(namespace),
            message=text,
            ts=event.get("log_time"),
            exc_text=exc_text,
        )


def real_stdout() -> IO[str]:
    return sys.__stdout__ if sys.__stdout__ is not None else sys.stderr


def install_stdlib(writer: LogWriter) -> WriterHandler:
    """Route the root stdlib logger to `writer` (replacing earlier handlers)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, WriterHandler):
            root.removeHandler(h)
    handler = WriterHandler(writer)
    root.addHandler(handler)
    root.setLevel(writer.level)
    return handler
