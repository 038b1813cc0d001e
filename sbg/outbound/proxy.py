"""The outbound listener: an HTTP proxy that only speaks CONNECT.

A connection starts in "head" mode: sbg reads one proxy request head
(bounded in size, and in time by `limits.header_timeout`), decides on it
(`sbg.policy.outbound.decide_connect`; `docs/decisions.md`, outbound steps
2-9) and either refuses it with a status
and closes, or answers `200` and switches the connection into a TLS server
whose certificate is minted for the ClientHello's SNI. The decrypted stream
then feeds an ordinary HTTP/1.1 channel whose requests go through
`OutboundHandler` one by one: every request on a kept-alive tunnel is
checked.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from sbg import reasons
from sbg.audit import AuditRecord
from sbg.http.site import BorderHTTPFactory
from sbg.metrics import UNKNOWN
from sbg.outbound.handler import OutboundHandler
from sbg.outbound.state import OutboundState
from sbg.policy.outbound import PROXY_CHALLENGE, ConnectFacts, Tunnel, decide_connect
from sbg.reasons import Refusal
from sbg.tls.failures import ObservedTLSFactory

logger = logging.getLogger(__name__)

MAX_HEAD = 16 * 1024
_HEAD_END = b"\r\n\r\n"
_PHRASES = {
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


def _malformed(detail: str) -> Refusal:
    return Refusal(reasons.MALFORMED_REQUEST, detail)


def parse_head(head: bytes) -> tuple[bytes, bytes, bytes, dict[bytes, list[bytes]]]:
    """Parse a proxy request head (no body): method, target, version, headers."""
    lines = head.split(b"\r\n")
    if any(b"\n" in line or b"\r" in line for line in lines):
        raise _malformed("bare CR or LF in proxy request")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise _malformed("malformed proxy request line")
    method, target, version = parts
    if version not in (b"HTTP/1.0", b"HTTP/1.1"):
        raise _malformed("unsupported HTTP version")
    headers: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        if not line:
            continue
        if line[:1] in (b" ", b"\t") or any((c < 32 and c != 9) or c == 127 for c in line):
            raise _malformed("malformed proxy request header")
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or any(c < 33 for c in name):
            raise _malformed("malformed proxy request header")
        headers.setdefault(name.lower(), []).append(value.strip(b" \t"))
    return method, target, version, headers


class ConnectProtocol(Protocol):
    """One client connection to the outbound listener."""

    def __init__(self, state: OutboundState) -> None:
        self._state = state
        self._buffer = b""
        self._tls: TLSMemoryBIOProtocol | None = None
        self._closed = False
        self._timer: Any = None
        self.tunnel: Tunnel | None = None
        self.active_requests = 0
        self._started = time.monotonic()

    # -- head mode ---------------------------------------------------------

    def connectionMade(self) -> None:
        # The CONNECT head has `header_timeout` to arrive, like any request.
        rt = self._state.runtime
        self._timer = rt.reactor.callLater(rt.policy.config.limits.header_timeout, self._too_slow)

    def _too_slow(self) -> None:
        self._timer = None
        if self._closed or self._tls is not None:
            return
        record = self._record()
        self._deny(record, Refusal(reasons.HEADER_TIMEOUT, "CONNECT head not received in time"))
        self._closed = True
        self.transport.abortConnection()  # type: ignore[union-attr]

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def dataReceived(self, data: bytes) -> None:
        if self._tls is not None:
            self._tls.dataReceived(data)
            return
        if self._closed:
            return
        self._buffer += data
        end = self._buffer.find(_HEAD_END)
        if end < 0:
            if len(self._buffer) > MAX_HEAD:
                self._refuse(self._record(), _malformed("proxy request head too large"), 431)
            elif b"\n" in self._buffer and b"\r\n" not in self._buffer:
                self._refuse(self._record(), _malformed("bare LF in proxy request"))
            return
        head, rest = self._buffer[:end], self._buffer[end + 4 :]
        self._buffer = b""
        self._on_head(head, rest)

    def _peer(self) -> str:
        peer: IAddress = self.transport.getPeer()  # type: ignore[union-attr]
        return str(getattr(peer, "host", "-"))

    def _record(self) -> AuditRecord:
        return AuditRecord(direction="outbound", peer=self._peer(), method="-", path="-")

    def _on_head(self, head: bytes, rest: bytes) -> None:
        self._cancel_timer()
        rt = self._state.runtime
        record = self._record()
        version = b"HTTP/1.1"
        try:
            method, target, version, headers = parse_head(head)
        except Refusal as refusal:
            self._refuse(record, refusal)
            return
        record.method = method.decode("latin-1")[:16]
        if method == b"CONNECT":
            record.path = target[:300].decode("latin-1")
        else:
            record.path = target.split(b"?", 1)[0][:256].decode("latin-1")
        facts = ConnectFacts(
            method=method,
            target=target,
            proxy_authorization=headers.get(b"proxy-authorization", []),
            open_tunnels=self._state.open_tunnels,
            has_ca=self._state.has_ca,
        )
        out = decide_connect(rt.policy, facts, lambda s: rt.killswitch.is_killed(s, "outbound"))
        if out.tunnel is not None:
            record.destination = out.tunnel.server_name
        if out.refusal is not None:
            self._refuse(record, out.refusal, version=version)
            return
        tunnel = out.tunnel
        assert tunnel is not None
        self.tunnel = tunnel
        record.decision = "allow"
        record.status = 200
        record.reason = tunnel.describe()
        self._emit(record, tunnel.server_name or UNKNOWN)
        self._state.register(self)
        self.transport.write(version + b" 200 Connection established\r\n\r\n")  # type: ignore[union-attr]
        self._start_tls(tunnel, rest)

    def _deny(self, record: AuditRecord, refusal: Refusal, status: int | None = None) -> int:
        record.decision = "deny"
        record.status = status or refusal.answer("outbound")[0]
        record.reason = refusal.reason
        record.code = refusal.code
        self._state.runtime.metrics.refusals.labels("outbound", UNKNOWN, refusal.code).inc()
        self._emit(record, UNKNOWN)
        return record.status

    def _refuse(
        self,
        record: AuditRecord,
        refusal: Refusal,
        status: int | None = None,
        version: bytes = b"HTTP/1.1",
    ) -> None:
        self._cancel_timer()
        code = self._deny(record, refusal, status)
        phrase = _PHRASES.get(code, "Error")
        body = (refusal.reason + "\n").encode()
        lines = [
            f"HTTP/1.1 {code} {phrase}",
            "Content-Type: text/plain; charset=utf-8",
            f"Content-Length: {len(body)}",
            "Connection: close",
        ]
        if refusal.kind is reasons.PROXY_AUTH:
            lines += [f"{k}: {v}" for k, v in PROXY_CHALLENGE]
        out = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
        self._closed = True
        self.transport.write(out)  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]

    def _emit(self, record: AuditRecord, server: str) -> None:
        record.duration_ms = (time.monotonic() - self._started) * 1000.0
        m = self._state.runtime.metrics
        m.count_request("outbound", server, UNKNOWN, record.decision)
        self._state.runtime.audit.emit(record)

    # -- tunnel mode -------------------------------------------------------

    def _start_tls(self, tunnel: Tunnel, rest: bytes) -> None:
        rt = self._state.runtime
        handler = OutboundHandler(self._state, self)
        http_factory = BorderHTTPFactory(
            handler, rt.reactor, idle_timeout=rt.policy.config.outbound.idle_timeout
        )
        tls_factory = ObservedTLSFactory(
            # Without SNI (an IP literal), the certificate is for the target.
            self._state.interception_context(tunnel.connect_host),
            False,
            http_factory,
            listener="outbound_client",
            failures=rt.tls_failures,
        )
        tls = tls_factory.buildProtocol(self.transport.getPeer())  # type: ignore[union-attr]
        assert isinstance(tls, TLSMemoryBIOProtocol)
        self._tls = tls
        tls.makeConnection(self.transport)
        if rest:
            tls.dataReceived(rest)

    def close(self) -> None:
        """Cut the tunnel (kill switch, shutdown)."""
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def close_if_idle(self) -> None:
        if self.tunnel is None or self.active_requests == 0:
            self.close()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self._closed = True
        self._cancel_timer()
        if self._tls is not None:
            self._tls.connectionLost(reason)
        self._state.unregister(self)


class OutboundProxyFactory(Factory):
    """Builds a `ConnectProtocol` per connection to the outbound listener."""

    noisy = False

    def __init__(self, state: OutboundState) -> None:
        self._state = state

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        p = ConnectProtocol(self._state)
        p.factory = self
        return p
