"""Outbound set-up for the tests: a gateway, a TLS stand-in partner, signed requests, tunnels."""

from __future__ import annotations

import json
import socket
import ssl
from typing import Any

from signedjson.key import generate_signing_key
from twisted.internet import threads

from sbg.matrix.xmatrix import sign_request
from testbed.configtools import (
    DELETE,
    INTERNAL_SERVER,
    PARTNER_HOST,
    PARTNER_SERVER,
    Material,
)
from tests.asynctest import TestCase
from tests.gateway import Gateway, start_gateway
from tests.rawhttp import RawResponse, _read_response, build_request
from tests.standin import StandinState, start_standin

TXN = b"/_matrix/federation/v1/send/1700000000002"


CONNECT = PARTNER_HOST.encode() + b":8448"


HOST = PARTNER_HOST.encode() + b":8448"


INTERNAL_KEY = generate_signing_key("int1")


def signed(
    method: str,
    target: bytes,
    content: Any = None,
    *,
    origin: str = INTERNAL_SERVER,
    destination: str | None = PARTNER_SERVER,
    host: bytes = HOST,
) -> bytes:
    auth = sign_request(INTERNAL_KEY, method, target, origin, destination or "x", content)
    if destination is None:
        auth = b",".join(p for p in auth.split(b",") if not p.startswith(b"destination="))
    headers = [(b"Host", host), (b"Authorization", auth), (b"User-Agent", b"Synapse/1.163.2")]
    body = json.dumps(content).encode() if content is not None else None
    return build_request(method.encode(), target, headers, body)


def txn() -> dict[str, Any]:
    return {"origin": INTERNAL_SERVER, "origin_server_ts": 1, "pdus": [], "edus": []}


async def start(
    test: TestCase,
    overrides: dict[str, Any] | None = None,
    *,
    upstream: StandinState | None = None,
    tls_ca: str = "partner",
) -> tuple[Gateway, StandinState]:
    """sbg with a TLS stand-in for partner.example behind `addresses`."""
    holder: dict[str, Any] = {}

    def build(m: Material) -> dict[str, Any]:
        state, port = start_standin(
            upstream, tls=(m.partner_tls.certificate, m.partner_tls.private_key)
        )
        test.addCleanup(port.stopListening)
        holder["state"] = state
        target = f"127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]
        out: dict[str, Any] = {
            "external_homeservers[0].addresses": {
                f"{PARTNER_HOST}:8448": target,
                f"{PARTNER_SERVER}:443": target,
            },
            "outbound.proxy_auth": DELETE,
        }
        if tls_ca == "internal":
            out["external_homeservers[0].tls_ca"] = m.internal_ca.certificate
        out.update(overrides or {})
        return out

    gw = await start_gateway(test, build)
    return gw, holder["state"]


def assert_nothing_sent(test: TestCase, state: StandinState) -> None:
    test.assertEqual(state.requests, [], "a refused request reached the destination")


async def open_tunnel(test: TestCase, gw: Gateway) -> ssl.SSLSocket:
    """A kept-alive tunnel to partner.example with one request answered."""

    def run() -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", gw.ports["outbound"]), timeout=10)
        raw.sendall(b"CONNECT " + CONNECT + b" HTTP/1.1\r\nHost: " + CONNECT + b"\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = raw.recv(1)
            if not chunk:
                raise AssertionError("CONNECT refused: " + head.decode())
            head += chunk
        assert head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")), head
        ctx = ssl.create_default_context(cafile=gw.material.outbound_ca.certificate)
        sock = ctx.wrap_socket(raw, server_hostname=PARTNER_HOST)
        resp = send_on(sock, signed("PUT", TXN + b"a", txn()))
        assert resp.status == 200, resp
        return sock

    sock = await threads.deferToThread(run)
    test.addCleanup(sock.close)
    return sock


def send_on(sock: ssl.SSLSocket, request: bytes) -> RawResponse:
    sock.sendall(request)
    return _read_response(sock, request.split(b" ", 1)[0])
