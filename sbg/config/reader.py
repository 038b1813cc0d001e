"""The configuration reader's groundwork: key paths, value shapes, files.

`BaseReader` turns parsed YAML values into typed ones, collecting every
problem with its key path; the section readers (`listeners`, `settings`,
`homeservers`, `trust`) build on it, and `sbg.config.load` puts them
together."""

from __future__ import annotations

import datetime
import difflib
import json
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from sbg.config import model
from sbg.config.certificates import validity
from sbg.config.units import (
    parse_duration,
    parse_host_pattern,
    parse_size,
)
from sbg.errors import ConfigError

# Secret files are one short line; anything bigger is not one.
_MAX_SECRET_BYTES = 64 * 1024
# No configuration, certificate or CA file is this big (/dev/zero is).
_MAX_FILE_BYTES = 16 * 1024 * 1024
_TLS_KEYS = ("certificate", "private_key")
_RATE_LIMIT_KEYS = ("per_second", "burst")
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")
_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


def key_path(parent: str, key: object) -> str:
    """PARENT's child KEY: `a.b`, or `a."odd:key"` for keys with other characters."""
    text = key if isinstance(key, str) else str(key)
    part = text if _PLAIN_KEY.fullmatch(text) else json.dumps(text, ensure_ascii=False)
    return f"{parent}.{part}" if parent else part


def index_path(parent: str, index: int) -> str:
    """PARENT's list item INDEX (0-based): `a[0]`."""
    return f"{parent}[{index}]"


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


class BaseReader:
    """Turns parsed YAML into model values, collecting every problem."""

    def __init__(self, base_dir: str, skip_files: bool) -> None:
        self.base_dir = base_dir
        self.skip_files = skip_files
        self.errors: list[ConfigError] = []
        self.warnings: list[ConfigError] = []
        self.now = datetime.datetime.now(datetime.UTC)
        # key path of a certificate file -> its certificates, once read.
        self.loaded_certificates: dict[str, list[x509.Certificate]] = {}
        # (list path, e.g. "external_homeservers[0].client_hosts") -> the key
        # path of each host pattern kept from it, for cross-check messages.
        self.pattern_paths: dict[str, list[str]] = {}
        self.non_matrix_paths: list[str] = []

    def error(self, path: str, message: str) -> None:
        self.errors.append(ConfigError(path, message))

    def warning(self, path: str, message: str) -> None:
        self.warnings.append(ConfigError(path, message))

    def check_dates(
        self, path: str, file: str, certs: list[x509.Certificate], *, bundle: bool
    ) -> None:
        """Expired and soon expiring certificates (`sbg.config.certificates`)."""
        self.loaded_certificates[path] = certs
        errors, warnings = validity(file, certs, self.now, bundle=bundle)
        for message in errors:
            self.error(path, message)
        for message in warnings:
            self.warning(path, message)

    def has_error(self, path: str) -> bool:
        """Whether a problem was found at PATH, inside it or at a parent of it.

        Cross-checks skip values that are missing only because they were
        wrong: that problem is already reported.
        """

        def inside(child: str, parent: str) -> bool:
            return child == parent or child.startswith((parent + ".", parent + "["))

        return any(inside(e.key_path, path) or inside(path, e.key_path) for e in self.errors)

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
        self.check_dates(cert_path, files.certificate, certs, bundle=False)
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

    # -- shapes shared by several sections

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
            certs = self.certificates(key_path(path, key), file)
            if certs:
                self.check_dates(key_path(path, key), file, certs, bundle=True)
        return file

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


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (x509.ExtensionNotFound, ValueError):
        return False
    return constraints.ca
