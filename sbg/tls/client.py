"""Client-side TLS for forwarding: trust per destination, SNI, name checks.

`ClientTLSPolicy.creator_for` returns a Twisted connection creator (for
`wrapClientTLS`, `SSL4ClientEndpoint`, an `IPolicyForHTTPS`) that:

- trusts ONLY the certificates of the given CA files when there are any
  (pinning: the system roots are not consulted; any pinned certificate is a
  trust anchor, so pinning an intermediate works), else the platform's roots
  (`default_trust: system`), else nothing at all (`none`: refused with 502);
- sends SNI for a DNS name and none for an IP literal, and checks the
  server's certificate against the name (DNS SAN) or the address (IP SAN)
  with service_identity, failing closed on any error;
- requires TLS 1.2 or newer and offers ALPN `http/1.1` only.

The creator is sbg's own rather than Twisted's `optionsForClientTLS`: from
Twisted 23.10 on, an exception other than a name mismatch while checking
the name (service_identity raises one for a malformed DNS SAN) is logged and
the certificate accepted for any name. A failed check here always fails the
handshake (an `OpenSSL.SSL.Error`, "certificate verify failed").

Contexts are built once per trust set and creators once per (name, trust),
both kept in bounded LRU caches; a CA file is parsed again only when it
changes on disk (size, mtime or inode).
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from OpenSSL import SSL, crypto
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint
from zope.interface import implementer

from sbg.hosts import normalise_name
from sbg.tls.failures import HandshakeFailures, ObservedClientTLSEndpoint, note_for
from sbg.tls.pem import PemError, load_certificates
from sbg.tls.server import HTTP11

logger = logging.getLogger(__name__)

_FileIdentity = tuple[str, int, int, int, int]


class NoUpstreamTrust(ValueError):
    """No CA is trusted for this destination (`default_trust: none`, no `tls_ca`)."""

    def __init__(self, hostname: str) -> None:
        super().__init__(f"no CA is trusted for {hostname} (no tls_ca and default_trust: none)")


def _identity(path: str) -> _FileIdentity:
    try:
        st = os.stat(path)
    except OSError as e:
        raise PemError(f"{path}: cannot read: {e.strerror or e}") from None
    return (path, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _new_context(anchors: Sequence[crypto.X509] | None) -> SSL.Context:
    """A client context trusting `anchors` only, or the platform roots (None)."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    ctx.set_alpn_protos([HTTP11])
    if anchors is None:
        ctx.set_default_verify_paths()
    else:
        store = ctx.get_cert_store()
        assert store is not None
        for cert in anchors:
            store.add_cert(cert)
        store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
    return ctx


def _is_ip(hostname: str) -> bool:
    try:
        ipaddress.ip_address(hostname)
    except ValueError:
        return False
    return True


@implementer(IOpenSSLClientConnectionCreator)
class VerifyingClientCreator:
    """Client connections to one host name, checked against one trust set.

    Raises:
        ValueError: a host name that IDNA cannot encode.
    """

    def __init__(self, hostname: str, context: SSL.Context) -> None:
        self.hostname = hostname
        self._context = context
        self._check: Callable[[crypto.X509], None]
        if _is_ip(hostname):
            self._sni: bytes | None = None
            self._check = lambda cert: verify_certificate_ip_address(
                cert.to_cryptography(), hostname
            )
        else:
            self._sni = hostname.encode("idna")
            self._check = lambda cert: verify_certificate_hostname(cert.to_cryptography(), hostname)

    def _verify(
        self, conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int
    ) -> bool:
        # Why a certificate is refused goes into the connection's note, for
        # the one line `sbg.tls.failures` writes about the failed handshake.
        if not ok:
            logger.debug(
                "TLS to %s: certificate not trusted (X509 verify error %d at depth %d)",
                self.hostname,
                errno,
                depth,
            )
            note_for(conn).refused_by_verify_error(errno, depth)
            return False
        if depth != 0:
            return True
        try:
            self._check(cert)
        except Exception as e:
            logger.debug("TLS to %s: the certificate does not match the name: %s", self.hostname, e)
            note_for(conn).refused_for_name(f"not valid for {self.hostname}")
            return False
        return True

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        conn = SSL.Connection(self._context, None)
        if self._sni is not None:
            conn.set_tlsext_host_name(self._sni)
        conn.set_verify(SSL.VERIFY_PEER, self._verify)
        return conn


class ClientTLSPolicy:
    """Builds and caches client connection creators; see the module docstring.

    Args:
        cache_size: creators kept (and, separately, contexts: one per trust set).
    """

    def __init__(self, *, cache_size: int = 512, failures: HandshakeFailures | None = None) -> None:
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        self._cache_size = cache_size
        self.failures = failures
        self._creators: OrderedDict[tuple[Any, ...], VerifyingClientCreator] = OrderedDict()
        self._contexts: OrderedDict[tuple[_FileIdentity, ...], SSL.Context] = OrderedDict()

    def __len__(self) -> int:
        return len(self._creators)

    def creator_for(
        self, hostname: str, ca_files: Sequence[str] | None, default_trust: str
    ) -> VerifyingClientCreator:
        """The creator for TLS to `hostname` (DNS name or IP literal).

        Args:
            hostname: the name the certificate must be for; also the SNI.
            ca_files: PEM files whose certificates are the only trusted
                roots, or None to use `default_trust`. An empty sequence
                trusts nothing.
            default_trust: "system" (platform roots) or "none".

        Raises:
            NoUpstreamTrust: nothing to trust (a 502 refusal).
            PemError: a CA file is unreadable or holds no certificate.
            ValueError: an empty hostname or an unknown `default_trust`.
        """
        host = normalise_name(hostname)
        if not host:
            raise ValueError("empty host name")
        # The trust set: the pinned files' identities, or () for the platform.
        files: tuple[_FileIdentity, ...]
        if ca_files is not None:
            if not ca_files:
                raise NoUpstreamTrust(host)
            files = tuple(_identity(p) for p in dict.fromkeys(ca_files))
        elif default_trust == "system":
            files = ()
        elif default_trust == "none":
            raise NoUpstreamTrust(host)
        else:
            raise ValueError(f"unknown default_trust {default_trust!r}")
        key = (host, files)
        creator = self._creators.get(key)
        if creator is not None:
            self._creators.move_to_end(key)
            return creator
        context = self._context(files)
        creator = VerifyingClientCreator(host, context)
        self._creators[key] = creator
        while len(self._creators) > self._cache_size:
            self._creators.popitem(last=False)
        return creator

    def endpoint(
        self,
        tcp: IStreamClientEndpoint,
        hostname: str,
        ca_files: Sequence[str] | None,
        default_trust: str,
        *,
        listener: str,
    ) -> IStreamClientEndpoint:
        """TLS over `tcp` with `creator_for`'s creator; a failed handshake is
        logged and counted with `listener` (`sbg.tls.failures`).

        Raises:
            as `creator_for`.
        """
        creator = self.creator_for(hostname, ca_files, default_trust)
        return ObservedClientTLSEndpoint(
            creator, tcp, listener=listener, failures=self.failures, sni=creator.hostname
        )

    def _context(self, files: tuple[_FileIdentity, ...]) -> SSL.Context:
        ctx = self._contexts.get(files)
        if ctx is not None:
            self._contexts.move_to_end(files)
            return ctx
        anchors = None
        if files:
            anchors = [
                crypto.X509.from_cryptography(c)
                for path, *_ in files
                for c in load_certificates(path)
            ]
        ctx = _new_context(anchors)
        self._contexts[files] = ctx
        while len(self._contexts) > self._cache_size:
            self._contexts.popitem(last=False)
        return ctx
