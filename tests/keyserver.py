"""A stand-in key server (`/_matrix/key/v2/server` over TLS) and its PKI."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from signedjson.key import encode_verify_key_base64, get_verify_key
from signedjson.sign import sign_json
from twisted.internet import reactor
from twisted.internet.interfaces import IListeningPort
from twisted.internet.ssl import PrivateCertificate
from twisted.trial.unittest import TestCase
from twisted.web import resource, server

from testbed.configtools import PARTNER_HOST, PARTNER_SERVER
from testbed.pki import CertFiles, issue_server_cert, make_ca

DAY_MS = 24 * 3600 * 1000


def key_id(signing_key: Any) -> str:
    return f"{signing_key.alg}:{signing_key.version}"


def b64(signing_key: Any) -> str:
    return str(encode_verify_key_base64(get_verify_key(signing_key)))


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class KeyServer:
    """What the stand-in key server answers, and what it saw."""

    server_name: str
    current: list[Any]
    old: dict[str, tuple[str, int]] = field(default_factory=dict)  # id -> (b64, expired_ts)
    valid_until_ms: int = 0
    # Overrides for the refusal tests.
    name_in_response: str | None = None
    signers: list[Any] | None = None  # default: every current key
    padding: int = 0
    streamed: bool = False  # no Content-Length: the body is chunked
    status: int = 200
    headers: dict[bytes, bytes] = field(default_factory=dict)
    # Seen.
    hits: int = 0
    host_headers: list[bytes] = field(default_factory=list)
    snis: list[bytes | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.valid_until_ms:
            self.valid_until_ms = now_ms() + DAY_MS

    def rotate(self, new_key: Any, expired_ts: int) -> None:
        """Switch to NEW_KEY; the current keys move to old_verify_keys."""
        for k in self.current:
            self.old[key_id(k)] = (b64(k), expired_ts)
        self.current = [new_key]

    def body(self) -> bytes:
        obj: dict[str, Any] = {
            "server_name": self.name_in_response or self.server_name,
            "valid_until_ts": self.valid_until_ms,
            "verify_keys": {key_id(k): {"key": b64(k)} for k in self.current},
            "old_verify_keys": {
                kid: {"key": key, "expired_ts": ts} for kid, (key, ts) in self.old.items()
            },
        }
        if self.padding:
            obj["padding"] = "x" * self.padding
        for k in self.current if self.signers is None else self.signers:
            obj = sign_json(obj, self.server_name, k)
        return json.dumps(obj).encode()


class _KeyResource(resource.Resource):
    isLeaf = True

    def __init__(self, state: KeyServer) -> None:
        super().__init__()
        self.state = state

    def render_GET(self, request: Any) -> bytes | int:
        st = self.state
        if request.path != b"/_matrix/key/v2/server":
            request.setResponseCode(404)
            return b"{}"
        st.hits += 1
        st.host_headers.append(request.getHeader(b"host"))
        handle = request.channel.transport.getHandle()
        st.snis.append(handle.get_servername())
        request.setResponseCode(st.status)
        request.setHeader(b"content-type", b"application/json")
        for name, value in st.headers.items():
            request.setHeader(name, value)
        body = st.body()
        if not st.streamed:
            return body
        for i in range(0, len(body), 64 * 1024):
            request.write(body[i : i + 64 * 1024])
        request.finish()
        return server.NOT_DONE_YET


def start_key_server(test: TestCase, state: KeyServer, tls: CertFiles) -> int:
    """Listen with TLS on 127.0.0.1 (port 0); the bound port."""
    with open(tls.certificate, "rb") as f:
        cert = f.read()
    with open(tls.private_key, "rb") as f:
        key = f.read()
    options = PrivateCertificate.loadPEM(cert + key).options()
    site = server.Site(_KeyResource(state))
    site.timeOut = None
    port: IListeningPort = reactor.listenSSL(0, site, options, interface="127.0.0.1")  # type: ignore[attr-defined]
    test.addCleanup(port.stopListening)
    return int(port.getHost().port)  # type: ignore[attr-defined]


@dataclass
class PKI:
    ca: CertFiles
    tls: CertFiles  # matrix.partner.example, partner.example, 127.0.0.1
    other_ca: CertFiles
    other_tls: CertFiles  # the same names, issued by other_ca


def make_pki(directory: str) -> PKI:
    ca = make_ca(os.path.join(directory, "ca"), "Partner test CA")
    other_ca = make_ca(os.path.join(directory, "other"), "Some other CA")
    names = [PARTNER_HOST, PARTNER_SERVER]
    return PKI(
        ca=ca,
        tls=issue_server_cert(ca, directory, "partner", names, ["127.0.0.1"]),
        other_ca=other_ca,
        other_tls=issue_server_cert(other_ca, directory, "other", names, ["127.0.0.1"]),
    )
