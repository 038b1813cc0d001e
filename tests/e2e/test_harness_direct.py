"""Phase-1 proof of the harness: hs-int and hs-ext federate directly over TLS (no sbg)."""

import json
import os
import socket
import ssl
import threading
import time
import urllib.request

from twisted.trial.unittest import TestCase

from testbed.e2e.harness import (
    HS_EVIL,
    HS_EXT,
    HS_INT,
    SBG_ADDRESS,
    SBG_OUTBOUND_PORT,
    Cluster,
    require_synapse,
    start_cluster,
)
from testbed.e2e.matrix_client import MatrixClient, MatrixError, wait_until
from testbed.e2e.processes import ProcessError


class DirectFederationTests(TestCase):
    """Two real Synapse homeservers, each with its own hosts file and test CA."""

    timeout = 300

    def test_invite_join_and_messages_both_ways(self) -> None:
        cluster = start_cluster(self, homeservers=(HS_INT, HS_EXT))
        hs_int, hs_ext = cluster[HS_INT.key], cluster[HS_EXT.key]
        started = time.monotonic()
        with cluster.logs_on_failure():
            alice = hs_int.register("alice")
            bob = hs_ext.register("bob")
            self.assertEqual(alice.user_id, "@alice:hs-int.test:8448")
            self.assertEqual(bob.user_id, "@bob:hs-ext.test:8448")
            bob.sync()  # start bob's sync stream before the invite

            room_id = alice.create_room(preset="private_chat", name="border test")
            alice.invite(room_id, bob.user_id)
            invite_state = bob.wait_for_invite(room_id, timeout=30)
            inviter_events = [e for e in invite_state["events"] if e["type"] == "m.room.member"]
            self.assertIn(alice.user_id, [e["state_key"] for e in inviter_events])

            self.assertEqual(bob.join(room_id, via=[hs_int.server_name]), room_id)
            alice.wait_for_members(room_id, [alice.user_id, bob.user_id], timeout=30)

            from_alice = [f"alice {i}" for i in range(3)]
            from_bob = [f"bob {i}" for i in range(3)]
            for body in from_alice:
                alice.send_message(room_id, body)
            bob_view = bob.wait_for_bodies(room_id, from_alice, timeout=30)
            for body in from_bob:
                bob.send_message(room_id, body)
            alice_view = alice.wait_for_bodies(room_id, from_alice + from_bob, timeout=30)
            bob_view = bob.wait_for_bodies(room_id, from_alice + from_bob, timeout=30)

        expected = [(alice.user_id, b) for b in from_alice] + [(bob.user_id, b) for b in from_bob]
        self.assertEqual(alice_view, expected)
        self.assertEqual(bob_view, expected)
        print(
            f"[e2e] scenario (register, invite, join, 6 messages both ways) "
            f"took {time.monotonic() - started:.1f}s"
        )

    def test_client_calls_over_direct_federation(self) -> None:
        """Every MatrixClient call the scenarios use works across direct federation."""
        cluster = start_cluster(self, homeservers=(HS_INT, HS_EXT))
        hs_int, hs_ext = cluster[HS_INT.key], cluster[HS_EXT.key]
        started = time.monotonic()
        with cluster.logs_on_failure():
            alice = hs_int.register("alice", password="alice-pw")
            bob = hs_ext.register("bob")
            self.assertEqual(
                MatrixClient.login(hs_int.client_url, "alice", "alice-pw").user_id, alice.user_id
            )
            # Profile across the border.
            alice.set_displayname("Alice Internal")
            self.assertEqual(bob.get_profile(alice.user_id)["displayname"], "Alice Internal")

            # A public room with an alias, found and joined from hs-ext by alias.
            room_id = alice.create_room(preset="public_chat", alias_localpart="lobby", public=True)
            alias = f"#lobby:{hs_int.server_name}"
            self.assertEqual(bob.resolve_alias(alias)["room_id"], room_id)
            listed = bob.public_rooms(server=hs_int.server_name)["chunk"]
            self.assertIn(room_id, [r["room_id"] for r in listed])
            self.assertEqual(bob.join(alias), room_id)
            alice.wait_for_members(room_id, [alice.user_id, bob.user_id])

            # Device keys and one-time keys across the border.
            device_keys, otks = bob.make_device_keys(one_time_keys=2)
            counts = bob.upload_keys(device_keys, otks)["one_time_key_counts"]
            self.assertEqual(counts["signed_curve25519"], 2)
            queried = alice.query_keys([bob.user_id])
            self.assertEqual(queried["failures"], {})
            self.assertEqual(queried["device_keys"][bob.user_id][bob.device_id], device_keys)
            claimed = alice.claim_keys(bob.user_id, bob.device_id)
            self.assertEqual(claimed["failures"], {})
            (otk,) = claimed["one_time_keys"][bob.user_id][bob.device_id].values()
            self.assertIn(otk, list(otks.values()))

            # Media uploaded on hs-ext, downloaded through hs-int.
            payload = os.urandom(3000)
            mxc = bob.upload_media(payload, "application/octet-stream", "blob.bin")
            self.assertTrue(mxc.startswith(f"mxc://{hs_ext.server_name}/"))
            self.assertEqual(alice.download_media(mxc)[1], payload)

            # Leave crosses back.
            bob.leave(room_id)
            wait_until(
                lambda: True if alice.joined_members(room_id) == [alice.user_id] else None,
                30,
                "bob's leave to reach hs-int",
            )
        print(
            f"[e2e] client calls (login, profile, alias, publicRooms, keys, media, leave) "
            f"took {time.monotonic() - started:.1f}s; keys/query retries: {alice.retries}"
        )

    def test_impersonator_with_wrong_certificate_is_refused(self) -> None:
        """hs-int's hosts file sends hs-ext.test to hs-evil: TLS verification stops it.

        Proves the per-homeserver hosts files and certificate checks are real:
        the invite must fail, hs-int must log a certificate error, and neither
        hs-evil nor hs-ext may receive the invite.
        """
        cluster = start_cluster(
            self,
            homeservers=(HS_INT, HS_EXT, HS_EVIL),
            hosts_overrides={HS_INT.key: {HS_EXT.host: HS_EVIL.address}},
        )
        hs_int, hs_ext, hs_evil = cluster[HS_INT.key], cluster[HS_EXT.key], cluster[HS_EVIL.key]
        started = time.monotonic()
        alice = hs_int.register("alice")
        bob = hs_ext.register("bob")
        mallory = hs_evil.register("mallory")
        room_id = alice.create_room(preset="private_chat")
        with self.assertRaises(MatrixError) as caught:
            alice.invite(room_id, bob.user_id)
        self.assertEqual(caught.exception.status, 502)
        with open(hs_int.log_path) as f:
            int_log = f.read()
        # hs-evil's certificate is valid (its CA is trusted) but not for hs-ext.test.
        self.assertIn("DNSMismatch(mismatched_id=DNS_ID(hostname=b'hs-ext.test'))", int_log)
        for hs in (hs_ext, hs_evil):
            with open(hs.log_path) as f:
                self.assertNotIn("/_matrix/federation/v2/invite/", f.read())
        # hs-evil itself is up and reachable by its own users.
        self.assertEqual(mallory.whoami()["user_id"], "@mallory:hs-evil.test:8448")
        print(f"[e2e] impersonation scenario took {time.monotonic() - started:.1f}s")


class HarnessDisciplineTests(TestCase):
    """The harness itself: a broken homeserver fails fast, with its log, and nothing lingers."""

    timeout = 120

    def test_failed_start_reports_log_and_leaves_nothing_running(self) -> None:
        require_synapse()
        cluster = Cluster(
            self.mktemp(),
            homeservers=(HS_INT, HS_EXT),
            extra_config={HS_EXT.key: {"database": {"name": "no-such-engine"}}},
        )
        self.addCleanup(cluster.stop)
        started = time.monotonic()
        with self.assertRaises(ProcessError) as caught:
            cluster.start(timeout=60)
        self.assertLess(time.monotonic() - started, 30)
        message = str(caught.exception)
        self.assertIn("hs-ext exited", message)
        self.assertIn("no-such-engine", message)  # the log's tail is in the error
        pids = [hs.process.pid for hs in cluster.homeservers.values()]
        self.assertTrue(cluster[HS_INT.key].process.running())
        cluster.stop()
        for pid in pids:
            assert pid is not None
            self.assertRaises(ProcessLookupError, os.kill, pid, 0)
        self.assertFalse(any(hs.process.running() for hs in cluster.homeservers.values()))


class _RecordingProxy:
    """A listening socket that records the request heads sent to it, then hangs up."""

    def __init__(self, address: str, port: int) -> None:
        self.heads: list[bytes] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((address, port))
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                head = b""
                try:
                    while b"\r\n\r\n" not in head and len(head) < 8192:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        head += chunk
                except OSError:
                    pass
                self.heads.append(head)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


class BehindSbgLayoutTests(TestCase):
    """The phase-2 homeserver layout, checked without sbg."""

    timeout = 120

    def test_internal_homeserver_uses_proxy_and_plain_listener(self) -> None:
        cluster = start_cluster(
            self, homeservers=(HS_INT, HS_EXT), behind_sbg=True, start_sbg=False
        )
        hs_int, hs_ext = cluster[HS_INT.key], cluster[HS_EXT.key]

        # hs-int's federation listener is plain HTTP on :8009 and publishes the
        # key the harness exposes (the one sbg's config will pin).
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            f"http://{HS_INT.address}:{HS_INT.plain_federation_port}/_matrix/key/v2/server",
            timeout=10,
        ) as resp:
            keys = json.loads(resp.read())
        self.assertEqual(keys["server_name"], "hs-int.test:8448")
        self.assertEqual(
            keys["verify_keys"], {hs_int.verify_key_id: {"key": hs_int.verify_key_base64}}
        )
        # ... and it serves no TLS federation of its own.
        self.assertRaises(
            ConnectionRefusedError,
            socket.create_connection,
            (HS_INT.address, HS_INT.federation_port),
            2,
        )

        # hs-ext serves TLS with a certificate for hs-ext.test from the external CA.
        ctx = ssl.create_default_context(cafile=cluster.cas[HS_EXT.ca].certificate)
        raw = socket.create_connection((HS_EXT.address, HS_EXT.federation_port), 10)
        with ctx.wrap_socket(raw, server_hostname=HS_EXT.host) as tls:
            tls.sendall(b"GET /_matrix/key/v2/server HTTP/1.0\r\nHost: hs-ext.test:8448\r\n\r\n")
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
        ext_keys = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        self.assertEqual(
            ext_keys["verify_keys"], {hs_ext.verify_key_id: {"key": hs_ext.verify_key_base64}}
        )

        # hs-int's outbound federation goes to sbg's proxy address (a recorder here).
        proxy = _RecordingProxy(SBG_ADDRESS, SBG_OUTBOUND_PORT)
        self.addCleanup(proxy.close)
        alice = hs_int.register("alice")
        room_id = alice.create_room()
        with self.assertRaises(MatrixError):
            alice.invite(room_id, "@bob:hs-ext.test:8448")
        self.assertTrue(proxy.heads, "hs-int never contacted the proxy")
        self.assertTrue(
            proxy.heads[0].startswith(b"CONNECT hs-ext.test:8448 HTTP/1."), proxy.heads[0]
        )
        with open(hs_ext.log_path) as f:
            self.assertNotIn("/_matrix/federation/", f.read())
        with open(hs_ext.hosts_path) as f:
            self.assertIn(f"{SBG_ADDRESS}\ths-int.test\n", f.read())
