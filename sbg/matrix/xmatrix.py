"""The `Authorization: X-Matrix` header: parse, build, verify.

The parser is deliberately stricter than RFC 9110 and than Synapse, so that
every header it accepts means the same thing to both (federation-notes 1.1):

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

Every refusal is a 401 `M_UNAUTHORIZED` `SbgError`.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from canonicaljson import encode_canonical_json
from nacl.exceptions import BadSignatureError
from signedjson.sign import SignatureVerifyException, sign_json, verify_signed_json

from sbg.errors import SbgError
from sbg.matrix.ids import is_key_id, is_server_name

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


def _malformed(reason: str) -> SbgError:
    return SbgError(401, "M_UNAUTHORIZED", f"malformed X-Matrix header: {reason}", "malformed_auth")


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
        SbgError: 401 `M_UNAUTHORIZED` with code `missing_auth`,
            `multiple_auth` or `malformed_auth`.
    """
    if not values:
        raise SbgError(401, "M_UNAUTHORIZED", "missing X-Matrix authorization", "missing_auth")
    if len(values) != 1:
        raise SbgError(401, "M_UNAUTHORIZED", "more than one Authorization header", "multiple_auth")
    try:
        text = values[0].decode("ascii")
    except UnicodeDecodeError:
        raise _malformed("non-ASCII bytes")
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


def signed_bytes_with_raw_body(
    method: str, uri: str, origin: str, destination: str, body: bytes
) -> bytes:
    """The signed object's encoding with `content` spliced in as received.

    Synapse sends request bodies as canonical JSON, so for its requests this
    is exactly the canonical encoding of `signed_request_json(...)` (the keys
    `content` < `destination` < `method` < `origin` < `uri` are in order),
    without parsing the body again or encoding it.
    """
    rest = encode_canonical_json(
        {"destination": destination, "method": method, "origin": origin, "uri": uri}
    )
    return b'{"content":' + body + b"," + rest[1:]


def _verifies(key: VerifyKey, message: bytes, sig: bytes) -> bool:
    try:
        key.verify(message, sig)
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True


def _bad_signature(reason: str) -> SbgError:
    return SbgError(401, "M_UNAUTHORIZED", reason, "bad_signature")


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
        body: the raw body `content` was strictly parsed from (one JSON
            object, nothing else), if any. A signature over the request
            with these very bytes as its content is checked first: it is
            the canonical encoding whenever the sender sent canonical JSON
            (Synapse does), and either way it proves the origin's key signed
            this destination, method, target and body. Otherwise the check
            is over the canonical encoding of `content`, as Synapse's.

    Raises:
        SbgError: 401 `M_UNAUTHORIZED`, code `unknown_key` when `keys` has
            no key for `auth.key_id`, `bad_signature` when the signature does
            not verify (or the target is not ASCII).
    """
    key = keys.get(auth.key_id)
    if key is None:
        raise SbgError(
            401,
            "M_UNAUTHORIZED",
            f"no known key {auth.key_id} for {auth.origin}",
            "unknown_key",
        )
    try:
        uri_text = uri.decode("ascii")
    except UnicodeDecodeError:
        raise _bad_signature("request target is not ASCII")
    if body is not None and content is not None:
        raw = signed_bytes_with_raw_body(method, uri_text, auth.origin, destination, body)
        if _verifies(key, raw, _decode_sig(auth.sig)):
            return
    signed = signed_request_json(method, uri_text, auth.origin, destination, content)
    # signedjson looks the signature up under the key's own id.
    signed["signatures"] = {auth.origin: {f"{key.alg}:{key.version}": auth.sig.rstrip("=")}}
    try:
        verify_signed_json(signed, auth.origin, key)
    except (SignatureVerifyException, ValueError, TypeError):
        raise _bad_signature(f"signature by {auth.origin} {auth.key_id} does not verify")


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
