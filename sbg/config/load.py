"""Read the YAML configuration into `sbg.config.model` (contract section 3).

Every problem is collected with its key path (dots, 0-based list indexes,
keys quoted when they hold anything but letters, digits, `_` and `-`) and
all of them are raised together as one `ConfigErrors`; nothing a file
contains makes this module raise anything else.

Choices where the contract is silent:

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

import difflib
import ipaddress
import json
import os
import re
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal, cast

import yaml
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from sbg.config import model
from sbg.config.units import (
    decode_verify_key,
    parse_duration,
    parse_host_pattern,
    parse_server_name,
    parse_size,
    parse_url,
)
from sbg.errors import ConfigError, ConfigErrors
from sbg.hosts import HostParseError, format_authority, parse_authority
from sbg.matrix.groups import GROUPS

LISTENER_TYPES = ("inbound", "outbound", "admin")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
KEY_FETCH_MODES = ("pinned", "fetch")
DEFAULT_TRUSTS = ("system", "none")
DEFAULT_BIND = {"admin": ("127.0.0.1",), "inbound": ("0.0.0.0",), "outbound": ("0.0.0.0",)}
# The port a server name without one is reached on for discovery.
DISCOVERY_PORT = 443
# Secret files are one short line; anything bigger is not one.
_MAX_SECRET_BYTES = 64 * 1024
# No configuration, certificate or CA file is this big (/dev/zero is).
_MAX_FILE_BYTES = 16 * 1024 * 1024

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
)
_LIMITS_KEYS = (
    "max_connections",
    "max_connections_per_ip",
    "max_inflight_upstream",
    "max_inflight_per_server",
    "max_tunnels",
    "header_timeout",
    "rate_limit_per_ip",
    "max_buffered_bytes",
)
_RATE_LIMIT_KEYS = ("per_second", "burst")
MODES = ("enforce", "monitor")
_LISTENER_KEYS = ("type", "port", "bind_addresses", "tls", "x_forwarded")
_INBOUND_KEYS = ("max_body_size", "request_timeout", "idle_timeout", "strict_origin_checks")
_OUTBOUND_KEYS = (
    "ca",
    "proxy_auth",
    "upstream_proxy",
    "default_trust",
    "request_timeout",
    "idle_timeout",
    "allowed_non_matrix_urls",
)
_TLS_KEYS = ("certificate", "private_key")
_PROXY_AUTH_KEYS = ("username", "password_file")
_NON_MATRIX_KEYS = ("host", "port", "path", "methods")
NON_MATRIX_METHODS = ("GET", "POST", "PUT")
_HTTP_METHOD = re.compile(r"[A-Z]+")
_INTERNAL_KEYS = ("server_name", "federation_hosts", "upstream", "upstream_ca", "tls")
_EXTERNAL_KEYS = (
    "server_name",
    "federation_hosts",
    "client_hosts",
    "verify_keys",
    "key_fetch",
    "tls_ca",
    "addresses",
    "source_ips",
    "trust_level",
    "enabled",
)
_TRUST_LEVEL_KEYS = ("inbound", "outbound", "mode", "rate_limit")

_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")
_KEY_ID = re.compile(r"ed25519:[A-Za-z0-9_]+")
_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


# ---------------------------------------------------------------- entry points


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
        raise ConfigErrors(path, [ConfigError("", f"{path}: cannot read: {_strerror(e)}")])
    if raw is None:
        raise ConfigErrors(path, [ConfigError("", f"{path}: too large to be a configuration")])
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigErrors(
            path, [ConfigError("", f"{path}: not UTF-8 text (bad byte at offset {e.start})")]
        )
    return parse_config_text(
        text, base_dir=os.path.dirname(abspath), path=path, skip_files=skip_files
    )


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
        raise ConfigErrors(path, [ConfigError("", f"{path}: {_describe_yaml_error(e)}")])
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as e:
        # PyYAML raises plain ValueErrors too (e.g. a timestamp with month 13).
        message = " ".join(str(e).split())
        raise ConfigErrors(path, [ConfigError("", f"{path}: not valid YAML: {message}")])
    except RecursionError:
        raise ConfigErrors(path, [ConfigError("", f"{path}: not valid YAML: nested too deeply")])
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
    return config


# ---------------------------------------------------------------- key paths


def key_path(parent: str, key: object) -> str:
    """PARENT's child KEY: `a.b`, or `a."odd:key"` for keys with other characters."""
    text = key if isinstance(key, str) else str(key)
    part = text if _PLAIN_KEY.fullmatch(text) else json.dumps(text, ensure_ascii=False)
    return f"{parent}.{part}" if parent else part


def index_path(parent: str, index: int) -> str:
    """PARENT's list item INDEX (0-based): `a[0]`."""
    return f"{parent}[{index}]"


# ---------------------------------------------------------------- YAML


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


# ---------------------------------------------------------------- helpers


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bytes):
        return "binary data"
    if isinstance(value, set):
        return "a set"
    return "a date" if hasattr(value, "isoformat") else type(value).__name__


def _suggest(key: object, allowed: Collection[str]) -> str:
    if not isinstance(key, str):
        return ""
    close = difflib.get_close_matches(key, list(allowed), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _strerror(e: OSError) -> str:
    return e.strerror or str(e)


def _read_capped(path: str) -> bytes | None:
    """The bytes of the file at PATH; None if it is larger than _MAX_FILE_BYTES."""
    with open(path, "rb") as f:
        data = f.read(_MAX_FILE_BYTES + 1)
    return data if len(data) <= _MAX_FILE_BYTES else None


@dataclass(frozen=True)
class _Claim:
    """A host some server (or the non-Matrix allowlist) answers for."""

    pattern: model.HostPattern
    path: str
    owner: str  # two claims with the same owner never conflict
    # For a server_name's own claim: the name, folded (a name used twice is
    # reported once, by check_names).
    server_name: str | None = None

    def overlaps(self, other: _Claim) -> bool:
        if self.pattern.host != other.pattern.host:
            return False
        a, b = self.pattern.port, other.pattern.port
        return a is None or b is None or a == b


# ---------------------------------------------------------------- the reader


class _Reader:
    """Turns the parsed YAML into the model, collecting every problem."""

    def __init__(self, base_dir: str, skip_files: bool) -> None:
        self.base_dir = base_dir
        self.skip_files = skip_files
        self.errors: list[ConfigError] = []
        # (list path, e.g. "external_homeservers[0].client_hosts") -> the key
        # path of each host pattern kept from it, for cross-check messages.
        self.pattern_paths: dict[str, list[str]] = {}
        self.non_matrix_paths: list[str] = []

    def error(self, path: str, message: str) -> None:
        self.errors.append(ConfigError(path, message))

    def has_error(self, path: str) -> bool:
        """Whether a problem was found at PATH, inside it or at a parent of it.

        Cross-checks skip values that are missing only because they were
        wrong: that problem is already reported.
        """

        def inside(child: str, parent: str) -> bool:
            return child == parent or child.startswith((parent + ".", parent + "["))

        return any(inside(e.key_path, path) or inside(path, e.key_path) for e in self.errors)

    # -- generic shapes

    def mapping(
        self, value: object, path: str, allowed: Collection[str]
    ) -> dict[str, object] | None:
        """VALUE as a mapping with only ALLOWED keys; null is an empty mapping."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.error(path, f"must be a mapping, not {_kind(value)}")
            return None
        result: dict[str, object] = {}
        for key, item in value.items():
            if isinstance(key, str) and key in allowed:
                result[key] = item
            else:
                self.error(key_path(path, key), "unknown key" + _suggest(key, allowed))
        return result

    def items(self, m: Mapping[str, object], key: str, path: str) -> list[tuple[str, object]]:
        """The list at KEY as (item path, item) pairs; null is an empty list."""
        value = m.get(key)
        p = key_path(path, key)
        if value is None:
            return []
        if not isinstance(value, list):
            self.error(p, f"must be a list, not {_kind(value)}")
            return []
        return [(index_path(p, i), item) for i, item in enumerate(value)]

    def string(
        self, m: Mapping[str, object], key: str, path: str, *, required: bool = False
    ) -> str | None:
        return self.string_value(m.get(key), key_path(path, key), required=required)

    def string_value(self, value: object, path: str, *, required: bool = False) -> str | None:
        if value is None:
            if required:
                self.error(path, "is required")
            return None
        if not isinstance(value, str):
            self.error(path, f"must be a string, not {_kind(value)}")
            return None
        if not value.strip():
            self.error(path, "must not be empty")
            return None
        return value

    def boolean(self, m: Mapping[str, object], key: str, path: str, default: bool) -> bool:
        value = m.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.error(key_path(path, key), f"must be true or false, not {_kind(value)}")
            return default
        return value

    def integer(
        self,
        m: Mapping[str, object],
        key: str,
        path: str,
        *,
        default: int | None,
        minimum: int,
        maximum: int | None = None,
    ) -> int | None:
        value = m.get(key)
        p = key_path(path, key)
        if value is None:
            if default is None:
                self.error(p, "is required")
            return default
        if not isinstance(value, int) or isinstance(value, bool):
            self.error(p, f"must be an integer, not {_kind(value)}")
            return default
        if value < minimum or (maximum is not None and value > maximum):
            limit = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            self.error(p, f"must be {limit}, not {value}")
            return default
        return value

    def choice(
        self,
        m: Mapping[str, object],
        key: str,
        path: str,
        choices: Collection[str],
        default: str | None,
    ) -> str | None:
        p = key_path(path, key)
        value = self.string(m, key, path, required=default is None)
        if value is None:
            return default
        if value.lower() not in choices:
            self.error(p, f"must be one of {' | '.join(choices)}, not {value!r}")
            return default
        return value.lower()

    def size(self, m: Mapping[str, object], key: str, path: str, default: int) -> int:
        value = m.get(key)
        if value is None:
            return default
        p = key_path(path, key)
        try:
            size = parse_size(value)
        except ValueError as e:
            self.error(p, str(e))
            return default
        if size <= 0:
            self.error(p, "must be greater than 0")
            return default
        return size

    def duration(
        self,
        m: Mapping[str, object],
        key: str,
        path: str,
        default: float,
        *,
        positive: bool = True,
    ) -> float:
        value = m.get(key)
        if value is None:
            return default
        p = key_path(path, key)
        try:
            seconds = parse_duration(value)
        except ValueError as e:
            self.error(p, str(e))
            return default
        if positive and seconds <= 0:
            self.error(p, "must be greater than 0")
            return default
        return seconds

    def file_path(
        self, m: Mapping[str, object], key: str, path: str, *, required: bool = False
    ) -> str | None:
        """A path, made absolute against the configuration file's directory."""
        value = self.string(m, key, path, required=required)
        if value is None:
            return None
        if "\x00" in value:
            self.error(key_path(path, key), "not a file path")
            return None
        return os.path.normpath(os.path.join(self.base_dir, value))

    def host_patterns(
        self, m: Mapping[str, object], key: str, path: str
    ) -> tuple[model.HostPattern, ...]:
        result = []
        paths = self.pattern_paths.setdefault(key_path(path, key), [])
        for item_path, item in self.items(m, key, path):
            text = self.string_value(item, item_path, required=True)
            if text is None:
                continue
            try:
                result.append(parse_host_pattern(text))
                paths.append(item_path)
            except ValueError as e:
                self.error(item_path, str(e))
        return tuple(result)

    # -- files (never opened with skip_files)

    def read_file(self, path: str, file: str) -> bytes | None:
        try:
            data = _read_capped(file)
        except OSError as e:
            self.error(path, f"cannot read {file}: {_strerror(e)}")
            return None
        if data is None:
            self.error(path, f"{file} is too large")
        return data

    def certificates(self, path: str, file: str) -> list[x509.Certificate] | None:
        """Every certificate of a PEM file (at least one, all parsing)."""
        data = self.read_file(path, file)
        if data is None:
            return None
        blocks = _PEM_CERT.findall(data)
        if not blocks:
            self.error(path, f"{file}: no PEM certificate in it")
            return None
        certs = []
        for n, block in enumerate(blocks, start=1):
            try:
                certs.append(x509.load_pem_x509_certificate(block))
            except ValueError as e:
                self.error(path, f"{file}: certificate {n} does not parse: {e}")
                return None
        return certs

    def public_key_of_private_key(self, path: str, file: str) -> bytes | None:
        """The DER public key of the PEM private key in FILE."""
        data = self.read_file(path, file)
        if data is None:
            return None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError:
            self.error(path, f"{file}: the private key is encrypted (sbg needs it unencrypted)")
            return None
        except (ValueError, UnsupportedAlgorithm):
            self.error(path, f"{file}: not a PEM private key")
            return None
        return key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def check_tls_files(self, path: str, files: model.TLSFiles, *, ca: bool) -> None:
        """Certificate (chain) and key parse and belong together; CA-ness if CA."""
        cert_path = key_path(path, "certificate")
        certs = self.certificates(cert_path, files.certificate)
        key_public = self.public_key_of_private_key(
            key_path(path, "private_key"), files.private_key
        )
        if not certs:
            return
        if ca and not _is_ca(certs[0]):
            self.error(cert_path, f"{files.certificate}: not a CA certificate (CA:TRUE missing)")
        if key_public is None:
            return
        cert_public = (
            certs[0]
            .public_key()
            .public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        if cert_public != key_public:
            self.error(
                key_path(path, "private_key"),
                f"{files.private_key} does not match the certificate in {files.certificate}",
            )

    def secret(self, path: str, file: str, *, token: bool) -> str | None:
        """The one-line secret in FILE, without its trailing newline."""
        data = self.read_file(path, file)
        if data is None:
            return None
        if len(data) > _MAX_SECRET_BYTES:
            self.error(path, f"{file} is too large for a secret")
            return None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            self.error(path, f"{file}: not UTF-8 text")
            return None
        if text.endswith("\n"):
            text = text[:-1]
            if text.endswith("\r"):
                text = text[:-1]
        if not text:
            self.error(path, f"{file} is empty")
            return None
        if "\n" in text or "\r" in text:
            self.error(path, f"{file} must hold one line")
            return None
        if token and any(c.isspace() or not c.isprintable() for c in text):
            self.error(path, f"{file}: the token must not contain spaces or control characters")
            return None
        return text

    # -- sections

    def config(self, data: dict[object, object], abspath: str) -> model.Config:
        top = self.mapping(data, "", _TOP_KEYS) or {}
        listeners = self.listeners(top)
        log_level = self.choice(top, "log_level", "", LOG_LEVELS, "info")
        log_format = self.choice(top, "log_format", "", LOG_FORMATS, "text")
        state_dir = self.file_path(top, "state_dir", "") or "/var/lib/sbg"
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
        )

    def listeners(self, top: Mapping[str, object]) -> list[tuple[str, model.Listener]]:
        if top.get("listeners") is None:
            self.error("listeners", "is required (at least one listener)")
            return []
        entries = self.items(top, "listeners", "")
        if not entries and isinstance(top.get("listeners"), list):
            self.error("listeners", "must list at least one listener")
        result = []
        for path, value in entries:
            listener = self.listener(value, path)
            if listener is not None:
                result.append((path, listener))
        return result

    def listener(self, value: object, path: str) -> model.Listener | None:
        m = self.mapping(value, path, _LISTENER_KEYS)
        if m is None:
            return None
        kind = self.choice(m, "type", path, LISTENER_TYPES, None)
        port = self.integer(m, "port", path, default=None, minimum=0, maximum=65535)
        addresses: list[str] = []
        if m.get("bind_addresses") is not None:
            entries = self.items(m, "bind_addresses", path)
            if not entries and isinstance(m.get("bind_addresses"), list):
                self.error(key_path(path, "bind_addresses"), "must list at least one address")
            for item_path, item in entries:
                text = self.string_value(item, item_path, required=True)
                if text is None:
                    continue
                try:
                    addresses.append(str(ipaddress.ip_address(text)))
                except ValueError:
                    self.error(item_path, f"not an IP address: {text!r}")
        for key in ("tls", "x_forwarded"):
            if kind is not None and kind != "inbound" and m.get(key) is not None:
                self.error(key_path(path, key), "only valid on an inbound listener")
        tls = self.boolean(m, "tls", path, False)
        x_forwarded = self.boolean(m, "x_forwarded", path, False)
        if kind is None or port is None:
            return None
        if m.get("bind_addresses") is None:
            addresses = list(DEFAULT_BIND[kind])
        return model.Listener(
            type=cast(model.ListenerType, kind),
            port=port,
            bind_addresses=tuple(addresses),
            tls=tls and kind == "inbound",
            x_forwarded=x_forwarded and kind == "inbound",
        )

    def tls_files(
        self, m: Mapping[str, object], key: str, path: str, *, ca: bool
    ) -> model.TLSFiles | None:
        p = key_path(path, key)
        if m.get(key) is None:
            return None
        section = self.mapping(m.get(key), p, _TLS_KEYS)
        if section is None:
            return None
        certificate = self.file_path(section, "certificate", p, required=True)
        private_key = self.file_path(section, "private_key", p, required=True)
        if certificate is None or private_key is None:
            return None
        files = model.TLSFiles(certificate=certificate, private_key=private_key)
        if not self.skip_files:
            self.check_tls_files(p, files, ca=ca)
        return files

    def ca_file(self, m: Mapping[str, object], key: str, path: str) -> str | None:
        file = self.file_path(m, key, path)
        if file is not None and not self.skip_files:
            self.certificates(key_path(path, key), file)
        return file

    def inbound(self, value: object) -> model.InboundSettings:
        m = self.mapping(value, "inbound", _INBOUND_KEYS)
        if m is None:
            return model.InboundSettings()
        d = model.InboundSettings()
        return model.InboundSettings(
            max_body_size=self.size(m, "max_body_size", "inbound", d.max_body_size),
            request_timeout=self.duration(m, "request_timeout", "inbound", d.request_timeout),
            idle_timeout=self.duration(m, "idle_timeout", "inbound", d.idle_timeout),
            strict_origin_checks=self.boolean(
                m, "strict_origin_checks", "inbound", d.strict_origin_checks
            ),
        )

    def outbound(self, value: object) -> model.OutboundSettings:
        path = "outbound"
        m = self.mapping(value, path, _OUTBOUND_KEYS)
        if m is None:
            return model.OutboundSettings()
        d = model.OutboundSettings()
        upstream_proxy = None
        text = self.string(m, "upstream_proxy", path)
        if text is not None:
            try:
                _, host, port = parse_url(text, ("http",))
                upstream_proxy = (host, port)
            except ValueError as e:
                self.error(key_path(path, "upstream_proxy"), str(e))
        return model.OutboundSettings(
            ca=self.tls_files(m, "ca", path, ca=True),
            proxy_auth=self.proxy_auth(m.get("proxy_auth"), key_path(path, "proxy_auth")),
            upstream_proxy=upstream_proxy,
            default_trust=cast(
                Literal["system", "none"],
                self.choice(m, "default_trust", path, DEFAULT_TRUSTS, d.default_trust),
            ),
            request_timeout=self.duration(m, "request_timeout", path, d.request_timeout),
            idle_timeout=self.duration(m, "idle_timeout", path, d.idle_timeout),
            allowed_non_matrix_urls=self.non_matrix_urls(m, path),
        )

    def proxy_auth(self, value: object, path: str) -> model.ProxyAuth | None:
        if value is None:
            return None
        m = self.mapping(value, path, _PROXY_AUTH_KEYS)
        if m is None:
            return None
        username = self.string(m, "username", path, required=True)
        if username is not None and (":" in username or not username.isprintable()):
            self.error(key_path(path, "username"), "must not contain ':' or control characters")
        password_file = self.file_path(m, "password_file", path, required=True)
        if username is None or password_file is None:
            return None
        password = None
        if not self.skip_files:
            password = self.secret(key_path(path, "password_file"), password_file, token=False)
        return model.ProxyAuth(username=username, password_file=password_file, password=password)

    def non_matrix_urls(self, m: Mapping[str, object], path: str) -> tuple[model.NonMatrixURL, ...]:
        result = []
        for item_path, value in self.items(m, "allowed_non_matrix_urls", path):
            entry = self.mapping(value, item_path, _NON_MATRIX_KEYS)
            if entry is None:
                continue
            host = None
            text = self.string(entry, "host", item_path, required=True)
            if text is not None:
                try:
                    pattern = parse_host_pattern(text)
                except ValueError as e:
                    self.error(key_path(item_path, "host"), str(e))
                else:
                    if pattern.port is not None:
                        self.error(
                            key_path(item_path, "host"), "must be a host without a port (use port:)"
                        )
                    else:
                        host = pattern.host
            port = self.integer(entry, "port", item_path, default=443, minimum=1, maximum=65535)
            regex = None
            source = self.string(entry, "path", item_path, required=True)
            if source is not None:
                try:
                    regex = re.compile(source)
                except (re.error, RecursionError, OverflowError) as e:
                    self.error(key_path(item_path, "path"), f"not a valid regular expression: {e}")
            methods = self.methods(entry, item_path)
            if host is not None and port is not None and regex is not None:
                result.append(model.NonMatrixURL(host=host, port=port, path=regex, methods=methods))
                self.non_matrix_paths.append(key_path(item_path, "host"))
        return tuple(result)

    def methods(self, entry: Mapping[str, object], path: str) -> frozenset[str]:
        """An allowed URL's `methods` (default GET, POST, PUT), upper case."""
        if entry.get("methods") is None:
            return frozenset(NON_MATRIX_METHODS)
        result = set()
        items = self.items(entry, "methods", path)
        if not items:
            self.error(key_path(path, "methods"), "must list at least one method")
        for item_path, item in items:
            text = self.string_value(item, item_path, required=True)
            if text is None:
                continue
            if not _HTTP_METHOD.fullmatch(text.upper()) or text.upper() == "CONNECT":
                self.error(item_path, f"not an HTTP method: {text!r}")
                continue
            result.add(text.upper())
        return frozenset(result) or frozenset(NON_MATRIX_METHODS)

    def internal_homeservers(
        self, top: Mapping[str, object]
    ) -> list[tuple[str, model.InternalHomeserver]]:
        if top.get("internal_homeservers") is None:
            self.error("internal_homeservers", "is required (at least one homeserver)")
            return []
        entries = self.items(top, "internal_homeservers", "")
        if not entries and isinstance(top.get("internal_homeservers"), list):
            self.error("internal_homeservers", "must list at least one homeserver")
        result = []
        for path, value in entries:
            m = self.mapping(value, path, _INTERNAL_KEYS)
            if m is None:
                continue
            server_name = self.server_name(m, path)
            hosts = self.host_patterns(m, "federation_hosts", path)
            if m.get("federation_hosts") in (None, []):
                self.error(
                    key_path(path, "federation_hosts"),
                    "at least one host is required (server_name alone only serves discovery)",
                )
            upstream = None
            text = self.string(m, "upstream", path, required=True)
            if text is not None:
                try:
                    scheme, host, port = parse_url(text, ("http", "https"))
                    upstream = f"{scheme}://{format_authority(host, port)}"
                except ValueError as e:
                    self.error(key_path(path, "upstream"), str(e))
            upstream_ca = self.ca_file(m, "upstream_ca", path)
            if upstream_ca is not None and upstream is not None and upstream.startswith("http:"):
                self.error(key_path(path, "upstream_ca"), "only used with an https upstream")
            result.append(
                (
                    path,
                    model.InternalHomeserver(
                        server_name=server_name or "",
                        federation_hosts=hosts,
                        upstream=upstream or "",
                        upstream_ca=upstream_ca,
                        tls=self.tls_files(m, "tls", path, ca=False),
                    ),
                )
            )
        return result

    def server_name(self, m: Mapping[str, object], path: str) -> str | None:
        text = self.string(m, "server_name", path, required=True)
        if text is None:
            return None
        try:
            parse_server_name(text)
        except ValueError as e:
            self.error(key_path(path, "server_name"), str(e))
            return None
        return text

    def external_homeservers(
        self, top: Mapping[str, object]
    ) -> list[tuple[str, model.ExternalHomeserver]]:
        result = []
        for path, value in self.items(top, "external_homeservers", ""):
            m = self.mapping(value, path, _EXTERNAL_KEYS)
            if m is None:
                continue
            server_name = self.server_name(m, path)
            federation_hosts = self.host_patterns(m, "federation_hosts", path)
            key_fetch = self.choice(m, "key_fetch", path, KEY_FETCH_MODES, "pinned")
            verify_keys = self.verify_keys(m, path)
            if key_fetch == "pinned" and not verify_keys and m.get("verify_keys") in (None, {}):
                self.error(
                    key_path(path, "verify_keys"),
                    "required with key_fetch: pinned (paste the output of sbg keys fetch)",
                )
            if key_fetch == "fetch" and m.get("federation_hosts") in (None, []):
                self.error(
                    key_path(path, "key_fetch"),
                    "fetch needs a federation_hosts entry to fetch the keys from",
                )
            result.append(
                (
                    path,
                    model.ExternalHomeserver(
                        server_name=server_name or "",
                        federation_hosts=federation_hosts,
                        client_hosts=self.host_patterns(m, "client_hosts", path),
                        verify_keys=verify_keys,
                        key_fetch=cast(Literal["pinned", "fetch"], key_fetch),
                        tls_ca=self.ca_file(m, "tls_ca", path),
                        addresses=self.addresses(m, path),
                        source_ips=self.source_ips(m, path),
                        trust_level=self.trust_level_name(m, path),
                        enabled=self.boolean(m, "enabled", path, True),
                    ),
                )
            )
        return result

    def trust_level_name(self, m: Mapping[str, object], path: str) -> str:
        """The `trust_level` (default `external`); "" when it is not a string."""
        if m.get("trust_level") is None:
            return "external"
        return self.string(m, "trust_level", path) or ""

    def verify_keys(self, m: Mapping[str, object], path: str) -> tuple[tuple[str, bytes], ...]:
        p = key_path(path, "verify_keys")
        value = m.get("verify_keys")
        if value is None:
            return ()
        if not isinstance(value, dict):
            self.error(p, f"must be a mapping of key id to public key, not {_kind(value)}")
            return ()
        result = []
        for key_id, encoded in value.items():
            item_path = key_path(p, key_id)
            ok = True
            if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
                self.error(item_path, "key id must be ed25519: followed by letters, digits or _")
                ok = False
            if not isinstance(encoded, str):
                self.error(item_path, f"must be a string (unpadded base64), not {_kind(encoded)}")
                continue
            try:
                raw = decode_verify_key(encoded)
            except ValueError as e:
                self.error(item_path, str(e))
                continue
            if ok:
                result.append((cast(str, key_id), raw))
        return tuple(result)

    def addresses(
        self, m: Mapping[str, object], path: str
    ) -> tuple[tuple[str, tuple[str, int]], ...]:
        p = key_path(path, "addresses")
        value = m.get("addresses")
        if value is None:
            return ()
        if not isinstance(value, dict):
            self.error(p, f'must be a mapping of "host:port" to "ip:port", not {_kind(value)}')
            return ()
        result: dict[str, tuple[str, int]] = {}
        for target, address in value.items():
            item_path = key_path(p, target)
            name = None
            try:
                if not isinstance(target, str):
                    raise HostParseError(f"{target!r} is not host:port")
                host, port = parse_authority(target)
                if port is None:
                    raise HostParseError(f"the port is missing in {target!r}")
                name = format_authority(host, port)
            except HostParseError as e:
                self.error(item_path, f"bad key: {e}")
            if name is not None and name in result:
                self.error(item_path, f"{name} is given twice")
            if not isinstance(address, str):
                self.error(item_path, f'must be a string "ip:port", not {_kind(address)}')
                continue
            try:
                ip, ip_port = parse_authority(address)
                ipaddress.ip_address(ip)
                if ip_port is None:
                    raise ValueError("port missing")
            except ValueError:
                self.error(item_path, f"must be ip:port (IPv6 as [addr]:port), not {address!r}")
                continue
            if name is not None:
                result[name] = (ip, ip_port)
        return tuple(result.items())

    def source_ips(self, m: Mapping[str, object], path: str) -> tuple[model.IPNetwork, ...]:
        result = []
        for item_path, item in self.items(m, "source_ips", path):
            text = self.string_value(item, item_path, required=True)
            if text is None:
                continue
            try:
                result.append(ipaddress.ip_network(text, strict=True))
            except ValueError as e:
                self.error(item_path, f"not a CIDR network: {e}")
        return tuple(result)

    def trust_levels(self, top: Mapping[str, object]) -> tuple[model.TrustLevel, ...] | None:
        """The trust levels; None when the section itself is unusable."""
        value = top.get("trust_levels")
        if value is None:
            return ()
        if not isinstance(value, dict):
            self.error("trust_levels", f"must be a mapping, not {_kind(value)}")
            return None
        result = []
        for name, levels in value.items():
            path = key_path("trust_levels", name)
            if not isinstance(name, str) or not name.strip():
                self.error(path, "a trust level name must be a non-empty string")
                continue
            m = self.mapping(levels, path, _TRUST_LEVEL_KEYS)
            if m is None:
                result.append(model.TrustLevel(name, frozenset(), frozenset()))
                continue
            level_mode = self.choice(m, "mode", path, MODES, "") or None
            result.append(
                model.TrustLevel(
                    name=name,
                    inbound=self.groups(m, "inbound", path),
                    outbound=self.groups(m, "outbound", path),
                    mode=cast(model.Mode | None, level_mode),
                    rate_limit=self.rate_limit(m.get("rate_limit"), key_path(path, "rate_limit")),
                )
            )
        return tuple(result)

    def rate_limit(self, value: object, path: str) -> model.RateLimit | None:
        """A `{per_second, burst}` token bucket; null means unlimited."""
        if value is None:
            return None
        m = self.mapping(value, path, _RATE_LIMIT_KEYS)
        if m is None:
            return None
        p = key_path(path, "per_second")
        rate = m.get("per_second")
        if rate is None:
            self.error(p, "is required")
            return None
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not rate > 0:
            self.error(p, f"must be a number greater than 0, not {rate!r}")
            return None
        default_burst = max(1, int(rate))
        burst = self.integer(m, "burst", path, default=default_burst, minimum=1)
        return model.RateLimit(float(rate), burst or default_burst)

    def limits(self, value: object) -> model.Limits:
        m = self.mapping(value, "limits", _LIMITS_KEYS)
        d = model.Limits()
        if m is None:
            return d

        def count(key: str, default: int) -> int:
            return self.integer(m, key, "limits", default=default, minimum=1) or default

        return model.Limits(
            max_connections=count("max_connections", d.max_connections),
            max_connections_per_ip=count("max_connections_per_ip", d.max_connections_per_ip),
            max_inflight_upstream=count("max_inflight_upstream", d.max_inflight_upstream),
            max_inflight_per_server=count("max_inflight_per_server", d.max_inflight_per_server),
            max_tunnels=count("max_tunnels", d.max_tunnels),
            header_timeout=self.duration(m, "header_timeout", "limits", d.header_timeout),
            rate_limit_per_ip=self.rate_limit(
                m.get("rate_limit_per_ip"), key_path("limits", "rate_limit_per_ip")
            ),
            max_buffered_bytes=self.size(m, "max_buffered_bytes", "limits", d.max_buffered_bytes),
        )

    def groups(self, m: Mapping[str, object], key: str, path: str) -> frozenset[str]:
        result = set()
        for item_path, item in self.items(m, key, path):
            text = self.string_value(item, item_path, required=True)
            if text is None:
                continue
            if text not in GROUPS:
                self.error(item_path, f"unknown endpoint group {text!r}" + _suggest(text, GROUPS))
                continue
            result.add(text)
        return frozenset(result)

    # -- cross-checks

    def check_listeners(
        self,
        listeners: list[tuple[str, model.Listener]],
        outbound: model.OutboundSettings,
        internals: list[tuple[str, model.InternalHomeserver]],
        admin_token_file: str | None,
    ) -> None:
        seen: dict[tuple[str, int], str] = {}
        tls_listener = next((p for p, li in listeners if li.type == "inbound" and li.tls), None)
        if tls_listener is not None:
            for hs_path, hs in internals:
                if hs.tls is None and not self.has_error(key_path(hs_path, "tls")):
                    self.error(
                        key_path(hs_path, "tls"),
                        f"required: the inbound listener {tls_listener} terminates TLS",
                    )
        for path, listener in listeners:
            for address in listener.bind_addresses:
                if listener.port and (address, listener.port) in seen:
                    self.error(
                        key_path(path, "port"),
                        f"{format_authority(address, listener.port)} is also used by "
                        f"{seen[(address, listener.port)]}",
                    )
                seen.setdefault((address, listener.port), path)
        outbound_listener = next((p for p, li in listeners if li.type == "outbound"), None)
        if outbound_listener and outbound.ca is None and not self.has_error("outbound.ca"):
            self.error("outbound.ca", f"required by the outbound listener {outbound_listener}")
        if admin_token_file is not None or self.has_error("admin_token_file"):
            return
        for path, listener in listeners:
            if listener.type != "admin":
                continue
            for n, address in enumerate(listener.bind_addresses):
                if not ipaddress.ip_address(address).is_loopback:
                    self.error(
                        index_path(key_path(path, "bind_addresses"), n),
                        f"admin listener on non-loopback address {address} "
                        "requires admin_token_file",
                    )

    def check_names(
        self,
        internals: list[tuple[str, model.InternalHomeserver]],
        externals: list[tuple[str, model.ExternalHomeserver]],
    ) -> None:
        seen: dict[str, str] = {}
        servers: list[tuple[str, str]] = [(p, hs.server_name) for p, hs in internals]
        servers += [(p, hs.server_name) for p, hs in externals]
        for path, name in servers:
            if not name:
                continue
            folded = name.lower()
            if folded in seen:
                self.error(
                    key_path(path, "server_name"),
                    f"{name} is also the server name of {seen[folded]}",
                )
            else:
                seen[folded] = path

    def check_claims(
        self,
        internals: list[tuple[str, model.InternalHomeserver]],
        externals: list[tuple[str, model.ExternalHomeserver]],
        outbound: model.OutboundSettings,
    ) -> None:
        claims: list[_Claim] = []
        for path, internal in internals:
            claims.extend(self.server_claims(path, internal))
        for path, external in externals:
            claims.extend(self.server_claims(path, external))
        # Several entries for one push gateway are fine; a federation host
        # on this list would let requests skip the federation checks.
        for entry, path in zip(
            outbound.allowed_non_matrix_urls, self.non_matrix_paths, strict=True
        ):
            pattern = model.HostPattern(entry.host, entry.port)
            claims.append(_Claim(pattern, path, "outbound.allowed_non_matrix_urls"))
        by_host: dict[str, list[_Claim]] = {}
        for claim in claims:
            for earlier in by_host.get(claim.pattern.host, []):
                same_name = earlier.server_name is not None and (
                    earlier.server_name == claim.server_name
                )
                if earlier.owner != claim.owner and not same_name and earlier.overlaps(claim):
                    self.error(
                        claim.path,
                        f"{format_authority(claim.pattern.host, claim.pattern.port)} is also "
                        f"claimed by {earlier.path}",
                    )
                    break
            by_host.setdefault(claim.pattern.host, []).append(claim)

    def check_trust_level_names(
        self, externals: list[tuple[str, model.ExternalHomeserver]], names: set[str]
    ) -> None:
        for path, ext in externals:
            if ext.trust_level and ext.trust_level not in names:
                known = ", ".join(sorted(names)) or "none is defined"
                self.error(
                    key_path(path, "trust_level"),
                    f"{ext.trust_level!r} is not a key of trust_levels ({known})",
                )

    def server_claims(
        self, path: str, hs: model.InternalHomeserver | model.ExternalHomeserver
    ) -> Iterator[_Claim]:
        if hs.server_name:
            host, port = parse_server_name(hs.server_name)
            pattern = model.HostPattern(host, port if port is not None else DISCOVERY_PORT)
            yield _Claim(pattern, key_path(path, "server_name"), path, hs.server_name.lower())
        lists: list[tuple[str, tuple[model.HostPattern, ...]]] = [
            ("federation_hosts", hs.federation_hosts)
        ]
        if isinstance(hs, model.ExternalHomeserver):
            lists.append(("client_hosts", hs.client_hosts))
        for key, patterns in lists:
            paths = self.pattern_paths.get(key_path(path, key), [])
            for pattern, pattern_path in zip(patterns, paths, strict=True):
                yield _Claim(pattern, pattern_path, path)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (x509.ExtensionNotFound, ValueError):
        return False
    return constraints.ca
