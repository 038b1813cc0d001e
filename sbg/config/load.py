"""Read the YAML configuration into `sbg.config.model` (docs/configuration.md).

Every problem is collected with its key path (dots, 0-based list indexes,
keys quoted when they hold anything but letters, digits, `_` and `-`) and
all of them are raised together as one `ConfigErrors`; nothing a file
contains makes this module raise anything else.

Rules the loader applies (for operators: docs/configuration.md):

- `null` means "not set" for every optional key (an empty `inbound:`
  section keeps the defaults); a required key that is `null` is missing.
- A key given twice in one mapping is an error.
- `bind_addresses` are IP literals (`localhost` is refused: a listener binds
  an address, and the admin loopback check is exact: 127.0.0.0/8 and ::1).
  Defaults: `["127.0.0.1"]` for admin listeners, `["0.0.0.0"]` otherwise.
  Port 0 binds a free port (tests).
- `tls` and `x_forwarded` on a non-inbound listener are errors.
- An internal homeserver needs at least one `federation_hosts` entry (its
  `server_name` alone only serves discovery); an external one may list
  none (then only its `server_name` on 443, for discovery, is reachable).
- `upstream` and `upstream_proxy` need an explicit port.
- Host names are compared case-insensitively, server names as written
  except when looking for a name used twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Literal, cast

import yaml

from sbg.config import model
from sbg.config.cluster import ClusterReader
from sbg.config.homeservers import HomeserversReader
from sbg.config.listeners import ListenersReader
from sbg.config.reader import _kind, _read_capped, _strerror, index_path, key_path
from sbg.config.settings import SettingsReader
from sbg.config.trust import MODES, TrustReader
from sbg.errors import ConfigError, ConfigErrors

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
MAX_WORKERS = 64
_TOP_KEYS = (
    "listeners",
    "log_level",
    "log_format",
    "state_dir",
    "admin_token_file",
    "shutdown_grace",
    "workers",
    "inbound",
    "outbound",
    "internal_homeservers",
    "external_homeservers",
    "trust_levels",
    "mode",
    "limits",
    "cluster",
)


def load_config(path: str, *, skip_files: bool = False) -> model.Config:
    """Read, validate and return the configuration file at PATH.

    With `skip_files`, no file the configuration names is opened (the
    password and token are then None in the model).

    Raises:
        ConfigErrors: every problem found, each with its key path.
    """
    abspath = os.path.abspath(path)
    try:
        raw = _read_capped(abspath)
    except OSError as e:
        raise ConfigErrors(
            path, [ConfigError("", f"{path}: cannot read: {_strerror(e)}")]
        ) from None
    if raw is None:
        raise ConfigErrors(path, [ConfigError("", f"{path}: too large to be a configuration")])
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigErrors(
            path, [ConfigError("", f"{path}: not UTF-8 text (bad byte at offset {e.start})")]
        ) from None
    config = parse_config_text(
        text, base_dir=os.path.dirname(abspath), path=path, skip_files=skip_files
    )
    return dataclasses.replace(config, sha256=hashlib.sha256(raw).hexdigest())


def parse_config_text(
    text: str, *, base_dir: str, path: str, skip_files: bool = False
) -> model.Config:
    """Validate configuration TEXT; relative paths are resolved against BASE_DIR.

    PATH names the file in messages; made absolute, it becomes `Config.path`.

    Raises:
        ConfigErrors: every problem found, each with its key path.
    """
    try:
        data, duplicates = _load_yaml(text)
    except yaml.MarkedYAMLError as e:
        raise ConfigErrors(path, [ConfigError("", f"{path}: {_describe_yaml_error(e)}")]) from None
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as e:
        # PyYAML raises plain ValueErrors too (e.g. a timestamp with month 13).
        message = " ".join(str(e).split())
        raise ConfigErrors(path, [ConfigError("", f"{path}: not valid YAML: {message}")]) from None
    except RecursionError:
        raise ConfigErrors(
            path, [ConfigError("", f"{path}: not valid YAML: nested too deeply")]
        ) from None
    if data is None:
        raise ConfigErrors(path, [ConfigError("", f"{path}: the file is empty")])
    if not isinstance(data, dict):
        raise ConfigErrors(
            path,
            [ConfigError("", f"{path}: the top level must be a mapping, not {_kind(data)}")],
        )
    reader = _Reader(os.path.abspath(base_dir), skip_files)
    reader.errors.extend(duplicates)
    config = reader.config(data, os.path.abspath(path))
    if reader.errors:
        raise ConfigErrors(path, reader.errors)
    return dataclasses.replace(config, warnings=tuple(str(w) for w in reader.warnings))


# libyaml's parser when PyYAML has it (Debian's does): about ten times
# faster, which matters for a reload of a file with many servers.
_SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _load_yaml(text: str) -> tuple[object, list[ConfigError]]:
    """Parse one YAML document; also report keys given twice in a mapping."""
    loader = _SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, []
        duplicates = _duplicate_keys(node)
        return loader.construct_document(node), duplicates
    finally:
        loader.dispose()


def _duplicate_keys(root: yaml.Node) -> list[ConfigError]:
    found: list[tuple[int, ConfigError]] = []
    visited: set[int] = set()
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    while stack:
        node, path = stack.pop()
        if id(node) in visited:  # aliases share nodes
            continue
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen: set[tuple[str, str]] = set()
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    stack.append((value_node, key_path(path, "?")))
                    continue
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                child = key_path(path, key_node.value)
                ident = (key_node.tag, key_node.value)
                if ident in seen:
                    line = key_node.start_mark.line + 1
                    found.append((line, ConfigError(child, f"duplicate key (line {line})")))
                seen.add(ident)
                stack.append((value_node, child))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                stack.append((item, index_path(path, i)))
    found.sort(key=lambda item: item[0])
    return [error for _, error in found]


def _describe_yaml_error(e: yaml.MarkedYAMLError) -> str:
    mark = e.problem_mark or e.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    parts = [p for p in (e.context, e.problem) if p]
    return f"not valid YAML: {where}{' '.join(' '.join(parts).split())}"


class _Reader(ListenersReader, SettingsReader, HomeserversReader, TrustReader, ClusterReader):
    """The whole file: every section, then the checks that span them."""

    def config(self, data: dict[object, object], abspath: str) -> model.Config:
        top = self.mapping(data, "", _TOP_KEYS) or {}
        listeners = self.listeners(top)
        log_level = self.choice(top, "log_level", "", LOG_LEVELS, "info")
        log_format = self.choice(top, "log_format", "", LOG_FORMATS, "text")
        state_dir = self.file_path(top, "state_dir", "") or "/var/lib/sbg"
        if not self.skip_files and os.path.exists(state_dir) and not os.path.isdir(state_dir):
            self.error("state_dir", f"{state_dir} exists and is not a directory")
        admin_token_file = self.file_path(top, "admin_token_file", "")
        admin_token = None
        if admin_token_file is not None and not self.skip_files:
            admin_token = self.secret("admin_token_file", admin_token_file, token=True)
        shutdown_grace = self.duration(top, "shutdown_grace", "", 30.0, positive=False)
        workers = self.integer(top, "workers", "", default=1, minimum=1, maximum=MAX_WORKERS) or 1
        inbound = self.inbound(top.get("inbound"))
        outbound = self.outbound(top.get("outbound"))
        internals = self.internal_homeservers(top)
        externals = self.external_homeservers(top)
        trust_levels = self.trust_levels(top)
        mode = self.choice(top, "mode", "", MODES, "enforce")
        limits = self.limits(top.get("limits"))
        cluster = self.cluster(top)

        self.check_listeners(listeners, outbound, internals, admin_token_file)
        self.check_names(internals, externals)
        self.check_claims(internals, externals, outbound)
        if trust_levels is not None:
            self.check_trust_level_names(externals, {t.name for t in trust_levels})

        return model.Config(
            path=abspath,
            listeners=tuple(listener for _, listener in listeners),
            log_level=cast(Literal["debug", "info", "warning", "error"], log_level),
            log_format=cast(Literal["text", "json"], log_format),
            state_dir=state_dir,
            admin_token_file=admin_token_file,
            admin_token=admin_token,
            shutdown_grace=shutdown_grace,
            workers=workers,
            inbound=inbound,
            outbound=outbound,
            internal_homeservers=tuple(hs for _, hs in internals),
            external_homeservers=tuple(hs for _, hs in externals),
            trust_levels=trust_levels or (),
            mode=cast(model.Mode, mode),
            limits=limits,
            cluster=cluster,
        )


def _key_tables() -> dict[str, tuple[str, ...]]:
    from sbg.config import cluster, homeservers, listeners, reader, settings, trust

    modules = (reader, listeners, settings, homeservers, trust, cluster)
    tables: dict[str, tuple[str, ...]] = {"_TOP_KEYS": _TOP_KEYS}
    for module in modules:
        for name, value in vars(module).items():
            if name.startswith("_") and name.endswith("_KEYS") and isinstance(value, tuple):
                tables[name] = value
    return tables


# Every table of accepted keys, by name (for the documentation's checks).
KEY_TABLES: dict[str, tuple[str, ...]] = _key_tables()

__all__ = ["KEY_TABLES", "index_path", "key_path", "load_config", "parse_config_text"]
