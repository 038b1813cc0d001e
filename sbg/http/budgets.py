"""Token buckets and budgets: what one process may spend at once.

`RateLimiter` keeps one token bucket per key (an origin server, a peer
address); the number of keys is bounded, least recently used first out, so
an attacker cycling addresses cannot grow memory. `InflightBudget` bounds
the requests being forwarded at once, overall and per external server, so
one server exhausting its budget does not starve the others. `BodyBudget`
bounds the request body bytes held in memory at once
(`limits.max_buffered_bytes`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sbg import reasons
from sbg.config.model import Limits, RateLimit
from sbg.reasons import Refusal


class RateLimiter:
    """One token bucket per key, the least recently used keys dropped first."""

    def __init__(self, clock: Callable[[], float], max_keys: int = 65536) -> None:
        self._clock = clock
        self._max_keys = max_keys
        # key -> (tokens, time of last update)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str, limit: RateLimit) -> float:
        """Take one token for `key`: 0.0 if allowed, else seconds to wait."""
        now = self._clock()
        tokens, last = self._buckets.pop(key, (float(limit.burst), now))
        tokens = min(float(limit.burst), tokens + (now - last) * limit.per_second)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            wait = 0.0
        else:
            self._buckets[key] = (tokens, now)
            wait = (1.0 - tokens) / limit.per_second
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return wait


class InflightBudget:
    """Counts requests being forwarded; `acquire` says whether one more fits."""

    def __init__(self) -> None:
        self.total = 0
        self._per_server: dict[str, int] = {}

    def acquire(self, server: str | None, max_total: int, max_per_server: int) -> bool:
        if self.total >= max_total:
            return False
        if server is not None:
            current = self._per_server.get(server, 0)
            if current >= max_per_server:
                return False
            self._per_server[server] = current + 1
        self.total += 1
        return True

    def release(self, server: str | None) -> None:
        self.total -= 1
        if server is not None:
            left = self._per_server.get(server, 1) - 1
            if left:
                self._per_server[server] = left
            else:
                self._per_server.pop(server, None)

    @contextmanager
    def hold(self, server: str | None, limits: Limits) -> Iterator[None]:
        """One request forwarded for `server`, or 503 when no budget is left."""
        if not self.acquire(server, limits.max_inflight_upstream, limits.max_inflight_per_server):
            raise Refusal(reasons.OVERLOADED, "too many requests in flight")
        try:
            yield
        finally:
            self.release(server)


class BodyBudget:
    """The request body bytes held in memory by this process, and a cap.

    A request reserves its declared length before a byte of its body is
    kept (or each chunk as it comes, for a chunked body) and releases it
    when it ends; a reservation that would go beyond the cap is refused.
    """

    def __init__(self, cap: Callable[[], int]) -> None:
        self._cap = cap
        self.held = 0

    def reserve(self, n: int) -> bool:
        """Hold `n` more bytes; False (nothing held) if that exceeds the cap."""
        if self.held + n > self._cap():
            return False
        self.held += n
        return True

    def release(self, n: int) -> None:
        self.held -= n
