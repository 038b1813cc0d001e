"""Loading PEM certificates and keys, with errors an operator can act on.

Works with cryptography 38 (no `load_pem_x509_certificates`, no
`not_valid_after_utc`) as well as newer releases.
"""

from __future__ import annotations

import datetime
import re

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sbg.config.certificates import not_valid_after

# The private key types sbg can sign and serve TLS with.
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

_CERT_BLOCK = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?-----END CERTIFICATE-----", re.DOTALL
)


class PemError(ValueError):
    """A certificate or key file that cannot be used; the message names the file."""


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise PemError(f"{path}: cannot read: {e.strerror or e}") from None


def parse_certificates(data: bytes, source: str) -> list[x509.Certificate]:
    """Every PEM certificate in `data`, in file order (at least one).

    `source` names the data in error messages (usually its file path).
    """
    blocks = _CERT_BLOCK.findall(data)
    if not blocks:
        raise PemError(f"{source}: no PEM certificate found")
    certs = []
    for i, block in enumerate(blocks):
        try:
            certs.append(x509.load_pem_x509_certificate(block))
        except ValueError as e:
            raise PemError(f"{source}: certificate #{i + 1} does not parse: {e}") from None
    return certs


def load_certificates(path: str) -> list[x509.Certificate]:
    """Every certificate in the PEM file at `path`, in file order (at least one)."""
    return parse_certificates(_read(path), path)


def load_private_key(path: str) -> PrivateKey:
    """The unencrypted PEM private key (EC or RSA) in the file at `path`."""
    data = _read(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise PemError(f"{path}: the private key is encrypted (sbg needs it unencrypted)") from None
    except ValueError as e:
        raise PemError(f"{path}: not a PEM private key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise PemError(f"{path}: unsupported key type {type(key).__name__} (use EC or RSA)")
    return key


def key_matches(cert: x509.Certificate, key: PrivateKey) -> bool:
    """Whether `key` is the private half of `cert`'s public key."""
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return cert.public_key().public_bytes(der, fmt) == key.public_key().public_bytes(der, fmt)


def certificate_expiry(path: str) -> datetime.datetime:
    """The earliest notAfter among the certificates in the PEM file at `path`.

    For a chain (leaf then intermediates) or a CA bundle this is the moment
    the file stops being fully usable, which is what an expiry alert wants.
    """
    return min(not_valid_after(c) for c in load_certificates(path))
