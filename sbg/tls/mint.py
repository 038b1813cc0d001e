"""Interception certificates for the outbound proxy, minted on the fly.

A federation sender opens `CONNECT host:port` and then TLS with SNI = the
name it wants to reach; sbg answers with a certificate for that SNI name,
signed by the interception CA that the internal homeservers trust. Minting is
cheap: one ECDSA P-256 leaf key is generated when the minter is built and
shared by every leaf, so a new name costs one signature; the resulting
contexts are kept in a bounded LRU cache.

Wiring one tunnel (after the CONNECT was accepted)::

    creator = InterceptingServerContextFactory(minter, connect_host)
    tls = TLSMemoryBIOFactory(creator, False, http_factory).buildProtocol(peer)
    tls.makeConnection(transport)

Inside the tunnel, `sbg.tls.server.sni_of(request.channel.transport)` (or
`transport.getHandle().get_servername()`) gives the SNI the client sent.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLContextFactory, IOpenSSLServerConnectionCreator
from zope.interface import implementer

from sbg.tls.ca import CertificateAuthority
from sbg.tls.server import install_sni_switch, new_server_context, servername_of

logger = logging.getLogger(__name__)

LEAF_VALIDITY = datetime.timedelta(days=30)
# Tolerates clocks of the internal homeservers that run behind sbg's.
LEAF_BACKDATE = datetime.timedelta(days=1)
# A cached certificate with less than this left is minted anew.
LEAF_RENEW_BEFORE = datetime.timedelta(days=7)

_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


class Clock(Protocol):
    """What the minter needs of a clock (`IReactorTime` provides it)."""

    def seconds(self) -> float: ...


def canonical_name(name: str) -> str:
    """`name` as a certificate is minted for it: a DNS name or an IP literal.

    DNS names are lower-cased (a trailing dot is dropped) and must be
    letters, digits and hyphens in dot-separated labels of 1 to 63
    characters, 253 at most in all; IP literals (IPv6 with or without
    brackets) take their canonical form.

    Raises:
        ValueError: anything else (wildcards, underscores, non-ASCII, ...).
    """
    host = name.lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
            raise ValueError(f"not a certificate name: {name!r} (scoped address)")
        return str(ip)
    if host.endswith("."):
        host = host[:-1]
    if not host or len(host) > 253 or not all(_LABEL.match(lb) for lb in host.split(".")):
        raise ValueError(f"not a certificate name: {name!r}")
    return host


@dataclass
class _Minted:
    certificate: x509.Certificate
    serving: SSL.Context
    renew_at: float
    front: SSL.Context | None = None


class CertMinter:
    """Mints and caches server contexts for names, signed by `ca`.

    Args:
        ca: the interception CA.
        cache_size: how many names keep their context (least recently used
            first out).
        clock: time source (`seconds()`); the system clock by default.
    """

    def __init__(
        self, ca: CertificateAuthority, *, cache_size: int = 1024, clock: Clock | None = None
    ) -> None:
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        self._ca = ca
        self._cache_size = cache_size
        self._clock = clock
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._ski = x509.SubjectKeyIdentifier.from_public_key(self._key.public_key())
        self._aki = x509.AuthorityKeyIdentifier(
            key_identifier=ca.ski, authority_cert_issuer=None, authority_cert_serial_number=None
        )
        # Clients trust the CA itself: a self-signed CA is not sent. An
        # intermediate CA is sent with its issuers, up to the root they trust.
        self._chain = () if ca.self_signed else (ca.certificate, *ca.chain)
        self._session_id = os.urandom(16)
        self._cache: OrderedDict[str, _Minted] = OrderedDict()

    def __len__(self) -> int:
        return len(self._cache)

    def cached_names(self) -> tuple[str, ...]:
        """The names with a cached context, least recently used first."""
        return tuple(self._cache)

    def _now(self) -> float:
        return self._clock.seconds() if self._clock is not None else time.time()

    def context_for(self, server_name: str) -> SSL.Context:
        """The server context presenting a certificate for `server_name`.

        Raises:
            ValueError: `server_name` is no DNS name or IP literal.
        """
        return self._entry(canonical_name(server_name)).serving

    def certificate_for(self, server_name: str) -> x509.Certificate:
        """The certificate `context_for(server_name)` presents."""
        return self._entry(canonical_name(server_name)).certificate

    def front_context_for(self, fallback_name: str) -> SSL.Context:
        """A context that serves `fallback_name` unless the client's SNI names another.

        Connections made from it are moved, during their ClientHello, to
        `context_for(SNI)`, or to `context_for(fallback_name)` when the
        client sent no SNI or one no certificate can be minted for (the
        client then refuses the certificate itself).

        Raises:
            ValueError: `fallback_name` is no DNS name or IP literal.
        """
        name = canonical_name(fallback_name)
        entry = self._entry(name)
        if entry.front is None:
            front = new_server_context(entry.certificate, self._chain, self._key, self._session_id)
            install_sni_switch(front, lambda conn: self._choose(conn, name))
            entry.front = front
        return entry.front

    def _choose(self, connection: SSL.Connection, fallback: str) -> SSL.Context:
        sni = servername_of(connection)
        if sni is not None:
            try:
                return self.context_for(sni)
            except ValueError:
                logger.info("no interception certificate for the SNI %r", sni)
        return self.context_for(fallback)

    def _entry(self, name: str) -> _Minted:
        now = self._now()
        entry = self._cache.get(name)
        if entry is not None and now < entry.renew_at:
            self._cache.move_to_end(name)
            return entry
        entry = self._mint(name, now)
        self._cache[name] = entry
        self._cache.move_to_end(name)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return entry

    def _mint(self, name: str, now: float) -> _Minted:
        start = datetime.datetime.fromtimestamp(now, datetime.UTC)
        try:
            alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            alt = x509.DNSName(name)
        # A common name is at most 64 characters; the SAN is what clients
        # check, and is critical when the subject is empty (RFC 5280).
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, name)] if len(name) <= 64 else []
        not_after = start + LEAF_VALIDITY
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attrs))
            .issuer_name(self._ca.certificate.subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start - LEAF_BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([alt]), critical=not attrs)
            .add_extension(self._ski, critical=False)
            .add_extension(self._aki, critical=False)
            .sign(self._ca.key, hashes.SHA256())
        )
        serving = new_server_context(cert, self._chain, self._key, self._session_id)
        renew_at = (not_after - LEAF_RENEW_BEFORE).timestamp()
        return _Minted(certificate=cert, serving=serving, renew_at=renew_at)


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLContextFactory)
class InterceptingServerContextFactory:
    """The TLS server side of one intercepted tunnel, for `TLSMemoryBIOFactory`.

    The certificate is minted for the client's SNI; `fallback_name` (the
    CONNECT target host, e.g. an IP literal) is used when there is no SNI.

    Raises:
        ValueError: `fallback_name` is no DNS name or IP literal.
    """

    def __init__(self, minter: CertMinter, fallback_name: str) -> None:
        self._front = minter.front_context_for(fallback_name)

    def getContext(self) -> SSL.Context:
        return self._front

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self._front, None)
