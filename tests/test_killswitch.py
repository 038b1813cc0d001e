"""Kill-switch state: engage/lift semantics and persistence across restarts."""

from __future__ import annotations

import json
import mmap
import os
import shutil
import stat

from twisted.trial.unittest import SynchronousTestCase

from sbg.killswitch.shared import SEGMENT_SIZE, SharedState
from sbg.killswitch.switch import KillSwitch, KillSwitchPersistError, KillSwitchStateError
from tests.gateway import bare


class KillSwitchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.join(self.mktemp(), "state")

    def test_global_switch_covers_every_server(self) -> None:
        ks = KillSwitch(self.dir)
        ks.load()
        ks.engage(None, "inbound")
        self.assertTrue(ks.is_killed("partner.example", "inbound"))
        self.assertTrue(ks.is_killed(None, "inbound"))
        self.assertFalse(ks.is_killed("partner.example", "outbound"))

    def test_server_switch_covers_only_that_server(self) -> None:
        ks = KillSwitch(self.dir)
        ks.load()
        ks.engage("a.example", "both")
        self.assertTrue(ks.is_killed("a.example", "inbound"))
        self.assertTrue(ks.is_killed("a.example", "outbound"))
        self.assertFalse(ks.is_killed("b.example", "inbound"))
        self.assertFalse(ks.is_killed(None, "inbound"))

    def test_lift_one_direction(self) -> None:
        ks = KillSwitch(self.dir)
        ks.load()
        ks.engage("a.example", "both")
        ks.lift("a.example", "inbound")
        self.assertFalse(ks.is_killed("a.example", "inbound"))
        self.assertTrue(ks.is_killed("a.example", "outbound"))
        self.assertEqual(
            bare(ks.as_json()), {"engaged": [{"server": "a.example", "direction": "outbound"}]}
        )

    def test_state_survives_a_new_instance(self) -> None:
        ks = KillSwitch(self.dir)
        ks.load()
        ks.engage("a.example", "inbound")
        ks.engage(None, "outbound")
        again = KillSwitch(self.dir)
        again.load()
        self.assertEqual(again.engaged, ks.engaged)
        self.assertTrue(again.is_killed("zzz", "outbound"))

    def test_state_dir_created_private(self) -> None:
        ks = KillSwitch(self.dir)
        ks.load()
        self.assertEqual(stat.S_IMODE(os.stat(self.dir).st_mode), 0o700)

    def test_written_atomically_no_temp_left(self) -> None:
        ks = KillSwitch(self.dir)
        ks.load()
        ks.engage(None, "both")
        self.assertEqual(sorted(os.listdir(self.dir)), ["killswitch.json"])
        with open(ks.path) as f:
            self.assertEqual(len(json.load(f)["engaged"]), 2)

    def test_corrupt_state_refuses_to_start(self) -> None:
        os.makedirs(self.dir)
        with open(os.path.join(self.dir, "killswitch.json"), "w") as f:
            f.write("{not json")
        ks = KillSwitch(self.dir)
        self.assertRaises(KillSwitchStateError, ks.load)

    def test_listeners_notified(self) -> None:
        seen = []
        ks = KillSwitch(self.dir)
        ks.load()
        ks.on_change(seen.append)
        ks.engage("a.example", "outbound")
        ks.engage("a.example", "outbound")  # no change, no notification
        self.assertEqual(seen, [frozenset({("a.example", "outbound")})])

    def test_bad_direction(self) -> None:
        ks = KillSwitch(self.dir)
        ks.load()
        self.assertRaises(ValueError, ks.engage, None, "sideways")


class SharedStateTests(SynchronousTestCase):
    """A worker follows the state its supervisor publishes in shared memory."""

    def setUp(self) -> None:
        self.dir = os.path.join(self.mktemp(), "state")
        self.problems: list[str] = []
        self.shared = SharedState.create()
        self.addCleanup(os.close, self.shared.fd)
        self.admin = KillSwitch(self.dir, shared=self.shared, on_problem=self.problems.append)
        self.admin.load()
        self.worker = KillSwitch(
            self.dir,
            shared=SharedState.attach(self.shared.fd),
            follower=True,
            on_problem=self.problems.append,
        )
        self.worker.load()
        self.seen: list[frozenset[object]] = []
        self.worker.on_change(self.seen.append)

    def test_next_check_after_engage_sees_it(self) -> None:
        self.assertFalse(self.worker.is_killed("a.example", "inbound"))
        self.admin.engage("a.example", "inbound")
        # No signal, no timer: the very next check.
        self.assertTrue(self.worker.is_killed("a.example", "inbound"))
        self.assertFalse(self.worker.is_killed("a.example", "outbound"))
        # The callbacks (closing tunnels) wait for the periodic refresh, so
        # the request being checked gets its refusal first.
        self.assertEqual(self.seen, [])
        self.worker.refresh()
        self.assertEqual(self.seen, [frozenset({("a.example", "inbound")})])
        self.worker.refresh()
        self.assertEqual(len(self.seen), 1)
        self.admin.engage(None, "outbound")
        self.assertTrue(self.worker.is_killed("b.example", "outbound"))
        self.admin.lift("a.example", "inbound")
        self.admin.lift(None, "outbound")
        self.assertFalse(self.worker.is_killed("a.example", "inbound"))
        self.assertFalse(self.worker.is_killed("b.example", "outbound"))

    def test_many_changes_each_seen(self) -> None:
        for i in range(50):
            self.admin.engage(None, "inbound")
            self.assertTrue(self.worker.is_killed(None, "inbound"), i)
            self.admin.lift(None, "inbound")
            self.assertFalse(self.worker.is_killed(None, "inbound"), i)

    def test_refresh_alone_sees_and_tells(self) -> None:
        self.admin.engage(None, "inbound")
        self.worker.refresh()
        self.assertEqual(self.seen, [frozenset({(None, "inbound")})])
        self.assertTrue(self.worker.is_killed(None, "inbound"))

    def test_change_seen_by_a_check_is_still_told(self) -> None:
        self.admin.engage("a.example", "outbound")
        self.assertTrue(self.worker.is_killed("a.example", "outbound"))
        self.admin.lift("a.example", "outbound")
        self.assertFalse(self.worker.is_killed("a.example", "outbound"))
        # Engaged and lifted between two refreshes: nothing to tell.
        self.worker.refresh()
        self.assertEqual(self.seen, [])
        self.admin.engage("a.example", "outbound")
        self.assertTrue(self.worker.is_killed("a.example", "outbound"))
        self.worker.refresh()
        self.assertEqual(self.seen, [frozenset({("a.example", "outbound")})])

    def test_a_worker_never_reads_or_writes_the_file(self) -> None:
        self.admin.engage(None, "both")
        self.assertRaises(RuntimeError, self.worker.engage, None, "both")
        self.assertRaises(RuntimeError, self.worker.lift, None, "both")
        os.remove(self.admin.path)
        self.worker.check_file()
        self.assertFalse(os.path.exists(self.admin.path))

    def _damage(self, how: str) -> None:
        path = self.admin.path
        if how == "deleted":
            os.remove(path)
        elif how == "truncated":
            with open(path, "r+") as f:
                f.truncate(0)
        elif how == "corrupt":
            with open(path, "w") as f:
                f.write("{not json")
        elif how == "replaced":
            tmp = path + ".x"
            with open(tmp, "w") as f:
                json.dump({"engaged": []}, f)
            os.replace(tmp, path)
        else:
            raise AssertionError(how)

    def test_a_damaged_file_never_lifts_a_switch(self) -> None:
        for how in ("deleted", "truncated", "corrupt", "replaced"):
            self.problems.clear()
            self.admin.engage("a.example", "both", reason="r")
            self._damage(how)
            # In force in every process, whatever the disk says.
            self.assertTrue(self.worker.is_killed("a.example", "inbound"), how)
            self.assertTrue(self.admin.is_killed("a.example", "outbound"), how)
            # The next periodic check notices, counts and writes it again.
            self.admin.check_file()
            self.assertEqual(self.problems, ["file"], how)
            again = KillSwitch(self.dir)
            again.load()
            self.assertEqual(again.engaged, self.admin.engaged, how)
            self.assertEqual(again.entries[("a.example", "inbound")].reason, "r")
            self.admin.check_file()
            self.assertEqual(self.problems, ["file"], how)

    def test_unwritable_state_dir(self) -> None:
        os.chmod(self.dir, 0o500)
        self.addCleanup(os.chmod, self.dir, 0o700)
        if os.access(self.admin.path + ".probe", os.W_OK) or os.geteuid() == 0:
            # root writes anywhere: make the directory a file instead.
            os.chmod(self.dir, 0o700)
            shutil.rmtree(self.dir)
            with open(self.dir, "w") as f:
                f.write("not a directory")
        persisted = self.admin.engage(None, "inbound", reason="x", by="127.0.0.1")
        self.assertFalse(persisted)
        self.assertEqual(self.problems, ["persist"])
        # Engaged all the same, in every process.
        self.assertTrue(self.admin.is_killed("z", "inbound"))
        self.assertTrue(self.worker.is_killed("z", "inbound"))
        # A lift that cannot be written changes nothing.
        self.assertRaises(KillSwitchPersistError, self.admin.lift, None, "inbound")
        self.assertTrue(self.worker.is_killed("z", "inbound"))
        # Reported once, not every second.
        self.admin.check_file()
        self.admin.check_file()
        self.assertEqual(self.problems, ["persist", "persist"])

    def test_a_torn_shared_state_keeps_the_last_one(self) -> None:
        self.admin.engage(None, "outbound")
        self.assertTrue(self.worker.is_killed("z", "outbound"))
        # A writer that died mid-change leaves an odd sequence number.
        import struct

        m = mmap.mmap(self.shared.fd, SEGMENT_SIZE)
        self.addCleanup(m.close)
        (seq,) = struct.unpack_from("<Q", m, 0)
        struct.pack_into("<Q", m, 0, seq + 1)
        self.assertTrue(self.worker.is_killed("z", "outbound"))
        self.assertEqual(self.problems, ["shared"])

    def test_older_state_files_still_load(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        with open(self.admin.path, "w") as f:
            json.dump({"engaged": [{"server": "a.example", "direction": "inbound"}]}, f)
        ks = KillSwitch(self.dir)
        ks.load()
        entry = ks.entries[("a.example", "inbound")]
        self.assertEqual((entry.reason, entry.since_ts, entry.by), (None, 0, None))
