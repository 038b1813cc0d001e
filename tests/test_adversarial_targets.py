"""Parser differentials through the real inbound listener.

Hypothesis builds raw request targets and X-Matrix headers; each one is sent
over real TLS to sbg's inbound listener with a valid signature over exactly
those bytes. Whatever sbg forwards must reach the stand-in upstream
byte-identical and must route, the way Synapse routes (anchored regexes with
`[^/]*` parameters on the raw path, then `urllib.parse.unquote` of each
captured parameter), to exactly the endpoint and parameters sbg matched;
whatever else is sent must be refused with the status of docs/decisions.md,
inbound step 5, and never
reach the upstream.

The trust level admits every group and strict origin checks are off, so the
only thing that can refuse a target here is the target itself: sbg's verdict
through the listener must equal `match_target`'s, and `match_target` must
agree with the Synapse model. The number of examples is `SBG_FUZZ_EXAMPLES`
(default 150: each one is a TLS round trip).
"""

from __future__ import annotations

import json
import os
import re
import string
from typing import Any
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import threads

from sbg.matrix.endpoints import ENDPOINTS, ENDPOINTS_BY_NAME, Match, match_target
from sbg.matrix.groups import GROUPS
from sbg.reasons import Refusal
from testbed.configtools import INTERNAL_HOST, INTERNAL_SERVER
from tests.asynctest import TestCase
from tests.gateway import Gateway, start_gateway
from tests.rawhttp import RawResponse, build_request, exchange_sync
from tests.synapse_model import synapse_auth, synapse_route

EXAMPLES = int(os.environ.get("SBG_FUZZ_EXAMPLES", "0") or 0) or 150

LISTENER_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)

# Every group admitted, origin checks off: only the target can refuse.
OPEN_BORDER: dict[str, Any] = {
    "trust_levels.external.inbound": sorted(GROUPS),
    "inbound.strict_origin_checks": False,
}

# --------------------------------------------------------------------------
# Synapse's router, modelled (synapse/http/server.py on twisted.web)
# --------------------------------------------------------------------------


# --------------------------------------------------------------------------
# Sending one request, judging the answer
# --------------------------------------------------------------------------


def _content_for(method: bytes) -> dict[str, Any] | None:
    return {"k": "v", "n": 1} if method in (b"PUT", b"POST") else None


def signed_raw(gw: Gateway, method: bytes, target: bytes) -> bytes:
    """A request for `target`, signed over exactly these bytes when they are
    ASCII (a non-ASCII target carries a signature for `/`: it must be
    refused before the signature matters)."""
    content = _content_for(method)
    try:
        target.decode("ascii")
        signed_for = target
    except UnicodeDecodeError:
        signed_for = b"/"
    headers = gw.signed_headers(method.decode("latin-1"), signed_for, content)
    body = json.dumps(content).encode() if content is not None else None
    return build_request(method, target, headers, body)


def send_inbound_sync(gw: Gateway, request: bytes) -> RawResponse:
    """One request on a fresh TLS connection (call from a thread)."""
    [resp] = exchange_sync(
        "127.0.0.1",
        gw.ports["inbound"],
        [request],
        tls=True,
        sni=INTERNAL_HOST,
        ca_file=gw.material.internal_ca.certificate,
    )
    return resp


def forwarded(resp: RawResponse) -> bool:
    """The stand-in upstream answered (it marks every answer)."""
    return resp.header(b"X-Standin") == b"yes"


# Bytes the HTTP parser itself may refuse with a bare 400 (docs/decisions.md,
# inbound step 3).
_PARSER_REFUSES = re.compile(b"[\x00-\x20\x7f-\xff]")


def try_match(method: bytes, target: bytes) -> Match | Refusal:
    try:
        return match_target(method, target)
    except Refusal as e:
        return e


class Judge:
    """Checks one request's outcome against `match_target` and Synapse."""

    def __init__(self, test: TestCase, gw: Gateway) -> None:
        self.test = test
        self.gw = gw

    def check(self, method: bytes, target: bytes) -> None:
        t = self.test
        before = len(self.gw.upstream.requests)
        resp = send_inbound_sync(self.gw, signed_raw(self.gw, method, target))
        expected = try_match(method, target)
        synapse = synapse_route(method, target)
        if forwarded(resp):
            t.assertEqual(resp.status, 200, (target, resp.body))
            t.assertIsInstance(expected, Match, target)
            assert isinstance(expected, Match)
            t.assertEqual(len(self.gw.upstream.requests), before + 1, target)
            seen = self.gw.upstream.requests[-1]
            t.assertEqual(seen.method, method, target)
            t.assertEqual(seen.uri, target, "the target was not forwarded byte-identical")
            t.assertIn(method + b" " + target + b" HTTP/1.1\r\n", self.gw.upstream.raw_bytes)
            # Synapse routes the same bytes to the same endpoint and values.
            t.assertIsInstance(synapse, tuple, (target, synapse))
            assert isinstance(synapse, tuple)
            t.assertEqual(synapse[0], expected.endpoint, target)
            t.assertEqual(synapse[1], dict(expected.params), target)
            return
        t.assertEqual(len(self.gw.upstream.requests), before, f"{target!r} reached upstream")
        if isinstance(expected, Match):
            t.fail(
                f"{method!r} {target!r} matched {expected.endpoint.name} but was refused: "
                f"{resp.status} {resp.body!r}"
            )
        if resp.status == 400 and not resp.body and _PARSER_REFUSES.search(target):
            return  # refused by the HTTP parser itself, which is fine
        t.assertEqual(resp.status, expected.status, (method, target, resp.body))
        if method != b"HEAD":  # a HEAD answer has no body
            t.assertEqual(resp.json()["errcode"], expected.errcode, (method, target))
        if expected.status == 405:
            t.assertEqual(synapse, 405, target)


# --------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------

_VISIBLE = sorted(set(string.printable[:94]) - set("/?#%"))
_TEXT = st.characters(min_codepoint=0x20, max_codepoint=0x2FFF).filter(
    lambda c: not 0xD800 <= ord(c) <= 0xDFFF and not 0x7F <= ord(c) <= 0x9F
)
_server = st.sampled_from(
    ["partner.example", "internal.example", "hs.test:8448", "[::1]:8448", "1.2.3.4"]
)
PARAM_VALUES: dict[str, st.SearchStrategy[str]] = {
    "roomId": st.text(_TEXT, min_size=1, max_size=12).map(lambda s: "!" + s),
    "eventId": st.one_of(
        st.text(_TEXT, min_size=1, max_size=12).map(lambda s: "$" + s),
        st.from_regex(r"\A[A-Za-z0-9+/]{43}\Z").map(lambda s: "$" + s),
    ),
    "userId": st.tuples(
        st.text(_TEXT.filter(lambda c: c != ":"), min_size=1, max_size=8), _server
    ).map(lambda t: f"@{t[0]}:{t[1]}"),
    "serverName": _server,
    "txnId": st.text(_TEXT.filter(lambda c: c != "/"), min_size=1, max_size=10),
    "mediaId": st.text(_TEXT.filter(lambda c: c != "/"), min_size=1, max_size=10),
    "fileName": st.text(_TEXT.filter(lambda c: c != "/"), min_size=1, max_size=10),
    "queryType": st.sampled_from(["profile", "directory", "client_keys", "x;y", "pro%file"]),
}


@st.composite
def _encode(draw: st.DrawFn, value: str) -> str:
    """A way some sender may percent-encode a parameter value."""
    how = draw(st.sampled_from(["synapse", "minimal", "random"]))
    if how == "synapse":
        return quote(value, safe="")
    out = []
    for ch in value:
        if ch not in _VISIBLE or (how == "random" and draw(st.booleans())):
            hexes = ch.encode("utf-8").hex()
            upper = draw(st.booleans())
            out.append(
                "".join(
                    "%" + (hexes[i : i + 2].upper() if upper else hexes[i : i + 2])
                    for i in range(0, len(hexes), 2)
                )
            )
        else:
            out.append(ch)
    return "".join(out)


_ENDPOINT_PATHS = sorted({ep.template for ep in ENDPOINTS if "{" not in ep.template})
_queries = st.one_of(
    st.just(""),
    st.sampled_from(_ENDPOINT_PATHS).map(lambda p: "?x=" + p),
    st.sampled_from(_ENDPOINT_PATHS).map(lambda p: "?" + p),
    st.sampled_from(["?a=1+2", "?a=%2F..%2F", "?ver=1&ver=10", "?;x=1", "?a=%3F%23", "??", "?"]),
)


@st.composite
def well_formed(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(method, target) for a random entry, encoded some legitimate way."""
    ep = draw(st.sampled_from(ENDPOINTS))
    segs = []
    for seg in ep.template.split("/"):
        if seg.startswith("{"):
            segs.append(draw(_encode(draw(PARAM_VALUES[seg[1:-1]]))))
        else:
            segs.append(seg)
    head = draw(st.booleans()) and ep.method == "GET"
    method = b"HEAD" if head else ep.method.encode()
    return method, ("/".join(segs) + draw(_queries)).encode("ascii")


# The usual troublemakers: dot segments (plain, encoded, overlong
# UTF-8), `//`, `;` parameters, `#`, `+`, encoded separators, double
# encoding, raw and encoded non-ASCII, NUL, backslashes.
_NASTY = [
    ".",
    "..",
    "%2e",
    "%2E%2e",
    ".%2e",
    "%C0%AE",
    "%C0%AE%C0%AE",
    "%E0%80%AE",
    "",
    ";",
    ";x=1",
    "%3B",
    "#",
    "#frag",
    "%23",
    "+",
    "%2B",
    "%2F",
    "%2f",
    "%252e",
    "%252F",
    "%00",
    "%0a",
    "%0D",
    "%7F",
    "%C2%85",
    "\\",
    "%5C",
    "%FF",
    "%e9",
    "%C3%A9",
    "\u00e9",
    "\u202e",
    "\ufeff",
    "%E2%80%AE",
    "%ef%bb%bf",
    "?",
    "%3F",
    "%",
    "%4",
    "%zz",
    " ",
    "\t",
    "*",
    "~",
    "%7E",
    "@",
    "%40",
]


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A well-formed request with its path damaged, segment-wise or bytewise."""
    method, target = draw(well_formed())
    path, sep, query = target.decode("ascii").partition("?")
    segs = path[1:].split("/")
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(segs)))
        piece = draw(st.sampled_from(_NASTY))
        how = draw(st.sampled_from(["insert", "replace", "append", "prepend", "case"]))
        if how == "insert" or i == len(segs):
            segs.insert(i, piece)
        elif how == "replace":
            segs[i] = piece
        elif how == "append":
            segs[i] += piece
        elif how == "prepend":
            segs[i] = piece + segs[i]
        else:
            segs[i] = segs[i].swapcase()
    text = "/" + "/".join(segs) + sep + query
    wrap = draw(st.sampled_from(["", "", "", "absolute", "double", "trailing", "fragment"]))
    if wrap == "absolute":
        text = "https://" + INTERNAL_HOST + text
    elif wrap == "double":
        text = "/" + text
    elif wrap == "trailing":
        text = text.partition("?")[0] + "/"
    elif wrap == "fragment":
        text += "#" + draw(st.sampled_from(_ENDPOINT_PATHS))
    if draw(st.booleans()):
        method = draw(st.sampled_from([b"GET", b"PUT", b"POST", b"HEAD", b"DELETE"]))
    return method, text.encode("utf-8")


@st.composite
def query_smuggling(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A path outside the table, with an endpoint path hidden after it."""
    outside = draw(
        st.sampled_from(
            [
                "/_matrix/client/v3/login",
                "/_synapse/admin/v1/users",
                "/_matrix/media/v3/upload",
                "/_matrix/federation/v1/send",
                "/",
                "/_matrix",
                "/health",
            ]
        )
    )
    hidden = draw(st.sampled_from(_ENDPOINT_PATHS))
    glue = draw(st.sampled_from(["?", "?x=", "%3F", ";", "#", "/..", "/%2e%2e", "%2F..%2F", "?/"]))
    method = draw(st.sampled_from([b"GET", b"PUT", b"POST"]))
    return method, (outside + glue + hidden).encode("ascii")


# --------------------------------------------------------------------------
# X-Matrix header variants
# --------------------------------------------------------------------------

# (header bytes, hostile): a benign variant means the same to every reader
# and must be accepted; a hostile one must be refused.
HeaderVariant = tuple[list[bytes], bool]


def _recase(draw: st.DrawFn, name: str) -> str:
    return "".join(c.upper() if draw(st.booleans()) else c for c in name)


@st.composite
def xmatrix_variants(draw: st.DrawFn, auth: bytes) -> HeaderVariant:
    parsed = synapse_auth(auth)
    assert parsed is not None
    origin, key, sig, dest = parsed
    params: list[tuple[str, str]] = [("origin", origin), ("key", key), ("sig", sig)]
    if dest is not None:
        params.append(("destination", dest))
    params = draw(st.permutations(params))
    if draw(st.booleans()):
        unknown = draw(st.sampled_from([("foo", "bar"), ("realm", '"a b"'), ("x", "y:z")]))
        params.insert(draw(st.integers(0, len(params))), unknown)
    hostile = False
    trick = draw(
        st.sampled_from(
            ["none"] * 6
            + [
                "duplicate_same",
                "duplicate_evil",
                "backslash",
                "quoted_comma",
                "space_around_equals",
                "empty_element",
                "trailing_comma",
                "unclosed_quote",
                "missing",
                "origin_case",
                "two_headers",
                "scheme",
            ]
        )
    )
    rendered: list[str] = []
    for name, value in params:
        shown_name = _recase(draw, name)
        if name == "sig" and draw(st.booleans()):
            value += "=="  # padded base64: decoders accept it
        quoted = value.startswith('"') or draw(st.booleans())
        shown = value if value.startswith('"') else (f'"{value}"' if quoted else value)
        rendered.append(f"{shown_name}={shown}")
    if trick == "duplicate_same":
        rendered.append(draw(st.sampled_from(rendered)))
    elif trick == "duplicate_evil":
        evil = draw(st.sampled_from(["evil.example", INTERNAL_SERVER, "partner.example:1"]))
        rendered.append(f"{_recase(draw, 'origin')}={evil}")
    elif trick == "backslash":
        # Synapse unescapes `\\e` to `e`: the same origin to it, refused by sbg.
        rendered = [
            f'{r.partition("=")[0]}="partn\\er.example"' if r.lower().startswith("origin=") else r
            for r in rendered
        ]
    elif trick == "quoted_comma":
        rendered.append('foo="a,b"')
    elif trick == "space_around_equals":
        i = draw(st.integers(0, len(rendered) - 1))
        rendered[i] = rendered[i].replace("=", draw(st.sampled_from([" =", "= ", " = "])), 1)
    elif trick == "missing":
        wanted = draw(st.sampled_from(["origin=", "key=", "sig="]))
        rendered = [r for r in rendered if not r.lower().startswith(wanted)]
    elif trick == "origin_case":
        rendered = [r.replace("partner", "Partner") for r in rendered]
    elif trick == "unclosed_quote":
        i = draw(st.integers(0, len(rendered) - 1))
        rendered[i] = rendered[i].rstrip('"') if rendered[i].endswith('"') else rendered[i] + '"'
    hostile = trick != "none"
    seps = [draw(st.sampled_from([",", ", ", " ,", " , ", ",\t", "\t,\t"])) for _ in rendered]
    text = "".join(r + (seps[i] if i < len(rendered) - 1 else "") for i, r in enumerate(rendered))
    if trick == "empty_element":
        text = text.replace(",", ",,", 1) if "," in text else text + ",,"
    if trick == "trailing_comma":
        text += ","
    scheme = "X-Matrix" + " " * draw(st.integers(1, 3))
    if trick == "scheme":
        scheme = draw(
            st.sampled_from(
                [
                    "x-matrix ",
                    "X-MATRIX ",
                    "X-Matrix\t",
                    "XMatrix ",
                    "X-Matrix,",
                    "Bearer ",
                    "X-Matrix-2 ",
                ]
            )
        )
    header = (scheme + text).encode("ascii")
    headers = [header]
    if trick == "two_headers":
        headers.append(header)
    return headers, hostile


def _header_facts(auth: bytes) -> tuple[str, str, str, str | None]:
    parsed = synapse_auth(auth)
    assert parsed is not None
    return parsed


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


async def _run_in_thread(check: Any) -> None:
    await threads.deferToThread(check)


class TargetDifferentialTests(TestCase):
    """Targets: forwarded byte-identical and routed alike, or refused."""

    async def test_well_formed_targets(self) -> None:
        gw = await start_gateway(self, OPEN_BORDER)
        judge = Judge(self, gw)

        @LISTENER_SETTINGS
        @given(well_formed())
        def check(request: tuple[bytes, bytes]) -> None:
            judge.check(*request)

        await _run_in_thread(check)
        # The allowed side was really exercised.
        self.assertGreater(len(gw.upstream.requests), EXAMPLES // 4)

    async def test_mutated_targets(self) -> None:
        gw = await start_gateway(self, OPEN_BORDER)
        judge = Judge(self, gw)

        @LISTENER_SETTINGS
        @given(mutated())
        def check(request: tuple[bytes, bytes]) -> None:
            judge.check(*request)

        await _run_in_thread(check)

    async def test_endpoint_paths_hidden_in_queries_and_fragments(self) -> None:
        gw = await start_gateway(self, OPEN_BORDER)
        judge = Judge(self, gw)

        @LISTENER_SETTINGS
        @given(query_smuggling())
        def check(request: tuple[bytes, bytes]) -> None:
            judge.check(*request)

        await _run_in_thread(check)
        self.assertEqual(gw.upstream.requests, [], "no hidden endpoint path may be forwarded")

    async def test_known_tricks(self) -> None:
        """A fixed list, so that every trick runs in every run."""
        gw = await start_gateway(self, OPEN_BORDER)
        judge = Judge(self, gw)
        v1 = b"/_matrix/federation/v1"
        tricks = [
            (b"GET", v1 + b"/version"),
            (b"GET", v1 + b"/version;x=1"),
            (b"GET", v1 + b";x=1/version"),
            (b"GET", v1 + b"/version%3Bx=1"),
            (b"GET", v1 + b"/./version"),
            (b"GET", v1 + b"/%2e/version"),
            (b"GET", v1 + b"/x/%2E%2E/version"),
            (b"GET", v1 + b"/x/%C0%AE%C0%AE/version"),
            (b"GET", v1 + b"/x/%252e%252e/version"),
            (b"GET", b"/_matrix/federation%2Fv1/version"),
            (b"GET", v1 + b"/version#/_matrix/key/v2/server"),
            (b"GET", v1 + b"/version/"),
            (b"GET", b"/_matrix/key/v2/server?/../../_synapse/admin"),
            (b"GET", b"/_matrix/client/v3/login?x=/_matrix/key/v2/server"),
            (b"GET", b"/_synapse/admin/v1/users?/_matrix/federation/v1/version"),
            (b"GET", b"/_matrix/media/v3/upload?/_matrix/media/v3/download/a/b"),
            (b"GET", b"/_matrix/media/v3/download/hs.test/abc/%2e%2e"),
            (b"GET", b"/_matrix/media/v3/download/hs.test/abc/..%2F..%2Fupload"),
            (b"GET", b"/_matrix/media/v3/download/hs.test%2F..%2F..%2Fupload/abc"),
            (b"GET", b"/_matrix/media/v1/download/hs.test/abc"),
            (b"GET", v1 + b"/query/%70rofile?user_id=%40a%3Ab"),
            (b"GET", v1 + b"/query/Profile?user_id=%40a%3Ab"),
            (b"GET", v1 + b"/query/client_keys"),
            (b"GET", v1 + b"/event/%24a%2Fb%2Bc"),
            (b"GET", v1 + b"/event/$a+b"),
            (b"GET", v1 + b"/event/%24%00"),
            (b"GET", v1 + b"/event/%24%C3%28"),
            (b"GET", v1 + b"/event/\xc3\xa9"),
            (b"GET", v1 + b"/user/devices/%40a%3Ahs.test%2F..%2F..%2Fsend"),
            (b"PUT", v1 + b"/send/1%2F..%2F..%2F..%2F_synapse"),
            (b"PUT", v1 + b"/send/%2e%2e"),
            (b"PUT", v1 + b"/send/.."),
            (b"DELETE", v1 + b"/send/1"),
            (b"GET", v1 + b"/send/1"),
            (b"HEAD", v1 + b"/version"),
            (b"get", v1 + b"/version"),
            (b"GET", b"https://" + INTERNAL_HOST.encode() + v1 + b"/version"),
            (b"GET", b"*"),
            (b"GET", b"//_matrix/federation/v1/version"),
            (b"GET", b"/_matrix/federation/v1/version?a=%00"),
        ]
        for method, target in tricks:
            await _run_in_thread(lambda m=method, t=target: judge.check(m, t))


class ByteIdentityTests(TestCase):
    """Targets that a URL parser would "tidy": they must still reach the
    upstream exactly as sent (the signature and Synapse's router see the
    raw target), or be refused; never arrive changed."""

    TARGETS = (
        (b"GET", b"/_matrix/federation/v1/version?"),
        (b"PUT", b"/_matrix/federation/v1/send/1;"),
        (b"PUT", b"/_matrix/federation/v1/send/1;?a=b"),
        (b"GET", b"/_matrix/federation/v1/event/%24a;;"),
        (b"GET", b"/_matrix/federation/v1/query/profile;?user_id=%40a%3Ab"),
        (b"GET", b"/_matrix/media/v3/download/hs.test/abc;"),
    )

    async def test_inbound(self) -> None:
        gw = await start_gateway(self, OPEN_BORDER)
        judge = Judge(self, gw)
        failures = []
        for method, target in self.TARGETS:
            try:
                await _run_in_thread(lambda m=method, t=target: judge.check(m, t))
            except self.failureException as e:
                failures.append(str(e))
        self.assertEqual(failures, [])

    async def test_outbound(self) -> None:
        from tests.framing import start_outbound, tunnel

        side = await start_outbound(self, {"trust_levels.external.outbound": sorted(GROUPS)})
        changed: list[tuple[bytes, bytes]] = []
        for method, target in self.TARGETS:
            before = len(side.upstream.requests)
            content = _content_for(method)
            body = json.dumps(content).encode() if content is not None else None
            request = build_request(
                method, target, side.auth_headers(method.decode(), target, content), body
            )
            conv = await tunnel(side.gw, request)
            self.assertTrue(conv.final, target)
            if len(side.upstream.requests) > before:
                if side.upstream.requests[-1].uri != target:
                    changed.append((target, side.upstream.requests[-1].uri))
            else:
                self.assertIn(conv.final[0].status, (400, 404), target)
        self.assertEqual(changed, [], "targets changed on the way to the destination")


class XMatrixDifferentialTests(TestCase):
    """X-Matrix headers: what sbg accepts, Synapse reads the same way."""

    async def test_header_variants(self) -> None:
        gw = await start_gateway(self)
        target = b"/_matrix/federation/v1/query/profile?user_id=%40a%3Apartner.example"
        good = dict(gw.signed_headers("GET", target))[b"Authorization"]
        truth = _header_facts(good)

        @LISTENER_SETTINGS
        @given(xmatrix_variants(good))
        def check(variant: HeaderVariant) -> None:
            headers, hostile = variant
            before = len(gw.upstream.requests)
            request = build_request(
                b"GET",
                target,
                [(b"Host", INTERNAL_HOST.encode())] + [(b"Authorization", h) for h in headers],
            )
            resp = send_inbound_sync(gw, request)
            if forwarded(resp):
                self.assertFalse(hostile, f"hostile header forwarded: {headers!r}")
                [header] = headers
                seen = gw.upstream.requests[-1]
                got = [v for k, vs in seen.headers if k.lower() == b"authorization" for v in vs]
                self.assertEqual(got, [header], "the header was not forwarded untouched")
                facts = synapse_auth(header)
                self.assertIsNotNone(facts, header)
                assert facts is not None
                self.assertEqual((*facts[:2], facts[2].rstrip("="), *facts[3:]), truth, header)
                return
            self.assertEqual(len(gw.upstream.requests), before, f"{headers!r} reached upstream")
            self.assertTrue(hostile, f"benign header refused: {headers!r}: {resp.body!r}")
            self.assertIn(resp.status, (401, 403), (headers, resp.body))
            errcode = resp.json()["errcode"]
            self.assertEqual(errcode, {401: "M_UNAUTHORIZED", 403: "M_FORBIDDEN"}[resp.status])

        await _run_in_thread(check)
        self.assertGreater(len(gw.upstream.requests), 0)

    async def test_synapse_last_wins_origin_never_forwarded(self) -> None:
        """The header Synapse would read as another origin (last duplicate
        wins; scheme case; a second header whose origin Synapse keeps)."""
        gw = await start_gateway(self)
        target = b"/_matrix/federation/v1/user/devices/%40a%3Ainternal.example"
        good = dict(gw.signed_headers("GET", target))[b"Authorization"]
        evil = good.replace(b'origin="partner.example"', b'origin="evil.example"')
        cases: list[list[bytes]] = [
            [good + b",origin=evil.example"],
            [good + b',Origin="' + INTERNAL_SERVER.encode() + b'"'],
            [good, evil],
            [evil, good],
            [good, b"x-matrix origin=evil.example"],
            [good.replace(b'origin="partner.example"', b'origin="partner.example\\"')],
            [good.replace(b'origin="partner.example"', b'origin="evil.example,partner.example"')],
        ]
        for headers in cases:
            request = build_request(
                b"GET",
                target,
                [(b"Host", INTERNAL_HOST.encode())] + [(b"Authorization", h) for h in headers],
            )
            resp = await gw.inbound(request)
            self.assertEqual(resp.status, 401, (headers, resp.body))
            self.assertEqual(resp.json()["errcode"], "M_UNAUTHORIZED")
            self.assertEqual(gw.upstream.requests, [], headers)

    def test_synapse_model_reads_the_tricks_as_documented(self) -> None:
        """The model of Synapse used above, pinned on the known cases."""
        sig = "A" * 86
        base = f'X-Matrix origin="a.test",key="ed25519:k",sig="{sig}"'
        self.assertEqual(synapse_auth(base.encode()), ("a.test", "ed25519:k", sig, None))
        self.assertEqual(synapse_auth((base + ",origin=b.test").encode())[0], "b.test")  # type: ignore[index]
        self.assertEqual(
            synapse_auth(base.replace('"a.test"', '"a\\.test"').encode())[0],  # type: ignore[index]
            "a.test",
        )
        self.assertIsNone(synapse_auth(base.replace("X-Matrix", "x-matrix").encode()))
        self.assertEqual(
            synapse_route(b"GET", b"/_matrix/federation/v1/query/%70rofile")[0],  # type: ignore[index]
            ENDPOINTS_BY_NAME["query_profile"],
        )
        self.assertEqual(synapse_route(b"GET", b"/_matrix/federation/v1/send/1"), 405)
        self.assertEqual(synapse_route(b"GET", b"/_matrix/federation/v1/version/"), 404)
        route = synapse_route(b"GET", b"/_matrix/federation/v1/event/%24a%2Fb")
        self.assertEqual(route, (ENDPOINTS_BY_NAME["event"], {"eventId": "$a/b"}))
