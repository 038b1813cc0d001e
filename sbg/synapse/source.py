"""The room rules' view of sbg.yaml: read with the gateway's own loader, and
re-read when the file changes.

The first read happens when Synapse parses the module's configuration; a
file that cannot be used then stops Synapse from starting (`RulesError`,
one line). Afterwards, `refresh` (called every few seconds) re-reads the
file when its stamp changed: a good file replaces the rules at once, a bad
one leaves the last good rules in force and is logged once per change.

Only the servers and trust levels are used. The file is loaded with
`skip_files`: the certificates, keys and secrets it names belong to the
gateway and need not exist on a homeserver.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from sbg.config.load import load_config
from sbg.errors import ConfigErrors
from sbg.policy.room_facts import Servers
from sbg.policy.snapshot import Policy

logger = logging.getLogger("sbg.synapse")

# What identifies one version of the file (replaced or rewritten).
Stamp = tuple[int, int, int, int] | None


class RulesError(Exception):
    """The rules cannot be read: one line naming the file and the problem."""


@dataclass(frozen=True)
class ModuleConfig:
    """The module's own configuration (its `config:` block in homeserver.yaml)."""

    sbg_config: str


def parse_module_config(config: object) -> ModuleConfig:
    """The `config:` block: exactly one key, `sbg_config`, naming sbg.yaml."""
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise RulesError("the module's config must be a mapping with sbg_config: FILE")
    unknown = sorted(str(k) for k in config if k != "sbg_config")
    if unknown:
        raise RulesError(f"unknown key {unknown[0]!r} in the module's config (only sbg_config)")
    path = config.get("sbg_config")
    if path is None:
        raise RulesError("sbg_config is missing: the path of sbg.yaml, e.g. /etc/sbg/sbg.yaml")
    if not isinstance(path, str) or not path.strip() or "\x00" in path:
        raise RulesError("sbg_config must be the path of sbg.yaml, e.g. /etc/sbg/sbg.yaml")
    return ModuleConfig(sbg_config=os.path.abspath(path))


def stamp_of(path: str) -> Stamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


def read_servers(path: str) -> Servers:
    """The servers and trust levels of the sbg.yaml at PATH.

    Raises:
        RulesError: the file cannot be read or is not a valid sbg config.
    """
    try:
        config = load_config(path, skip_files=True)
    except ConfigErrors as e:
        raise RulesError(_one_line(path, e)) from None
    return Servers.from_policy(Policy.build(config))


def _one_line(path: str, errors: ConfigErrors) -> str:
    """Every problem of ERRORS on one line, naming the file once."""
    whole_file = [e.message for e in errors.errors if not e.key_path]
    if whole_file:  # the loader's message names the file already
        return f"sbg_config: {whole_file[0]}"
    lines = errors.lines()
    shown = "; ".join(lines[:5]) + (f"; and {len(lines) - 5} more" if len(lines) > 5 else "")
    count = "" if len(lines) == 1 else f"{len(lines)} problems: "
    return f"sbg_config {path}: {count}{shown}"


class RulesSource:
    """The current rules, and the file they come from."""

    def __init__(self, path: str, servers: Servers, stamp: Stamp) -> None:
        self.path = path
        self._servers = servers
        self._stamp = stamp
        self._local: str | None = None
        self._listeners: list[Callable[[Servers], None]] = []

    @classmethod
    def open(cls, config: ModuleConfig) -> RulesSource:
        """Read the file now (at Synapse's start); raises RulesError."""
        stamp = stamp_of(config.sbg_config)
        return cls(config.sbg_config, read_servers(config.sbg_config), stamp)

    @property
    def servers(self) -> Servers:
        return self._servers

    def with_local_server(self, server_name: str) -> None:
        """Make sure this homeserver counts as internal (it runs the rules)."""
        self._local = server_name
        self._servers = _with_internal(self._servers, server_name)

    def on_change(self, listener: Callable[[Servers], None]) -> None:
        self._listeners.append(listener)

    def refresh(self) -> bool:
        """Re-read the file if it changed; True when new rules are in force."""
        stamp = stamp_of(self.path)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            servers = read_servers(self.path)
        except RulesError as e:
            logger.error("room rules: %s; the last good rules stay in force", e)
            return False
        self._servers = _with_internal(servers, self._local) if self._local else servers
        logger.info(
            "room rules: re-read %s (%d internal, %d external servers)",
            self.path,
            len(self._servers.internal),
            len(self._servers.external),
        )
        for listener in self._listeners:
            listener(self._servers)
        return True


def _with_internal(servers: Servers, server_name: str) -> Servers:
    if server_name in servers.internal:
        return servers
    logger.warning(
        "room rules: this homeserver, %s, is not in internal_homeservers; "
        "it counts as internal anyway",
        server_name,
    )
    return Servers(servers.internal | {server_name}, servers.external)
