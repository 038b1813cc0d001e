"""A complete, valid sbg configuration backed by real generated files, for tests.

Typical use::

    material = make_material(self.mktemp())
    path = write_config(material.directory, {"inbound.max_body_size": "1K"}, material=material)
    config = load_config(path)

`make_material` writes every file the configuration names (TLS certificates
and keys, CAs, secrets, a Synapse signing key for the external server);
`config_dict` returns the configuration as a fresh dict (paths relative to the
material's directory); `write_config` applies overrides and writes it to
`DIR/sbg.yaml`. Overrides use the key paths `sbg check-config` prints:
`"listeners[0].port"`, `'external_homeservers[0].verify_keys."ed25519:x"'`;
the value `DELETE` removes the key (or list item).

The servers: internal `internal.example` (federation host
`matrix.internal.example`, upstream `http://127.0.0.1:8008`, TLS certificate
for both names issued by `internal_ca`), external `partner.example`
(federation host `matrix.partner.example`, pinned key `partner_key_id`,
`tls_ca` = `partner_ca`, which issued `partner_tls` for
`matrix.partner.example`, `partner.example` and 127.0.0.1; trust level
`external`). Listeners: inbound (TLS), outbound and admin, all on
127.0.0.1 port 0. Trust levels `external` and `partner` as in `conf/sbg.yaml`.
Proxy credentials and an admin token are set (`proxy_password`,
`admin_token`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from signedjson.key import (
    encode_verify_key_base64,
    generate_signing_key,
    get_verify_key,
    write_signing_keys,
)

from testbed.pki import CertFiles, issue_server_cert, make_ca

INTERNAL_SERVER = "internal.example"
INTERNAL_HOST = "matrix.internal.example"
PARTNER_SERVER = "partner.example"
PARTNER_HOST = "matrix.partner.example"
PROXY_USERNAME = "federation-sender"

# The V1 model, and the same plus room discovery and knocking.
EXTERNAL_GROUPS = [
    "discovery",
    "keys",
    "transactions",
    "events",
    "joins",
    "leaves",
    "invites",
    "queries_profile",
    "devices",
    "e2ee",
    "media",
]
PARTNER_GROUPS = [*EXTERNAL_GROUPS, "public_rooms", "queries_directory", "hierarchy", "knocks"]


class _Delete:
    def __repr__(self) -> str:
        return "DELETE"


DELETE: Any = _Delete()


@dataclass(frozen=True)
class Material:
    """Every file the test configuration names, with absolute paths."""

    directory: str
    internal_ca: CertFiles  # issued internal_tls: trust it to reach the inbound listener
    internal_tls: CertFiles  # matrix.internal.example, internal.example
    outbound_ca: CertFiles  # the interception CA (outbound.ca)
    partner_ca: CertFiles  # the partner's CA (its tls_ca)
    partner_tls: CertFiles  # matrix.partner.example, partner.example, 127.0.0.1
    partner_signing_key: Any  # signedjson SigningKey; its version is in partner_key_id
    partner_key_id: str  # "ed25519:..."
    partner_verify_key: str  # unpadded base64
    partner_signing_key_file: str  # the same key in Synapse's signing key format
    admin_token: str
    proxy_password: str


def _rel(base_dir: str, path: str) -> str:
    return os.path.relpath(path, base_dir)


def _write_secret(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")


def make_material(directory: str) -> Material:
    """Generate the keys, certificates and secrets under DIRECTORY (created)."""
    directory = os.path.abspath(directory)
    tls_dir = os.path.join(directory, "tls")
    internal_ca = make_ca(tls_dir, "Internal test CA", "internal-ca")
    internal_tls = issue_server_cert(
        internal_ca, tls_dir, "internal", [INTERNAL_HOST, INTERNAL_SERVER]
    )
    outbound_ca = make_ca(os.path.join(directory, "ca"), "sbg interception test CA", "ca")
    pins = os.path.join(directory, "pins")
    partner_ca = make_ca(pins, "Partner test CA", "partner-ca")
    partner_tls = issue_server_cert(
        partner_ca, tls_dir, "partner", [PARTNER_HOST, PARTNER_SERVER], ["127.0.0.1"]
    )

    version = "a_" + secrets.token_hex(3)
    signing_key = generate_signing_key(version)
    keys_dir = os.path.join(directory, "keys")
    os.makedirs(keys_dir, exist_ok=True)
    key_file = os.path.join(keys_dir, "partner.signing.key")
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        write_signing_keys(f, [signing_key])

    secrets_dir = os.path.join(directory, "secrets")
    os.makedirs(secrets_dir, exist_ok=True)
    admin_token = secrets.token_urlsafe(24)
    proxy_password = secrets.token_urlsafe(16)
    _write_secret(os.path.join(secrets_dir, "admin_token"), admin_token)
    _write_secret(os.path.join(secrets_dir, "proxy_password"), proxy_password)

    return Material(
        directory=directory,
        internal_ca=internal_ca,
        internal_tls=internal_tls,
        outbound_ca=outbound_ca,
        partner_ca=partner_ca,
        partner_tls=partner_tls,
        partner_signing_key=signing_key,
        partner_key_id="ed25519:" + version,
        partner_verify_key=encode_verify_key_base64(get_verify_key(signing_key)),
        partner_signing_key_file=key_file,
        admin_token=admin_token,
        proxy_password=proxy_password,
    )


def config_dict(material: Material, base_dir: str | None = None) -> dict[str, Any]:
    """The complete valid configuration for MATERIAL (a fresh dict).

    File paths are relative to BASE_DIR (default: the material's directory),
    where the configuration file is meant to be.
    """
    base = os.path.abspath(base_dir or material.directory)
    secrets_dir = os.path.join(material.directory, "secrets")
    return {
        "listeners": [
            {"type": "inbound", "port": 0, "bind_addresses": ["127.0.0.1"], "tls": True},
            {"type": "outbound", "port": 0, "bind_addresses": ["127.0.0.1"]},
            {"type": "admin", "port": 0, "bind_addresses": ["127.0.0.1"]},
        ],
        "log_level": "info",
        "log_format": "text",
        "state_dir": _rel(base, os.path.join(material.directory, "state")),
        "admin_token_file": _rel(base, os.path.join(secrets_dir, "admin_token")),
        "shutdown_grace": "30s",
        "workers": 1,
        "inbound": {
            "max_body_size": "16M",
            "request_timeout": "600s",
            "idle_timeout": "60s",
            "strict_origin_checks": True,
        },
        "outbound": {
            "ca": {
                "certificate": _rel(base, material.outbound_ca.certificate),
                "private_key": _rel(base, material.outbound_ca.private_key),
            },
            "proxy_auth": {
                "username": PROXY_USERNAME,
                "password_file": _rel(base, os.path.join(secrets_dir, "proxy_password")),
            },
            "upstream_proxy": None,
            "default_trust": "system",
            "request_timeout": "600s",
            "idle_timeout": "60s",
            "allowed_non_matrix_urls": [],
        },
        "internal_homeservers": [
            {
                "server_name": INTERNAL_SERVER,
                "federation_hosts": [INTERNAL_HOST],
                "upstream": "http://127.0.0.1:8008",
                "upstream_ca": None,
                "tls": {
                    "certificate": _rel(base, material.internal_tls.certificate),
                    "private_key": _rel(base, material.internal_tls.private_key),
                },
            }
        ],
        "external_homeservers": [
            {
                "server_name": PARTNER_SERVER,
                "federation_hosts": [PARTNER_HOST],
                "client_hosts": [],
                "verify_keys": {material.partner_key_id: material.partner_verify_key},
                "key_fetch": "pinned",
                "tls_ca": _rel(base, material.partner_ca.certificate),
                "addresses": {},
                "source_ips": [],
                "trust_level": "external",
                "enabled": True,
            }
        ],
        "trust_levels": {
            "external": {"inbound": list(EXTERNAL_GROUPS), "outbound": list(EXTERNAL_GROUPS)},
            "partner": {"inbound": list(PARTNER_GROUPS), "outbound": list(PARTNER_GROUPS)},
        },
    }


_STEP = re.compile(r'\.?([A-Za-z0-9_-]+)|\[([0-9]+)\]|\.?("(?:[^"\\]|\\.)*")')


def _steps(key_path: str) -> list[str | int]:
    steps: list[str | int] = []
    pos = 0
    while pos < len(key_path):
        match = _STEP.match(key_path, pos)
        if not match or match.end() == pos:
            raise ValueError(f"bad key path {key_path!r} at {pos}")
        name, index, quoted = match.groups()
        if index is not None:
            steps.append(int(index))
        else:
            steps.append(json.loads(quoted) if quoted is not None else name)
        pos = match.end()
    return steps


def set_path(config: dict[str, Any], key_path: str, value: Any) -> None:
    """Set (or with DELETE remove) the value at KEY_PATH, creating mappings on the way.

    A list index equal to the list's length appends.
    """
    steps = _steps(key_path)
    node: Any = config
    for step in steps[:-1]:
        if isinstance(step, str) and isinstance(node, dict) and node.get(step) is None:
            node[step] = {}
        node = node[step]
    last = steps[-1]
    if value is DELETE:
        del node[last]
    elif isinstance(node, list) and last == len(node):
        node.append(value)
    else:
        node[last] = value


def write_config(
    directory: str,
    overrides: Mapping[str, Any] | None = None,
    *,
    material: Material | None = None,
    filename: str = "sbg.yaml",
) -> str:
    """Write the valid configuration (with OVERRIDES applied) to DIRECTORY/FILENAME.

    Generates the material in DIRECTORY unless MATERIAL is given; its files
    are referenced relative to DIRECTORY. Returns the file's path.
    """
    if material is None:
        material = make_material(directory)
    config = config_dict(material, directory)
    for key_path, value in (overrides or {}).items():
        set_path(config, key_path, value)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(os.path.abspath(directory), filename)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return path
