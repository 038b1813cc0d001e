"""A send_join must follow a make_join the internal homeserver answered.

The decision as tables, the store shared by the workers of a node, and the
gateway from the attacker's side: a hand-crafted send_join (no make_join,
or after a make_join the homeserver refused) is refused with 403
`join_not_prepared` and nothing reaches the homeserver; the ordinary
make_join then send_join passes.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from sbg.policy.joins import (
    check_send_join,
    decide_send_join,
    join_key,
    joining_key,
    prepared_key,
)
from sbg.reasons import JOIN_NOT_PREPARED
from testbed.configtools import INTERNAL_SERVER, PARTNER_SERVER
from tests.asynctest import TestCase
from tests.gateway import assert_refused, start_gateway
from tests.joins_requests import BOB, ROOM, make_join_target, member_event, send_join_target
from tests.standin import StandinState


class DecisionTests(SynchronousTestCase):
    def test_keys(self) -> None:
        key = join_key(PARTNER_SERVER, ROOM, BOB)
        self.assertRegex(key, r"^[0-9a-f]{64}$")
        params = {"roomId": ROOM, "userId": BOB}
        rows = [
            ("make_join 200", prepared_key("make_join", params, PARTNER_SERVER, 200), key),
            ("make_join 403", prepared_key("make_join", params, PARTNER_SERVER, 403), None),
            ("make_leave 200", prepared_key("make_leave", params, PARTNER_SERVER, 200), None),
            ("unauthenticated", prepared_key("make_join", params, None, 200), None),
            ("no user", prepared_key("make_join", {"roomId": ROOM}, PARTNER_SERVER, 200), None),
        ]
        for event_params in ({"roomId": ROOM, "eventId": "$e"},):
            for name in ("send_join", "send_join_v1", "send_join_v2"):
                rows.append(
                    (name, joining_key(name, event_params, PARTNER_SERVER, member_event()), key)
                )
            rows += [
                (
                    "send_leave",
                    joining_key("send_leave_v2", event_params, PARTNER_SERVER, member_event()),
                    None,
                ),
                ("no body", joining_key("send_join_v2", event_params, PARTNER_SERVER, None), None),
                ("no sender", joining_key("send_join_v2", event_params, PARTNER_SERVER, {}), None),
                (
                    "other room",
                    joining_key("send_join_v2", {"roomId": "!o:i"}, PARTNER_SERVER, member_event()),
                    join_key(PARTNER_SERVER, "!o:i", BOB),
                ),
            ]
        wrong = [(name, got, want) for name, got, want in rows if got != want]
        self.assertEqual(wrong, [])

    def test_decision(self) -> None:
        key = join_key(PARTNER_SERVER, ROOM, BOB)
        self.assertIsNone(check_send_join(None, False))
        self.assertIsNone(check_send_join(key, True))
        refusal = check_send_join(key, False)
        assert refusal is not None
        self.assertIs(refusal.kind, JOIN_NOT_PREPARED)
        self.assertEqual((refusal.status, refusal.errcode), (403, "M_FORBIDDEN"))
        self.assertEqual(decide_send_join(False, key, False).effect, "deny")
        self.assertEqual(decide_send_join(True, key, False).effect, "would_deny")
        self.assertEqual(decide_send_join(False, key, True).effect, "allow")


class StoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        from sbg.joins import PreparedJoins

        self.now = 1000.0
        self.dir = os.path.abspath(self.mktemp())
        self.make = lambda **kw: PreparedJoins(self.dir, clock=lambda: self.now, **kw)

    def test_shared_between_workers_and_fresh_for_the_ttl(self) -> None:
        one, two = self.make(ttl=600), self.make(ttl=600)
        key = join_key(PARTNER_SERVER, ROOM, BOB)
        self.assertFalse(two.prepared(key))
        one.record(key)
        self.assertTrue(two.prepared(key))  # another worker's record
        self.now += 600
        self.assertTrue(two.prepared(key))
        self.now += 1
        self.assertFalse(two.prepared(key))
        self.assertEqual(os.stat(os.path.join(self.dir, "joins")).st_mode & 0o777, 0o700)

    def test_bounded(self) -> None:
        store = self.make(ttl=100, capacity=3)
        keys = [join_key(PARTNER_SERVER, ROOM, f"@u{i}:{PARTNER_SERVER}") for i in range(5)]
        for i, key in enumerate(keys):
            self.now = 1000.0 + i
            store.record(key)
        store.sweep()
        self.assertEqual(sorted(os.listdir(store.directory)), sorted(keys[2:]))
        self.now = 1200.0
        store.sweep()
        self.assertEqual(os.listdir(store.directory), [])

    def test_not_a_key(self) -> None:
        store = self.make()
        with self.assertRaises(ValueError):
            store.record("../../etc/passwd")
        self.assertFalse(store.prepared("../x"))

    def test_an_unwritable_store_fails_open(self) -> None:
        """The room rules still undo a join they do not allow; refusing
        every join because of the disk would break the federation."""
        with open(self.dir, "w") as f:
            f.write("not a directory")
        store = self.make()
        key = join_key(PARTNER_SERVER, ROOM, BOB)
        with self.assertLogs("sbg.joins.store", "ERROR"):
            store.record(key)
        with self.assertLogs("sbg.joins.store", "ERROR"):
            self.assertTrue(store.prepared(key))


class GatewayTests(TestCase):
    async def send_join(self, gw: Any, room: str = ROOM) -> Any:
        target = send_join_target(room)
        content = member_event(room=room)
        return await gw.inbound(gw.signed_request("PUT", target, content))

    async def make_join(self, gw: Any, room: str = ROOM) -> Any:
        return await gw.inbound(gw.signed_request("GET", make_join_target(room)))

    async def test_a_send_join_without_make_join_is_refused(self) -> None:
        gw = await start_gateway(self)
        resp = await self.send_join(gw)
        assert_refused(self, gw, resp, 403, "M_FORBIDDEN", code="join_not_prepared")
        record = gw.last_audit()
        self.assertEqual((record["code"], record["group"]), ("join_not_prepared", "joins"))
        self.assertEqual(record["destination"], INTERNAL_SERVER)

    async def test_make_join_then_send_join_pass(self) -> None:
        gw = await start_gateway(self)
        self.assertEqual((await self.make_join(gw)).status, 200)
        resp = await self.send_join(gw)
        self.assertEqual(resp.status, 200, resp.body)
        self.assertEqual(len(gw.upstream.requests), 2)
        self.assertEqual(gw.last_audit()["decision"], "allow")
        # It prepared that room only.
        other = await self.send_join(gw, room="!other:internal.example")
        assert_refused(
            self, gw, other, 403, "M_FORBIDDEN", upstream_before=2, code="join_not_prepared"
        )

    async def test_a_make_join_the_homeserver_refused_prepares_nothing(self) -> None:
        upstream = StandinState(status=403, response_body=b'{"errcode": "M_FORBIDDEN"}')
        gw = await start_gateway(self, upstream=upstream)
        self.assertEqual((await self.make_join(gw)).status, 403)
        upstream.status = 200
        resp = await self.send_join(gw)
        assert_refused(
            self, gw, resp, 403, "M_FORBIDDEN", upstream_before=1, code="join_not_prepared"
        )

    async def test_monitor_mode_logs_it_and_lets_it_pass(self) -> None:
        gw = await start_gateway(self, {"mode": "monitor"})
        resp = await self.send_join(gw)
        self.assertEqual(resp.status, 200, resp.body)
        record = gw.last_audit()
        self.assertEqual((record["decision"], record["code"]), ("would_deny", "join_not_prepared"))
