"""Server-side TLS: contexts, inbound certificate selection by SNI, reading SNI.

Every server context sbg uses comes from `new_server_context`: TLS 1.2 or
newer, ECDHE AEAD ciphers for TLS 1.2, no compression, no renegotiation, and
ALPN that only ever selects `http/1.1` (a client offering only `h2` gets no
ALPN answer and must fall back or give up).

Certificate selection by SNI works the same for the inbound listener
(`SNIServerContextFactory`) and for outbound interception
(`sbg.tls.mint.InterceptingServerContextFactory`): each connection starts on
a *front* context whose servername callback moves it, with
`Connection.set_context`, to a prebuilt *serving* context. The callback runs
for every ClientHello, with or without SNI, so serving contexts are never a
connection's first context: Twisted 22's `TLSMemoryBIOFactory` rewrites the
ALPN callback of a connection's first context from the wrapped factory's
`acceptableProtocols()` (a `Site` offers `h2` when the h2 package is
installed); that only ever touches the front context, whose ALPN is not used.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLContextFactory, IOpenSSLServerConnectionCreator
from zope.interface import implementer

from sbg.config.certificates import covers
from sbg.hosts import normalise_name
from sbg.tls.pem import PemError, PrivateKey, key_matches, load_certificates, load_private_key

logger = logging.getLogger(__name__)

HTTP11 = b"http/1.1"
# TLS 1.2 suites (TLS 1.3 suites are all acceptable and configured apart).
TLS12_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"


def _select_alpn(connection: SSL.Connection, offered: list[bytes]) -> Any:
    if HTTP11 in offered:
        return HTTP11
    return SSL.NO_OVERLAPPING_PROTOCOLS


def _use_identity(
    ctx: SSL.Context, leaf: x509.Certificate, chain: Sequence[x509.Certificate], key: PrivateKey
) -> None:
    try:
        # pyOpenSSL >= 24.3 takes cryptography objects (and deprecates its own).
        ctx.use_certificate(leaf)
        for cert in chain:
            ctx.add_extra_chain_cert(cert)
        ctx.use_privatekey(key)
    except TypeError:
        # Older pyOpenSSL (Debian 12: 23.0) only takes X509 / PKey.
        ctx.use_certificate(crypto.X509.from_cryptography(leaf))
        for cert in chain:
            ctx.add_extra_chain_cert(crypto.X509.from_cryptography(cert))
        ctx.use_privatekey(crypto.PKey.from_cryptography_key(key))


def new_server_context(
    leaf: x509.Certificate,
    chain: Sequence[x509.Certificate],
    key: PrivateKey,
    session_id: bytes,
) -> SSL.Context:
    """A server context presenting `leaf` (then `chain`) with `key`.

    `session_id` (at most 32 bytes) must be the same for every context a
    connection can be moved between, so that sessions can resume.
    """
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(
        SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION
    )
    ctx.set_cipher_list(TLS12_CIPHERS)
    _use_identity(ctx, leaf, chain, key)
    ctx.check_privatekey()
    ctx.set_session_id(session_id)
    ctx.set_alpn_select_callback(_select_alpn)
    return ctx


def servername_of(connection: SSL.Connection) -> str | None:
    """The lower-cased SNI of an OpenSSL connection, None if the client sent none.

    Bytes that are not ASCII become U+FFFD, so they match no configured name.
    """
    name = connection.get_servername()
    if not name:
        return None
    return name.decode("ascii", "replace").lower()


def sni_of(transport: object) -> str | None:
    """The lower-cased SNI a TLS client sent, from a Twisted TLS transport.

    `transport` is what a protocol running over TLS sees as its transport,
    e.g. `request.channel.transport` in twisted.web: a `TLSMemoryBIOProtocol`,
    whose `getHandle()` is the `OpenSSL.SSL.Connection`. Returns None for a
    plain TCP transport, a closed connection, or a client that sent no SNI.
    """
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is None:
        return None
    handle = get_handle()
    if not isinstance(handle, SSL.Connection):
        return None
    return servername_of(handle)


def install_sni_switch(
    front: SSL.Context, choose: Callable[[SSL.Connection], SSL.Context | None]
) -> None:
    """Make `front` move each connection to `choose(connection)`'s context.

    `choose` runs during the ClientHello; None, or an exception (logged),
    leaves the connection on `front`.
    """

    def on_servername(connection: SSL.Connection) -> None:
        try:
            target = choose(connection)
        except Exception:
            logger.exception("choosing a TLS certificate failed")
            return
        if target is not None:
            connection.set_context(target)

    front.set_tlsext_servername_callback(on_servername)


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLContextFactory)
class SNIServerContextFactory:
    """Inbound TLS: one prebuilt context per internal homeserver, chosen by SNI.

    Usable with `TLSMemoryBIOFactory`, `SSL4ServerEndpoint` and
    `reactor.listenSSL`. An unknown or absent SNI gets the default entry's
    certificate.
    """

    def __init__(
        self,
        serving: Sequence[SSL.Context],
        by_name: dict[str, int],
        default: int,
        front: SSL.Context,
    ) -> None:
        self._serving = tuple(serving)
        self._by_name = dict(by_name)
        self._default = default
        self._front = front
        install_sni_switch(front, self._choose)

    def _choose(self, connection: SSL.Connection) -> SSL.Context:
        return self.context_for_sni(servername_of(connection))

    def context_for_sni(self, sni: str | None) -> SSL.Context:
        """The serving context for an SNI value (None: no SNI)."""
        if sni is None:
            return self._serving[self._default]
        index = self._by_name.get(normalise_name(sni), self._default)
        return self._serving[index]

    def getContext(self) -> SSL.Context:
        return self._front

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self._front, None)


def build_sni_server_context(
    entries: Sequence[tuple[Sequence[str], str, str]], default_index: int = 0
) -> SNIServerContextFactory:
    """Load every (host names, certificate chain file, key file) entry once.

    The certificate file holds the leaf followed by its intermediates, all of
    which are served. Host names are matched case-insensitively against the
    client's SNI; a name claimed by two entries is an error.

    Raises:
        PemError: a file is unreadable, or a key does not match its certificate.
        ValueError: no entries, a bad `default_index`, or a name in two entries.
    """
    if not entries:
        raise ValueError("no TLS certificate configured for the inbound listener")
    if not 0 <= default_index < len(entries):
        raise ValueError(f"default_index {default_index} out of range")
    session_id = os.urandom(16)
    serving: list[SSL.Context] = []
    by_name: dict[str, int] = {}
    loaded: list[tuple[list[x509.Certificate], PrivateKey]] = []
    for index, (names, cert_path, key_path) in enumerate(entries):
        certs = load_certificates(cert_path)
        key = load_private_key(key_path)
        if not key_matches(certs[0], key):
            raise PemError(f"{key_path}: this key does not belong to the certificate {cert_path}")
        loaded.append((certs, key))
        serving.append(new_server_context(certs[0], certs[1:], key, session_id))
        for raw in names:
            name = normalise_name(raw)
            if by_name.get(name, index) != index:
                raise ValueError(f"host name {name!r} is claimed by two TLS certificates")
            by_name[name] = index
            if not covers(certs[0], name):
                logger.warning(
                    "the certificate %s does not cover the host name %s: "
                    "TLS clients asking for it will refuse it",
                    cert_path,
                    name,
                )
    certs, key = loaded[default_index]
    front = new_server_context(certs[0], certs[1:], key, session_id)
    return SNIServerContextFactory(serving, by_name, default_index, front)
