"""Kill-switch state: engage/lift semantics and persistence across restarts."""

from __future__ import annotations

import json
import os
import stat

from twisted.trial.unittest import SynchronousTestCase

from sbg.policy.killswitch import KillSwitch, KillSwitchStateError


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
            ks.as_json(), {"engaged": [{"server": "a.example", "direction": "outbound"}]}
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


class WatchTests(SynchronousTestCase):
    """A worker process follows the state its supervisor's admin API writes."""

    def setUp(self) -> None:
        self.dir = os.path.join(self.mktemp(), "state")
        self.admin = KillSwitch(self.dir)
        self.admin.load()
        self.worker = KillSwitch(self.dir)
        self.worker.load()
        self.worker.watch()
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
        # Back-to-back replacements (the inode may be reused) are all seen.
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

    def test_damaged_file_keeps_last_state(self) -> None:
        self.admin.engage(None, "both")
        self.assertTrue(self.worker.is_killed(None, "inbound"))
        tmp = os.path.join(self.dir, "x.tmp")
        with open(tmp, "w") as f:
            f.write("{not json")
        os.replace(tmp, self.admin.path)
        # Fail safe: the switch stays engaged rather than being lifted.
        self.assertTrue(self.worker.is_killed(None, "inbound"))
        self.assertTrue(self.worker.is_killed(None, "outbound"))

    def test_removed_file_lifts(self) -> None:
        self.admin.engage("a.example", "both")
        self.assertTrue(self.worker.is_killed("a.example", "inbound"))
        os.remove(self.admin.path)
        self.assertFalse(self.worker.is_killed("a.example", "inbound"))
