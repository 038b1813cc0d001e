"""Signed federation requests, generated once and replayed by the load generators.

A request file holds raw HTTP/1.1 requests, each preceded by its length in
bytes on a line of its own (read by `replay.lua` and `loadclient.py`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from canonicaljson import encode_canonical_json

from sbg.matrix.xmatrix import sign_request

TXN_PATH = "/_matrix/federation/v1/send/"
MEDIA_PATH = "/_matrix/federation/v1/media/download/"


def _b64ish(seed: str, n: int = 43) -> str:
    digest = hashlib.sha256(seed.encode()).hexdigest()
    return (digest * 2)[:n]


def pdu(origin: str, room: str, index: int, text_size: int) -> dict[str, Any]:
    """A realistic-looking `m.room.message` PDU sent by a user of ORIGIN."""
    return {
        "auth_events": [f"${_b64ish(f'auth{index}{k}')}" for k in range(3)],
        "content": {
            "body": ("lorem ipsum " * (text_size // 12 + 1))[:text_size],
            "msgtype": "m.text",
        },
        "depth": 1000 + index,
        "hashes": {"sha256": _b64ish(f"hash{index}")},
        "origin": origin,
        "origin_server_ts": 1700000000000 + index,
        "prev_events": [f"${_b64ish(f'prev{index}')}"],
        "room_id": room,
        "sender": f"@alice:{origin}",
        "signatures": {origin: {"ed25519:a_bench": _b64ish(f"sig{index}", 86)}},
        "type": "m.room.message",
        "unsigned": {"age_ts": 1700000000000 + index},
    }


def transaction(
    origin: str, destination: str, body_size: int, pdus: int, seq: int
) -> dict[str, Any]:
    """A `/send` transaction body of about BODY_SIZE bytes with PDUS PDUs."""
    room = f"!bench:{destination}"
    base = {"origin": origin, "origin_server_ts": 1700000000000 + seq, "pdus": [], "edus": []}
    overhead = len(json.dumps(base)) + len(json.dumps(pdu(origin, room, 0, 0)) + ", ") * pdus
    text = max(0, (body_size - overhead) // pdus)
    base["pdus"] = [pdu(origin, room, seq * pdus + i, text) for i in range(pdus)]
    return base


def http_request(method: str, target: str, host: str, auth: bytes, body: bytes | None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1".encode(), b"Host: " + host.encode()]
    lines.append(b"Authorization: " + auth)
    if body is not None:
        lines.append(b"Content-Type: application/json")
        lines.append(b"Content-Length: " + str(len(body)).encode())
    lines.append(b"User-Agent: sbg-bench")
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


def send_requests(
    key: Any,
    origin: str,
    destination: str,
    host: str,
    body_size: int,
    pdus: int,
    count: int,
    tag: str,
) -> list[bytes]:
    """COUNT distinct signed `PUT /send/{txnId}` requests."""
    out = []
    for seq in range(count):
        content = transaction(origin, destination, body_size, pdus, seq)
        target = f"{TXN_PATH}bench{tag}{seq:06d}"
        # As Synapse sends it: canonical JSON (sorted keys, no spaces, UTF-8).
        body = encode_canonical_json(content)
        auth = sign_request(key, "PUT", target, origin, destination, content)
        out.append(http_request("PUT", target, host, auth, body))
    return out


def media_request(key: Any, origin: str, destination: str, host: str, media_id: str) -> bytes:
    """A signed `GET /media/download/{mediaId}`."""
    target = MEDIA_PATH + media_id
    auth = sign_request(key, "GET", target, origin, destination, None)
    return http_request("GET", target, host, auth, None)


def write_requests(path: str, requests: list[bytes]) -> str:
    with open(path, "wb") as f:
        for raw in requests:
            f.write(str(len(raw)).encode() + b"\n" + raw)
    return path


def read_requests(path: str) -> list[bytes]:
    out = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        nl = data.index(b"\n", pos)
        n = int(data[pos:nl])
        out.append(data[nl + 1 : nl + 1 + n])
        pos = nl + 1 + n
    return out
