"""`SharedJoins`: the prepared joins of every node of a cluster.

Behind a load balancer, a partner's `make_join` may reach node A and its
`send_join` node B. With a `cluster` block each process that serves
requests keeps its node's `PreparedJoins` and also writes every prepared
join to Redis (`sbg:join:KEY`, expiring with the store's TTL); a
`send_join` that the node's own store does not know is looked up there.

The reactor never waits on Redis: one thread (`sbg-joins`) owns a redis
client and runs the writes and lookups in order, each with the cluster's
1 s socket timeout. A write is fire-and-forget. A lookup that misses is
asked again twice within half a second (the `make_join`'s node may still
be writing it). A lookup Redis cannot answer fails open, as the store does
when its directory cannot be read (logged): the room rules still undo a
join they do not allow, and refusing joins because Redis is down would
break the federation. While Redis is known to be down (a failure in the
last `DOWN_FOR` seconds), lookups are not tried at all.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.task import deferLater

from sbg.cluster.link import TIMEOUT, describe, make_client
from sbg.config.model import ClusterSettings
from sbg.joins.store import TTL, PreparedJoins

logger = logging.getLogger(__name__)

PREFIX = "sbg:join:"
# Delays before the lookups of a key the node does not know (seconds).
LOOKUPS = (0.0, 0.15, 0.35)
# After a failure, lookups fail open without asking for this long.
DOWN_FOR = 5.0
_STOP = object()


@dataclass
class _Item:
    key: str
    deadline: float
    done: defer.Deferred[bool] | None  # None: a write


class SharedJoins:
    """A node's `PreparedJoins`, and the cluster's through Redis."""

    def __init__(
        self,
        local: PreparedJoins,
        settings: ClusterSettings,
        reactor: Any,
        *,
        ttl: float = TTL,
        lookups: tuple[float, ...] = LOOKUPS,
        client_factory: Callable[[ClusterSettings], Any] = make_client,
    ) -> None:
        self.local = local
        self._settings = settings
        self._reactor = reactor
        self._ttl = ttl
        self._lookups = lookups
        self._client_factory = client_factory
        self._queue: queue.Queue[object] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._down_until = 0.0  # the reactor's view, time.monotonic()
        self._down_logged = False

    def start(self) -> None:
        if self._thread is not None:
            return
        client = self._client_factory(self._settings)
        self._thread = threading.Thread(
            target=self._run, args=(client,), name="sbg-joins", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread = None

    # -- the reactor's side ------------------------------------------------

    def record(self, key: str) -> None:
        """A `make_join` answered 200 prepared the join KEY: in this node's
        store at once, in Redis soon."""
        self.local.record(key)
        if self._thread is not None:
            self._queue.put(_Item(key, time.monotonic() + 2 * TIMEOUT, None))

    async def is_prepared(self, key: str) -> bool:
        """Whether any node prepared the join KEY within the TTL; True when
        Redis cannot tell (logged)."""
        if self.local.prepared(key):
            return True
        if self._thread is None:
            return False
        for delay in self._lookups:
            if delay:
                await deferLater(self._reactor, delay, lambda: None)
            if time.monotonic() < self._down_until:
                self._fail_open(key, "Redis was unreachable moments ago")
                return True
            try:
                found = await self._ask(key)
            except Exception as e:
                self._down_until = time.monotonic() + DOWN_FOR
                self._fail_open(key, _describe(e))
                return True
            self._down_logged = False
            if found:
                return True
        return False

    def _ask(self, key: str) -> defer.Deferred[bool]:
        done: defer.Deferred[bool] = defer.Deferred()
        self._queue.put(_Item(key, time.monotonic() + TIMEOUT, done))
        # A lookup stuck behind others is not waited for longer than this.
        return done.addTimeout(2 * TIMEOUT + 0.5, self._reactor)

    def _fail_open(self, key: str, why: str) -> None:
        if not self._down_logged:
            logger.warning(
                "prepared joins: cannot ask the cluster's Redis (%s): a send_join "
                "this node did not prepare is let through while it is unreachable",
                why,
            )
            self._down_logged = True
        logger.info("prepared joins: join %s let through unchecked (Redis unreachable)", key[:16])

    # -- the thread --------------------------------------------------------

    def _run(self, client: Any) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is _STOP:
                    return
                if isinstance(item, _Item):
                    self._serve(client, item)
        finally:
            client.close()

    def _serve(self, client: Any, item: _Item) -> None:
        name = PREFIX + item.key
        try:
            if time.monotonic() > item.deadline:
                raise TimeoutError("Redis did not answer in time")
            if item.done is None:
                client.set(name, b"1", ex=max(1, int(self._ttl)))
                return
            found = bool(client.exists(name))
        except Exception as e:
            if item.done is None:
                logger.warning("prepared joins: not written to Redis: %s", _describe(e))
            else:
                self._reactor.callFromThread(_fire, item.done, e)
            return
        self._reactor.callFromThread(_fire, item.done, found)


def _fire(done: defer.Deferred[bool], result: bool | Exception) -> None:
    if done.called:
        return  # timed out on the reactor's side already
    if isinstance(result, Exception):
        done.errback(result)
    else:
        done.callback(result)


def _describe(e: BaseException) -> str:
    if isinstance(e, defer.TimeoutError):
        return "Redis did not answer in time"
    return describe(e)
