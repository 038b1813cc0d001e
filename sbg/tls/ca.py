"""The outbound interception CA: creating it (`sbg ca init`) and loading it.

The internal homeservers trust this CA through Synapse's
`federation_custom_ca_list`; sbg signs a leaf certificate with it for every
name a federation sender reaches through the proxy (`sbg.tls.mint`).
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, NameOID

from sbg.config.certificates import not_valid_after
from sbg.tls.pem import (
    PemError,
    PrivateKey,
    key_matches,
    load_certificates,
    load_private_key,
)

CA_VALIDITY = datetime.timedelta(days=3652)
CA_BACKDATE = datetime.timedelta(days=1)
CERT_FILE = "ca.crt"
KEY_FILE = "ca.key"


class CAError(Exception):
    """The CA cannot be created or used; the message is one line for an operator."""


@dataclass(frozen=True)
class CertificateAuthority:
    """A loaded CA: its certificate, private key and key identifier.

    `chain` holds the certificates that followed the CA's own in its file
    (its issuers, when the CA is an intermediate); `ski` is the CA's
    subject key identifier, used as the authority key identifier of every
    certificate it signs.
    """

    certificate: x509.Certificate
    key: PrivateKey
    ski: bytes
    chain: tuple[x509.Certificate, ...] = ()

    @property
    def self_signed(self) -> bool:
        return self.certificate.issuer == self.certificate.subject


def _ca_name(now: datetime.datetime) -> x509.Name:
    host = socket.gethostname() or "localhost"
    cn = f"sbg interception CA {host} {now:%Y-%m-%d}"
    # A common name is at most 64 characters (RFC 5280 ub-common-name).
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn[:64])])


def build_ca(
    now: datetime.datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A fresh self-signed ECDSA P-256 CA certificate and its key (in memory)."""
    now = now or datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = _ca_name(now)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CA_BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        # pathlen 0: this CA signs leaf certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _create_exclusive(path: str, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)


def init_ca(directory: str) -> tuple[str, str]:
    """Create `DIRECTORY/ca.crt` and `DIRECTORY/ca.key` (mode 0600).

    The directory and its missing parents are created (mode 0700). Never
    overwrites: raises `CAError` if either file already exists.

    Returns:
        The paths of the certificate and of the key.
    """
    cert_path = os.path.join(directory, CERT_FILE)
    key_path = os.path.join(directory, KEY_FILE)
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as e:
        raise CAError(f"{directory}: cannot create the directory: {e.strerror or e}") from None
    for path in (key_path, cert_path):
        if os.path.lexists(path):
            raise CAError(f"{path} already exists; refusing to overwrite it")
    cert, key = build_ca()
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        # O_EXCL: a concurrent `sbg ca init` of the same directory cannot
        # replace a key this one just wrote, nor the reverse.
        _create_exclusive(key_path, key_pem, 0o600)
    except FileExistsError:
        raise CAError(f"{key_path} already exists; refusing to overwrite it") from None
    except OSError as e:
        raise CAError(f"{key_path}: cannot write: {e.strerror or e}") from None
    try:
        _create_exclusive(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    except OSError as e:
        os.unlink(key_path)
        if isinstance(e, FileExistsError):
            raise CAError(f"{cert_path} already exists; refusing to overwrite it") from None
        raise CAError(f"{cert_path}: cannot write: {e.strerror or e}") from None
    return cert_path, key_path


def _ski_of(cert: x509.Certificate) -> bytes:
    try:
        ext = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_KEY_IDENTIFIER)
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest
    value = ext.value
    assert isinstance(value, x509.SubjectKeyIdentifier)
    return value.digest


def check_ca_certificate(cert: x509.Certificate, source: str) -> None:
    """Raise `CAError` unless `cert` may sign TLS server certificates now."""
    try:
        bc = cert.extensions.get_extension_for_oid(ExtensionOID.BASIC_CONSTRAINTS).value
    except x509.ExtensionNotFound:
        bc = None
    if not isinstance(bc, x509.BasicConstraints) or not bc.ca:
        raise CAError(f"{source}: not a CA certificate (basicConstraints CA:true missing)")
    try:
        ku = cert.extensions.get_extension_for_oid(ExtensionOID.KEY_USAGE).value
    except x509.ExtensionNotFound:
        ku = None
    if isinstance(ku, x509.KeyUsage) and not ku.key_cert_sign:
        raise CAError(f"{source}: the CA certificate's keyUsage lacks keyCertSign")
    expiry = not_valid_after(cert)
    if expiry <= datetime.datetime.now(datetime.UTC):
        raise CAError(f"{source}: the CA certificate expired on {expiry:%Y-%m-%d %H:%M} UTC")


def load_ca(cert_path: str, key_path: str) -> CertificateAuthority:
    """Load the CA certificate (first in its file; the rest is its chain) and key.

    Raises:
        CAError: unreadable files, a certificate that is no usable CA, or a
            key that does not belong to it.
    """
    try:
        certs = load_certificates(cert_path)
        key = load_private_key(key_path)
    except PemError as e:
        raise CAError(str(e)) from None
    cert = certs[0]
    check_ca_certificate(cert, cert_path)
    if not key_matches(cert, key):
        raise CAError(f"{key_path}: this key does not belong to the certificate {cert_path}")
    return CertificateAuthority(
        certificate=cert, key=key, ski=_ski_of(cert), chain=tuple(certs[1:])
    )
