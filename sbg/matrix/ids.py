"""Matrix identifier helpers: server names, key ids, the server of a user id.

The server-name grammar is the intersection of the spec's (appendices,
"Server Name") and Synapse's `parse_and_validate_server_name`: a value
accepted here is accepted by both, so sbg and the homeserver behind it
never disagree about which server a name designates.
"""

from __future__ import annotations

import ipaddress
import re

# DNS name: non-empty labels of letters, digits and hyphens joined by single
# dots (Synapse refuses empty labels and a trailing dot; the spec allows
# 1-255 such characters). IPv4 dotted quads match this form too.
_DNS_HOST = re.compile(r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")
_IPV6_CHARS = re.compile(r"[0-9A-Fa-f:.]{2,45}")
_PORT = re.compile(r"[0-9]{1,5}")
_KEY_ID = re.compile(r"ed25519:[A-Za-z0-9_]+")

MAX_HOST_LENGTH = 255


def is_server_name(value: str) -> bool:
    """Whether `value` is a server name: `host[:port]`.

    `host` is a DNS name or IPv4 dotted quad (at most 255 characters), or an
    IPv6 literal in brackets; `port` is 1 to 5 ASCII digits. Comparison of
    server names elsewhere is case-sensitive, as in Synapse.
    """
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return False
        literal, rest = value[1:end], value[end + 1 :]
        if not _IPV6_CHARS.fullmatch(literal):
            return False
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            return False
        if not rest:
            return True
        return rest.startswith(":") and _PORT.fullmatch(rest[1:]) is not None
    host, sep, port = value.partition(":")
    if sep and _PORT.fullmatch(port) is None:
        return False
    return len(host) <= MAX_HOST_LENGTH and _DNS_HOST.fullmatch(host) is not None


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
