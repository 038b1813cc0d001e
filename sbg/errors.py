"""Errors that carry their own operator- or wire-facing meaning."""

from __future__ import annotations


class SbgError(Exception):
    """A refusal: an HTTP status, a Matrix errcode and a human reason.

    `code` is the short, fixed refusal code used as the `reason` label of
    `sbg_refusals_total` (never free text); `reason` is the human text sent
    in the error body and written to the audit log.
    """

    def __init__(self, status: int, errcode: str, reason: str, code: str) -> None:
        super().__init__(reason)
        self.status = status
        self.errcode = errcode
        self.reason = reason
        self.code = code


class ConfigError(Exception):
    """One problem in a configuration file, at a key path.

    `key_path` uses dots and 0-based list indexes, e.g.
    `external_homeservers[0].verify_keys."ed25519:x"`; it is empty for a
    problem with the file as a whole.
    """

    def __init__(self, key_path: str, message: str) -> None:
        super().__init__(f"{key_path}: {message}" if key_path else message)
        self.key_path = key_path
        self.message = message


class ConfigErrors(Exception):
    """Every problem found in one configuration file (never only the first)."""

    def __init__(self, path: str, errors: list[ConfigError]) -> None:
        super().__init__("\n".join(str(e) for e in errors))
        self.path = path
        self.errors = errors

    def lines(self) -> list[str]:
        return [str(e) for e in self.errors]
