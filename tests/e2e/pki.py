"""Test certificates and signing keys for the end-to-end homeservers.

Every key is ECDSA P-256 (TLS) or ed25519 (Matrix signing), made fresh for
each run with ``cryptography`` and ``signedjson``.
"""

import datetime
import ipaddress
import os
import secrets
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from signedjson.key import (
    encode_verify_key_base64,
    generate_signing_key,
    get_verify_key,
    write_signing_keys,
)

_VALIDITY = datetime.timedelta(days=2)
_BACKDATE = datetime.timedelta(hours=1)


@dataclass(frozen=True)
class CertFiles:
    """A PEM certificate and its PEM private key, on disk."""

    certificate: str
    private_key: str


@dataclass(frozen=True)
class SigningKeyFiles:
    """A Synapse signing key file and its public half."""

    path: str
    key_id: str  # "ed25519:a_XXXX"
    verify_key_base64: str  # unpadded base64 of the 32-byte public key


def _write_key(path: str, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_cert(path: str, cert: x509.Certificate) -> None:
    with open(path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))


def _load(files: CertFiles) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    with open(files.certificate, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    with open(files.private_key, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def make_ca(directory: str, common_name: str, basename: str = "ca") -> CertFiles:
    """Create a self-signed CA (ECDSA P-256, CA:true) as DIR/BASENAME.crt/.key.

    The key file is mode 0600; DIR is created if missing.
    """
    os.makedirs(directory, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    files = CertFiles(
        certificate=os.path.join(directory, basename + ".crt"),
        private_key=os.path.join(directory, basename + ".key"),
    )
    _write_cert(files.certificate, cert)
    _write_key(files.private_key, key)
    return files


def issue_server_cert(
    ca: CertFiles,
    directory: str,
    basename: str,
    dns_names: list[str],
    ip_addresses: list[str] | None = None,
) -> CertFiles:
    """Issue a TLS server certificate for DNS_NAMES (and IPs) signed by CA."""
    os.makedirs(directory, exist_ok=True)
    ca_cert, ca_key = _load(ca)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    alt_names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses or []]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = CertFiles(
        certificate=os.path.join(directory, basename + ".crt"),
        private_key=os.path.join(directory, basename + ".key"),
    )
    _write_cert(files.certificate, cert)
    _write_key(files.private_key, key)
    return files


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
