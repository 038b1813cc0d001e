"""HTTP framing attacks on the inbound listener and inside outbound tunnels.

Each attack is written byte by byte over real TLS. The outcome must be a
refusal, or a safe handling, and never an ambiguous forward: a request the
attacker hides in another's body, or behind a framing disagreement, is
either parsed by sbg as a request of its own (and checked like any other) or
never reaches the upstream. Whatever sbg forwards carries one framing of its
own choosing: exactly one `Content-Length` (none for a bodiless GET) and no
`Transfer-Encoding`, checked on the bytes the upstream received.
"""

from __future__ import annotations

import inspect
from typing import Any

from twisted.internet import defer

from testbed.configtools import (
    INTERNAL_SERVER,
    PARTNER_SERVER,
)
from tests.asynctest import TestCase
from tests.framing import ADMIN, TXN, Conversation, Reply, Side, head, start_outbound
from tests.gateway import start_gateway
from tests.standin import StandinState

# --------------------------------------------------------------------------
# A byte-level conversation: send raw bytes, read every response that comes
# --------------------------------------------------------------------------


# --------------------------------------------------------------------------
# Requests, written line by line
# --------------------------------------------------------------------------


def chunked(body: bytes, size: int = 7) -> bytes:
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


async def start_inbound(test: TestCase, overrides: dict[str, Any] | None = None) -> Side:
    gw = await start_gateway(test, overrides)
    return Side(gw, gw.upstream, "inbound")


# --------------------------------------------------------------------------
# What the upstream received
# --------------------------------------------------------------------------


def upstream_heads(state: StandinState) -> list[list[bytes]]:
    """The header lines of every request the upstream received, from its raw
    bytes (bodies skipped by their Content-Length)."""
    raw = state.raw_bytes
    heads = []
    while raw:
        end = raw.find(b"\r\n\r\n")
        assert end >= 0, raw[:200]
        lines = raw[:end].split(b"\r\n")
        heads.append(lines)
        raw = raw[end + 4 :]
        lengths = [
            int(x.split(b":", 1)[1]) for x in lines[1:] if x.lower().startswith(b"content-length:")
        ]
        raw = raw[lengths[0] if lengths else 0 :]
    return heads


def assert_clean_framing(test: TestCase, state: StandinState) -> None:
    """Everything the upstream got: one Content-Length at most (exactly one
    with a body), no Transfer-Encoding, no folded or bare-LF header line."""
    for lines in upstream_heads(state):
        names = [x.split(b":", 1)[0].lower() for x in lines[1:]]
        test.assertNotIn(b"transfer-encoding", names, lines)
        test.assertLessEqual(names.count(b"content-length"), 1, lines)
        if lines[0].split(b" ")[0] in (b"PUT", b"POST"):
            test.assertEqual(names.count(b"content-length"), 1, lines)
        for line in lines:
            test.assertNotIn(b"\n", line)
            test.assertNotIn(b"\r", line)
            test.assertFalse(line[:1] in (b" ", b"\t"), lines)
    test.assertEqual(len(upstream_heads(state)), len(state.requests))


def assert_never_forwarded(test: TestCase, state: StandinState, path: bytes) -> None:
    test.assertNotIn(path, [s.uri.split(b"?")[0] for s in state.requests])
    test.assertNotIn(path, state.raw_bytes)


def assert_refused(test: TestCase, conv: Conversation, statuses: tuple[int, ...] = (400,)) -> None:
    test.assertTrue(conv.final, f"no answer at all within {conv.seconds:.1f}s")
    test.assertIn(conv.final[0].status, statuses, conv.final[0].body)


# --------------------------------------------------------------------------
# The attacks, run on both sides of the border
# --------------------------------------------------------------------------


class FramingAttacks:
    """Mixed into one TestCase per side; `start` builds the side."""

    async def start(self, overrides: dict[str, Any] | None = None) -> Side:
        raise NotImplementedError

    def assert_bodiless_put(self, side: Side, reply: Reply) -> None:
        """A transaction that arrived without a body: inbound refuses it
        (inbound step 13); outbound does not read bodies and may forward it, empty."""
        t: Any = self
        if side.direction == "inbound" or reply.status == 400:
            t.assertEqual(reply.status, 400, reply.body)
            t.assertEqual(reply.json()["errcode"], "M_NOT_JSON")
            t.assertEqual(side.upstream.requests, [])
        else:
            t.assertEqual(reply.status, 200, reply.body)
            t.assertEqual([s.body for s in side.upstream.requests], [b""])
        assert_clean_framing(t, side.upstream)

    async def test_content_length_and_transfer_encoding(self) -> None:
        t: Any = self
        side = await self.start()
        h, body = side.send_txn_head()
        smuggled = side.forbidden_request()
        # CL covers the chunked body *and* the hidden request; TE does not.
        as_chunks = chunked(body) + smuggled
        for framing in (
            b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n" % len(as_chunks),
            b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n" % len(as_chunks),
            b"Transfer-Encoding: chunked\r\nContent-Length: 0\r\n",
        ):
            conv = await side.converse(h + framing + b"\r\n" + as_chunks, want=2)
            assert_refused(t, conv)
            t.assertEqual(len(conv.final), 1, conv.statuses)
            t.assertTrue(conv.closed)
        t.assertEqual(side.upstream.requests, [])
        t.assertEqual(side.upstream.raw, [])

    async def test_duplicate_or_malformed_content_length(self) -> None:
        t: Any = self
        side = await self.start()
        h, body = side.send_txn_head()
        n = len(body)
        for framing in (
            b"Content-Length: %d\r\nContent-Length: %d\r\n" % (n, n),
            b"Content-Length: %d\r\nContent-Length: %d\r\n" % (n, n + 30),
            b"Content-Length: %d, %d\r\n" % (n, n),
            b"Content-Length: +%d\r\n" % n,
            b"Content-Length: -1\r\n",
            b"Content-Length: 0x%x\r\n" % n,
            b"Content-Length: %d %d\r\n" % (n, n),
            b"Content-Length: 1e3\r\n",
        ):
            conv = await side.converse(h + framing + b"\r\n" + body + side.forbidden_request(), 2)
            assert_refused(t, conv)
            t.assertTrue(conv.closed, framing)
        t.assertEqual(side.upstream.requests, [])

    async def test_transfer_encoding_variants(self) -> None:
        t: Any = self
        side = await self.start()
        h, body = side.send_txn_head()
        for framing in (
            b"Transfer-Encoding: chunked, identity\r\n",
            b"Transfer-Encoding: identity, chunked\r\n",
            b"Transfer-Encoding: gzip, chunked\r\n",
            b"Transfer-Encoding: xchunked\r\n",
            b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        ):
            conv = await side.converse(h + framing + b"\r\n" + chunked(body), 1)
            t.assertTrue(conv.final, framing)
            t.assertEqual(conv.final[0].status, 400, (framing, conv.final[0].body))
        t.assertEqual(side.upstream.requests, [])

    async def test_chunked_then_identity_over_two_headers_is_refused(self) -> None:
        """Two Transfer-Encoding lines are one list (RFC 9110 5.3): `chunked,
        identity`, where chunked is not last, so the length is unknown and
        RFC 9112 6.1 requires a 400 and a close. A front-end that honours the
        last coding would disagree with sbg on where this request ends."""
        t: Any = self
        side = await self.start()
        h, body = side.send_txn_head()
        framing = b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n"
        conv = await side.converse(h + framing + b"\r\n" + chunked(body), 1)
        t.assertEqual(conv.statuses, [400], conv.final[0].body if conv.final else None)
        t.assertEqual(side.upstream.requests, [])

    async def test_request_hidden_in_an_unframed_body_is_checked_on_its_own(self) -> None:
        """`Transfer-Encoding: identity` (and no length) frames no body: what
        follows the head is the next request, and it is judged as one."""
        t: Any = self
        side = await self.start()
        h, _body = side.send_txn_head()
        conv = await side.converse(
            h + b"Transfer-Encoding: identity\r\n\r\n" + side.forbidden_request(), want=2
        )
        # Any Transfer-Encoding but exactly "chunked" is ambiguous framing:
        # refused with 400 and the connection closed, so nothing hidden
        # behind it is ever parsed.
        t.assertEqual([r.status for r in conv.final], [400])
        t.assertTrue(conv.closed)
        assert_never_forwarded(t, side.upstream, ADMIN)

    async def test_short_content_length_hides_a_second_request(self) -> None:
        t: Any = self
        side = await self.start()
        h, body = side.send_txn_head()
        # The declared length stops before the end of the JSON: the tail and
        # the hidden request become a "next request" of garbage.
        cut = len(body) - 5
        smuggle = h + b"Content-Length: %d\r\n\r\n" % cut + body + side.forbidden_request()
        conv = await side.converse(smuggle, want=2, timeout=3.0)
        t.assertIn(conv.statuses[0], (400, 401, 200) if side.direction == "outbound" else (400,))
        for seen in side.upstream.requests:  # outbound does not read bodies
            t.assertEqual(seen.body, body[:cut])
        assert_never_forwarded(t, side.upstream, ADMIN)
        assert_clean_framing(t, side.upstream)

    async def test_obs_fold_never_reaches_the_upstream_folded(self) -> None:
        """RFC 9112 5.2: a folded line is refused or unfolded before use;
        either way the upstream never sees a continuation line."""
        t: Any = self
        side = await self.start()
        h, body = side.send_txn_head()
        conv = await side.converse(
            h + b"X-Folded: first\r\n second\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        t.assertIn(conv.final[0].status, (200, 400))
        assert_clean_framing(t, side.upstream)
        # A fold cannot add a Host: the joined value names nothing.
        before = len(side.upstream.requests)
        evil = head(
            b"GET",
            b"/_matrix/key/v2/server",
            [(b"Host", b"evil.example"), (b" " + side.host, b"")],
        )
        conv = await side.converse(evil.replace(b": \r\n", b"\r\n") + b"\r\n")
        t.assertIn(conv.final[0].status, (400, 403, 404))
        t.assertEqual(len(side.upstream.requests), before)

    async def test_bare_lf_cr_and_nul(self) -> None:
        t: Any = self
        side = await self.start()
        host = side.host
        for raw in (
            b"GET /_matrix/key/v2/server HTTP/1.1\nHost: " + host + b"\r\n\r\n",
            b"GET /_matrix/key/v2/server HTTP/1.1\r\nHost: " + host + b"\nX-A: b\r\n\r\n",
            b"GET /_matrix/key/v2/server HTTP/1.1\r\nHost: " + host + b"\r\nX-A: b\rc\r\n\r\n",
            b"GET /_matrix/key/v2/server HTTP/1.1\r\nHost: " + host + b"\r\nX-A: b\x00c\r\n\r\n",
            b"GET /_matrix/key/v2/server HTTP/1.1\r\nHost: " + host + b"\r\nX-\x00A: b\r\n\r\n",
            b"GET /_matrix/key/v2/server HTTP/1.1\r\nHost: " + host + b"\x00.evil\r\n\r\n",
            b"GET /_matrix/key/v2/server\x00 HTTP/1.1\r\nHost: " + host + b"\r\n\r\n",
            b"GET /_matrix/key/v2/server HTTP/1.1\r\nHost : " + host + b"\r\n\r\n",
            b"GET /_matrix/key/v2/server HTTP/1.1\r\nHost: "
            + host
            + b"\r\n\n"
            + side.forbidden_request(),
            b"GET  /_matrix/key/v2/server HTTP/1.1\r\nHost: " + host + b"\r\n\r\n",
            b"GET /_matrix/key/v2/server HTTP/1.1 \r\nHost: " + host + b"\r\n\r\n",
            b"GET /_matrix/key/v2/server HTTP/2.0\r\nHost: " + host + b"\r\n\r\n",
        ):
            conv = await side.converse(raw, want=1, timeout=3.0)
            t.assertTrue(conv.final or conv.closed, raw)
            if conv.final:
                t.assertIn(conv.final[0].status, (400, 404, 505), raw)
        t.assertEqual(side.upstream.requests, [])

    async def test_too_many_headers_and_too_large_header_section(self) -> None:
        t: Any = self
        side = await self.start()
        good = side.good_request()
        h, rest = good.split(b"\r\n", 1)
        many = h + b"\r\n" + b"".join(b"X-H%d: 1\r\n" % i for i in range(600)) + rest
        conv = await side.converse(many)
        assert_refused(t, conv, (400, 431))
        big = h + b"\r\n" + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(20)) + rest
        conv = await side.converse(big)
        assert_refused(t, conv, (400, 431))
        t.assertEqual(side.upstream.requests, [])

    async def test_oversized_request_line_is_answered_and_closed(self) -> None:
        """A line beyond the parser's limit: a 4xx and a closed connection,
        promptly, not a connection left hanging until the idle timeout."""
        t: Any = self
        side = await self.start()
        line = b"GET /_matrix/federation/v1/event/%24" + b"a" * 20000 + b" HTTP/1.1\r\n"
        conv = await side.converse(line + b"Host: " + side.host + b"\r\n\r\n", timeout=5.0)
        t.assertTrue(conv.closed or conv.final, f"no answer, not closed after {conv.seconds:.1f}s")
        if conv.final:
            t.assertIn(conv.final[0].status, (400, 414, 431))
        t.assertEqual(side.upstream.requests, [])

    async def test_oversized_header_line_is_answered_and_closed(self) -> None:
        t: Any = self
        side = await self.start()
        raw = head(
            b"GET", b"/_matrix/key/v2/server", [(b"Host", side.host), (b"X-Big", b"v" * 20000)]
        )
        conv = await side.converse(raw + b"\r\n", timeout=5.0)
        t.assertTrue(conv.closed or conv.final, f"no answer, not closed after {conv.seconds:.1f}s")
        if conv.final:
            t.assertIn(conv.final[0].status, (400, 431))
        t.assertEqual(side.upstream.requests, [])

    async def test_chunk_size_overflow_and_malformed_chunks(self) -> None:
        t: Any = self
        side = await self.start({"inbound.max_body_size": "1K", "limits.header_timeout": "1s"})
        h, body = side.send_txn_head()
        te = b"Transfer-Encoding: chunked\r\n\r\n"
        # A chunk size far beyond any cap: the body is cut at the cap and the
        # request never completes; the whole-request timer closes it.
        conv = await side.converse(h + te + b"f" * 40 + b"\r\n" + body, timeout=6.0)
        t.assertTrue(conv.closed or conv.final, f"still open after {conv.seconds:.1f}s")
        if conv.final:
            t.assertIn(conv.final[0].status, (400, 413))
        for bad in (b"-1\r\n", b"0x10\r\n", b"1 0\r\n", b"\r\n", b"g\r\n", b"+5\r\n"):
            conv = await side.converse(h + te + bad + body + b"\r\n0\r\n\r\n", timeout=3.0)
            assert_refused(t, conv)
        # The chunk data is longer than its size line says.
        conv = await side.converse(h + te + b"2\r\n" + body + b"\r\n0\r\n\r\n", timeout=3.0)
        assert_refused(t, conv, (400, 404))
        t.assertEqual(side.upstream.requests, [])

    async def test_expect_continue_with_oversized_body_is_refused(self) -> None:
        """An oversized declared body under `Expect: 100-continue`: 413, and
        nothing forwarded (sbg may read and drop the body first)."""
        t: Any = self
        side = await self.start({"inbound.max_body_size": "1K"})
        h, _body = side.send_txn_head()
        big = b'{"pad": "' + b"x" * 200_000 + b'"}'
        expect = h + b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(big)
        conv = await side.converse([expect, big], want=1, timeout=10.0)
        t.assertEqual(conv.final[0].status, 413, conv.statuses)
        t.assertEqual(conv.final[0].json()["errcode"], "M_TOO_LARGE")
        t.assertEqual(side.upstream.requests, [])

    async def test_expect_continue_oversized_is_not_invited(self) -> None:
        """The declared length is already too large: sbg never answers
        `100 Continue` for a body it will refuse."""
        t: Any = self
        side = await self.start({"inbound.max_body_size": "1K"})
        h, _body = side.send_txn_head()
        expect = h + b"Expect: 100-continue\r\nContent-Length: 5000\r\n\r\n"
        # The client waits for an invitation that never comes, then sends
        # the body anyway (as curl and Synapse's client do) and gets the 413.
        conv = await side.converse([expect, b"x" * 5000], want=1, timeout=3.0)
        t.assertNotIn(100, conv.statuses, "sbg invited a body it will refuse")
        t.assertEqual(conv.statuses[-1:], [413])
        t.assertEqual(side.upstream.requests, [])

    async def test_http10_without_length(self) -> None:
        t: Any = self
        side = await self.start()
        h, body = side.send_txn_head()
        raw = h.replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1) + b"\r\n" + body
        conv = await side.converse(raw + side.forbidden_request(), want=2, timeout=3.0)
        # No length: no body. The connection (HTTP/1.0) ends after the
        # answer: the tail is never parsed.
        t.assertEqual(len(conv.final), 1, conv.statuses)
        self.assert_bodiless_put(side, conv.final[0])
        t.assertTrue(conv.closed)
        assert_never_forwarded(t, side.upstream, ADMIN)

    async def test_get_with_a_body(self) -> None:
        """Inbound refuses a body on GET (the signature would not cover it);
        outbound may forward the GET, but never its body."""
        t: Any = self
        side = await self.start()
        target = b"/_matrix/federation/v1/user/devices/%40a%3Apartner.example"
        h = head(b"GET", target, side.auth_headers("GET", target))
        smuggled = side.forbidden_request()
        conv = await side.converse(h + b"Content-Length: %d\r\n\r\n" % len(smuggled) + smuggled)
        if side.direction == "inbound":
            t.assertEqual(conv.statuses, [400])
            t.assertEqual(conv.final[0].json()["errcode"], "M_NOT_JSON")
            t.assertEqual(side.upstream.requests, [])
        else:
            t.assertIn(conv.statuses, ([400], [200]))
            for seen in side.upstream.requests:
                t.assertEqual(seen.body, b"")
        assert_never_forwarded(t, side.upstream, ADMIN)
        assert_clean_framing(t, side.upstream)

    async def test_pipelined_requests_are_each_checked(self) -> None:
        t: Any = self
        side = await self.start()
        good = side.good_request()
        second = side.good_request(TXN + b"2")
        conv = await side.converse(good + side.forbidden_request() + second, want=3)
        t.assertEqual(conv.statuses, [200, 404, 200])
        t.assertEqual([s.uri for s in side.upstream.requests], [TXN, TXN + b"2"])
        assert_clean_framing(t, side.upstream)

    async def test_forwarded_chunked_body_gets_one_content_length(self) -> None:
        t: Any = self
        side = await self.start()
        h, body = side.send_txn_head()
        conv = await side.converse(h + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(body, 3))
        t.assertEqual(conv.statuses, [200], conv.final[0].body if conv.final else None)
        [seen] = side.upstream.requests
        t.assertEqual(seen.body, body)
        [lines] = upstream_heads(side.upstream)
        t.assertIn(b"content-length: %d" % len(body), [x.lower() for x in lines])
        assert_clean_framing(t, side.upstream)
        # A GET goes without any length.
        target = b"/_matrix/key/v2/server"
        get = head(b"GET", target, [(b"Host", side.host), (b"Content-Length", b"0")])
        conv = await side.converse(get + b"\r\n")
        t.assertEqual(conv.statuses, [200])
        assert_clean_framing(t, side.upstream)


class InboundFramingTests(FramingAttacks, TestCase):
    async def start(self, overrides: dict[str, Any] | None = None) -> Side:
        return await start_inbound(self, overrides)

    async def test_transaction_signature_survives_chunked_framing(self) -> None:
        """The chunked body is verified as the bytes it decodes to."""
        side = await self.start()
        h, body = side.send_txn_head()
        forged = body.replace(PARTNER_SERVER.encode(), INTERNAL_SERVER.encode())
        conv = await side.converse(h + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(forged))
        self.assertEqual(conv.statuses, [401])
        self.assertEqual(side.upstream.requests, [])


class OutboundFramingTests(FramingAttacks, TestCase):
    async def start(self, overrides: dict[str, Any] | None = None) -> Side:
        return await start_outbound(self, overrides)


def _run_deferred(fn: Any) -> Any:
    """An `async def` test as trial 22.4 needs it (see tests.asynctest)."""

    def run(self: Any) -> Any:
        return defer.ensureDeferred(fn(self))

    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


def _wrap_shared_attacks(*sides: type) -> None:
    """The shared attacks are plain coroutines on a mixin: wrap them for
    trial on each side's TestCase (tests.asynctest wraps a class's own
    methods only)."""
    for side in sides:
        for name, fn in vars(FramingAttacks).items():
            if name.startswith("test") and inspect.iscoroutinefunction(fn):
                setattr(side, name, _run_deferred(fn))


_wrap_shared_attacks(InboundFramingTests, OutboundFramingTests)
