"""The cluster's records and the reconciliation of a node with Redis (pure),
and the ledger a node keeps in its state_dir.

The property that matters: a switch engaged here is lifted only by a
record from Redis that says lifted and is newer than what this node
knows; a missing, older, equal or malformed record never lifts."""

from __future__ import annotations

import json
import os

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sbg.cluster.ledger import Ledger
from sbg.cluster.plan import reconcile
from sbg.cluster.records import Record, RecordError, decode, field_name, newer
from sbg.killswitch.state import Switch

X: Switch = ("partner.example", "inbound")
Y: Switch = (None, "outbound")


def rec(switch: Switch, engaged: bool, version: int) -> Record:
    return Record(
        switch[0],
        switch[1],
        engaged,
        version,
        1000,
        "gw-a",
        "10.0.0.1",
        "r" if engaged else None,
        5,
    )


class RecordTests(SynchronousTestCase):
    def test_round_trip_and_field(self) -> None:
        r = rec(X, True, 7)
        self.assertEqual(decode(field_name(X), r.encode()), r)
        self.assertEqual(field_name(Y), '[null,"outbound"]')
        self.assertEqual(r.entry().since_ts, 5)

    def test_malformed(self) -> None:
        good = rec(X, True, 7).as_json()
        for bad in (
            b"not json",
            b"[]",
            json.dumps({**good, "state": "off"}),
            json.dumps({**good, "direction": "both"}),
            json.dumps({**good, "version": -1}),
            json.dumps({**good, "version": True}),
            json.dumps({**good, "version": 2**60}),
            json.dumps({**good, "node": ""}),
            json.dumps({**good, "server": 5}),
        ):
            with self.assertRaises(RecordError):
                decode(field_name(X), bad)
        # Filed under another switch: not taken.
        with self.assertRaises(RecordError):
            decode(field_name(Y), json.dumps(good))

    def test_order(self) -> None:
        self.assertTrue(newer(rec(X, False, 8), rec(X, True, 7)))
        self.assertFalse(newer(rec(X, False, 7), rec(X, True, 7)))  # a tie: engaged wins
        self.assertTrue(newer(rec(X, True, 7), rec(X, False, 7)))
        self.assertTrue(newer(rec(X, False, 1), None))
        self.assertFalse(newer(None, rec(X, True, 1)))


class ReconcileTests(SynchronousTestCase):
    def test_newer_remote_applies(self) -> None:
        plan = reconcile(
            {X: rec(X, True, 3)}, {X}, set(), {X: rec(X, False, 4), Y: rec(Y, True, 1)}
        )
        self.assertEqual([r.switch for r in plan.lift], [X])
        self.assertEqual([r.switch for r in plan.engage], [Y])
        self.assertEqual(plan.push, ())

    def test_missing_or_older_remote_is_written_again_never_lifts(self) -> None:
        for remote in ({}, {X: rec(X, False, 2)}, {X: rec(X, False, 3)}):
            plan = reconcile({X: rec(X, True, 3)}, {X}, set(), remote)
            self.assertEqual(plan.lift, ())
            self.assertEqual([r.version for r in plan.push], [3])

    def test_pending_and_busy_are_left_alone(self) -> None:
        remote = {X: rec(X, False, 9)}
        self.assertFalse(reconcile({}, {X}, {X}, remote))
        self.assertFalse(reconcile({X: rec(X, True, 1)}, {X}, set(), remote, busy={X}))

    def test_lift_of_a_switch_not_engaged_here_is_remembered(self) -> None:
        plan = reconcile({}, set(), set(), {X: rec(X, False, 2)})
        self.assertEqual([r.switch for r in plan.remember], [X])

    def test_known_engaged_but_not_in_force_is_put_back(self) -> None:
        plan = reconcile({X: rec(X, True, 3)}, set(), set(), {X: rec(X, True, 3)})
        self.assertEqual([r.switch for r in plan.engage], [X])

    @given(
        st.dictionaries(st.sampled_from([X, Y]), st.tuples(st.booleans(), st.integers(0, 5))),
        st.dictionaries(st.sampled_from([X, Y]), st.tuples(st.booleans(), st.integers(0, 5))),
    )
    def test_only_a_newer_lifted_record_lifts(
        self, local: dict[Switch, tuple[bool, int]], remote: dict[Switch, tuple[bool, int]]
    ) -> None:
        known = {s: rec(s, e, v) for s, (e, v) in local.items()}
        theirs = {s: rec(s, e, v) for s, (e, v) in remote.items()}
        engaged = {s for s, r in known.items() if r.engaged}
        plan = reconcile(known, engaged, set(), theirs)
        for r in plan.lift:
            self.assertFalse(r.engaged)
            self.assertTrue(newer(r, known[r.switch]))
        for s in engaged:
            if s not in {r.switch for r in plan.lift}:
                self.assertFalse(newer(theirs.get(s), known[s]) and not theirs[s].engaged)


class LedgerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        self.problems: list[str] = []

    def test_saved_and_loaded(self) -> None:
        ledger = Ledger(self.dir, self.problems.append)
        ledger.learn([rec(X, True, 3), rec(Y, False, 2)])
        self.assertTrue(ledger.save())
        again = Ledger(self.dir)
        again.load()
        self.assertEqual(again.known, ledger.known)

    def test_engaged_switches_unknown_to_the_ledger_are_pending(self) -> None:
        ledger = Ledger(self.dir, self.problems.append)
        ledger.learn([rec(X, False, 4)])
        self.assertTrue(ledger.repair({X, Y}))
        self.assertEqual(set(ledger.pending), {X, Y})
        mark = ledger.pending[X]
        ledger.confirm(rec(X, True, 5), mark)
        self.assertEqual(set(ledger.pending), {Y})
        # A confirmation of an older change leaves a newer pending one.
        ledger.mark_pending([Y])
        ledger.confirm(rec(Y, True, 1), mark)
        self.assertIn(Y, ledger.pending)
        self.assertTrue(ledger.repair(set()))
        self.assertEqual(ledger.pending, {})

    def test_damaged_file_counts_and_starts_empty(self) -> None:
        os.makedirs(self.dir)
        with open(os.path.join(self.dir, "cluster.json"), "w") as f:
            f.write('{"records": [{"state": "engaged"}]}')
        ledger = Ledger(self.dir, self.problems.append)
        ledger.load()
        self.assertEqual((ledger.known, self.problems), ({}, ["persist"]))

    def test_unwritable_state_dir(self) -> None:
        with open(self.dir, "w") as f:
            f.write("not a directory")
        ledger = Ledger(self.dir, self.problems.append)
        self.assertFalse(ledger.save())
        self.assertFalse(ledger.save())
        self.assertEqual(self.problems, ["persist"])  # logged and counted once
