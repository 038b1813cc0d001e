"""Test certificates and signing keys for the end-to-end homeservers.

Every key is ECDSA P-256 (TLS) or ed25519 (Matrix signing), made fresh for
each run with ``cryptography`` and ``signedjson``.
"""

import os
import secrets
from dataclasses import dataclass

from signedjson.key import (
    encode_verify_key_base64,
    generate_signing_key,
    get_verify_key,
    write_signing_keys,
)

from testbed.tlstools import CertFiles, issue_cert
from testbed.tlstools import make_ca as _make_ca

__all__ = ["CertFiles", "SigningKeyFiles", "issue_server_cert", "make_ca", "make_signing_key"]


@dataclass(frozen=True)
class SigningKeyFiles:
    """A Synapse signing key file and its public half."""

    path: str
    key_id: str  # "ed25519:a_XXXX"
    verify_key_base64: str  # unpadded base64 of the 32-byte public key


def make_ca(directory: str, common_name: str, basename: str = "ca") -> CertFiles:
    """A self-signed CA (ECDSA P-256, CA:true) as DIR/BASENAME.crt/.key (key 0600)."""
    return _make_ca(directory, common_name, basename)


def issue_server_cert(
    ca: CertFiles,
    directory: str,
    basename: str,
    dns_names: list[str],
    ip_addresses: list[str] | None = None,
) -> CertFiles:
    """A TLS server certificate for DNS_NAMES (and IPs) signed by CA."""
    return issue_cert(ca, directory, basename, dns_names, ip_addresses or ())


def make_signing_key(path: str) -> SigningKeyFiles:
    """Write a fresh ed25519 Synapse signing key to PATH (Synapse's file format)."""
    version = "a_" + secrets.token_hex(3)
    key = generate_signing_key(version)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        write_signing_keys(f, [key])
    return SigningKeyFiles(
        path=path,
        key_id="ed25519:" + version,
        verify_key_base64=encode_verify_key_base64(get_verify_key(key)),
    )
