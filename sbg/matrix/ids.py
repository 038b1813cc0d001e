"""Matrix identifier helpers: key ids, the server of a user id.

Server names are `sbg.hosts.is_server_name` (the one host-name grammar).
"""

from __future__ import annotations

import re

from sbg.hosts import is_server_name

_KEY_ID = re.compile(r"ed25519:[A-Za-z0-9_]+")


def is_key_id(value: str) -> bool:
    """Whether `value` is an ed25519 key id: `ed25519:` + `[A-Za-z0-9_]+`."""
    return _KEY_ID.fullmatch(value) is not None


def server_of(user_id: str) -> str | None:
    """The server part of a user id (or any `sigil local:server` id).

    It is everything after the *first* `:`, as Synapse's `get_domain_from_id`
    takes it, so a port stays attached: `@alice:hs.test:8448` gives
    `hs.test:8448`. None when there is no `:`.
    """
    _local, sep, server = user_id.partition(":")
    return server if sep else None


__all__ = ["is_key_id", "is_server_name", "server_of"]
