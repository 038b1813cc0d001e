"""Fetching the signing keys of `key_fetch: fetch` servers (docs/decisions.md,
inbound step 15).

`KeyFetcher` asks a server for its `/_matrix/key/v2/server` over TLS, from
the server's first `federation_hosts` entry (port from that entry, else from
`server_name`, else 8448; `addresses` applies), with SNI, `Host` and the
certificate check for that host and only `tls_ca` trusted when set (else
`outbound.default_trust`). A response is used only if
`validate_key_response` accepts it (right `server_name`, self-signed by
every key it lists, unexpired); its keys are then cached until their
`valid_until_ts`, and the next successful response replaces them.

The fetcher belongs to the long-lived `Runtime`, not to a `Policy`
snapshot: a configuration reload builds a new `Policy` (and `KeyRing` of
pinned keys) but keeps the fetched keys. Each cache entry remembers where
its keys came from (host, port, address, `tls_ca`); when a reload changes
any of these, the entry is dropped. Everything runs on the reactor thread;
nothing blocks it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory, IResponse
from zope.interface import implementer

from sbg.clients.connect import HTTPConnectEndpoint
from sbg.config.model import ExternalHomeserver, OutboundSettings
from sbg.hosts import HostParseError, format_authority, server_name_authority
from sbg.matrix.jsonbody import parse_json_object
from sbg.matrix.keys import KeyResponseError, validate_key_response
from sbg.reasons import Refusal
from sbg.tls.client import ClientTLSPolicy, NoUpstreamTrust
from sbg.tls.pem import PemError

if TYPE_CHECKING:
    from signedjson.types import VerifyKey

logger = logging.getLogger(__name__)

KEY_PATH = b"/_matrix/key/v2/server"
DEFAULT_KEY_PORT = 8448
MAX_RESPONSE_SIZE = 1024 * 1024
FETCH_TIMEOUT = 10.0
# An unknown key id makes sbg ask the server again at most this often.
MIN_REFETCH_INTERVAL = 60.0


class KeyFetchError(Exception):
    """A key fetch that failed or returned something that must not be used."""


@dataclass(frozen=True)
class FetchTarget:
    """Where and how a server's keys are fetched.

    Attributes:
        host: the name for SNI, `Host` and the certificate check.
        port: the port of that name (part of `Host` unless 443).
        connect: the (host or IP, port) actually connected to (`addresses`).
        ca_files: the only trusted CAs (`tls_ca`), or None for the default.
    """

    host: str
    port: int
    connect: tuple[str, int]
    ca_files: tuple[str, ...] | None


def fetch_target(server: ExternalHomeserver) -> FetchTarget:
    """The key-fetch target of SERVER.

    The first `federation_hosts` entry; a server without one is fetched
    from its `server_name`'s host.

    Raises:
        KeyFetchError: the server name cannot be parsed.
    """
    try:
        name_host, name_port = server_name_authority(server.server_name)
    except HostParseError as e:
        raise KeyFetchError(f"bad server name {server.server_name!r}: {e}") from None
    if server.federation_hosts:
        first = server.federation_hosts[0]
        host, port = first.host, first.port
    else:
        host, port = name_host, None
    if port is None:
        port = name_port if name_port is not None else DEFAULT_KEY_PORT
    authority = format_authority(host, port)
    connect = dict(server.addresses).get(authority, (host, port))
    ca_files = (server.tls_ca,) if server.tls_ca else None
    return FetchTarget(host, port, connect, ca_files)


@implementer(IAgentEndpointFactory)
class _FixedEndpoint:
    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        return self._endpoint


class _CappedBody(Protocol):
    """Collects a response body; gives up (and aborts) beyond `limit` bytes."""

    def __init__(self, limit: int, declared: int | None) -> None:
        self._limit = limit
        self._declared = declared
        self._parts: list[bytes] = []
        self._size = 0
        self.done: defer.Deferred[bytes] = defer.Deferred(self._cancel)

    def _cancel(self, _d: defer.Deferred[bytes]) -> None:
        self._abort()

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def _too_large(self) -> None:
        if not self.done.called:
            self.done.errback(KeyFetchError(f"response larger than {self._limit} bytes"))
        self._abort()

    def connectionMade(self) -> None:
        if self._declared is not None and self._declared > self._limit:
            self._too_large()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._too_large()
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.done.called:
            return
        if reason is not None and reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._parts))
        else:
            self.done.errback(KeyFetchError(f"response cut short: {_describe(reason)}"))


def _describe(failure: Failure | None) -> str:
    """A one-line description of a network failure."""
    if failure is None:
        return "connection lost"
    value = failure.value
    if isinstance(value, (ResponseFailed, ResponseNeverReceived)) and value.reasons:
        return _describe(value.reasons[0])
    if isinstance(value, (defer.TimeoutError, defer.CancelledError)):
        return "timed out"
    text = str(value).strip() or type(value).__name__
    return text.splitlines()[0] if text else type(value).__name__


@dataclass
class _Cached:
    source: FetchTarget
    keys: dict[str, tuple[VerifyKey, int]]


class KeyFetcher:
    """Fetches, validates and caches `key_fetch: fetch` servers' keys.

    Args:
        reactor: for connections and timeouts.
        tls: the runtime's client TLS policy (pinned-CA creators).
        clock: seconds since the epoch, for expiry and rate limiting.
        timeout: seconds for a whole fetch (connect, TLS, response).
        max_size: the largest response body accepted, in bytes.
        min_interval: seconds between two fetches for one server.
    """

    def __init__(
        self,
        reactor: Any,
        tls: ClientTLSPolicy,
        *,
        clock: Callable[[], float] = time.time,
        timeout: float = FETCH_TIMEOUT,
        max_size: int = MAX_RESPONSE_SIZE,
        min_interval: float = MIN_REFETCH_INTERVAL,
    ) -> None:
        self._reactor = reactor
        self._tls = tls
        self._clock = clock
        self._timeout = timeout
        self._max_size = max_size
        self._min_interval = min_interval
        self._cache: dict[str, _Cached] = {}
        # Called after every change of the cache (`sbg status` with workers).
        self.on_change: Callable[[], None] | None = None
        self._last_attempt: dict[str, float] = {}
        self._waiters: dict[str, list[defer.Deferred[bool]]] = {}

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    # -- the cache -----------------------------------------------------------

    def keys_for(
        self, server: ExternalHomeserver, pinned: Mapping[str, VerifyKey]
    ) -> Mapping[str, VerifyKey]:
        """PINNED plus SERVER's unexpired fetched keys (pinned ids win).

        Only a `key_fetch: fetch` server has fetched keys, and only those
        fetched from its current target and trust.
        """
        if server.key_fetch != "fetch":
            return pinned
        cached = self._cache.get(server.server_name)
        if cached is None:
            return pinned
        try:
            source = fetch_target(server)
        except KeyFetchError:
            return pinned
        if cached.source != source:
            del self._cache[server.server_name]
            self._changed()
            return pinned
        now = self._now_ms()
        expired = [k for k, (_key, until) in cached.keys.items() if until < now]
        for key_id in expired:
            del cached.keys[key_id]
        if expired:
            self._changed()
        if not cached.keys:
            return pinned
        merged: dict[str, VerifyKey] = {k: key for k, (key, _until) in cached.keys.items()}
        merged.update(pinned)
        return MappingProxyType(merged)

    def fetched(self) -> dict[str, dict[str, int]]:
        """Server name -> key id -> usable until (ms since the epoch), for
        every key in the cache, expired ones included until they are
        dropped (`sbg status`)."""
        return {
            name: {key_id: until for key_id, (_key, until) in cached.keys.items()}
            for name, cached in self._cache.items()
        }

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:
                logger.exception("publishing the fetched keys failed")

    # -- fetching ------------------------------------------------------------

    def may_refresh(self, server: ExternalHomeserver) -> bool:
        """Whether `refresh` would fetch (or join a fetch) now: a
        `key_fetch: fetch` server not tried within `min_interval`."""
        if server.key_fetch != "fetch":
            return False
        name = server.server_name
        if name in self._waiters:
            return True
        last = self._last_attempt.get(name)
        return last is None or self._clock() - last >= self._min_interval

    def refresh(
        self, server: ExternalHomeserver, outbound: OutboundSettings
    ) -> defer.Deferred[bool]:
        """Fetch SERVER's keys again, unless it was tried within `min_interval`.

        Concurrent callers share one fetch. Never fails: a failed fetch is
        logged and the cache is left as it was.

        Returns:
            A Deferred firing True when a fetch ran and its keys replaced the
            cache, False otherwise (not a fetch server, rate limited, failed).
        """
        name = server.server_name
        if server.key_fetch != "fetch":
            return defer.succeed(False)
        waiting = self._waiters.get(name)
        if waiting is not None:
            mine: defer.Deferred[bool] = defer.Deferred()
            waiting.append(mine)
            return mine
        now = self._clock()
        last = self._last_attempt.get(name)
        if last is not None and now - last < self._min_interval:
            logger.debug("key fetch for %s skipped: last one %.0f s ago", name, now - last)
            return defer.succeed(False)
        self._last_attempt[name] = now
        first: defer.Deferred[bool] = defer.Deferred()
        self._waiters[name] = [first]
        d = defer.ensureDeferred(self._refresh(server, outbound))

        def finished(result: object) -> None:
            for w in self._waiters.pop(name, []):
                if not w.called:
                    w.callback(result is True)

        d.addBoth(finished)
        return first

    async def _refresh(self, server: ExternalHomeserver, outbound: OutboundSettings) -> bool:
        try:
            target = fetch_target(server)
            keys = await self.fetch(server, outbound)
        except KeyFetchError as e:
            logger.warning("key fetch for %s failed: %s", server.server_name, e)
            return False
        except Exception:
            logger.exception("key fetch for %s failed", server.server_name)
            return False
        now = self._now_ms()
        usable = {k: v for k, v in keys.items() if v[1] >= now}
        self._cache[server.server_name] = _Cached(target, usable)
        self._changed()
        logger.info(
            "fetched keys of %s from %s: %s",
            server.server_name,
            format_authority(target.host, target.port),
            ", ".join(sorted(usable)) or "none usable",
        )
        return True

    async def fetch(
        self, server: ExternalHomeserver, outbound: OutboundSettings
    ) -> dict[str, tuple[VerifyKey, int]]:
        """One fetch of SERVER's keys, validated; no cache, no rate limit.

        Returns:
            key id -> (verify key, usable until in ms), as
            `validate_key_response` returns them.

        Raises:
            KeyFetchError: unreachable, TLS refused, timeout, not 200, too
                large, not JSON, or refused by `validate_key_response`.
        """
        target = fetch_target(server)
        authority = format_authority(target.host, target.port)
        d = defer.ensureDeferred(self._get(target, outbound))
        d.addTimeout(self._timeout, self._reactor)
        try:
            body = await d
        except KeyFetchError as e:
            raise KeyFetchError(f"{authority}: {e}") from None
        except (NoUpstreamTrust, PemError) as e:
            raise KeyFetchError(f"{authority}: {e}") from None
        except Exception:
            raise KeyFetchError(f"{authority}: {_describe(Failure())}") from None
        try:
            parsed = parse_json_object(body)
        except Refusal as e:
            raise KeyFetchError(f"{authority}: {e.reason}") from None
        try:
            return validate_key_response(parsed, server.server_name, self._now_ms())
        except KeyResponseError as e:
            raise KeyFetchError(f"{authority}: {e}") from None

    async def _get(self, target: FetchTarget, outbound: OutboundSettings) -> bytes:
        host, port = target.connect
        tcp: IStreamClientEndpoint
        proxy = outbound.upstream_proxy
        if proxy is not None:
            tcp = HTTPConnectEndpoint(
                HostnameEndpoint(self._reactor, proxy[0], proxy[1], timeout=self._timeout),
                host,
                port,
            )
        else:
            tcp = HostnameEndpoint(self._reactor, host, port, timeout=self._timeout)
        tls = self._tls.endpoint(
            tcp,
            target.host,
            list(target.ca_files) if target.ca_files is not None else None,
            outbound.default_trust,
            listener="outbound_upstream",
        )
        pool = HTTPConnectionPool(self._reactor, persistent=False)
        agent = Agent.usingEndpointFactory(self._reactor, _FixedEndpoint(tls), pool=pool)
        url = b"https://" + format_authority(target.host, target.port).encode("ascii") + KEY_PATH
        headers = Headers({b"Accept": [b"application/json"], b"User-Agent": [b"sbg"]})
        response: IResponse = await agent.request(b"GET", url, headers)
        declared = None if response.length is UNKNOWN_LENGTH else int(response.length)
        reader = _CappedBody(self._max_size, declared)
        response.deliverBody(reader)
        body = await reader.done
        if response.code != 200:
            raise KeyFetchError(f"HTTP {response.code}")
        return body
