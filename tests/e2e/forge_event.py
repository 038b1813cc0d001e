"""Sign a PDU as a homeserver would (run with Synapse's Python).

`python forge_event.py SIGNING_KEY_FILE SERVER_NAME ROOM_VERSION < event.json`
prints the event with its content hash and signature, and its event id,
as one JSON object `{"event": ..., "event_id": ...}`. The end-to-end tests
use it to play a hostile trusted server that builds a join event itself
instead of asking for a template (`make_join`): Synapse's own signing code,
so the event is exactly what a homeserver would send.
"""

import json
import sys

from signedjson.key import read_signing_keys
from synapse.api.room_versions import KNOWN_ROOM_VERSIONS
from synapse.crypto.event_signing import add_hashes_and_signatures
from synapse.events import make_event_from_dict


def main() -> None:
    key_file, server_name, version = sys.argv[1:4]
    with open(key_file) as f:
        (key,) = read_signing_keys(f)
    room_version = KNOWN_ROOM_VERSIONS[version]
    event = json.load(sys.stdin)
    add_hashes_and_signatures(room_version, event, server_name, key)
    event_id = make_event_from_dict(dict(event), room_version).event_id
    json.dump({"event": event, "event_id": event_id}, sys.stdout)


if __name__ == "__main__":
    main()
