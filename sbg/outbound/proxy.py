"""The outbound listener: an HTTP proxy that only speaks CONNECT (contract 7).

A connection starts in "head" mode: sbg reads one proxy request head
(bounded), decides on it (rows 1 and 2 of contract 7) and either refuses it
with a status and closes, or answers `200` and switches the connection into
a TLS server whose certificate is minted for the ClientHello's SNI. The
decrypted stream then feeds an ordinary HTTP/1.1 channel whose requests go
through `OutboundHandler` one by one: every request on a kept-alive tunnel is
checked.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import time

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from sbg.audit import AuditRecord
from sbg.errors import SbgError
from sbg.hosts import HostParseError, parse_connect_target
from sbg.http.site import BorderHTTPFactory
from sbg.metrics import UNKNOWN
from sbg.outbound.handler import OutboundHandler
from sbg.outbound.state import OutboundState, Tunnel, TunnelRefused

logger = logging.getLogger(__name__)

MAX_HEAD = 16 * 1024
_HEAD_END = b"\r\n\r\n"


class _Refusal(Exception):
    def __init__(
        self, status: int, reason: str, code: str, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.code = code
        self.headers = headers


_PHRASES = {
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


def parse_head(head: bytes) -> tuple[bytes, bytes, bytes, dict[bytes, list[bytes]]]:
    """Parse a proxy request head (no body): method, target, version, headers."""
    lines = head.split(b"\r\n")
    if any(b"\n" in line or b"\r" in line for line in lines):
        raise _Refusal(400, "bare CR or LF in proxy request", "malformed_request")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise _Refusal(400, "malformed proxy request line", "malformed_request")
    method, target, version = parts
    if version not in (b"HTTP/1.0", b"HTTP/1.1"):
        raise _Refusal(400, "unsupported HTTP version", "malformed_request")
    headers: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        if not line:
            continue
        if line[:1] in (b" ", b"\t") or b"\n" in line or b"\r" in line:
            raise _Refusal(400, "malformed proxy request header", "malformed_request")
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or any(c < 33 for c in name):
            raise _Refusal(400, "malformed proxy request header", "malformed_request")
        headers.setdefault(name.lower(), []).append(value.strip(b" \t"))
    return method, target, version, headers


class ConnectProtocol(Protocol):
    """One client connection to the outbound listener."""

    def __init__(self, state: OutboundState) -> None:
        self._state = state
        self._buffer = b""
        self._tls: TLSMemoryBIOProtocol | None = None
        self._closed = False
        self.tunnel: Tunnel | None = None
        self._started = time.monotonic()

    # -- head mode ---------------------------------------------------------

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
                self._refuse_raw(431, "proxy request head too large", "malformed_request")
            elif b"\n" in self._buffer and b"\r\n" not in self._buffer:
                self._refuse_raw(400, "bare LF in proxy request", "malformed_request")
            return
        head, rest = self._buffer[:end], self._buffer[end + 4 :]
        self._buffer = b""
        self._on_head(head, rest)

    def _peer(self) -> str:
        peer: IAddress = self.transport.getPeer()  # type: ignore[union-attr]
        return str(getattr(peer, "host", "-"))

    def _refuse_raw(self, status: int, reason: str, code: str) -> None:
        record = AuditRecord(direction="outbound", peer=self._peer(), method="-", path="-")
        self._refuse(record, _Refusal(status, reason, code), b"HTTP/1.1")

    def _on_head(self, head: bytes, rest: bytes) -> None:
        policy = self._state.runtime.policy
        record = AuditRecord(direction="outbound", peer=self._peer(), method="-", path="-")
        version = b"HTTP/1.1"
        try:
            method, target, version, headers = parse_head(head)
            record.method = method.decode("latin-1")[:16]
            if method != b"CONNECT":
                record.path = target.split(b"?", 1)[0][:256].decode("latin-1")
                if target.lower().startswith(b"http://"):
                    raise _Refusal(
                        403, "plain HTTP is not proxied: federation is HTTPS only", "plain_http"
                    )
                raise _Refusal(405, "only CONNECT is supported", "method_not_allowed")
            record.path = target[:300].decode("latin-1")
            self._check_proxy_auth(headers)
            try:
                host, port = parse_connect_target(target.decode("ascii"))
            except (UnicodeDecodeError, HostParseError):
                raise _Refusal(400, "malformed CONNECT target", "malformed_request")
            tunnel = self._state.open_tunnel(policy, host, port)
        except _Refusal as r:
            self._refuse(record, r, version)
            return
        except SbgError as e:
            record.destination = e.destination if isinstance(e, TunnelRefused) else None
            self._refuse(record, _Refusal(e.status, e.reason, e.code), version)
            return
        self.tunnel = tunnel
        record.destination = tunnel.server_name
        record.group = None
        record.decision = "allow"
        record.status = 200
        record.reason = tunnel.describe()
        self._emit(record, tunnel.metric_server)
        self._state.register(self, tunnel)
        self.transport.write(version + b" 200 Connection established\r\n\r\n")  # type: ignore[union-attr]
        self._start_tls(tunnel, rest)

    def _check_proxy_auth(self, headers: dict[bytes, list[bytes]]) -> None:
        auth = self._state.runtime.policy.config.outbound.proxy_auth
        if auth is None:
            return
        challenge = (("Proxy-Authenticate", 'Basic realm="sbg"'),)
        values = headers.get(b"proxy-authorization", [])
        if len(values) != 1:
            raise _Refusal(407, "proxy credentials required", "proxy_auth", challenge)
        scheme, _, encoded = values[0].partition(b" ")
        if scheme.lower() != b"basic":
            raise _Refusal(407, "proxy credentials required", "proxy_auth", challenge)
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise _Refusal(407, "malformed proxy credentials", "proxy_auth", challenge)
        expected = f"{auth.username}:{auth.password or ''}".encode()
        if auth.password is None or not hmac.compare_digest(decoded, expected):
            raise _Refusal(407, "wrong proxy credentials", "proxy_auth", challenge)

    def _refuse(self, record: AuditRecord, r: _Refusal, version: bytes) -> None:
        record.decision = "deny"
        record.status = r.status
        record.reason = r.reason
        record.code = r.code
        self._state.runtime.metrics.refusals.labels("outbound", UNKNOWN, r.code).inc()
        self._emit(record, UNKNOWN)
        phrase = _PHRASES.get(r.status, "Error")
        body = (r.reason + "\n").encode()
        lines = [
            f"HTTP/1.1 {r.status} {phrase}",
            "Content-Type: text/plain; charset=utf-8",
            f"Content-Length: {len(body)}",
            "Connection: close",
        ]
        lines += [f"{k}: {v}" for k, v in r.headers]
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
        handler = OutboundHandler(self._state, tunnel)
        http_factory = BorderHTTPFactory(
            handler, self._state.runtime.reactor, idle_timeout=tunnel.idle_timeout
        )
        tls_factory = TLSMemoryBIOFactory(
            self._state.interception_context(tunnel.fallback_name),
            isClient=False,
            wrappedFactory=http_factory,
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
        if self.tunnel is None or self.tunnel.active_requests == 0:
            self.close()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self._closed = True
        if self._tls is not None:
            self._tls.connectionLost(reason)
        self._state.unregister(self)


class OutboundProxyFactory(Factory):
    noisy = False

    def __init__(self, state: OutboundState) -> None:
        self._state = state

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        p = ConnectProtocol(self._state)
        p.factory = self
        return p
