"""The upstream HTTP/1.1 client (`sbg.http.upstream`) and the forwarder's use of it.

The upstream here is a raw TCP server on loopback whose every byte the test
writes, so it can answer what no sane server answers: folded or
control-laden header lines, conflicting framing, 1xx storms, bodies cut
short. Refusals are checked from both sides: the pool fails the request,
and a client going through sbg gets 502 with nothing of the upstream's
answer in it. The chunked decoder is also fed every split of a response
through an in-memory transport.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.web.http_headers import Headers

from sbg.http.forward import InvalidTarget, request_head, response_headers
from sbg.http.upstream import UpstreamResponse
from sbg.http.upstream_pool import UpstreamPool
from sbg.http.upstream_wire import UpstreamClosed, UpstreamProtocolError, parse_head
from testbed.configtools import INTERNAL_HOST, Material
from tests.asynctest import TestCase
from tests.gateway import Gateway, start_gateway
from tests.rawhttp import build_request
from tests.standin import StandinState, start_standin

SECRET = b"UPSTREAM-ANSWER-MARKER"


def ok(body: bytes = b"hello", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


# -- a raw upstream ----------------------------------------------------------


@dataclass
class Seen:
    head: bytes
    body: bytes

    @property
    def target(self) -> bytes:
        return self.head.split(b" ")[1]


class _Conn(Protocol):
    def __init__(self, server: RawServer) -> None:
        self.server = server
        self.buf = b""
        self.requests: list[Seen] = []
        self.closed: defer.Deferred[None] = defer.Deferred()
        self.open = True

    def connectionMade(self) -> None:
        self.server.conns.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end]
            m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            n = int(m.group(1)) if m else 0
            if len(self.buf) < end + 4 + n:
                return
            seen = Seen(head, self.buf[end + 4 : end + 4 + n])
            self.buf = self.buf[end + 4 + n :]
            self.requests.append(seen)
            self.server.requests.append(seen)
            self.server.respond(self, seen)

    def write(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def close(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = None) -> None:
        self.open = False
        self.closed.callback(None)


@dataclass
class RawServer:
    respond: Callable[[_Conn, Seen], None]
    conns: list[_Conn] = field(default_factory=list)
    requests: list[Seen] = field(default_factory=list)
    port: int = 0


async def serve(test: TestCase, respond: Callable[[_Conn, Seen], None]) -> RawServer:
    server = RawServer(respond)
    lp = reactor.listenTCP(  # type: ignore[attr-defined]
        0, Factory.forProtocol(lambda: _Conn(server)), interface="127.0.0.1"
    )
    server.port = lp.getHost().port

    async def cleanup() -> None:
        await lp.stopListening()
        for conn in server.conns:
            if conn.open:
                conn.transport.abortConnection()  # type: ignore[union-attr]
            await conn.closed

    test.addCleanup(lambda: defer.ensureDeferred(cleanup()))
    return server


def pool_for(
    test: TestCase, server: RawServer, clock: Any = None, max_idle: int = 8
) -> UpstreamPool:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", server.port)
    pool = UpstreamPool(clock or reactor, endpoint, max_idle=max_idle)
    test.addCleanup(pool.closeCachedConnections)
    return pool


class Sink:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.done: defer.Deferred[bool] = defer.Deferred()

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def data(self, data: bytes) -> None:
        assert data, "a sink never gets an empty piece"
        self.chunks.append(data)

    def end(self, complete: bool) -> None:
        self.done.callback(complete)


class PausingSink(Sink):
    """Pauses its response at every piece (once it delivers to it)."""

    response: UpstreamResponse | None = None

    def deliver_from(self, response: UpstreamResponse) -> None:
        self.response = response
        response.deliver(self)

    def data(self, data: bytes) -> None:
        super().data(data)
        if self.response is not None:
            self.response.pauseProducing()


def head_for(method: bytes, target: bytes = b"/x", body: bytes | None = None) -> bytes:
    head = method + b" " + target + b" HTTP/1.1\r\nHost: upstream.test\r\n"
    if body is not None:
        head += b"Content-Length: %d\r\n" % len(body)
    return head + b"\r\n"


async def fetch(
    pool: UpstreamPool, method: bytes = b"GET", target: bytes = b"/x", body: bytes | None = None
) -> tuple[UpstreamResponse, bytes, bool]:
    response = await pool.request(method, head_for(method, target, body), body)
    sink = Sink()
    response.deliver(sink)
    complete = await sink.done
    return response, sink.body, complete


def sleep(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)  # type: ignore[arg-type]


# -- the malformed answers ---------------------------------------------------

MALFORMED: dict[str, bytes] = {
    "obs_fold": b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\nContent-Length: 6\r\n\r\n",
    "leading_space": b"HTTP/1.1 200 OK\r\n X-A: 1\r\nContent-Length: 6\r\n\r\n",
    "leading_tab": b"HTTP/1.1 200 OK\r\n\tX-A: 1\r\nContent-Length: 6\r\n\r\n",
    "bare_cr": b"HTTP/1.1 200 OK\r\nX-A: a\rX-B: b\r\nContent-Length: 6\r\n\r\n",
    "bare_lf": b"HTTP/1.1 200 OK\r\nX-A: a\nX-B: b\r\nContent-Length: 6\r\n\r\n",
    "nul": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 6\r\n\r\n",
    "control": b"HTTP/1.1 200 OK\r\nX-A: a\x01b\r\nContent-Length: 6\r\n\r\n",
    "del": b"HTTP/1.1 200 OK\r\nX-A: a\x7fb\r\nContent-Length: 6\r\n\r\n",
    "control_in_reason": b"HTTP/1.1 200 O\x02K\r\nContent-Length: 6\r\n\r\n",
    "space_before_colon": b"HTTP/1.1 200 OK\r\nX-A : 1\r\nContent-Length: 6\r\n\r\n",
    "no_colon": b"HTTP/1.1 200 OK\r\nX-A 1\r\nContent-Length: 6\r\n\r\n",
    "empty_name": b"HTTP/1.1 200 OK\r\n: 1\r\nContent-Length: 6\r\n\r\n",
    "head_too_large": b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (65 * 1024) + b"\r\n\r\n",
    "too_many_lines": b"HTTP/1.1 200 OK\r\n"
    + b"".join(b"X-%d: 1\r\n" % i for i in range(101))
    + b"\r\n",
    "status_600": b"HTTP/1.1 600 Odd\r\nContent-Length: 6\r\n\r\n",
    "status_099": b"HTTP/1.1 099 Odd\r\nContent-Length: 6\r\n\r\n",
    "status_two_digits": b"HTTP/1.1 20 OK\r\nContent-Length: 6\r\n\r\n",
    "http2_version": b"HTTP/2.0 200 OK\r\nContent-Length: 6\r\n\r\n",
    "double_space": b"HTTP/1.1  200 OK\r\nContent-Length: 6\r\n\r\n",
    "not_http": b"\x00\x01 this is not HTTP\r\n\r\n",
    "length_negative": b"HTTP/1.1 200 OK\r\nContent-Length: -6\r\n\r\n",
    "length_plus": b"HTTP/1.1 200 OK\r\nContent-Length: +6\r\n\r\n",
    "length_hex": b"HTTP/1.1 200 OK\r\nContent-Length: 0x6\r\n\r\n",
    "length_list": b"HTTP/1.1 200 OK\r\nContent-Length: 6, 6\r\n\r\n",
    "length_empty": b"HTTP/1.1 200 OK\r\nContent-Length:\r\n\r\n",
    "length_conflict": b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nContent-Length: 7\r\n\r\n",
    "te_gzip": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    "te_gzip_chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    "te_twice": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n",
    "te_and_length": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n",
    "switching_protocols": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
    "interim_storm": b"HTTP/1.1 100 Continue\r\n\r\n" * 9,
}


def malformed_responder(conn: _Conn, seen: Seen) -> None:
    case = seen.target.rsplit(b"/", 1)[-1].decode()
    conn.write(MALFORMED[case] + SECRET)


class StrictParsingTests(TestCase):
    async def test_each_malformed_head_fails_the_request(self) -> None:
        server = await serve(self, malformed_responder)
        pool = pool_for(self, server)
        for case in MALFORMED:
            try:
                await pool.request(b"GET", head_for(b"GET", b"/m/" + case.encode()), None)
            except UpstreamProtocolError:
                pass
            else:
                self.fail(f"{case}: accepted")
        # Nothing from a refused answer is ever reused.
        self.assertEqual(pool.idle_count, 0)
        self.assertEqual(len(server.conns), len(MALFORMED))

    async def test_each_malformed_head_is_a_502_through_sbg(self) -> None:
        """The attacker's side: a hostile upstream's answer never reaches
        the client, which gets a 502."""
        server = await serve(self, malformed_responder)
        gw = await start_gateway(
            self,
            {
                "internal_homeservers[0].upstream": f"http://127.0.0.1:{server.port}",
                "trust_levels.external.inbound": ["discovery", "keys", "legacy_media"],
            },
        )
        requests = [
            build_request(
                b"GET",
                b"/_matrix/media/v3/download/internal.example/" + case.encode(),
                [(b"Host", INTERNAL_HOST.encode())],
            )
            for case in MALFORMED
        ]
        responses = await gw.inbound_many(requests)
        for case, resp in zip(MALFORMED, responses, strict=True):
            self.assertEqual(resp.status, 502, case)
            self.assertEqual(resp.json()["errcode"], "M_UNKNOWN", case)
            self.assertNotIn(SECRET, resp.raw_head + resp.body, case)
            self.assertNotIn(b"X-A", resp.raw_head, case)
            self.assertEqual(gw.last_audit()["status"], 502, case)
        self.assertEqual(len(server.requests), len(MALFORMED))

    def test_parse_head_accepts_a_clean_head(self) -> None:
        minor, code, phrase, fields = parse_head(
            b"HTTP/1.1 404 Not Found\r\nContent-Type:  text/plain \r\nX-Empty:\r\nX-T:\ta\tb"
        )
        self.assertEqual((minor, code, phrase), (1, 404, b"Not Found"))
        self.assertEqual(
            fields, [(b"Content-Type", b"text/plain"), (b"X-Empty", b""), (b"X-T", b"a\tb")]
        )
        # An empty reason, with or without its space.
        self.assertEqual(parse_head(b"HTTP/1.0 200 ")[:3], (0, 200, b""))
        self.assertEqual(parse_head(b"HTTP/1.1 200")[:3], (1, 200, b""))


class FramingTests(TestCase):
    async def test_keep_alive_reuses_one_connection(self) -> None:
        server = await serve(self, lambda c, s: c.write(ok(b"answer " + s.target)))
        pool = pool_for(self, server)
        for target in (b"/one", b"/two", b"/three"):
            resp, body, complete = await fetch(pool, target=target)
            self.assertEqual((resp.code, body, complete), (200, b"answer " + target, True))
        self.assertEqual(len(server.conns), 1)
        self.assertEqual(
            [s.target for s in server.conns[0].requests], [b"/one", b"/two", b"/three"]
        )
        self.assertEqual(pool.idle_count, 1)

    async def test_request_written_as_given(self) -> None:
        server = await serve(self, lambda c, s: c.write(ok()))
        pool = pool_for(self, server)
        body = b'{"a": 1}' * 10000  # over the single-write size
        head = head_for(b"PUT", b"/raw%2Ftarget?", body)
        resp = await pool.request(b"PUT", head, body)
        sink = Sink()
        resp.deliver(sink)
        self.assertTrue(await sink.done)
        [seen] = server.requests
        self.assertEqual(seen.head + b"\r\n\r\n", head)
        self.assertEqual(seen.body, body)

    async def test_equal_duplicate_content_length_accepted(self) -> None:
        server = await serve(self, lambda c, s: c.write(ok(b"abc", b"Content-Length: 3\r\n")))
        pool = pool_for(self, server)
        resp, body, complete = await fetch(pool)
        self.assertEqual((body, complete, resp.length), (b"abc", True, 3))

    async def test_chunked_body_decoded(self) -> None:
        pieces = [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n",
            b"5;name=value\r\nhello\r\n",
            b"1",
            b"\r\n \r\n",
            b"10 ; ext\r\n0123456789abcdef\r\n",
            b"0\r\nX-Trailer: dropped\r\n\r\n",
        ]

        def respond(conn: _Conn, seen: Seen) -> None:
            # Each piece in its own segment, so the decoder meets the splits.
            for i, piece in enumerate(pieces):
                reactor.callLater(0.02 * i, conn.write, piece)  # type: ignore[attr-defined]

        server = await serve(self, respond)
        pool = pool_for(self, server)
        resp, body, complete = await fetch(pool)
        self.assertEqual((body, complete, resp.length), (b"hello 0123456789abcdef", True, None))
        # Chunked framing ends cleanly: the connection is reused.
        await fetch(pool)
        self.assertEqual(len(server.conns), 1)

    async def test_malformed_chunks_cut_the_body(self) -> None:
        bodies = {
            b"/size": b"zz\r\nhello\r\n0\r\n\r\n",
            b"/no-crlf": b"5\r\nhelloXX0\r\n\r\n",
            b"/size-too-long": b"1" + b"0" * 16 + b"\r\n",
            b"/trailer": b"0\r\nbad trailer\r\n\r\n",
            b"/long-line": b"5;" + b"x" * 5000,
        }

        def respond(conn: _Conn, seen: Seen) -> None:
            conn.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            conn.write(bodies[seen.target])

        server = await serve(self, respond)
        pool = pool_for(self, server)
        for target in bodies:
            resp, body, complete = await fetch(pool, target=target)
            self.assertEqual(resp.code, 200)
            self.assertFalse(complete, target)
            self.assertNotIn(b"XX", body)
        self.assertEqual(pool.idle_count, 0)

    async def test_read_until_close(self) -> None:
        def respond(conn: _Conn, seen: Seen) -> None:
            conn.write(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\nall of ")
            reactor.callLater(0.05, conn.write, b"it")  # type: ignore[attr-defined]
            reactor.callLater(0.1, conn.close)  # type: ignore[attr-defined]

        server = await serve(self, respond)
        pool = pool_for(self, server)
        resp, body, complete = await fetch(pool)
        self.assertEqual((body, complete, resp.length), (b"all of it", True, None))
        self.assertEqual(pool.idle_count, 0)

    async def test_cut_content_length_body_is_incomplete(self) -> None:
        def respond(conn: _Conn, seen: Seen) -> None:
            conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
            conn.close()

        server = await serve(self, respond)
        pool = pool_for(self, server)
        _resp, body, complete = await fetch(pool)
        self.assertEqual((body, complete), (b"only this", False))

    async def test_interim_responses_skipped(self) -> None:
        def respond(conn: _Conn, seen: Seen) -> None:
            conn.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\n")
            conn.write(ok(b"final"))

        server = await serve(self, respond)
        pool = pool_for(self, server)
        resp, body, complete = await fetch(pool, b"PUT", body=b"{}")
        self.assertEqual((resp.code, body, complete), (200, b"final", True))
        self.assertEqual(resp.headers, [(b"Content-Length", b"5")])

    async def test_bodiless_responses(self) -> None:
        """HEAD, 204 and 304 have no body whatever their framing headers say;
        the connection stays usable."""

        def respond(conn: _Conn, seen: Seen) -> None:
            if seen.target == b"/204":
                conn.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            elif seen.target == b"/304":
                conn.write(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n")
            elif seen.target == b"/head-chunked":
                conn.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            else:
                conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")

        server = await serve(self, respond)
        pool = pool_for(self, server)
        for method, target in (
            (b"HEAD", b"/head"),
            (b"GET", b"/204"),
            (b"GET", b"/304"),
            (b"HEAD", b"/head-chunked"),
        ):
            resp, body, complete = await fetch(pool, method, target)
            self.assertEqual((body, complete, resp.length), (b"", True, 0), target)
        self.assertEqual(len(server.conns), 1)

    async def test_not_reused_when_the_response_says_so(self) -> None:
        answers = {
            b"/close": ok(b"a", b"Connection: keep-alive, close\r\n"),
            b"/http10": b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\na",
            b"/extra": ok(b"a") + b"HTTP/1.1 200 OK\r\n",
            b"/fine": ok(b"a"),
        }
        server = await serve(self, lambda c, s: c.write(answers[s.target]))
        pool = pool_for(self, server)
        for target in answers:
            _resp, body, complete = await fetch(pool, target=target)
            self.assertEqual((body, complete), (b"a", True))
        await fetch(pool, target=b"/fine")
        # One connection each for the first three; /fine's is reused.
        self.assertEqual(len(server.conns), 4)

    async def test_body_delivered_later_is_buffered_bounded_and_complete(self) -> None:
        def respond(conn: _Conn, seen: Seen) -> None:
            if seen.target == b"/close":
                conn.write(b"HTTP/1.1 200 OK\r\n\r\nuntil close")
                conn.close()
            else:
                conn.write(ok(b"later"))

        server = await serve(self, respond)
        pool = pool_for(self, server)
        for target, expected in ((b"/x", b"later"), (b"/close", b"until close")):
            resp = await pool.request(b"GET", head_for(b"GET", target), None)
            await sleep(0.1)
            sink = Sink()
            resp.deliver(sink)
            self.assertTrue(await sink.done)
            self.assertEqual(sink.body, expected)
        self.assertEqual(pool.idle_count, 0)  # the second one ended by closing


class RetryTests(TestCase):
    async def _stale_server(self) -> RawServer:
        """Answers the first request of a connection; closes it, without a
        byte, on the second (as a server does that timed the connection out
        just as the request came)."""

        def respond(conn: _Conn, seen: Seen) -> None:
            if len(conn.requests) == 1:
                conn.write(ok(b"fresh"))
            else:
                conn.close()

        return await serve(self, respond)

    async def test_idempotent_request_retried_once_on_a_fresh_connection(self) -> None:
        server = await self._stale_server()
        pool = pool_for(self, server)
        await fetch(pool)
        _resp, body, complete = await fetch(pool, b"PUT", body=b"{}")
        self.assertEqual((body, complete), (b"fresh", True))
        self.assertEqual(len(server.conns), 2)
        self.assertEqual(len(server.requests), 3)

    async def test_post_never_retried(self) -> None:
        server = await self._stale_server()
        pool = pool_for(self, server)
        await fetch(pool)
        with self.assertRaises(UpstreamClosed):
            await fetch(pool, b"POST", body=b"{}")
        self.assertEqual(len(server.requests), 2)
        self.assertEqual(len(server.conns), 1)

    async def test_fresh_connection_never_retried(self) -> None:
        server = await serve(self, lambda c, s: c.close())
        pool = pool_for(self, server)
        with self.assertRaises(UpstreamClosed):
            await fetch(pool, b"PUT", body=b"{}")
        self.assertEqual(len(server.requests), 1)

    async def test_retried_only_once(self) -> None:
        def respond(conn: _Conn, seen: Seen) -> None:
            if server.requests == [seen]:
                conn.write(ok())
            else:
                conn.close()

        server = await serve(self, respond)
        pool = pool_for(self, server)
        await fetch(pool)
        with self.assertRaises(UpstreamClosed):
            await fetch(pool, b"GET")
        self.assertEqual(len(server.requests), 3)

    async def test_no_retry_once_the_answer_began(self) -> None:
        def respond(conn: _Conn, seen: Seen) -> None:
            if len(conn.requests) == 1:
                conn.write(ok())
            else:
                conn.write(b"HTTP/1.1 200 O")
                conn.close()

        server = await serve(self, respond)
        pool = pool_for(self, server)
        await fetch(pool)
        with self.assertRaises(UpstreamProtocolError):
            await fetch(pool, b"GET")
        self.assertEqual(len(server.requests), 2)


class PoolTests(TestCase):
    async def test_idle_connections_expire(self) -> None:
        clock = task.Clock()
        server = await serve(self, lambda c, s: c.write(ok()))
        pool = pool_for(self, server, clock=clock)
        await fetch(pool)
        self.assertEqual(pool.idle_count, 1)
        clock.advance(19)
        self.assertEqual(pool.idle_count, 1)
        clock.advance(1.5)
        self.assertEqual(pool.idle_count, 0)
        await server.conns[0].closed  # really closed, not just forgotten
        await fetch(pool)
        self.assertEqual(len(server.conns), 2)

    async def test_expired_connection_not_reused_when_the_sweep_is_late(self) -> None:
        now = [1000.0]

        class LateClock(task.Clock):
            def seconds(self) -> float:
                return now[0]

        server = await serve(self, lambda c, s: c.write(ok()))
        pool = pool_for(self, server, clock=LateClock())
        await fetch(pool)
        now[0] += 25  # the sweep timer has not run
        await fetch(pool)
        self.assertEqual(len(server.conns), 2)
        await server.conns[0].closed

    async def test_max_idle_and_close_cached_connections(self) -> None:
        release: list[_Conn] = []

        def respond(conn: _Conn, seen: Seen) -> None:
            release.append(conn)

        server = await serve(self, respond)
        pool = pool_for(self, server, max_idle=2)
        fetches = [defer.ensureDeferred(fetch(pool, target=b"/%d" % i)) for i in range(3)]
        while len(release) < 3:
            await sleep(0.01)
        for conn in release:
            conn.write(ok())
        await defer.gatherResults(fetches)
        self.assertEqual(len(server.conns), 3)
        self.assertEqual(pool.idle_count, 2)
        await pool.closeCachedConnections()
        self.assertEqual(pool.idle_count, 0)
        for conn in server.conns:
            await conn.closed

    async def test_unsolicited_bytes_or_close_drop_an_idle_connection(self) -> None:
        def respond(conn: _Conn, seen: Seen) -> None:
            conn.write(ok())
            if seen.target == b"/junk":
                reactor.callLater(0.05, conn.write, b"HTTP/1.1 200 OK\r\n")  # type: ignore[attr-defined]
            elif seen.target == b"/close":
                reactor.callLater(0.05, conn.close)  # type: ignore[attr-defined]

        server = await serve(self, respond)
        pool = pool_for(self, server)
        for target in (b"/junk", b"/close"):
            await fetch(pool, target=target)
            self.assertEqual(pool.idle_count, 1)
            await sleep(0.2)
            self.assertEqual(pool.idle_count, 0, target)
        await fetch(pool)
        self.assertEqual(len(server.conns), 3)

    async def test_cancel_while_waiting_aborts_the_connection(self) -> None:
        server = await serve(self, lambda c, s: None)  # never answers
        pool = pool_for(self, server)
        d = pool.request(b"GET", head_for(b"GET"), None)
        while not server.requests:
            await sleep(0.01)
        d.cancel()
        with self.assertRaises(defer.CancelledError):
            await d
        await server.conns[0].closed
        self.assertEqual(pool.idle_count, 0)

    async def test_connection_refused(self) -> None:
        # A port nothing listens on: bind one, then close it.
        lp = reactor.listenTCP(0, Factory(), interface="127.0.0.1")  # type: ignore[attr-defined]
        dead = lp.getHost().port
        await lp.stopListening()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", dead)
        pool = UpstreamPool(reactor, endpoint, max_idle=1)
        from twisted.internet.error import ConnectionRefusedError

        with self.assertRaises(ConnectionRefusedError):
            await pool.request(b"GET", head_for(b"GET"), None)


class BackpressureTests(TestCase):
    async def test_paused_consumer_stops_reading(self) -> None:
        size = 16 * 1024 * 1024
        block = b"x" * (1024 * 1024)

        def respond(conn: _Conn, seen: Seen) -> None:
            conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            for _ in range(size // len(block)):
                conn.write(block)

        server = await serve(self, respond)
        pool = pool_for(self, server)
        response = await pool.request(b"GET", head_for(b"GET"), None)

        class Pausing(Sink):
            def data(self, data: bytes) -> None:
                super().data(data)
                if len(self.chunks) == 1:
                    response.pauseProducing()

        sink = Pausing()
        response.deliver(sink)
        await sleep(0.5)
        received = len(sink.body)
        self.assertLess(received, 1024 * 1024, "reading went on while paused")
        self.assertFalse(sink.done.called)
        response.resumeProducing()
        self.assertTrue(await sink.done)
        self.assertEqual(len(sink.body), size)
        # Resumed and complete: the connection is back, and it reads again.
        await fetch(pool)
        self.assertEqual(len(server.conns), 1)

    async def test_stop_producing_aborts(self) -> None:
        def respond(conn: _Conn, seen: Seen) -> None:
            conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nsome")

        server = await serve(self, respond)
        pool = pool_for(self, server)
        response = await pool.request(b"GET", head_for(b"GET"), None)
        sink = Sink()
        response.deliver(sink)
        await sleep(0.05)
        response.stopProducing()
        self.assertFalse(await sink.done)
        await server.conns[0].closed
        self.assertEqual(pool.idle_count, 0)


# -- every split of one response, through an in-memory transport -------------


class _MemoryEndpoint:
    def __init__(self) -> None:
        self.protocols: list[Any] = []

    def connect(self, factory: IProtocolFactory) -> defer.Deferred[Any]:
        proto = factory.buildProtocol(None)  # type: ignore[arg-type]
        assert proto is not None
        proto.makeConnection(StringTransport())
        self.protocols.append(proto)
        return defer.succeed(proto)


class SplitTests(TestCase):
    def test_every_split_of_a_chunked_response(self) -> None:
        response = (
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n"
            b"3;x=1\r\nabc\r\nA\r\n0123456789\r\n0\r\nT: 1\r\n\r\n"
        )
        for late in (False, True):
            for i in range(len(response)):
                for j in range(i, len(response)):
                    self._split(response, [response[:i], response[i:j], response[j:]], late)

    def _connection(self) -> tuple[UpstreamPool, Any, defer.Deferred[UpstreamResponse]]:
        endpoint = _MemoryEndpoint()
        pool = UpstreamPool(task.Clock(), endpoint, max_idle=1)  # type: ignore[arg-type]
        d = pool.request(b"GET", head_for(b"GET"), None)
        return pool, endpoint.protocols[0], d

    def test_head_trickling_in_single_bytes(self) -> None:
        head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * i) for i in range(90))
        pool, conn, d = self._connection()
        for byte in head + b"Content-Length: 2\r\n\r\nok":
            conn.dataReceived(bytes([byte]))
        response = self.successResultOf(d)
        self.assertEqual(len(response.headers), 91)
        self.assertEqual(response.headers[89], (b"X-89", b"v" * 89))
        sink = Sink()
        response.deliver(sink)
        self.assertEqual(sink.body, b"ok")
        self.assertEqual(pool.idle_count, 1)

    def test_endless_head_refused_past_the_limit(self) -> None:
        pool, conn, d = self._connection()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nX-Endless: ")
        sent = 0
        while not d.called:
            conn.dataReceived(b"a" * 1000)
            sent += 1000
        self.failureResultOf(d, UpstreamProtocolError)
        self.assertGreater(sent, 64 * 1024)
        self.assertLess(sent, 66 * 1024)
        self.assertTrue(conn.transport.disconnecting)
        self.assertEqual(pool.idle_count, 0)

    def _split(self, response: bytes, parts: list[bytes], late: bool) -> None:
        """Feed `parts`; deliver the body at once, or after everything came."""
        where = (late, [len(p) for p in parts])
        endpoint = _MemoryEndpoint()
        pool = UpstreamPool(task.Clock(), endpoint, max_idle=1)  # type: ignore[arg-type]
        d = pool.request(b"GET", head_for(b"GET"), None)
        [conn] = endpoint.protocols
        sink = PausingSink()
        if not late:
            # A consumer that pauses at every piece and never resumes: the
            # connection must still go back to the pool reading.
            d.addCallback(sink.deliver_from)
        for part in parts:
            if part:
                conn.dataReceived(part)
        if late:
            self.successResultOf(d).deliver(sink)  # a consumer that never pauses
        self.assertEqual(sink.body, b"abc0123456789", where)
        self.assertTrue(self.successResultOf(sink.done), where)
        self.assertEqual(pool.idle_count, 1, where)
        # Reading was resumed before the connection went back to the pool.
        self.assertEqual(conn.transport.producerState, "producing", where)


# -- the request head the forwarder builds -------------------------------------


class RequestHeadTests(TestCase):
    def test_hop_by_hop_dropped_and_framing_replaced(self) -> None:
        headers = Headers()
        for name, value in [
            (b"Host", b"matrix.internal.example"),
            (b"Connection", b"keep-alive, X-Named"),
            (b"X-Named", b"dropped"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Content-Length", b"999"),
            (b"Expect", b"100-continue"),
            (b"X-Forwarded-For", b"6.6.6.6"),
            (b"Proxy-Authorization", b"Basic c2VjcmV0"),
            (b"Authorization", b'X-Matrix origin="a",key="k",sig="s"'),
            (b"X-Kept", b"one"),
            (b"X-Kept", b"two"),
        ]:
            headers.addRawHeader(name, value)
        head = request_head(b"PUT", b"/p%2Fq?", headers, b"10.0.0.1", b"{}")
        lines = head.split(b"\r\n")
        self.assertEqual(lines[0], b"PUT /p%2Fq? HTTP/1.1")
        self.assertTrue(head.endswith(b"\r\n\r\n"))
        names = [line.split(b":")[0].lower() for line in lines[1:] if line]
        self.assertEqual(
            sorted(names),
            sorted(
                [
                    b"host",
                    b"authorization",
                    b"x-kept",
                    b"x-kept",
                    b"x-forwarded-for",
                    b"content-length",
                ]
            ),
        )
        self.assertIn(b"X-Forwarded-For: 10.0.0.1\r\n", head)
        self.assertIn(b"Content-Length: 2\r\n", head)
        self.assertIn(b'Authorization: X-Matrix origin="a",key="k",sig="s"\r\n', head)
        # No body, no X-Forwarded-For: neither header.
        bare = request_head(b"GET", b"/x", headers, None, None)
        self.assertNotIn(b"content-length", bare.lower())
        self.assertNotIn(b"x-forwarded-for", bare.lower())

    def test_unsendable_requests_refused(self) -> None:
        headers = Headers()
        headers.addRawHeader(b"Host", b"h")
        for target in (b"/a b", b"/a\r\nX: y", b"*", b"http://h/x", b"/\x7f", b"/\xc3\xa9"):
            with self.assertRaises(InvalidTarget):
                request_head(b"GET", target, headers, None, None)
        with self.assertRaises(InvalidTarget):
            request_head(b"GET", b"/x", headers, b"1.2.3.4\r\nX-Evil: 1", None)

    def test_response_headers_filtered(self) -> None:
        conn: Any = None
        response = UpstreamResponse(
            conn,
            1,
            200,
            b"OK",
            [
                (b"Content-Type", b"application/json"),
                (b"Connection", b"X-Private"),
                (b"X-Private", b"1"),
                (b"Transfer-Encoding", b"chunked"),
                (b"Content-Length", b"5"),
                (b"Keep-Alive", b"timeout=5"),
                (b"Set-Cookie", b"a=1"),
                (b"Set-Cookie", b"b=2"),
            ],
            5,
        )
        out = response_headers(response)
        self.assertEqual(
            sorted((k, v) for k, vs in out.getAllRawHeaders() for v in vs),
            [
                (b"Content-Type", b"application/json"),
                (b"Set-Cookie", b"a=1"),
                (b"Set-Cookie", b"b=2"),
            ],
        )


# -- through sbg: what the client sees -----------------------------------------


class ThroughGatewayTests(TestCase):
    async def test_chunked_and_close_delimited_relayed_whole(self) -> None:
        def respond(conn: _Conn, seen: Seen) -> None:
            if seen.target.endswith(b"/chunked"):
                conn.write(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Up: 1\r\n\r\n"
                    b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
                )
            else:
                conn.write(b"HTTP/1.0 200 OK\r\nX-Up: 2\r\n\r\nuntil close")
                conn.close()

        server = await serve(self, respond)
        gw = await start_gateway(
            self,
            {
                "internal_homeservers[0].upstream": f"http://127.0.0.1:{server.port}",
                "trust_levels.external.inbound": ["discovery", "keys", "legacy_media"],
            },
        )
        target = b"/_matrix/media/v3/download/internal.example/"
        host = [(b"Host", INTERNAL_HOST.encode())]
        chunked, close = await gw.inbound_many(
            [
                build_request(b"GET", target + b"chunked", host),
                build_request(b"GET", target + b"close", host),
            ]
        )
        self.assertEqual((chunked.status, chunked.body), (200, b"hello world"))
        self.assertEqual(chunked.header(b"X-Up"), b"1")
        self.assertEqual((close.status, close.body), (200, b"until close"))
        self.assertEqual(close.header(b"X-Up"), b"2")
        self.assertEqual(gw.audit.records[-1]["bytes_out"], len(b"until close"))

    async def _https_gateway(self, ca: Callable[[Material], str]) -> tuple[Gateway, StandinState]:
        """sbg whose internal upstream is HTTPS (the stand-in, with the
        partner's certificate for 127.0.0.1), trusting `ca` only."""
        upstream: list[StandinState] = []

        def overrides(m: Material) -> dict[str, Any]:
            state, port = start_standin(tls=(m.partner_tls.certificate, m.partner_tls.private_key))
            self.addCleanup(port.stopListening)
            upstream.append(state)
            return {
                "internal_homeservers[0].upstream": f"https://127.0.0.1:{state.port}",
                "internal_homeservers[0].upstream_ca": ca(m),
            }

        gw = await start_gateway(self, overrides)
        return gw, upstream[0]

    async def test_https_upstream_with_its_pinned_ca(self) -> None:
        gw, upstream = await self._https_gateway(lambda m: m.partner_ca.certificate)
        request = build_request(
            b"GET", b"/_matrix/key/v2/server", [(b"Host", INTERNAL_HOST.encode())]
        )
        first, second = await gw.inbound_many([request, request])
        self.assertEqual((first.status, first.json()), (200, {"ok": True}))
        self.assertEqual(second.status, 200)
        self.assertEqual([s.uri for s in upstream.requests], [b"/_matrix/key/v2/server"] * 2)
        # Both went over one kept-alive TLS connection, which is back in its pool.
        pool = gw.service.runtime.upstream_pool(gw.config.internal_homeservers[0])
        self.assertEqual(pool.idle_count, 1)

    async def test_https_upstream_with_another_ca_is_a_502(self) -> None:
        gw, upstream = await self._https_gateway(lambda m: m.internal_ca.certificate)
        request = build_request(
            b"GET", b"/_matrix/key/v2/server", [(b"Host", INTERNAL_HOST.encode())]
        )
        resp = await gw.inbound(request)
        self.assertEqual(resp.status, 502)
        self.assertEqual(resp.json()["errcode"], "M_UNKNOWN")
        self.assertEqual(gw.last_audit()["code"], "upstream_tls")
        self.assertEqual(upstream.requests, [])
