"""Strict parsing of JSON request bodies (docs/decisions.md, inbound step 17).

A body is accepted only if it is UTF-8 (no BOM) holding one JSON object with
no duplicate keys at any depth, no `NaN`/`Infinity` (nor a number that
overflows to infinity), no lone surrogate escapes, and at most `MAX_DEPTH`
nested arrays/objects. Floats and integers are otherwise read exactly as the
stdlib `json` module reads them, which is what Synapse does, so the value
handed to the signature check is the value Synapse will verify.

The work is the stdlib C parser plus a few linear passes over the bytes;
the exact surrogate check, which re-encodes the result, only runs when the
text contains a surrogate escape at all.
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate
from typing import Any, NoReturn

from sbg import reasons
from sbg.reasons import Refusal

MAX_DEPTH = 64

# Every byte but `"`, `[`, `]`, `{`, `}`: deleted before the depth scan.
_OTHER_BYTES = bytes(b for b in range(256) if b not in b'"[]{}')
_DEPTH_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}
# A \uD800-\uDFFF escape (possibly a false hit after an escaped backslash,
# which only costs the slower exact check).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _refuse(reason: str) -> NoReturn:
    raise Refusal(reasons.BAD_JSON, reason)


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        _refuse("duplicate key in a JSON object")
    return obj


def _constant(name: str) -> NoReturn:
    _refuse(f"{name} is not JSON")


def _float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        _refuse("number out of range")
    return value


def _depth(body: bytes) -> int:
    """The deepest array/object nesting in `body`, brackets in strings skipped.

    Escaped backslashes and then escaped quotes are removed first (left to
    right, so a run of backslashes pairs up as in JSON); what is left of the
    strings then contains no quote, so deleting every byte but quotes and
    brackets and then what lies between the 1st and 2nd, 3rd and 4th...
    quotes leaves exactly the structural brackets.
    On a text that is not JSON the count is exact up to the first error,
    which is as far as the parser goes.
    """
    if b"\\" in body:  # one memchr; the two replaces cost far more
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    skeleton = body.translate(None, _OTHER_BYTES)
    # Two adjacent quotes (an empty string's, or one string's end and the
    # next one's start) enclose no bracket: dropping them keeps the quotes
    # alternating. Usually no quote is left, and nothing to split.
    brackets = skeleton.replace(b'""', b"")
    if b'"' in brackets:
        brackets = b"".join(brackets.split(b'"')[::2])
    if brackets.count(b"[") + brackets.count(b"{") <= MAX_DEPTH:
        return 0
    return max(accumulate(map(_DEPTH_STEP.__getitem__, brackets)))


def parse_json_object(body: bytes) -> dict[str, Any]:
    """Parse a request body that must be a strict JSON object.

    Raises:
        Refusal: 400 `M_NOT_JSON`, code `bad_json`, for anything else.
    """
    if body.startswith(b"\xef\xbb\xbf"):
        _refuse("body starts with a byte order mark")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        _refuse("body is not UTF-8")
    if _depth(body) > MAX_DEPTH:
        _refuse(f"JSON nested deeper than {MAX_DEPTH} levels")
    try:
        value = json.loads(
            text, object_pairs_hook=_pairs, parse_constant=_constant, parse_float=_float
        )
    except json.JSONDecodeError as e:
        _refuse(f"body is not JSON: {e.msg} at offset {e.pos}")
    except ValueError:
        # An integer beyond Python's int-string conversion limit.
        _refuse("body is not JSON: integer too long")
    except RecursionError:
        # Unreachable after the depth check; kept so it can never escape.
        _refuse(f"JSON nested deeper than {MAX_DEPTH} levels")
    if not isinstance(value, dict):
        _refuse("body is not a JSON object")
    # One memchr first: a two-byte search costs far more.
    if b"\\" in body and b"\\u" in body and _SURROGATE_ESCAPE.search(text) is not None:
        try:
            json.dumps(value, ensure_ascii=False, check_circular=False).encode("utf-8")
        except UnicodeEncodeError:
            _refuse("lone surrogate in a JSON string")
    return value
