"""One audit record per request decision (docs/decisions.md).

Records go through the stdlib logger `sbg.audit` at INFO; `sbg.logsetup`
renders them as text or as one JSON object per line. A record never holds a
request body, a query string, a signature, a token or a password: the path is
cut at the first `?` before it gets here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

AUDIT_LOGGER = "sbg.audit"

Decision = Literal["allow", "deny", "would_deny"]


@dataclass
class AuditRecord:
    """The facts of one decision, filled in as the request goes along."""

    direction: Literal["inbound", "outbound"]
    peer: str
    method: str
    path: str
    origin: str | None = None
    destination: str | None = None
    group: str | None = None
    decision: Decision = "deny"
    status: int = 0
    reason: str = ""
    # The refusal's short code (as in sbg_refusals_total), "" when allowed.
    code: str = ""
    duration_ms: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    ts: str = ""

    def as_fields(self) -> dict[str, Any]:
        # A flat record of plain values: a shallow copy is a full copy, and
        # much cheaper than dataclasses.asdict on every request.
        return dict(vars(self))

    def text(self) -> str:
        """The text-format rendering: one line, key=value, reason last."""
        return (
            f"{self.direction} {self.decision} {self.status} {self.method} {self.path} "
            f"peer={self.peer} origin={self.origin or '-'} "
            f"destination={self.destination or '-'} group={self.group or '-'} "
            f"duration_ms={self.duration_ms:.1f} bytes_in={self.bytes_in} "
            f"bytes_out={self.bytes_out} code={self.code or '-'} reason={self.reason!r}"
        )


def path_for_log(raw_target: bytes) -> str:
    """The request target without its query string, safe to log."""
    path = raw_target.split(b"?", 1)[0].split(b"#", 1)[0]
    # Latin-1 never fails; control characters are escaped by the renderers.
    return path[:2048].decode("latin-1")


class AuditLog:
    """Writes audit records; the one place that decides what is logged."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._logger = logger or logging.getLogger(AUDIT_LOGGER)

    def emit(self, record: AuditRecord) -> None:
        if not self._logger.isEnabledFor(logging.INFO):
            return
        record.ts = datetime.now(UTC).isoformat(timespec="milliseconds")
        record.duration_ms = round(record.duration_ms, 3)
        self._logger.info(record.text(), extra={"sbg_audit": record.as_fields()})
