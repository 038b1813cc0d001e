"""A byte-level HTTP/1.1 client for tests, run in a thread.

Tests need to send what no well-behaved client sends (raw targets, duplicate
headers, forged framing, odd SNI), over real sockets and real TLS. This
client writes the request bytes exactly as given and reads one response.
`deferToThread` keeps the reactor (which runs sbg in the test) free.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import threads


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    raw_head: bytes = b""
    closed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def json(self) -> Any:
        import json

        return json.loads(self.body)


def build_request(
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes | None = None,
    version: bytes = b"HTTP/1.1",
    content_length: bool = True,
) -> bytes:
    lines = [method + b" " + target + b" " + version]
    for k, v in headers:
        lines.append(k + b": " + v)
    if body is not None and content_length:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


def read_head(sock: socket.socket | ssl.SSLSocket) -> bytes:
    """What the peer sends until its head ends (a blank line) or it closes
    (then possibly less than a head); may include bytes after the head."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf


def _read_response(sock: socket.socket | ssl.SSLSocket, method: bytes) -> RawResponse:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            if not buf:
                return RawResponse(0, [], b"", closed=True)
            break
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = []
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers.append((k.strip(), v.strip()))
    resp = RawResponse(status, headers, b"", raw_head=head)
    length = resp.header(b"content-length")
    chunked = (resp.header(b"transfer-encoding") or b"").lower() == b"chunked"
    if method == b"HEAD" or status in (204, 304) or 100 <= status < 200:
        return resp
    body = bytearray(rest)
    if length is not None:
        n = int(length)
        while len(body) < n:
            chunk = sock.recv(1 << 20)
            if not chunk:
                resp.closed = True
                break
            body += chunk
        resp.body = bytes(body[:n])
    elif chunked:
        resp.body = _read_chunked(sock, bytes(body))
    else:
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            body += chunk
        resp.body = bytes(body)
        resp.closed = True
    return resp


def _read_chunked(sock: socket.socket | ssl.SSLSocket, buf: bytes) -> bytes:
    out = b""
    while True:
        while b"\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                return out
            buf += chunk
        size_line, _, buf = buf.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        while len(buf) < size + 2:
            chunk = sock.recv(65536)
            if not chunk:
                return out + buf[:size]
            buf += chunk
        out += buf[:size]
        buf = buf[size + 2 :]
        if size == 0:
            return out


def exchange_sync(
    host: str,
    port: int,
    requests: list[bytes],
    *,
    tls: bool = False,
    sni: str | None = None,
    ca_file: str | None = None,
    method: bytes = b"GET",
    timeout: float = 10.0,
    check_hostname: bool = True,
) -> list[RawResponse]:
    """Send each request in turn on one connection; read one response each."""
    raw = socket.create_connection((host, port), timeout=timeout)
    sock: socket.socket | ssl.SSLSocket = raw
    try:
        if tls:
            ctx = ssl.create_default_context(cafile=ca_file)
            if sni is None or not check_hostname:
                ctx.check_hostname = False
            sock = ctx.wrap_socket(raw, server_hostname=sni)
        out = []
        for req in requests:
            sock.sendall(req)
            m = req.split(b" ", 1)[0]
            out.append(_read_response(sock, m))
        return out
    finally:
        sock.close()


def exchange(host: str, port: int, request: bytes, **kw: Any) -> Any:
    """Deferred firing with the one RawResponse (the client runs in a thread)."""
    return threads.deferToThread(lambda: exchange_sync(host, port, [request], **kw)[0])


def exchange_many(host: str, port: int, requests: list[bytes], **kw: Any) -> Any:
    return threads.deferToThread(exchange_sync, host, port, requests, **kw)


def tunnel_sync(
    proxy_port: int,
    connect: bytes,
    requests: list[bytes],
    *,
    sni: str | None,
    ca_file: str,
    proxy_headers: list[tuple[bytes, bytes]] | None = None,
    version: bytes = b"HTTP/1.0",
    timeout: float = 10.0,
) -> tuple[RawResponse, list[RawResponse], dict[str, Any]]:
    """CONNECT through the proxy, TLS inside the tunnel, then the requests.

    Returns the proxy's answer to CONNECT, the responses inside the tunnel,
    and facts about the TLS session (the peer certificate, in DER).
    """
    raw = socket.create_connection(("127.0.0.1", proxy_port), timeout=timeout)
    facts: dict[str, Any] = {}
    try:
        head = [b"CONNECT " + connect + b" " + version]
        head += [k + b": " + v for k, v in (proxy_headers or [])]
        raw.sendall(b"\r\n".join(head) + b"\r\n\r\n")
        buf = read_head(raw)
        head_bytes, _, rest = buf.partition(b"\r\n\r\n")
        if not head_bytes:
            return RawResponse(0, [], b"", closed=True), [], facts
        lines = head_bytes.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = [(k.strip(), v.strip()) for k, _, v in (x.partition(b":") for x in lines[1:])]
        answer = RawResponse(status, headers, rest, raw_head=head_bytes)
        if status != 200:
            while True:
                chunk = raw.recv(4096)
                if not chunk:
                    break
                answer.body += chunk
            return answer, [], facts
        ctx = ssl.create_default_context(cafile=ca_file)
        if sni is None:
            ctx.check_hostname = False
        sock = ctx.wrap_socket(raw, server_hostname=sni)
        facts["peer_cert"] = sock.getpeercert(binary_form=True)
        out = []
        for req in requests:
            sock.sendall(req)
            out.append(_read_response(sock, req.split(b" ", 1)[0]))
            if out[-1].closed:
                break
        return answer, out, facts
    finally:
        raw.close()
