"""Test PKI and loopback TLS probes, for any test that needs real TLS.

PKI (files written with `cryptography`, keys ECDSA P-256 unless asked for RSA):

- `make_ca(dir, name)` -> `CertFiles`: a self-signed root CA (`ca.crt`/`ca.key`);
  `make_ca(dir, name, parent=root)` makes an intermediate CA signed by `root`.
- `issue_cert(ca, dir, basename, dns_names=[...], ip_addresses=[...])` ->
  `CertFiles`: a server certificate signed by `ca`; `with_chain=True` appends
  the issuing CA's certificate to the certificate file (leaf + intermediate).
- `load_cert(path)` / `san_dns(cert)` / `san_ips(cert)`.

Loopback TLS (real sockets on 127.0.0.1, port 0):

- `listen_tls(reactor, creator, factory)`: listen with TLS (any Twisted server
  creator / context factory) in front of `factory`.
- `RecordingServerFactory(answer=b"...")`: a server protocol that records
  every byte of application data it receives and answers `answer` to it.
- `probe_tls(reactor, port, creator, send=b"")` -> Deferred[`ProbeResult`]:
  connects, sends `send` once TLS is up, reads until the server closes (or
  nothing to send), and reports the peer's certificate chain, the
  ALPN protocol, the bytes received and the reason the connection ended.
- `RawClientCreator(sni=..., ca_file=..., alpn=[...], max_version=...)`: a
  client connection creator that sends exactly the SNI it is given (or none)
  and, with `ca_file`, checks the chain (not the name) against that CA only.

`deferred_test`: decorate `async def test_...` methods with it. Trial of
Twisted 22.4 (Debian 12) does not await coroutine test methods: without it
they "pass" without running.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import os
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

_ONE_DAY = datetime.timedelta(days=1)


def deferred_test(
    f: Callable[..., Coroutine[Any, Any, None]],
) -> Callable[..., defer.Deferred[None]]:
    """Run an `async def` test method as a Deferred (any Twisted version)."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> defer.Deferred[None]:
        return defer.ensureDeferred(f(*args, **kwargs))

    return wrapper


@dataclass(frozen=True)
class CertFiles:
    """A PEM certificate file and its PEM private key file."""

    certificate: str
    private_key: str


def _new_key(key_type: str) -> Any:
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: str, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: Any) -> bytes:
    data: bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return data


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_cert(path: str) -> x509.Certificate:
    """The first certificate of a PEM file."""
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


def _load_key(path: str) -> Any:
    with open(path, "rb") as f:
        return serialization.load_pem_private_key(f.read(), password=None)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def make_ca(
    directory: str,
    common_name: str = "sbg test CA",
    basename: str = "ca",
    *,
    parent: CertFiles | None = None,
    key_type: str = "ec",
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> CertFiles:
    """A CA as DIRECTORY/BASENAME.crt and .key: self-signed, or signed by
    `parent`; valid from a day ago for a year unless told otherwise."""
    os.makedirs(directory, exist_ok=True)
    key = _new_key(key_type)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    if parent is None:
        issuer, signer = name, key
    else:
        issuer, signer = load_cert(parent.certificate).subject, _load_key(parent.private_key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or _now() - _ONE_DAY)
        .not_valid_after(not_after or _now() + 365 * _ONE_DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
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
    )
    if parent is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
            critical=False,
        )
    cert = builder.sign(signer, hashes.SHA256())
    files = CertFiles(
        os.path.join(directory, basename + ".crt"), os.path.join(directory, basename + ".key")
    )
    _write(files.certificate, _pem(cert))
    _write(files.private_key, _key_pem(key), 0o600)
    return files


def issue_cert(
    ca: CertFiles,
    directory: str,
    basename: str,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    *,
    with_chain: bool = False,
    key_type: str = "ec",
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> CertFiles:
    """A TLS server certificate for the names/addresses, signed by `ca`;
    valid from a day ago for 90 days unless told otherwise."""
    os.makedirs(directory, exist_ok=True)
    ca_cert, ca_key = load_cert(ca.certificate), _load_key(ca.private_key)
    key = _new_key(key_type)
    alt: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    alt += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    cn = (list(dns_names) + list(ip_addresses))[0]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or _now() - _ONE_DAY)
        .not_valid_after(not_after or _now() + 90 * _ONE_DAY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = CertFiles(
        os.path.join(directory, basename + ".crt"), os.path.join(directory, basename + ".key")
    )
    _write(files.certificate, _pem(cert) + (_pem(ca_cert) if with_chain else b""))
    _write(files.private_key, _key_pem(key), 0o600)
    return files


def san_dns(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(san.get_values_for_type(x509.DNSName))


def san_ips(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(a) for a in san.get_values_for_type(x509.IPAddress)]


# -- loopback TLS ---------------------------------------------------------


class RecordingServerProtocol(Protocol):
    factory: RecordingServerFactory

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.factory.received.append(data)
        answer = self.factory.answer
        if answer is not None:
            self.transport.write(answer)  # type: ignore[union-attr]
            self.transport.loseConnection()  # type: ignore[union-attr]


class RecordingServerFactory(Factory):
    """Records application data; answers `answer` (then closes) to the first bytes."""

    protocol = RecordingServerProtocol

    def __init__(self, answer: bytes | None = b"pong") -> None:
        self.answer = answer
        self.received: list[bytes] = []
        self.connections: list[RecordingServerProtocol] = []


def listen_tls(reactor: Any, creator: Any, factory: Factory) -> Any:
    """Listen on 127.0.0.1 (port 0) with TLS from `creator` in front of `factory`."""
    return reactor.listenTCP(0, TLSMemoryBIOFactory(creator, False, factory), interface="127.0.0.1")


@dataclass
class ProbeResult:
    handshake_done: bool = False
    chain: list[x509.Certificate] = field(default_factory=list)
    alpn: bytes | None = None
    servername_sent: bytes | None = None
    data: bytes = b""
    reason: Failure | None = None

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]


@implementer(IHandshakeListener)
class _Probe(Protocol):
    def __init__(self, send: bytes, close_after_handshake: bool) -> None:
        self.result = ProbeResult()
        self.done: defer.Deferred[ProbeResult] = defer.Deferred()
        self._send = send
        self._close = close_after_handshake

    def handshakeCompleted(self) -> None:
        handle = self.transport.getHandle()  # type: ignore[union-attr]
        self.result.handshake_done = True
        self.result.chain = [c.to_cryptography() for c in handle.get_peer_cert_chain() or []]
        self.result.alpn = handle.get_alpn_proto_negotiated() or None
        self.result.servername_sent = handle.get_servername()
        if self._send:
            self.transport.write(self._send)  # type: ignore[union-attr]
        if self._close:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.result.data += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.result.reason = reason
        self.done.callback(self.result)


class _ProbeFactory(ClientFactory):
    def __init__(self, probe: _Probe) -> None:
        self.probe = probe

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.probe

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.probe.result.reason = reason
        self.probe.done.callback(self.probe.result)


def probe_tls(
    reactor: Any,
    port: int,
    creator: Any,
    send: bytes = b"",
    *,
    close_after_handshake: bool | None = None,
) -> defer.Deferred[ProbeResult]:
    """Connect to 127.0.0.1:PORT with TLS from `creator`; see the module docstring.

    With nothing to send, the probe closes once the handshake is done
    (unless `close_after_handshake` says otherwise).
    """
    if close_after_handshake is None:
        close_after_handshake = not send
    probe = _Probe(send, close_after_handshake)
    factory = TLSMemoryBIOFactory(creator, True, _ProbeFactory(probe))
    reactor.connectTCP("127.0.0.1", port, factory, timeout=10)
    return probe.done


@implementer(IOpenSSLClientConnectionCreator)
class RawClientCreator:
    """A plain pyOpenSSL client: exact SNI (or none), optional CA check, no name check."""

    def __init__(
        self,
        sni: bytes | None = None,
        *,
        ca_file: str | None = None,
        alpn: Sequence[bytes] | None = None,
        max_version: int | None = None,
        min_version: int | None = None,
    ) -> None:
        self._sni = sni
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        if ca_file is not None:
            ctx.load_verify_locations(ca_file)
            ctx.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errno, depth, ok: bool(ok))
        if alpn:
            ctx.set_alpn_protos(list(alpn))
        if max_version is not None:
            ctx.set_max_proto_version(max_version)
            # Lets OpenSSL 3 speak the old versions this client is told to use.
            ctx.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        if min_version is not None:
            ctx.set_min_proto_version(min_version)
        self._ctx = ctx

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        conn = SSL.Connection(self._ctx, None)
        if self._sni is not None:
            conn.set_tlsext_host_name(self._sni)
        return conn
