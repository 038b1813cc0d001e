"""The servers and users the room-rule tables are written with.

Two internal servers, a V1 external server (the default room settings), a
V2 one (private rooms, public rooms, power level 50), one whose level is
never invited, and one unknown to the configuration.
"""

from __future__ import annotations

from sbg.config.model import RoomSettings
from sbg.policy.room_facts import Servers

INT = "int.example"
INT2 = "other-ministry.example:8448"
V1 = "v1.example:8448"
V2 = "v2.example"
NONE = "closed.example"
UNKNOWN = "evil.example"

SERVERS = Servers(
    internal=frozenset({INT, INT2}),
    external={
        V1: RoomSettings(),  # the V1 profile: open_rooms, no public rooms, level 0
        V2: RoomSettings("private_rooms", True, 50),
        NONE: RoomSettings("none", False, 0),
    },
)

# Synapse's default power levels need 100 to change the server ACL.
ACL_EVENTS = {"m.room.server_acl": 100}

ALICE = f"@alice:{INT}"  # internal room administrator
CAROL = f"@carol:{INT2}"  # internal, another internal server
BOB = f"@bob:{V1}"
VIC = f"@vic:{V2}"
NED = f"@ned:{NONE}"
EVE = f"@eve:{UNKNOWN}"
