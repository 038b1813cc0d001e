"""Client-side TLS for forwarding: trust per destination, SNI, name checks.

`ClientTLSPolicy.creator_for` returns a Twisted connection creator (for
`wrapClientTLS`, `SSL4ClientEndpoint`, an `IPolicyForHTTPS`) that:

- trusts ONLY the certificates of the given CA files when there are any
  (pinning: the system roots are not consulted), else the platform's roots
  (`default_trust: system`), else nothing at all (`none`: refused with 502);
- sends SNI for a DNS name and none for an IP literal, and checks the
  server's certificate against the name (DNS SAN) or address (IP SAN) with
  service_identity, as Twisted's `optionsForClientTLS` does;
- requires TLS 1.2 or newer and offers ALPN `http/1.1` only.

Creators are built once per (name, trust) and cached (bounded LRU); a CA
file is parsed again only when it changes on disk (size, mtime or inode).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from OpenSSL import crypto
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    Certificate,
    TLSVersion,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)

from sbg.errors import SbgError
from sbg.tls.pem import PemError, load_certificates
from sbg.tls.server import HTTP11, normalise_name

_FileIdentity = tuple[str, int, int, int, int]


class NoUpstreamTrust(SbgError):
    """No CA is trusted for this destination (`default_trust: none`, no `tls_ca`)."""

    def __init__(self, hostname: str) -> None:
        super().__init__(
            502,
            "M_UNKNOWN",
            f"no CA is trusted for {hostname} (no tls_ca and default_trust: none)",
            "upstream_no_trust",
        )


def _identity(path: str) -> _FileIdentity:
    try:
        st = os.stat(path)
    except OSError as e:
        raise PemError(f"{path}: cannot read: {e.strerror or e}")
    return (path, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class ClientTLSPolicy:
    """Builds and caches client connection creators; see the module docstring.

    Args:
        cache_size: creators kept (and, separately, parsed CA file sets).
    """

    def __init__(self, *, cache_size: int = 512) -> None:
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        self._cache_size = cache_size
        self._creators: OrderedDict[tuple[Any, ...], IOpenSSLClientConnectionCreator] = (
            OrderedDict()
        )
        self._roots: OrderedDict[tuple[_FileIdentity, ...], Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self._creators)

    def creator_for(
        self, hostname: str, ca_files: Sequence[str] | None, default_trust: str
    ) -> IOpenSSLClientConnectionCreator:
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
        trust_key: tuple[Any, ...]
        if ca_files is not None:
            if not ca_files:
                raise NoUpstreamTrust(host)
            files = tuple(_identity(p) for p in dict.fromkeys(ca_files))
            trust_key = ("pinned", files)
        elif default_trust == "system":
            files = ()
            trust_key = ("system",)
        elif default_trust == "none":
            raise NoUpstreamTrust(host)
        else:
            raise ValueError(f"unknown default_trust {default_trust!r}")
        key = (host, trust_key)
        creator = self._creators.get(key)
        if creator is not None:
            self._creators.move_to_end(key)
            return creator
        root = self._pinned_root(files) if files else platformTrust()
        creator = optionsForClientTLS(
            host,
            trustRoot=root,
            acceptableProtocols=[HTTP11],
            extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2},
        )
        self._creators[key] = creator
        while len(self._creators) > self._cache_size:
            self._creators.popitem(last=False)
        return creator

    def _pinned_root(self, files: tuple[_FileIdentity, ...]) -> Any:
        root = self._roots.get(files)
        if root is not None:
            self._roots.move_to_end(files)
            return root
        certs = [
            Certificate(crypto.X509.from_cryptography(c))
            for path, *_ in files
            for c in load_certificates(path)
        ]
        root = trustRootFromCertificates(certs)
        self._roots[files] = root
        while len(self._roots) > self._cache_size:
            self._roots.popitem(last=False)
        return root
