"""Gateway nodes of a cluster, for the tests: a real `redis-server`
(testbed.redisserver) and nodes in this process, each a `KillSwitch` and
its `ClusterKillSwitch` (with the real thread and redis client) on the
test's reactor, with a `state_dir` of its own.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor

from sbg.cluster.link import Announcement
from sbg.cluster.sync import ClusterKillSwitch
from sbg.config.cluster import settings as cluster_settings
from sbg.config.model import ClusterSettings
from sbg.killswitch.control import Outcome
from sbg.killswitch.state import Switch
from sbg.killswitch.switch import KillSwitch
from testbed.redisserver import RedisServer
from tests.asynctest import TestCase
from tests.processes import sleep

PARTNER = "partner.example"
BOTH: frozenset[Switch] = frozenset({(PARTNER, "inbound"), (PARTNER, "outbound")})
GLOBAL: frozenset[Switch] = frozenset({(None, "inbound"), (None, "outbound")})


def start_redis(test: TestCase, **kw: Any) -> RedisServer:
    server = RedisServer(os.path.abspath(test.mktemp()), **kw)
    server.start()
    test.addCleanup(server.stop)
    return server


def settings(url: str, node: str, password: str | None = None) -> ClusterSettings:
    return cluster_settings(
        url, node, password_file="(test)" if password else None, password=password
    )


class Node:
    """One node in this process (what a gateway's supervisor holds)."""

    def __init__(
        self,
        test: TestCase,
        url: str,
        name: str,
        *,
        state_dir: str | None = None,
        password: str | None = None,
    ) -> None:
        self.test, self.url, self.name, self.password = test, url, name, password
        self.state_dir = state_dir or os.path.abspath(test.mktemp())
        self.problems: list[str] = []
        self.ks = KillSwitch(self.state_dir, on_problem=self.problems.append)
        self.ks.load()
        announcement = Announcement(name, "0" * 64, "test", 1, secrets.token_hex(4), 0)
        self.cluster = ClusterKillSwitch(
            self.ks,
            settings(url, name, password),
            reactor,
            announcement,
            on_problem=self.problems.append,
        )
        self.cluster.start()
        test.addCleanup(self.cluster.stop)

    @property
    def engaged(self) -> frozenset[Switch]:
        return self.ks.engaged

    async def engage(self, server: str | None = PARTNER, direction: str = "both") -> Outcome:
        return await self.cluster.engage(server, direction, "test", "127.0.0.1")

    async def lift(self, server: str | None = PARTNER, direction: str = "both") -> Outcome:
        return await self.cluster.lift(server, direction, "127.0.0.1")

    def restart(self) -> Node:
        """Stop this node and start a new one on the same state_dir."""
        self.cluster.stop()
        return Node(
            self.test, self.url, self.name, state_dir=self.state_dir, password=self.password
        )


async def within(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until `check()` holds; fails after `timeout`."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        await sleep(0.01)
    return time.monotonic() - started


async def holds(check: Callable[[], bool], seconds: float, what: str) -> None:
    """`check()` holds all along `seconds`."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not check():
            raise AssertionError(f"stopped holding: {what}")
        await sleep(0.02)
