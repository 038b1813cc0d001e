"""TLS handshakes that fail, made visible: one WARNING line and a counter.

Every TLS connection sbg accepts or makes goes through `ObservedTLSFactory`
(a `TLSMemoryBIOFactory`): when the connection ends before its handshake
completed, the failure is classified (`classify`) into a short code from
`REASONS`, logged once through the `sbg.tls` logger at WARNING (fields
`listener`, `peer`, `sni`, `reason`) and counted in
`sbg_tls_handshake_failures_total{listener,reason}`.

Not a failure: a connection closed before it sent a byte (a TCP health
check, a port probe). A connection that sbg itself closes before the
handshake completed was closed by its idle timeout: `timeout`.

On the client side (sbg connecting out), the certificate check of
`sbg.tls.client` notes why it refused a certificate (`note_for`), since
OpenSSL itself only says "certificate verify failed".
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

logger = logging.getLogger("sbg.tls")

# Where a handshake failed: the inbound listener; the TLS inside an outbound
# tunnel (sbg serving an internal homeserver); sbg's connection to an
# external server (forwarding, key fetches); sbg's connection to an
# internal homeserver's `https://` upstream.
LISTENERS = ("inbound", "outbound_client", "outbound_upstream", "inbound_upstream")

# reason -> what it means, for the log line (and the documentation).
REASONS: dict[str, str] = {
    "unknown_ca": "the certificate is not signed by a CA the verifying side trusts",
    "bad_certificate": "the certificate was refused (by an OpenSSL client: often a name it "
    "does not cover)",
    "certificate_expired": "the certificate has expired (or is not yet valid)",
    "certificate_unknown": "the certificate was refused for an unspecified reason (Java "
    "clients: often an untrusted CA)",
    "name_mismatch": "the certificate does not name the host sbg connected to",
    "no_shared_cipher": "no protocol parameters both sides accept (cipher suites, groups, "
    "signature algorithms)",
    "protocol_version": "no TLS version both sides accept (sbg needs TLS 1.2 or newer)",
    "not_tls": "the peer does not speak TLS (plain HTTP, or another protocol)",
    "closed": "the peer closed the connection during the handshake, without an alert",
    "timeout": "the handshake did not complete within the idle timeout",
    "other": "another TLS error",
}

# Substrings of OpenSSL's reason strings, in order, and their code.
_OPENSSL_REASONS: tuple[tuple[str, str], ...] = (
    ("alert unknown ca", "unknown_ca"),
    ("alert bad certificate", "bad_certificate"),
    ("alert unsupported certificate", "bad_certificate"),
    ("alert certificate revoked", "bad_certificate"),
    ("alert certificate expired", "certificate_expired"),
    ("alert certificate unknown", "certificate_unknown"),
    ("alert protocol version", "protocol_version"),
    ("unsupported protocol", "protocol_version"),
    ("version too low", "protocol_version"),
    ("no protocols available", "protocol_version"),
    ("no shared cipher", "no_shared_cipher"),
    ("no cipher match", "no_shared_cipher"),
    ("no shared signature algorithms", "no_shared_cipher"),
    ("no suitable signature algorithm", "no_shared_cipher"),
    ("alert handshake failure", "no_shared_cipher"),
    ("alert insufficient security", "no_shared_cipher"),
    ("http request", "not_tls"),
    ("https proxy request", "not_tls"),
    ("wrong version number", "not_tls"),
    ("unknown protocol", "not_tls"),
    ("packet length too long", "not_tls"),
    ("record layer failure", "not_tls"),
    ("unexpected eof", "closed"),
)

# X509 verification errors (sbg's own check of a server's certificate).
_X509_EXPIRED = frozenset({9, 10})  # not yet valid, expired
_X509_UNKNOWN_CA = frozenset({2, 18, 19, 20, 21})
_X509_TEXT = {
    2: "unable to get issuer certificate",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in the chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
}


class HandshakeNote:
    """Why sbg's certificate check refused a server's certificate
    (`sbg.tls.client`), kept for its OpenSSL connection by `note_for`."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.detail = ""

    def refused_by_verify_error(self, errno: int, depth: int) -> None:
        """The chain did not verify: OpenSSL's X509 error `errno`."""
        if errno in _X509_EXPIRED:
            self.reason = "certificate_expired"
        elif errno in _X509_UNKNOWN_CA:
            self.reason = "unknown_ca"
        else:
            self.reason = "bad_certificate"
        text = _X509_TEXT.get(errno, "verification error")
        self.detail = f"X509 error {errno} at depth {depth}: {text}"

    def refused_for_name(self, detail: str) -> None:
        self.reason = "name_mismatch"
        self.detail = detail[:200]


# The notes of the connections whose certificate check refused something,
# for as long as the OpenSSL connection lives.
_NOTES: weakref.WeakKeyDictionary[SSL.Connection, HandshakeNote] = weakref.WeakKeyDictionary()


def note_for(conn: SSL.Connection) -> HandshakeNote:
    """The note of `conn` (made on first use)."""
    note = _NOTES.get(conn)
    if note is None:
        note = _NOTES[conn] = HandshakeNote()
    return note


def _openssl_reasons(error: SSL.Error) -> list[str]:
    reasons = []
    for item in error.args[0] if error.args and isinstance(error.args[0], list) else []:
        if isinstance(item, tuple) and item:
            reasons.append(str(item[-1]).lower())
    return reasons


def classify(failure: BaseException | None, note: HandshakeNote | None = None) -> str:
    """The code (a key of `REASONS`) of a handshake that ended with `failure`
    (None, or anything not from OpenSSL: the peer closed the connection)."""
    if note is not None and note.reason is not None:
        return note.reason
    if isinstance(failure, SSL.SysCallError):
        return "closed"
    if not isinstance(failure, SSL.Error):
        return "closed"
    reasons = _openssl_reasons(failure)
    for text in reasons:
        for fragment, code in _OPENSSL_REASONS:
            if fragment in text:
                return code
    return "other"


def _describe(failure: BaseException | None) -> str:
    if isinstance(failure, SSL.Error):
        reasons = _openssl_reasons(failure)
        if reasons:
            return "; ".join(dict.fromkeys(reasons))
    return ""


class HandshakeFailures:
    """Logs and counts failed handshakes.

    Args:
        count: called with (listener, reason) for each failure (the metric).
    """

    def __init__(self, count: Callable[[str, str], None]) -> None:
        self._count = count

    def report(
        self, listener: str, peer: str, sni: str | None, reason: str, detail: str = ""
    ) -> None:
        """One WARNING line and one count."""
        self._count(listener, reason)
        fields = {"listener": listener, "peer": peer, "sni": sni, "reason": reason}
        text = (
            f"TLS handshake failed: listener={listener} peer={peer} "
            f"sni={sni!r} reason={reason}: {REASONS.get(reason, '')}"
        )
        if detail:
            text += f" ({detail})"
        logger.warning("%s", text, extra={"sbg_fields": fields})


# The protocol class the installed Twisted's factory uses (Twisted 22.4:
# `TLSMemoryBIOProtocol`; later ones a buffering subclass of it).
_TLSProtocol: type[TLSMemoryBIOProtocol] = TLSMemoryBIOFactory.protocol


class _ObservedTLSProtocol(_TLSProtocol):  # type: ignore[misc,valid-type]
    """A TLS connection that reports a handshake it did not complete.

    Reads two attributes of Twisted's `TLSMemoryBIOProtocol` that every
    version since 11 has: `_handshakeDone` and `_reason` (the TLS error that
    ended the connection)."""

    factory: ObservedTLSFactory
    _sbg_received = False
    _sbg_closed_here = False
    _sbg_reported = False

    def dataReceived(self, data: bytes) -> None:
        self._sbg_received = True
        super().dataReceived(data)

    def loseConnection(self) -> None:
        self._sbg_closed_here = True
        super().loseConnection()

    def abortConnection(self) -> None:
        self._sbg_closed_here = True
        super().abortConnection()

    def connectionLost(self, reason: Failure) -> None:
        if not getattr(self, "_handshakeDone", True) and not self._sbg_reported:
            self._sbg_reported = True
            try:
                self._report(reason)
            except Exception:
                logger.exception("reporting a TLS handshake failure failed")
        super().connectionLost(reason)

    def _report(self, reason: Failure) -> None:
        ended: Failure | None = getattr(self, "_reason", None) or reason
        error = ended.value if ended is not None else None
        conn = self.getHandle()
        note = _NOTES.get(conn) if isinstance(conn, SSL.Connection) else None
        if isinstance(error, SSL.Error) or (note is not None and note.reason):
            code = classify(error, note)
            detail = note.detail if note is not None and note.reason else _describe(error)
        elif self._sbg_closed_here:
            code, detail = "timeout", ""
        elif self._sbg_received:
            code, detail = "closed", ""
        else:
            return  # nothing received: not a TLS attempt
        self.factory.report(self, code, detail)


class ObservedTLSFactory(TLSMemoryBIOFactory):
    """`TLSMemoryBIOFactory` whose failed handshakes are logged and counted.

    Args:
        listener: the `listener` label (one of `LISTENERS`).
        failures: where failures go.
        sni: the SNI to report for client connections (their own is not
            known to OpenSSL after a failure); None on the server side.
    """

    protocol = _ObservedTLSProtocol

    def __init__(
        self,
        contextFactory: Any,
        isClient: bool,
        wrappedFactory: IProtocolFactory,
        *,
        listener: str,
        failures: HandshakeFailures | None,
        sni: str | None = None,
    ) -> None:
        super().__init__(contextFactory, isClient, wrappedFactory)
        self._is_client = isClient
        self._listener = listener
        self._failures = failures
        self._sni = sni

    def report(self, protocol: TLSMemoryBIOProtocol, code: str, detail: str) -> None:
        if self._failures is None:
            return
        transport = protocol.transport
        peer = getattr(transport.getPeer(), "host", "-") if transport is not None else "-"
        sni = self._sni
        if sni is None and not self._is_client:
            conn = protocol.getHandle()
            raw = conn.get_servername() if isinstance(conn, SSL.Connection) else None
            sni = raw.decode("ascii", "replace")[:255] if raw else None
        self._failures.report(self._listener, str(peer), sni, code, detail)


@implementer(IStreamClientEndpoint)
class ObservedClientTLSEndpoint:
    """`wrapClientTLS(creator, endpoint)` with failed handshakes reported."""

    def __init__(
        self,
        creator: Any,
        endpoint: IStreamClientEndpoint,
        *,
        listener: str,
        failures: HandshakeFailures | None,
        sni: str | None,
    ) -> None:
        self._creator = creator
        self._endpoint = endpoint
        self._listener = listener
        self._failures = failures
        self._sni = sni

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[Any]:
        factory = ObservedTLSFactory(
            self._creator,
            True,
            protocolFactory,
            listener=self._listener,
            failures=self._failures,
            sni=self._sni,
        )
        d: defer.Deferred[Any] = self._endpoint.connect(factory)
        return d.addCallback(_wrapped_protocol)


def _wrapped_protocol(protocol: Any) -> Any:
    return protocol.wrappedProtocol
