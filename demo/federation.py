"""Real Synapse homeservers federating through sbg, on loopback.

Starts three homeservers and sbg (the end-to-end topology of tests/e2e):

    hs-ext.test:8448 (trusted)  --TLS-->  sbg inbound 127.0.0.10:8448  --HTTP-->  hs-int :8009
    hs-int.test:8448 (internal) --CONNECT--> sbg proxy 127.0.0.10:3128 --TLS--> hs-ext :8448
    hs-evil.test:8448 (unknown to sbg): refused both ways

then plays three scenarios with readable output: a private room across the
border (invite and join), messages both ways, and the untrusted server refused
in both directions. After each one it summarises sbg's audit lines. Then it
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
from collections.abc import Sequence
from types import FrameType

from testbed.e2e.border import (
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


def play(cluster: Cluster) -> None:
    """Scenarios 1, 2 and 6 of the end-to-end suite, narrated."""
    assert cluster.sbg is not None
    audit = cluster.sbg.audit
    hs_int, hs_ext, hs_evil = cluster[HS_INT.key], cluster[HS_EXT.key], cluster[HS_EVIL.key]
    alice = hs_int.register("alice")
    bob = hs_ext.register("bob")
    mallory = hs_evil.register("mallory")
    say(f"users: {alice.user_id} (internal), {bob.user_id} (trusted external), ")
    say(f"       {mallory.user_id} (not in sbg's configuration)")

    heading("1. a private room across the border")
    mark = audit.mark()
    room = alice.create_room(preset="private_chat", name="across the border")
    say(f"{alice.user_id} created {room} and invites {bob.user_id}")
    invite_and_join(alice, bob, room, hs_int.server_name)
    say(f"{bob.user_id} saw the invite and joined; members: {alice.joined_members(room)}")
    crossings(cluster, mark)

    heading(f"2. messages both ways ({MESSAGES_EACH_WAY} each, sent at the same time)")
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

    heading("6. hs-evil is refused in both directions")
    mark = audit.mark()
    lobby = alice.create_room(preset="public_chat", public=True, alias_localpart="lobby")
    for what, attempt in (
        (
            f"{mallory.user_id} looks up {alice.user_id}'s profile",
            lambda: mallory.get_profile(alice.user_id),
        ),
        (
            f"{mallory.user_id} tries to join {lobby}",
            lambda: mallory.join(lobby, via=[hs_int.server_name]),
        ),
        (f"{alice.user_id} invites {mallory.user_id}", lambda: alice.invite(room, mallory.user_id)),
    ):
        try:
            attempt()
            say(f"{what}: UNEXPECTEDLY ALLOWED")
        except MatrixError as e:
            say(f"{what}: refused, the client sees {e.status} {e.errcode}")
    refusals = [r for r in audit.records(mark) if r.get("decision") != "allow"]
    say(f"--- sbg refused {len(refusals)} request(s): ---")
    for r in refusals:
        say("  " + describe(r))


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
