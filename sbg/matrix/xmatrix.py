"""The `Authorization: X-Matrix` header: parse, build, verify.

The parser is deliberately stricter than RFC 9110 and than Synapse, so that
every header it accepts means the same thing to both
(docs/decisions.md, inbound step 9):

* exactly one `Authorization` header;
* the scheme is literally `X-Matrix` (case-sensitive, as Synapse matches it)
  followed by one or more spaces (RFC 9110 `1*SP`; Synapse also accepts
  several; a tab is refused by both);
* `name=value` parameters separated by a comma with optional spaces or tabs
  around it; no empty list elements, no whitespace around `=` and none at
  the end (Synapse would keep it inside the name or value);
* names are tokens, compared case-insensitively; a name given twice is
  refused (Synapse keeps the last, an RFC reader might keep the first);
  unknown names are ignored;
* a value is a run of printable ASCII other than `"`, `,` and `\\`, or a
  quoted string of the same characters plus space and tab. A quoted comma
  would be split by Synapse before unquoting and a backslash escape is never
  needed by a valid value, so both are refused;
* then `origin` and `destination` must be server names, `key` an
  `ed25519:` key id and `sig` base64 (standard alphabet, unpadded or
  padded) of 64 bytes; `origin`, `key` and `sig` are required.

Every refusal is a 401 `M_UNAUTHORIZED` `Refusal`.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from canonicaljson import encode_canonical_json
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from nacl.exceptions import BadSignatureError
from signedjson.sign import sign_json

from sbg import reasons
from sbg.matrix.ids import is_key_id, is_server_name
from sbg.reasons import Refusal

if TYPE_CHECKING:
    from signedjson.types import SigningKey, VerifyKey

SCHEME = "X-Matrix"

_NAME = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
# Printable ASCII without '"' (0x22), ',' (0x2c) and '\' (0x5c).
_BARE = r"[\x21\x23-\x2b\x2d-\x5b\x5d-\x7e]+"
_QUOTED = r'"[\t\x20\x21\x23-\x2b\x2d-\x5b\x5d-\x7e]*"'
_PARAM = re.compile(rf"({_NAME})=({_QUOTED}|{_BARE})")
_QUOTED_COMMA = re.compile(rf'{_NAME}="[^"]*,')
_SEPARATOR = re.compile(r"[ \t]*,[ \t]*")
_SIG = re.compile(r"[A-Za-z0-9+/]{86}(?:==)?")
_SIG_LENGTH = 64


@dataclass(frozen=True)
class XMatrixAuth:
    """The parameters of one well-formed X-Matrix header.

    Attributes:
        origin: the sending server's name.
        destination: the receiving server's name, None when absent.
        key_id: the signing key id, e.g. `ed25519:abc`.
        sig: the signature, base64 as received.
    """

    origin: str
    destination: str | None
    key_id: str
    sig: str


def _malformed(reason: str) -> Refusal:
    return Refusal(reasons.MALFORMED_AUTH, f"malformed X-Matrix header: {reason}")


def _params(text: str) -> dict[str, str]:
    """The `name=value` list after the scheme, names lower-cased."""
    params: dict[str, str] = {}
    pos = 0
    while True:
        m = _PARAM.match(text, pos)
        if m is None:
            if "\\" in text[pos:]:
                raise _malformed("backslash in a parameter")
            if _QUOTED_COMMA.match(text, pos):
                raise _malformed("comma inside a quoted value")
            raise _malformed(f"bad parameter at offset {pos}")
        name = m.group(1).lower()
        value = m.group(2)
        if value.startswith('"'):
            value = value[1:-1]
        if name in params:
            raise _malformed(f"parameter {name} given twice")
        params[name] = value
        pos = m.end()
        if pos == len(text):
            return params
        sep = _SEPARATOR.match(text, pos)
        if sep is None:
            raise _malformed(f"expected a comma at offset {pos}")
        pos = sep.end()


def parse_authorization(values: Sequence[bytes] | None) -> XMatrixAuth:
    """Parse the request's `Authorization` header values (all of them).

    Args:
        values: every raw `Authorization` value, as `getRawHeaders` gives.

    Raises:
        Refusal: 401 `M_UNAUTHORIZED` with code `missing_auth`,
            `multiple_auth` or `malformed_auth`.
    """
    if not values:
        raise Refusal(reasons.MISSING_AUTH, "missing X-Matrix authorization")
    if len(values) != 1:
        raise Refusal(reasons.MULTIPLE_AUTH, "more than one Authorization header")
    try:
        text = values[0].decode("ascii")
    except UnicodeDecodeError:
        raise _malformed("non-ASCII bytes") from None
    prefix = SCHEME + " "
    if not text.startswith(prefix):
        raise _malformed("scheme is not 'X-Matrix' followed by a space")
    params = _params(text[len(prefix) :].lstrip(" "))

    origin = params.get("origin")
    if origin is None or not is_server_name(origin):
        raise _malformed("origin missing or not a server name")
    destination = params.get("destination")
    if destination is not None and not is_server_name(destination):
        raise _malformed("destination is not a server name")
    key_id = params.get("key")
    if key_id is None or not is_key_id(key_id):
        raise _malformed("key missing or not an ed25519 key id")
    sig = params.get("sig")
    if sig is None or _SIG.fullmatch(sig) is None or len(_decode_sig(sig)) != _SIG_LENGTH:
        raise _malformed("sig missing or not a base64 ed25519 signature")
    return XMatrixAuth(origin=origin, destination=destination, key_id=key_id, sig=sig)


def _decode_sig(sig: str) -> bytes:
    unpadded = sig.rstrip("=")
    try:
        return base64.b64decode(unpadded + "=" * (-len(unpadded) % 4), validate=True)
    except binascii.Error:
        return b""


def signed_request_json(
    method: str, uri: str, origin: str, destination: str, content: object | None
) -> dict[str, Any]:
    """The object an X-Matrix signature covers (without `signatures`).

    `content` is included iff it is not None: the caller passes the parsed
    body for PUT/POST and None otherwise, as Synapse does.
    """
    obj: dict[str, Any] = {
        "method": method,
        "uri": uri,
        "origin": origin,
        "destination": destination,
    }
    if content is not None:
        obj["content"] = content
    return obj


# What the signed object's encoding starts with when it has a body: the
# body is received after these bytes (`sbg.http.body.BodyBuffer`).
CONTENT_PREFIX = b'{"content":'
# A body whose signature does not verify over its own bytes is parsed and
# canonically re-encoded (for a sender of non-canonical JSON) only up to
# this size: beyond it, that work is what a forger would make sbg do.
CANONICAL_FALLBACK_MAX = 1024 * 1024


def signed_suffix(method: str, uri: str, origin: str, destination: str) -> bytes:
    """What follows the content in the signed object's canonical encoding.

    The keys `content` < `destination` < `method` < `origin` < `uri` are in
    canonical order, so `CONTENT_PREFIX + body + signed_suffix(...)` is the
    canonical encoding of `signed_request_json(...)` whenever the body is
    itself canonical JSON, as Synapse sends it.
    """
    rest = encode_canonical_json(
        {"destination": destination, "method": method, "origin": origin, "uri": uri}
    )
    return b"," + rest[1:]


def signed_bytes_with_raw_body(
    method: str, uri: str, origin: str, destination: str, body: bytes
) -> bytes:
    """The signed object's encoding with `content` spliced in as received."""
    return CONTENT_PREFIX + body + signed_suffix(method, uri, origin, destination)


# Up to this length, libsodium verifies faster (measured: 110 against
# 270 us at 2 KiB; even at 64 KiB; at 1 MiB 5.0 against 2.3 ms).
_SHORT_MESSAGE = 64 * 1024


@functools.lru_cache(maxsize=1024)
def _public_key(raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(raw)


def _verifies(key: VerifyKey, message: bytes | bytearray, sig: bytes) -> bool:
    """Whether `sig` is `key`'s ed25519 signature of `message`.

    A short message is checked with libsodium (PyNaCl), whose curve
    arithmetic is about twice as fast as OpenSSL's. A long one (a large
    body) with `cryptography` over the buffer as it is: PyNaCl would copy
    the signature and the message into one new string, and OpenSSL's
    SHA-512 is the faster one where hashing dominates.
    """
    if len(sig) != _SIG_LENGTH:
        return False
    if len(message) <= _SHORT_MESSAGE:
        try:
            key.verify(bytes(message), sig)
        except (BadSignatureError, ValueError, TypeError):
            return False
        return True
    public = _public_key(bytes(key))
    try:
        try:
            public.verify(sig, message)
        except TypeError:
            # cryptography before 39 (Debian 12's 38) takes only bytes.
            public.verify(sig, bytes(message))
    except InvalidSignature:
        return False
    return True


def _bad_signature(reason: str) -> Refusal:
    return Refusal(reasons.BAD_SIGNATURE, reason)


def _key_for(auth: XMatrixAuth, keys: Mapping[str, VerifyKey]) -> VerifyKey:
    key = keys.get(auth.key_id)
    if key is None:
        raise Refusal(reasons.UNKNOWN_KEY, f"no known key {auth.key_id} for {auth.origin}")
    return key


def _target_text(uri: bytes) -> str:
    try:
        return uri.decode("ascii")
    except UnicodeDecodeError:
        raise _bad_signature("request target is not ASCII") from None


def _verify_canonical(
    auth: XMatrixAuth,
    key: VerifyKey,
    method: str,
    uri_text: str,
    destination: str,
    content: object | None,
) -> None:
    signed = signed_request_json(method, uri_text, auth.origin, destination, content)
    try:
        message = encode_canonical_json(signed)
    except (ValueError, TypeError):
        # NaN, a lone surrogate: nothing canonical can have been signed.
        raise Refusal(reasons.BAD_JSON, "body cannot be encoded as canonical JSON") from None
    if not _verifies(key, message, _decode_sig(auth.sig)):
        raise _bad_signature(f"signature by {auth.origin} {auth.key_id} does not verify")


def verify_request_signature(
    auth: XMatrixAuth,
    method: str,
    uri: bytes,
    destination: str,
    content: object | None,
    keys: Mapping[str, VerifyKey],
    body: bytes | None = None,
) -> None:
    """Check the header's signature over the request, as Synapse does.

    Args:
        auth: the parsed header.
        method: the request method as on the request line.
        uri: the raw request target (path and query), exactly as received.
        destination: the server this request is for (always used, whatever
            the header says, like Synapse).
        content: the parsed JSON body, or None when there is none.
        keys: the origin's usable keys by key id (signedjson verify keys).
        body: the raw body `content` was parsed from, if any: the check
            over these very bytes comes first (`verify_body_signature`).

    Raises:
        Refusal: `unknown_key` when `keys` has no key for `auth.key_id`,
            `bad_signature` when the signature does not verify (or the
            target is not ASCII).
    """
    key = _key_for(auth, keys)
    uri_text = _target_text(uri)
    if body is not None and content is not None:
        message = signed_bytes_with_raw_body(method, uri_text, auth.origin, destination, body)
        if _verifies(key, message, _decode_sig(auth.sig)):
            return
    _verify_canonical(auth, key, method, uri_text, destination, content)


def verify_body_signature(
    auth: XMatrixAuth,
    method: str,
    uri: bytes,
    destination: str,
    keys: Mapping[str, VerifyKey],
    buffer: bytearray,
    start: int,
) -> None:
    """Check the signature of a request with a body, before any parse.

    `buffer` holds `CONTENT_PREFIX` then the body from `start` on (a
    `BodyBuffer`'s). The signature is checked first over those very bytes
    with the rest of the signed object appended in place (and cut off
    again): for a sender of canonical JSON, as Synapse is, that is exactly
    what was signed, and nothing is parsed. Only a body of at most
    `CANONICAL_FALLBACK_MAX` bytes is then parsed (as Synapse parses it)
    and checked in its canonical encoding; a larger one is refused, so a
    forged request costs sbg its bytes, one hash and no parse.

    Whichever check passes, the origin's key signed exactly this
    destination, method, target and body; the caller still parses the body
    strictly (one JSON object, no duplicate keys) before it is used.

    Raises:
        Refusal: `unknown_key`, `bad_signature`, or `bad_json` when the
            fallback finds a body that is not JSON.
    """
    if bytes(buffer[:start]) != CONTENT_PREFIX:
        raise ValueError("the buffer does not start with CONTENT_PREFIX")
    key = _key_for(auth, keys)
    uri_text = _target_text(uri)
    sig = _decode_sig(auth.sig)
    end = len(buffer)
    buffer += signed_suffix(method, uri_text, auth.origin, destination)
    try:
        if _verifies(key, buffer, sig):
            return
    finally:
        del buffer[end:]
    if end - start > CANONICAL_FALLBACK_MAX:
        raise _bad_signature(
            f"signature by {auth.origin} {auth.key_id} does not verify over the body as sent "
            f"(a body over {CANONICAL_FALLBACK_MAX // 1024} KiB must be canonical JSON)"
        )
    try:
        content = json.loads(bytes(memoryview(buffer)[start:]))
    except (ValueError, RecursionError):
        raise Refusal(reasons.BAD_JSON, "body is not JSON") from None
    if not isinstance(content, dict):
        raise Refusal(reasons.BAD_JSON, "body is not a JSON object")
    _verify_canonical(auth, key, method, uri_text, destination, content)


def sign_request(
    signing_key: SigningKey,
    method: str,
    uri: str | bytes,
    origin: str,
    destination: str,
    content: object | None,
) -> bytes:
    """An `Authorization` value signing this request, shaped like Synapse's.

    Args:
        signing_key: a signedjson signing key (with `alg` and `version`).
        method: the request method.
        uri: the request target (path and query) exactly as it will be sent.
        origin: the signing server's name.
        destination: the receiving server's name.
        content: the JSON body, or None when there is none.
    """
    uri_text = uri.decode("ascii") if isinstance(uri, bytes) else uri
    signed = sign_json(
        signed_request_json(method, uri_text, origin, destination, content), origin, signing_key
    )
    key_id = f"{signing_key.alg}:{signing_key.version}"
    sig = signed["signatures"][origin][key_id]
    header = f'{SCHEME} origin="{origin}",destination="{destination}",key="{key_id}",sig="{sig}"'
    return header.encode("ascii")
