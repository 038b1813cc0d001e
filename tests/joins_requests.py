"""Join requests for the tests: a member event, the make_join and send_join
targets, for a partner's user joining an internal room."""

from __future__ import annotations

import urllib.parse
from typing import Any

from testbed.configtools import PARTNER_SERVER

ROOM = "!room:internal.example"
BOB = f"@bob:{PARTNER_SERVER}"


def member_event(sender: str = BOB, room: str = ROOM) -> dict[str, Any]:
    return {
        "type": "m.room.member",
        "room_id": room,
        "sender": sender,
        "state_key": sender,
        "content": {"membership": "join"},
        "origin_server_ts": 1700000000000,
    }


def make_join_target(room: str = ROOM, user: str = BOB) -> bytes:
    q = urllib.parse.quote
    return f"/_matrix/federation/v1/make_join/{q(room, safe='')}/{q(user, safe='')}?ver=12".encode()


def send_join_target(room: str = ROOM) -> bytes:
    q = urllib.parse.quote
    return f"/_matrix/federation/v2/send_join/{q(room, safe='')}/%24event".encode()
