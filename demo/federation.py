"""Real Synapse homeservers federating through sbg, on loopback.

Starts three homeservers and sbg (the end-to-end topology of tests/e2e):

    hs-ext.test:8448 (trusted)  --TLS-->  sbg inbound 127.0.0.10:8448  --HTTP-->  hs-int :8009
    hs-int.test:8448 (internal) --CONNECT--> sbg proxy 127.0.0.10:3128 --TLS--> hs-ext :8448
    hs-evil.test:8448 (unknown to sbg): refused both ways

hs-int runs the room rules module (`sbg.synapse.RoomRules`, reading sbg's
sbg.yaml, where hs-ext is at the V1 level). The demo plays four scenarios
with readable output: the room layer (the hs-ext user refused in a
restricted room, then invited into an open one), messages both ways, and
the untrusted server refused in both directions. After each one it prints
sbg's audit lines (the gateway layer) and the module's log lines (the room
layer). Then it
leaves everything running until Ctrl-C (or exits at once with --no-wait) and
stops every process it started, by PID.

Run with ``make demo`` (needs root for the per-homeserver hosts files and the
Synapse venv from scripts/install-synapse).
"""

import argparse
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType

from testbed.e2e.border import (
    ModuleLog,
    describe,
    invite_and_join,
    send_concurrently,
    summarise,
    wait_deliveries,
)
from testbed.e2e.harness import (
    HS_EVIL,
    HS_EXT,
    HS_INT,
    SBG_ADDRESS,
    SBG_ADMIN_PORT,
    SBG_INBOUND_PORT,
    SBG_OUTBOUND_PORT,
    Cluster,
    synapse_available,
)
from testbed.e2e.matrix_client import MatrixError

MESSAGES_EACH_WAY = 5


def say(text: str = "") -> None:
    print(text, flush=True)


def heading(text: str) -> None:
    say()
    say(f"=== {text} ===")


def crossings(cluster: Cluster, since: int) -> None:
    """Print what crossed the border since SINCE (an audit log offset)."""
    assert cluster.sbg is not None
    records = cluster.sbg.audit.records(since)
    say(f"--- sbg audit: {len(records)} decision(s) ---")
    say(summarise(records))


def room_rules(log: ModuleLog, since: int) -> None:
    """Print the room rules module's log lines since SINCE (a log offset)."""
    lines = log.lines(since)
    say(f"--- room rules (hs-int's Synapse module): {len(lines)} line(s) ---")
    for line in lines:
        say("  " + line.split(" - ")[-1])


def attempt(what: str, call: Callable[[], object]) -> None:
    try:
        call()
        say(f"{what}: UNEXPECTEDLY ALLOWED")
    except MatrixError as e:
        reason = e.body.get("error") if isinstance(e.body, dict) else e.body
        say(f"{what}: refused, the client sees {e.status} {e.errcode}: {reason}")


def play(cluster: Cluster) -> None:
    """The room layer, then scenarios 1, 2 and 6 of the end-to-end suite, narrated."""
    assert cluster.sbg is not None
    audit = cluster.sbg.audit
    hs_int, hs_ext, hs_evil = cluster[HS_INT.key], cluster[HS_EXT.key], cluster[HS_EVIL.key]
    log = ModuleLog(hs_int.log_path)
    alice = hs_int.register("alice")
    bob = hs_ext.register("bob")
    mallory = hs_evil.register("mallory")
    say(f"users: {alice.user_id} (internal), {bob.user_id} (trusted external, V1), ")
    say(f"       {mallory.user_id} (not in sbg's configuration)")

    heading("1. the room layer: a V1 user and a restricted room")
    mark, log_mark = audit.mark(), log.mark()
    internal = alice.create_room(preset="private_chat", name="internal only")
    say(f"{alice.user_id} created {internal} (no access rule: restricted, internal users only)")
    attempt(f"{alice.user_id} invites {bob.user_id}", lambda: alice.invite(internal, bob.user_id))
    attempt(
        f"{bob.user_id} tries to join it",
        lambda: bob.join(internal, via=[hs_int.server_name]),
    )
    say(f"members: {alice.joined_members(internal)}")
    room_rules(log, log_mark)
    crossings(cluster, mark)

    heading("2. an open room across the border")
    mark, log_mark = audit.mark(), log.mark()
    room = alice.create_room(
        preset="private_chat", name="across the border", access_rule="unrestricted"
    )
    say(f"{alice.user_id} created {room} (unrestricted: open to external users)")
    say(f"and invites {bob.user_id}")
    invite_and_join(alice, bob, room, hs_int.server_name)
    say(f"{bob.user_id} saw the invite and joined; members: {alice.joined_members(room)}")
    acl = alice.state_content(room, "m.room.server_acl") or {}
    say(f"the module keeps the room's server ACL: allow {acl.get('allow')}")
    room_rules(log, log_mark)
    crossings(cluster, mark)

    heading(f"3. messages both ways ({MESSAGES_EACH_WAY} each, sent at the same time)")
    mark = audit.mark()
    from_alice = [f"hello from the inside #{i}" for i in range(MESSAGES_EACH_WAY)]
    from_bob = [f"hello from the outside #{i}" for i in range(MESSAGES_EACH_WAY)]
    send_concurrently(room, [(alice, from_alice), (bob, from_bob)])
    took = wait_deliveries(
        [(bob, room, alice.user_id, from_alice), (alice, room, bob.user_id, from_bob)], 60
    )
    say(f"all delivered in order within {max(took):.1f}s; {bob.user_id} now reads:")
    for sender, body in bob.message_bodies(room):
        say(f"  {sender:28} {body}")
    crossings(cluster, mark)

    heading("4. hs-evil is refused in both directions, by both layers")
    mark, log_mark = audit.mark(), log.mark()
    lobby = alice.create_room(preset="public_chat", public=True, alias_localpart="lobby")
    attempt(
        f"{mallory.user_id} looks up {alice.user_id}'s profile",
        lambda: mallory.get_profile(alice.user_id),
    )
    attempt(
        f"{mallory.user_id} tries to join {lobby}",
        lambda: mallory.join(lobby, via=[hs_int.server_name]),
    )
    attempt(
        f"{alice.user_id} invites {mallory.user_id}", lambda: alice.invite(room, mallory.user_id)
    )
    attempt(
        f"{alice.user_id} looks up {mallory.user_id}'s profile",
        lambda: alice.get_profile(mallory.user_id),
    )
    refusals = [r for r in audit.records(mark) if r.get("decision") != "allow"]
    say(f"--- sbg (the gateway) refused {len(refusals)} request(s): ---")
    for r in refusals:
        say("  " + describe(r))
    room_rules(log, log_mark)


def wait_for_interrupt() -> None:
    """Block until SIGINT or SIGTERM."""
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    while not stop.wait(1.0):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.federation", description=__doc__)
    parser.add_argument("--no-wait", action="store_true", help="exit after the scenarios")
    parser.add_argument("--keep", action="store_true", help="keep the run directory (logs)")
    args = parser.parse_args(argv)

    why = synapse_available()
    if why is not None:
        print(f"demo.federation: cannot run: {why}", file=sys.stderr)
        return 1
    run_dir = tempfile.mkdtemp(prefix="sbg-federation-demo-")
    started = time.monotonic()
    cluster = Cluster(run_dir, behind_sbg=True, homeservers=(HS_INT, HS_EXT, HS_EVIL))
    # A SIGTERM while starting up must still reach the cleanup below.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    failed = False
    try:
        heading("starting sbg and three Synapse homeservers")
        sbg = cluster.write_sbg()
        sbg.start()
        say(
            f"sbg (pid {sbg.process.pid}): inbound {SBG_ADDRESS}:{SBG_INBOUND_PORT} (TLS), "
            f"outbound proxy {SBG_ADDRESS}:{SBG_OUTBOUND_PORT}, "
            f"admin {SBG_ADDRESS}:{SBG_ADMIN_PORT}"
        )
        cluster.start()
        for hs in cluster.homeservers.values():
            say(f"{hs.server_name:18} (pid {hs.process.pid}) client API {hs.client_url}")
        say(f"ready in {time.monotonic() - started:.1f}s; files and logs in {run_dir}")
        play(cluster)
        if not args.no_wait:
            heading("everything keeps running: press Ctrl-C to stop")
            say(f"sbg's log (JSON, audit lines included): {sbg.stdout_path}")
            say(
                f"kill switch: PYTHONPATH=. .venv/bin/python -m sbg.cli kill -c {sbg.config_path} "
                f"--server {cluster[HS_EXT.key].server_name}"
            )
            wait_for_interrupt()
    except (Exception, KeyboardInterrupt) as e:
        failed = not isinstance(e, KeyboardInterrupt)
        if failed:
            print(f"demo.federation: failed: {e}\n{cluster.describe_logs()}", file=sys.stderr)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        codes = cluster.stop()
        say()
        say(f"stopped: {', '.join(f'{k} exit {c}' for k, c in codes.items())}")
        if args.keep or failed:
            say(f"run directory kept: {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
