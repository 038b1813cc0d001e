"""Configuration errors, each with the key path of the problem.

Refusals of requests are `sbg.reasons.Refusal`."""

from __future__ import annotations


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
