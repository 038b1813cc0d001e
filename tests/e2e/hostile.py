"""Playing a hostile trusted server: federation requests built by hand.

`forge_join` builds a join event the way a homeserver signs one (with
Synapse's own code, `forge_event.py`, run by Synapse's Python) but without
asking the room's server for a template first; `send_signed` sends a
federation request signed with a homeserver's key to sbg's inbound
listener, as that homeserver would.
"""

import http.client
import json
import os
import socket
import ssl
import subprocess
import time
import urllib.parse
from typing import Any

from signedjson.key import read_signing_keys
from signedjson.sign import sign_json

from testbed.e2e.harness import SBG_ADDRESS, SBG_INBOUND_PORT, SYNAPSE_VENV, Homeserver
from testbed.e2e.processes import clean_environment

FORGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "forge_event.py")


def forge_join(
    origin: Homeserver,
    user_id: str,
    room_id: str,
    room_version: str,
    prev_events: list[str],
    auth_events: list[str],
) -> tuple[dict[str, Any], str]:
    """A join event for USER_ID signed by ORIGIN's key: (event, event id)."""
    event = {
        "type": "m.room.member",
        "room_id": room_id,
        "sender": user_id,
        "state_key": user_id,
        "content": {"membership": "join"},
        "origin_server_ts": int(time.time() * 1000),
        "depth": 1000,
        "prev_events": prev_events,
        "auth_events": auth_events,
    }
    done = subprocess.run(
        [
            os.path.join(SYNAPSE_VENV, "bin", "python"),
            FORGE,
            origin.signing_key.path,
            origin.server_name,
            room_version,
        ],
        input=json.dumps(event),
        capture_output=True,
        text=True,
        env=clean_environment(),
        timeout=60,
        check=True,
    )
    answer = json.loads(done.stdout)
    return answer["event"], answer["event_id"]


def send_signed(
    origin: Homeserver,
    destination: str,
    host: str,
    ca_file: str,
    method: str,
    path: str,
    content: Any,
) -> tuple[int, Any]:
    """METHOD PATH with CONTENT, signed by ORIGIN for DESTINATION, to sbg's
    inbound listener (TLS for HOST, verified against CA_FILE)."""
    with open(origin.signing_key.path) as f:
        (key,) = read_signing_keys(f)
    request = {
        "method": method,
        "uri": path,
        "origin": origin.server_name,
        "destination": destination,
        "content": content,
    }
    signed = sign_json(request, origin.server_name, key)
    sig = signed["signatures"][origin.server_name][f"ed25519:{key.version}"]
    auth = (
        f'X-Matrix origin="{origin.server_name}",destination="{destination}",'
        f'key="ed25519:{key.version}",sig="{sig}"'
    )
    body = json.dumps(content, separators=(",", ":"), sort_keys=True).encode()
    context = ssl.create_default_context(cafile=ca_file)
    conn = http.client.HTTPConnection(SBG_ADDRESS, SBG_INBOUND_PORT, timeout=30)
    conn.sock = context.wrap_socket(
        socket.create_connection((SBG_ADDRESS, SBG_INBOUND_PORT), 30), server_hostname=host
    )
    try:
        conn.request(
            method,
            path,
            body=body,
            headers={
                "Host": destination,
                "Authorization": auth,
                "Content-Type": "application/json",
            },
        )
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        return resp.status, raw.decode("utf-8", "replace")


def send_join_path(room_id: str, event_id: str) -> str:
    q = urllib.parse.quote
    return f"/_matrix/federation/v2/send_join/{q(room_id, safe='')}/{q(event_id, safe='')}"
