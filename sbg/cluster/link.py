"""`RedisLink`: the thread that owns the blocking Redis client.

The reactor never waits on Redis. One thread (`sbg-cluster`) owns the
client (redis-py: Debian 12's 4.3 or a newer one) and does everything that
talks to Redis, in order:

- every `POLL_INTERVAL` it reads the kill-switch records (one HGETALL),
  and every `ANNOUNCE_INTERVAL` the nodes' announcements and Redis's clock,
  and writes this node's announcement;
- between polls it runs the writes the reactor queued (`submit`): a
  change made through this node's admin API (an `operation`: each record
  gets the version above every version Redis or this node had for its
  switch) or a record Redis lacks or holds older (a `merge`), each in one
  optimistic transaction (`WATCH`/`MULTI`/`EXEC`).

Results go back to the reactor with `callFromThread`: a poll's snapshot when
the records changed and after each full read (`on_snapshot`), a change of reachability
(`on_state`), and each write's Deferred. Every call has a 1 s socket
timeout and no retry: Redis down is noticed within about a second, and the
next poll tries again.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from twisted.internet import defer

from sbg.cluster.nodes import NodeInfo, decode_nodes, forgotten
from sbg.cluster.records import Record, RecordError, decode, field_name, newer
from sbg.config.model import ClusterSettings
from sbg.killswitch.state import Switch

logger = logging.getLogger(__name__)

KILLSWITCH_KEY = "sbg:killswitch"
NODES_KEY = "sbg:nodes"
POLL_INTERVAL = 0.25
# The nodes and Redis's clock are read, and this node announced, this often.
ANNOUNCE_INTERVAL = 5.0
TIMEOUT = 1.0
WATCH_ATTEMPTS = 20
_STOP = object()


class RedisUnavailable(Exception):
    """Redis did not answer in time, refused, or the write could not be
    made. When the answer was lost after the command was sent, the write
    may still have been made: the next poll shows it."""


@dataclass(frozen=True)
class Snapshot:
    """What one poll read.

    Attributes:
        bad_fields: fields of the kill-switch hash that are not records.
        nodes: the nodes' announcements, as of the last full read.
        now_ms: Redis's clock at that read, taken at `now_at`
            (`time.monotonic()`).
    """

    records: dict[Switch, Record]
    bad_fields: tuple[str, ...]
    nodes: tuple[NodeInfo, ...]
    now_ms: int
    now_at: float

    def redis_now_ms(self) -> int:
        """Redis's clock now, as far as this node can tell."""
        return self.now_ms + int((time.monotonic() - self.now_at) * 1000)


@dataclass(frozen=True)
class Announcement:
    """What this node says of itself (all but the times)."""

    node: str
    config_sha256: str
    version: str
    workers: int
    instance: str
    started_ts: int


@dataclass
class _Write:
    kind: Literal["operation", "merge"]
    records: list[Record]
    deadline: float
    done: defer.Deferred[list[Record]]


def make_client(settings: ClusterSettings) -> Any:
    """A redis-py client for `settings` (imported only here: only a node
    with a `cluster` block needs the library)."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    kwargs: dict[str, Any] = {
        "db": settings.db,
        "password": settings.password,
        "socket_timeout": TIMEOUT,
        "socket_connect_timeout": TIMEOUT,
        "retry": Retry(NoBackoff(), 0),
        "client_name": f"sbg-{settings.node_name}",
    }
    if settings.service is not None:
        # The primary the sentinels name, asked again at each new connection
        # (after a failover, the next poll finds the new primary).
        from redis.sentinel import Sentinel

        sentinel_kwargs = {
            "socket_timeout": TIMEOUT,
            "socket_connect_timeout": TIMEOUT,
            "retry": Retry(NoBackoff(), 0),
        }
        manager = Sentinel(list(settings.sentinels), sentinel_kwargs=sentinel_kwargs)
        return manager.master_for(settings.service, **kwargs)
    if settings.unix_socket is not None:
        kwargs["unix_socket_path"] = settings.unix_socket
    else:
        kwargs["host"] = settings.host
        kwargs["port"] = settings.port
    return redis.Redis(**kwargs)


def _errors() -> tuple[type[BaseException], ...]:
    import redis

    return (redis.exceptions.RedisError, OSError)


class RedisLink:
    """The reactor's side of the thread that talks to Redis."""

    def __init__(
        self,
        settings: ClusterSettings,
        reactor: Any,
        announcement: Announcement,
        on_snapshot: Callable[[Snapshot], None],
        on_state: Callable[[bool, str], None],
        client_factory: Callable[[ClusterSettings], Any] = make_client,
    ) -> None:
        self.settings = settings
        self.announcement = announcement  # replaced whole by the reactor (reload)
        self._reactor = reactor
        self._on_snapshot = on_snapshot
        self._on_state = on_state
        self._client_factory = client_factory
        self._queue: queue.Queue[object] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._first = threading.Event()
        self._first_snapshot: Snapshot | None = None
        self._connected: bool | None = None
        self._delivered: dict[bytes, bytes] | None = None
        self._next_full = 0.0
        # From the last full read: the nodes, and Redis's clock (ms) as read
        # at `_now_at` (time.monotonic()).
        self._nodes: tuple[NodeInfo, ...] = ()
        self._now_ms = 0
        self._now_at = 0.0

    # -- the reactor's side ------------------------------------------------

    def start(self, wait: float) -> Snapshot | None:
        """Start the thread and wait up to `wait` s for its first poll:
        its snapshot, or None when Redis did not answer."""
        client = self._client_factory(self.settings)
        self._thread = threading.Thread(
            target=self._run, args=(client,), name="sbg-cluster", daemon=True
        )
        self._thread.start()
        self._first.wait(wait)
        return self._first_snapshot

    def stop(self) -> None:
        self._queue.put(_STOP)

    def submit(
        self, kind: Literal["operation", "merge"], records: list[Record], timeout: float = 3.0
    ) -> defer.Deferred[list[Record]]:
        """Queue a write; fires with the records Redis holds afterwards for
        those switches, or fails with `RedisUnavailable`. Not tried once
        `timeout` s have passed."""
        done: defer.Deferred[list[Record]] = defer.Deferred()
        self._queue.put(_Write(kind, records, time.monotonic() + timeout, done))
        return done

    # -- the thread --------------------------------------------------------

    def _run(self, client: Any) -> None:
        next_poll = 0.0
        try:
            while True:
                try:
                    item = self._queue.get(timeout=max(0.0, next_poll - time.monotonic()))
                except queue.Empty:
                    item = None
                if item is _STOP:
                    return
                if isinstance(item, _Write):
                    self._write(client, item)
                if time.monotonic() >= next_poll:
                    self._poll(client)
                    next_poll = time.monotonic() + POLL_INTERVAL
        finally:
            client.close()

    def _state(self, connected: bool, detail: str) -> None:
        if connected != self._connected:
            self._connected = connected
            self._reactor.callFromThread(self._on_state, connected, detail)

    def _poll(self, client: Any) -> None:
        """Read the records (one HGETALL); every `ANNOUNCE_INTERVAL` also the
        nodes and Redis's clock, and announce this node. A snapshot goes to
        the reactor when the records changed, and after each full read."""
        full = self._first_snapshot is None or time.monotonic() >= self._next_full
        try:
            raw = client.hgetall(KILLSWITCH_KEY)
            if full:
                self._read_nodes(client)
                self._next_full = time.monotonic() + ANNOUNCE_INTERVAL
        except Exception as e:
            self._failed(e)
            self._first.set()
            return
        self._state(True, "")
        if not full and raw == self._delivered:
            return
        self._delivered = raw
        snapshot = self._snapshot(raw)
        if self._first_snapshot is None:
            self._first_snapshot = snapshot
            self._first.set()
        self._reactor.callFromThread(self._on_snapshot, snapshot)

    def _snapshot(self, raw: dict[bytes, bytes]) -> Snapshot:
        records: dict[Switch, Record] = {}
        bad = []
        for name, value in sorted(raw.items()):
            try:
                record = decode(name, value)
            except RecordError:
                bad.append(name.decode("utf-8", "replace")[:200])
                continue
            records[record.switch] = record
        return Snapshot(records, tuple(bad), self._nodes, self._now_ms, self._now_at)

    def _read_nodes(self, client: Any) -> None:
        """Redis's clock, then this node's announcement written and every
        node's read (the stale ones removed)."""
        seconds, micros = client.time()
        self._now_at = time.monotonic()
        self._now_ms = int(seconds) * 1000 + int(micros) // 1000
        a = self.announcement
        info = NodeInfo(
            node=a.node,
            config_sha256=a.config_sha256,
            version=a.version,
            workers=a.workers,
            started_ts=a.started_ts,
            last_seen_ts=self._now_ms,
            instance=a.instance,
        )
        pipe = client.pipeline(transaction=False)
        pipe.hset(NODES_KEY, a.node, info.encode())
        stale = forgotten(self._nodes, self._now_ms)
        if stale:
            pipe.hdel(NODES_KEY, *stale)
        pipe.hgetall(NODES_KEY)
        self._nodes = tuple(decode_nodes(pipe.execute()[-1]))

    def _write(self, client: Any, write: _Write) -> None:
        if time.monotonic() > write.deadline:
            error = RedisUnavailable("not tried: Redis did not answer in time")
            self._reactor.callFromThread(write.done.errback, error)
            return
        try:
            result = self._transact(client, write)
        except Exception as e:
            if not isinstance(e, RedisUnavailable):
                self._failed(e)
            self._reactor.callFromThread(write.done.errback, RedisUnavailable(describe(e)))
            return
        self._reactor.callFromThread(write.done.callback, result)

    def _failed(self, e: Exception) -> None:
        """Redis did not answer, or answered what this node cannot use (a
        bug, or not a Redis): unreachable either way, never a crash of
        this thread."""
        if not isinstance(e, _errors()):
            logger.error("cluster: unexpected error talking to Redis", exc_info=e)
        self._state(False, describe(e))
        # The first poll that succeeds again is a full one, and its snapshot
        # goes to the reactor even if nothing changed (pending engages wait
        # for it).
        self._delivered = None
        self._next_full = 0.0

    def _transact(self, client: Any, write: _Write) -> list[Record]:
        import redis

        fields = [field_name(r.switch) for r in write.records]
        for _ in range(WATCH_ATTEMPTS):
            with client.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(KILLSWITCH_KEY)
                    values = pipe.hmget(KILLSWITCH_KEY, fields)
                    current = [_current(f, v) for f, v in zip(fields, values, strict=True)]
                    held = [
                        _decide(write.kind, mine, cur)
                        for mine, cur in zip(write.records, current, strict=True)
                    ]
                    changes = {
                        f: h.encode()
                        for f, h, cur in zip(fields, held, current, strict=True)
                        if h is not cur
                    }
                    pipe.multi()
                    if changes:
                        pipe.hset(KILLSWITCH_KEY, mapping=changes)
                    pipe.execute()
                    return held
                except redis.exceptions.WatchError:
                    continue
        raise RedisUnavailable("the records kept changing under this write")


def _current(field: str, value: bytes | None) -> Record | None:
    if value is None:
        return None
    try:
        return decode(field, value)
    except RecordError:
        return None  # overwritten: a record that does not parse holds nothing


def _decide(kind: Literal["operation", "merge"], mine: Record, current: Record | None) -> Record:
    """The record Redis is to hold: an operation's, above every version
    known; for a merge, the newer of the two."""
    if kind == "operation":
        floor = max(mine.version, current.version if current is not None else 0)
        return dataclasses.replace(mine, version=floor + 1)
    if newer(mine, current) or current is None:
        return mine
    return current


def describe(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:300]
