"""Property tests: the matcher against a model of Synapse's router.

Synapse routes a federation request by matching anchored regular expressions
(parameters `[^/]*`) against the raw path before `?`, then `unquote`s each
captured parameter; `/query/{type}` is one route that dispatches on the
decoded type. Whatever sbg lets through must reach the same endpoint with the
same parameter values there.
"""

import inspect
import string
from collections.abc import Callable
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sbg.matrix.endpoints import ENDPOINTS, Endpoint, Match, match_target
from sbg.reasons import Refusal
from tests.synapse_model import QUERY_LITERALS, synapse_route

SETTINGS = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

# --------------------------------------------------------------------------
# A model of Synapse's router (synapse/http/server.py, JsonResource)
# --------------------------------------------------------------------------


# --------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------


def _characters_excluding(*categories: str) -> st.SearchStrategy[str]:
    """`st.characters` minus `categories`, on any hypothesis version: before
    6.72 (Debian 12 has 6.67) the keyword is `blacklist_categories`."""
    if "exclude_categories" in inspect.signature(st.characters).parameters:
        return st.characters(exclude_categories=categories)
    return st.characters(blacklist_categories=categories)


_TEXT_CHARS = _characters_excluding("Cs", "Cc")
_server_names = st.one_of(
    st.from_regex(r"\A[A-Za-z0-9-]{1,12}(\.[A-Za-z0-9-]{1,12}){0,3}(:[0-9]{1,5})?\Z"),
    st.ip_addresses(v=4).map(str),
    st.tuples(st.ip_addresses(v=6), st.sampled_from(["", ":8448", ":1"])).map(
        lambda t: f"[{t[0]}]{t[1]}"
    ),
)
_opaque = st.text(_TEXT_CHARS, min_size=1, max_size=20).filter(
    lambda s: "/" not in s and s not in (".", "..")
)

PARAM_VALUES: dict[str, st.SearchStrategy[str]] = {
    "roomId": st.text(_TEXT_CHARS, min_size=1, max_size=30).map(lambda s: "!" + s),
    "eventId": st.one_of(
        st.text(_TEXT_CHARS, min_size=1, max_size=30).map(lambda s: "$" + s),
        st.from_regex(r"\A[A-Za-z0-9+/]{43}\Z").map(lambda s: "$" + s),
    ),
    "userId": st.tuples(
        st.text(_TEXT_CHARS.filter(lambda c: c != ":"), min_size=1, max_size=15),
        _server_names,
    ).map(lambda t: f"@{t[0]}:{t[1]}"),
    "serverName": _server_names,
    "txnId": _opaque,
    "mediaId": _opaque,
    "fileName": _opaque,
    "queryType": _opaque.filter(lambda s: s not in QUERY_LITERALS),
}

# Characters that may appear unencoded in a segment (visible ASCII but the
# separators and "%").
_RAW_OK = set(string.printable[:94]) - set("/?#%")


@st.composite
def encoded(draw: st.DrawFn, value: str) -> str:
    """One of the many ways a sender may percent-encode a parameter value."""
    how = draw(st.sampled_from(["synapse", "minimal", "random"]))
    if how == "synapse":
        return quote(value, safe="")
    out = []
    for ch in value:
        must = ch not in _RAW_OK
        if must or (how == "random" and draw(st.booleans())):
            hexes = ch.encode("utf-8").hex()
            pairs = [hexes[i : i + 2] for i in range(0, len(hexes), 2)]
            upper = draw(st.booleans())
            out.append("".join("%" + (p.upper() if upper else p) for p in pairs))
        else:
            out.append(ch)
    return "".join(out)


_query_strings = st.one_of(
    st.just(""),
    st.text(st.sampled_from(sorted(_RAW_OK | {"/", "?"})), max_size=30).map(lambda q: "?" + q),
    st.sampled_from(
        [
            "?ver=1&ver=10",
            "?x=/_matrix/key/v2/server",
            "?/.well-known/matrix/server",
            "?event_id=%24abc%2Fdef",
        ]
    ),
)


@st.composite
def valid_requests(draw: st.DrawFn) -> tuple[Endpoint, str, dict[str, str]]:
    """A well-formed request for a random entry: (endpoint, target, params)."""
    ep = draw(st.sampled_from(ENDPOINTS))
    params: dict[str, str] = {}
    segs = []
    for seg in ep.template.split("/"):
        if seg.startswith("{"):
            name = seg[1:-1]
            value = draw(PARAM_VALUES[name])
            params[name] = value
            segs.append(draw(encoded(value)))
        else:
            segs.append(seg)
    return ep, "/".join(segs) + draw(_query_strings), params


_methods = st.sampled_from([b"GET", b"HEAD", b"PUT", b"POST", b"DELETE", b"get"])


@st.composite
def swapped_literal_requests(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(method, target): one literal segment of a valid request replaced.

    The replacement is another literal of the table (which may make the
    target another entry's), or the same text percent-encoded or with a
    letter's case changed (which must match nothing).
    """
    ep, target, _params = draw(valid_requests())
    path, sep, query = target.partition("?")
    segs = path[1:].split("/")
    tpl = ep.template[1:].split("/")
    i = draw(st.sampled_from([k for k, t in enumerate(tpl) if "{" not in t]))
    how = draw(st.sampled_from(["other", "other", "encode", "case"]))
    if how == "other":
        segs[i] = draw(st.sampled_from(_LITERALS))
    elif how == "encode":
        k = draw(st.integers(0, len(segs[i]) - 1))
        segs[i] = segs[i][:k] + "%" + segs[i][k].encode("ascii").hex() + segs[i][k + 1 :]
    else:
        k = draw(st.integers(0, len(segs[i]) - 1))
        segs[i] = segs[i][:k] + segs[i][k].swapcase() + segs[i][k + 1 :]
    method = draw(st.one_of(st.just(ep.method.encode("ascii")), _methods))
    return method, ("/" + "/".join(segs) + sep + query).encode("ascii")


# Mostly harmless characters, with the occasional troublemaker.
_JUNK_PIECES = [
    *"aZ09._-~!$@:;=+,*'()[]" * 4,
    *"\\%/?#&",
    *["%2e", "%2F", "%00", "%zz", "%C0%AE", "%41", "%21"],
]
_junk = st.lists(st.sampled_from(_JUNK_PIECES), min_size=1, max_size=8).map("".join)
# Every literal segment of the table, e.g. "send", "v2", "_matrix", "profile".
_LITERALS = sorted(
    {seg for ep in ENDPOINTS for seg in ep.template.split("/")[1:] if "{" not in seg}
)
_pieces = st.one_of(_junk, st.sampled_from(_LITERALS), st.just(""))


def _mutations() -> st.SearchStrategy[Callable[[list[str]], list[str]]]:
    def replace(i: int, junk: str) -> Callable[[list[str]], list[str]]:
        return lambda s: [*s[: i % len(s)], junk, *s[i % len(s) + 1 :]]

    def insert(i: int, junk: str) -> Callable[[list[str]], list[str]]:
        return lambda s: [*s[: i % (len(s) + 1)], junk, *s[i % (len(s) + 1) :]]

    def delete(i: int) -> Callable[[list[str]], list[str]]:
        return lambda s: [*s[: i % len(s)], *s[i % len(s) + 1 :]] if len(s) > 1 else s

    def flip_case(i: int) -> Callable[[list[str]], list[str]]:
        return lambda s: [*s[: i % len(s)], s[i % len(s)].swapcase(), *s[i % len(s) + 1 :]]

    def encode_char(i: int, j: int) -> Callable[[list[str]], list[str]]:
        def f(s: list[str]) -> list[str]:
            seg = s[i % len(s)]
            if not seg:
                return s
            k = j % len(seg)
            enc = "%" + seg[k].encode("utf-8").hex()[:2].upper()
            return [*s[: i % len(s)], seg[:k] + enc + seg[k + 1 :], *s[i % len(s) + 1 :]]

        return f

    idx = st.integers(0, 50)
    return st.one_of(
        st.builds(replace, idx, _pieces),
        st.builds(insert, idx, _pieces),
        st.builds(delete, idx),
        st.builds(flip_case, idx),
        st.builds(encode_char, idx, idx),
    )


@st.composite
def mutated_requests(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(method, target): a request built from a template, then damaged."""
    ep, target, _params = draw(valid_requests())
    path, sep, query = target.partition("?")
    segs = path[1:].split("/")
    for mutation in draw(st.lists(_mutations(), min_size=1, max_size=3)):
        segs = mutation(segs)
    raw = ("/" + "/".join(segs) + sep + query).encode("utf-8")
    # mostly left alone, so that the damage above is what gets judged
    wraps = ["", "", "", "", "", "", "scheme", "slash", "trailing", "prefix", "bytes", "fragment"]
    wrap = draw(st.sampled_from(wraps))
    if wrap == "scheme":
        raw = b"https://hs.example" + raw
    elif wrap == "slash":
        raw = b"/" + raw
    elif wrap == "trailing":
        raw = raw.partition(b"?")[0] + b"/"
    elif wrap == "prefix":
        raw = b"/_matrix" + raw
    elif wrap == "bytes":
        pos = draw(st.integers(0, len(raw)))
        raw = raw[:pos] + draw(st.binary(min_size=1, max_size=3)) + raw[pos:]
    elif wrap == "fragment":
        raw += b"#x"
    method = draw(st.one_of(st.just(ep.method.encode("ascii")), _methods))
    return method, raw


# --------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------


def try_match(method: bytes, target: bytes) -> Match | Refusal:
    try:
        return match_target(method, target)
    except Refusal as e:
        return e


class AgreesWithSynapseTests(SynchronousTestCase):
    def assertAgrees(self, method: bytes, target: bytes, result: Match | Refusal) -> None:
        """An allowed target routes identically in Synapse; a 405 is a 405 there too."""
        if isinstance(result, Match):
            routed = synapse_route(method, target)
            self.assertIsInstance(routed, tuple, target)
            assert isinstance(routed, tuple)
            ep, params = routed
            self.assertEqual(ep, result.endpoint, target)
            self.assertEqual(params, dict(result.params), target)
        elif result.status == 405:
            self.assertEqual(synapse_route(method, target), 405, target)

    def assertLiteralsEqual(self, target: bytes, result: Match) -> None:
        """The matched template's literal segments are the raw segments."""
        raw = target.partition(b"?")[0].split(b"/")
        tpl = result.endpoint.template.split("/")
        self.assertEqual(len(raw), len(tpl), target)
        for r, t in zip(raw, tpl, strict=True):
            if not t.startswith("{"):
                self.assertEqual(r, t.encode("ascii"), target)

    @SETTINGS
    @given(valid_requests(), st.booleans())
    def test_every_well_formed_request_matches(
        self, request: tuple[Endpoint, str, dict[str, str]], head: bool
    ) -> None:
        ep, target, params = request
        method = b"HEAD" if head and ep.method == "GET" else ep.method.encode()
        result = match_target(method, target.encode("ascii"))
        self.assertEqual(result.endpoint, ep)
        self.assertEqual(dict(result.params), params)
        self.assertAgrees(method, target.encode("ascii"), result)

    @SETTINGS
    @given(mutated_requests())
    def test_mutated_targets(self, request: tuple[bytes, bytes]) -> None:
        method, target = request
        result = try_match(method, target)
        if isinstance(result, Refusal):
            self.assertIn(
                (result.status, result.code),
                {(400, "malformed_target"), (404, "unknown_endpoint"), (405, "method_not_allowed")},
            )
            self.assertEqual(result.errcode, "M_UNRECOGNIZED")
        else:
            self.assertLiteralsEqual(target, result)
        self.assertAgrees(method, target, result)

    @settings(SETTINGS, max_examples=1500)
    @given(swapped_literal_requests())
    def test_swapped_literals(self, request: tuple[bytes, bytes]) -> None:
        method, target = request
        result = try_match(method, target)
        if isinstance(result, Match):
            self.assertLiteralsEqual(target, result)
        self.assertAgrees(method, target, result)

    @SETTINGS
    @given(st.data())
    def test_query_types(self, data: st.DataObject) -> None:
        """However /query/{type} is encoded, sbg's group is Synapse's handler's."""
        qt = data.draw(st.one_of(st.sampled_from(sorted(QUERY_LITERALS)), _opaque))
        target = f"/_matrix/federation/v1/query/{data.draw(encoded(qt))}".encode("ascii")
        result = try_match(b"GET", target)
        if isinstance(result, Match):
            self.assertLiteralsEqual(target, result)
        self.assertAgrees(b"GET", target, result)

    @SETTINGS
    @given(st.binary(max_size=60), _methods)
    def test_arbitrary_bytes(self, target: bytes, method: bytes) -> None:
        result = try_match(method, target)
        if isinstance(result, Match):
            self.assertLiteralsEqual(target, result)
        self.assertAgrees(method, target, result)

    @SETTINGS
    @given(
        st.lists(
            st.sampled_from([*sorted(_RAW_OK | {"/"}), "%2F", "%2e", "%25", "%00"]), max_size=40
        ),
        _methods,
    )
    def test_printable_paths(self, pieces: list[str], method: bytes) -> None:
        target = ("/" + "".join(pieces)).encode("ascii")
        result = try_match(method, target)
        if isinstance(result, Match):
            self.assertLiteralsEqual(target, result)
        self.assertAgrees(method, target, result)
