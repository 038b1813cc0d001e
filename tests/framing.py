"""Framing tests' sides: raw bytes to the inbound listener or inside a tunnel."""

from __future__ import annotations

import json
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

from signedjson.key import generate_signing_key
from twisted.internet import threads

from sbg.matrix.xmatrix import sign_request
from testbed.configtools import (
    DELETE,
    INTERNAL_HOST,
    INTERNAL_SERVER,
    PARTNER_HOST,
    PARTNER_SERVER,
    Material,
)
from tests.asynctest import TestCase
from tests.gateway import Gateway, start_gateway
from tests.rawhttp import read_head
from tests.standin import StandinState, start_standin

TXN = b"/_matrix/federation/v1/send/1700000000008"


ADMIN = b"/_synapse/admin/v1/users"


OUT_CONNECT = PARTNER_HOST.encode() + b":8448"


OUT_HOST = OUT_CONNECT


INTERNAL_KEY = generate_signing_key("int1")


@dataclass
class Reply:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Conversation:
    replies: list[Reply] = field(default_factory=list)
    closed: bool = False
    seconds: float = 0.0

    @property
    def statuses(self) -> list[int]:
        return [r.status for r in self.replies]

    @property
    def final(self) -> list[Reply]:
        return [r for r in self.replies if r.status >= 200]


def _parse_one(buf: bytes, eof: bool) -> tuple[Reply, bytes] | None:
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = buf[:end].split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = [(k.strip(), v.strip()) for k, _, v in (x.partition(b":") for x in lines[1:])]
    rest = buf[end + 4 :]
    length = next((int(v) for k, v in headers if k.lower() == b"content-length"), None)
    if 100 <= status < 200 or status in (204, 304):
        return Reply(status, headers, b""), rest
    if length is not None:
        if len(rest) < length:
            return None
        return Reply(status, headers, rest[:length]), rest[length:]
    if not eof:
        return None
    return Reply(status, headers, rest), b""


def converse_sync(
    sock: ssl.SSLSocket, data: bytes | list[bytes], want: int, timeout: float
) -> Conversation:
    """Send `data` (pieces written in turn), then read until `want` final
    responses arrived, the connection closed, or `timeout` passed."""
    start = time.monotonic()
    conv = Conversation()
    for piece in [data] if isinstance(data, bytes) else data:
        try:
            sock.sendall(piece)
        except OSError:
            conv.closed = True
            break
    buf = b""
    sock.settimeout(0.2)
    while len(conv.final) < want and time.monotonic() - start < timeout and not conv.closed:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            chunk = b""
        if not chunk:
            conv.closed = True
        buf += chunk
        while (parsed := _parse_one(buf, conv.closed)) is not None:
            reply, buf = parsed
            conv.replies.append(reply)
            if not buf:
                break
    conv.seconds = time.monotonic() - start
    return conv


def _inbound_sync(gw: Gateway, data: bytes | list[bytes], want: int, timeout: float) -> Any:
    ctx = ssl.create_default_context(cafile=gw.material.internal_ca.certificate)
    raw = socket.create_connection(("127.0.0.1", gw.ports["inbound"]), timeout=10)
    sock = ctx.wrap_socket(raw, server_hostname=INTERNAL_HOST)
    try:
        return converse_sync(sock, data, want, timeout)
    finally:
        sock.close()


def inbound(gw: Gateway, data: bytes | list[bytes], want: int = 1, timeout: float = 5.0) -> Any:
    return threads.deferToThread(_inbound_sync, gw, data, want, timeout)


def _tunnel_sync(gw: Gateway, data: bytes | list[bytes], want: int, timeout: float) -> Any:
    raw = socket.create_connection(("127.0.0.1", gw.ports["outbound"]), timeout=10)
    raw.sendall(b"CONNECT " + OUT_CONNECT + b" HTTP/1.0\r\n\r\n")
    answer = read_head(raw)
    assert answer.startswith(b"HTTP/1.0 200"), answer
    ctx = ssl.create_default_context(cafile=gw.material.outbound_ca.certificate)
    sock = ctx.wrap_socket(raw, server_hostname=PARTNER_HOST)
    try:
        return converse_sync(sock, data, want, timeout)
    finally:
        sock.close()


def tunnel(gw: Gateway, data: bytes | list[bytes], want: int = 1, timeout: float = 5.0) -> Any:
    return threads.deferToThread(_tunnel_sync, gw, data, want, timeout)


def txn_content(origin: str) -> dict[str, Any]:
    return {"origin": origin, "origin_server_ts": 1, "pdus": [], "edus": []}


def head(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    return (
        method
        + b" "
        + target
        + b" HTTP/1.1\r\n"
        + b"".join(k + b": " + v + b"\r\n" for k, v in headers)
    )


class Side:
    """One side of the border: how to sign and where the upstream records."""

    def __init__(self, gw: Gateway, upstream: StandinState, direction: str) -> None:
        self.gw = gw
        self.upstream = upstream
        self.direction = direction

    def auth_headers(
        self, method: str, target: bytes, content: Any = None
    ) -> list[tuple[bytes, bytes]]:
        if self.direction == "inbound":
            return [
                h
                for h in self.gw.signed_headers(method, target, content)
                if h[0] != b"Content-Type"
            ]
        auth = sign_request(INTERNAL_KEY, method, target, INTERNAL_SERVER, PARTNER_SERVER, content)
        return [(b"Host", OUT_HOST), (b"Authorization", auth)]

    @property
    def host(self) -> bytes:
        return INTERNAL_HOST.encode() if self.direction == "inbound" else OUT_HOST

    def content(self) -> dict[str, Any]:
        return txn_content(PARTNER_SERVER if self.direction == "inbound" else INTERNAL_SERVER)

    def send_txn_head(self, target: bytes = TXN) -> tuple[bytes, bytes]:
        """(head without the blank line, JSON body) of a signed transaction."""
        content = self.content()
        body = json.dumps(content).encode()
        return head(b"PUT", target, self.auth_headers("PUT", target, content)), body

    def good_request(self, target: bytes = TXN) -> bytes:
        h, body = self.send_txn_head(target)
        return h + b"Content-Length: %d\r\n\r\n" % len(body) + body

    def forbidden_request(self) -> bytes:
        """A request the border must never forward (not in the table)."""
        return head(b"GET", ADMIN, [(b"Host", self.host)]) + b"\r\n"

    def converse(self, data: bytes | list[bytes], want: int = 1, timeout: float = 5.0) -> Any:
        if self.direction == "inbound":
            return inbound(self.gw, data, want, timeout)
        return tunnel(self.gw, data, want, timeout)


async def start_outbound(test: TestCase, overrides: dict[str, Any] | None = None) -> Side:
    """sbg with a recording TLS stand-in for partner.example behind `addresses`."""
    holder: dict[str, StandinState] = {}

    def build(m: Material) -> dict[str, Any]:
        state, port = start_standin(tls=(m.partner_tls.certificate, m.partner_tls.private_key))
        test.addCleanup(port.stopListening)
        holder["state"] = state
        target = f"127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]
        out: dict[str, Any] = {
            "external_homeservers[0].addresses": {f"{PARTNER_HOST}:8448": target},
            "outbound.proxy_auth": DELETE,
        }
        out.update(overrides or {})
        return out

    gw = await start_gateway(test, build)
    return Side(gw, holder["state"], "outbound")
