"""Inbound requests the tests send: a transaction path and a transaction body."""

from __future__ import annotations

from testbed.configtools import PARTNER_SERVER

TXN = b"/_matrix/federation/v1/send/1700000000001"


def txn_body(origin: str = PARTNER_SERVER) -> dict[str, object]:
    return {
        "origin": origin,
        "origin_server_ts": 1700000000000,
        "pdus": [],
        "edus": [
            {
                "edu_type": "m.typing",
                "content": {
                    "room_id": "!r:internal.example",
                    "user_id": f"@bob:{origin}",
                    "typing": True,
                },
            },
        ],
    }
