"""Prepared joins across the nodes of a cluster, against a real `redis-server`.

Behind a load balancer a partner's `make_join` may reach node A and its
`send_join` node B: B must let it through (a broken join is a broken
federation), and must still refuse a hand-crafted `send_join` that no node
prepared, without it reaching the homeserver. A Redis that cannot answer
never blocks a join (the room rules undo what they do not allow).
"""

from __future__ import annotations

import os
import time
from typing import Any

from twisted.internet import reactor

from sbg.cluster.joins import SharedJoins
from sbg.joins import PreparedJoins
from sbg.policy.joins import join_key
from testbed.configtools import PARTNER_SERVER
from tests.asynctest import TestCase
from tests.cluster_nodes import settings, start_redis
from tests.gateway import Gateway, assert_refused, start_gateway
from tests.joins_requests import BOB, ROOM, make_join_target, member_event, send_join_target
from tests.processes import sleep

KEY = join_key(PARTNER_SERVER, ROOM, BOB)


class StoreTests(TestCase):
    timeout = 60

    def node(self, url: str, name: str, **kw: Any) -> SharedJoins:
        local = PreparedJoins(os.path.abspath(self.mktemp()), clock=reactor.seconds)
        store = SharedJoins(local, settings(url, name), reactor, **kw)
        store.start()
        self.addCleanup(store.stop)
        return store

    async def test_a_join_prepared_on_one_node_is_known_on_the_other(self) -> None:
        redis = start_redis(self)
        a, b = self.node(redis.url, "a"), self.node(redis.url, "b")
        self.assertFalse(await b.is_prepared(KEY))
        a.record(KEY)
        self.assertTrue(await b.is_prepared(KEY))
        self.assertFalse(b.local.prepared(KEY))  # from Redis, not from B's own store
        other = join_key(PARTNER_SERVER, "!other:internal.example", BOB)
        self.assertFalse(await b.is_prepared(other))

    async def test_a_record_still_being_written_is_waited_for(self) -> None:
        redis = start_redis(self)
        a, b = self.node(redis.url, "a"), self.node(redis.url, "b")
        reactor.callLater(0.1, a.record, KEY)
        started = time.monotonic()
        self.assertTrue(await b.is_prepared(KEY))
        self.assertLess(time.monotonic() - started, 1.0)

    async def test_records_expire_in_redis(self) -> None:
        redis = start_redis(self)
        a, b = self.node(redis.url, "a", ttl=1), self.node(redis.url, "b", ttl=1)
        a.record(KEY)
        self.assertTrue(await b.is_prepared(KEY))
        await sleep(2.2)
        self.assertFalse(await b.is_prepared(KEY))

    async def test_redis_stopped_fails_open_and_says_so(self) -> None:
        redis = start_redis(self)
        b = self.node(redis.url, "b")
        redis.stop()
        with self.assertLogs("sbg.cluster.joins", "WARNING") as logs:
            self.assertTrue(await b.is_prepared(KEY))
            started = time.monotonic()
            self.assertTrue(await b.is_prepared(KEY))  # not asked again at once
            self.assertLess(time.monotonic() - started, 0.1)
        self.assertIn("cannot ask the cluster's Redis", logs.output[0])


class GatewayTests(TestCase):
    """Two gateways of one cluster (in this process, each with its own
    state_dir and homeserver) and a real Redis."""

    timeout = 60

    async def gateways(self) -> tuple[Gateway, Gateway]:
        redis = start_redis(self)
        out = []
        for name in ("gw-a", "gw-b"):
            cluster = {"redis": redis.url, "node_name": name}
            out.append(await start_gateway(self, {"cluster": cluster}))
        return out[0], out[1]

    async def test_make_join_on_one_node_send_join_on_the_other(self) -> None:
        a, b = await self.gateways()
        resp = await a.inbound(a.signed_request("GET", make_join_target(ROOM, BOB)))
        self.assertEqual(resp.status, 200, resp.body)
        send = b.signed_request("PUT", send_join_target(ROOM), member_event(BOB, ROOM))
        resp = await b.inbound(send)
        self.assertEqual(resp.status, 200, resp.body)
        self.assertEqual(len(b.upstream.requests), 1)
        self.assertEqual(b.last_audit()["decision"], "allow")

    async def test_a_send_join_no_node_prepared_is_refused(self) -> None:
        a, b = await self.gateways()
        resp = await a.inbound(a.signed_request("GET", make_join_target(ROOM, BOB)))
        self.assertEqual(resp.status, 200, resp.body)
        room = "!other:internal.example"
        send = b.signed_request("PUT", send_join_target(room), member_event(BOB, room))
        resp = await b.inbound(send)
        assert_refused(self, b, resp, 403, "M_FORBIDDEN", code="join_not_prepared")
