"""The external servers' signing keys (docs/configuration.md, `key_fetch`).

`KeyRing` holds, per external server, its pinned keys from the configuration
(always accepted) and, for servers in `key_fetch: fetch` mode, keys fetched
from their `/_matrix/key/v2/server`, each usable until its
`valid_until_ts`. `validate_key_response` is the pure check a fetcher runs on
such a response before calling `KeyRing.add_fetched`. Nothing here does I/O.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from signedjson.key import decode_verify_key_bytes
from signedjson.sign import SignatureVerifyException, verify_signed_json

from sbg.matrix.ids import is_key_id

if TYPE_CHECKING:
    from signedjson.types import VerifyKey

# A response listing more keys than this is refused: real servers list one
# or two, and each listed key costs a signature check.
MAX_KEYS_PER_RESPONSE = 32
# The spec's rule: a key response is trusted for at most 7 days.
MAX_VALIDITY_MS = 7 * 24 * 3600 * 1000

_KEY_B64 = re.compile(r"[A-Za-z0-9+/]{43}=?")
_ED25519 = "ed25519:"


class KeyResponseError(ValueError):
    """A `/_matrix/key/v2/server` response that must not be used."""


def _verify_key(key_id: str, raw: bytes) -> VerifyKey:
    key: VerifyKey = decode_verify_key_bytes(key_id, raw)
    return key


class KeyRing:
    """The keys each external server is pinned to, by key id (immutable).

    Args:
        pinned: server name -> (key id, 32 raw public key bytes) pairs.
    """

    def __init__(self, pinned: Mapping[str, Iterable[tuple[str, bytes]]]) -> None:
        self._pinned: dict[str, Mapping[str, VerifyKey]] = {}
        for server_name, keys in pinned.items():
            built: dict[str, VerifyKey] = {}
            for key_id, raw in keys:
                if not is_key_id(key_id) or len(raw) != 32:
                    raise ValueError(f"bad pinned key {key_id!r} for {server_name}")
                built[key_id] = _verify_key(key_id, raw)
            self._pinned[server_name] = MappingProxyType(built)

    def keys_for(self, server_name: str) -> Mapping[str, VerifyKey]:
        """`server_name`'s pinned keys by key id (empty for an unknown server)."""
        return self._pinned.get(server_name, _EMPTY)


_EMPTY: Mapping[str, VerifyKey] = MappingProxyType({})


def _decode_key(key_id: str, entry: object) -> VerifyKey:
    if not isinstance(entry, dict):
        raise KeyResponseError(f"{key_id}: not an object")
    text = entry.get("key")
    if not isinstance(text, str) or _KEY_B64.fullmatch(text) is None:
        raise KeyResponseError(f"{key_id}: key is not base64 of 32 bytes")
    try:
        raw = base64.b64decode(text.rstrip("=") + "=", validate=True)
    except binascii.Error:
        raise KeyResponseError(f"{key_id}: key is not base64 of 32 bytes") from None
    return _verify_key(key_id, raw)


def _ms(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise KeyResponseError(f"{what} is not an integer")
    return value


def _ed25519_entries(body: Mapping[str, Any], field: str) -> dict[str, Any]:
    """The ed25519 entries of a key map; other algorithms are ignored."""
    entries = body.get(field, {})
    if not isinstance(entries, dict):
        raise KeyResponseError(f"{field} is not an object")
    picked = {k: v for k, v in entries.items() if k.startswith(_ED25519)}
    if len(picked) > MAX_KEYS_PER_RESPONSE:
        raise KeyResponseError(f"{field} lists more than {MAX_KEYS_PER_RESPONSE} keys")
    for key_id in picked:
        if not is_key_id(key_id):
            raise KeyResponseError(f"{field}: bad key id {key_id!r}")
    return picked


def validate_key_response(
    body: Mapping[str, Any], expected_server_name: str, now_ms: int
) -> dict[str, tuple[VerifyKey, int]]:
    """Check a `/_matrix/key/v2/server` response and return its keys.

    The response must name `expected_server_name`, list at least one ed25519
    key in `verify_keys`, carry a valid self-signature by *every* ed25519 key
    listed there, and have a `valid_until_ts` in the future. Keys of other
    algorithms are ignored.

    Returns:
        key id -> (verify key, usable until in ms). For `verify_keys` that is
        `min(valid_until_ts, now_ms + MAX_VALIDITY_MS)`; `old_verify_keys`
        come with their `expired_ts` (a key id in both keeps the
        `verify_keys` entry).

    Raises:
        KeyResponseError: the response must not be used.
    """
    if not isinstance(body, dict):
        raise KeyResponseError("response is not an object")
    if body.get("server_name") != expected_server_name:
        raise KeyResponseError(
            f"server_name {body.get('server_name')!r} is not {expected_server_name!r}"
        )
    valid_until = _ms(body.get("valid_until_ts"), "valid_until_ts")
    if valid_until <= now_ms:
        raise KeyResponseError("valid_until_ts is not in the future")
    current = _ed25519_entries(body, "verify_keys")
    if not current:
        raise KeyResponseError("verify_keys lists no ed25519 key")
    old = _ed25519_entries(body, "old_verify_keys")

    result: dict[str, tuple[VerifyKey, int]] = {}
    for key_id, entry in old.items():
        if not isinstance(entry, dict):
            raise KeyResponseError(f"{key_id}: not an object")
        expired = _ms(entry.get("expired_ts"), f"{key_id} expired_ts")
        result[key_id] = (_decode_key(key_id, entry), expired)
    until = min(valid_until, now_ms + MAX_VALIDITY_MS)
    for key_id, entry in current.items():
        key = _decode_key(key_id, entry)
        try:
            verify_signed_json(dict(body), expected_server_name, key)
        except (SignatureVerifyException, ValueError, TypeError) as e:
            raise KeyResponseError(f"not self-signed by {key_id}: {e}") from None
        result[key_id] = (key, until)
    return result
