"""The one host-name grammar: Host headers, SNI, CONNECT targets, server names.

A host name is labels of letters, digits and hyphens joined by single
dots, at most 255 characters (Synapse's grammar for the host of a server
name); an IPv4 dotted quad has that form too.
An IPv6 literal is written in brackets, except in a CONNECT target.

Every value sbg routes on is normalised the same way before it is compared
with the configuration's `federation_hosts` / `client_hosts`: host
lower-cased, a trailing dot dropped, IPv6 literals without brackets in their
compressed form, port as an int or None. A Matrix server name
(`is_server_name`) is stricter: as Synapse and the spec read it, no
trailing dot, and compared as written.
"""

from __future__ import annotations

import functools
import ipaddress
import re

_DNS_NAME = re.compile(r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")
_PORT = re.compile(r"[0-9]{1,5}")
MAX_HOST_LENGTH = 255


class HostParseError(ValueError):
    """A value that is not a host, authority or CONNECT target."""


def _normalise_host(host: str) -> str:
    if not host:
        raise HostParseError("empty host")
    # Only what could be an address is tried as one (a failed parse raises,
    # which costs more than the rest of this function).
    if host[0].isdigit() or ":" in host:
        try:
            return str(ipaddress.ip_address(host))
        except ValueError:
            pass
    h = host.lower()
    bare = h[:-1] if h.endswith(".") else h
    if not is_host_name(bare):
        raise HostParseError(f"not a host name: {host!r}")
    return bare


def is_host_name(value: str) -> bool:
    """Whether `value` is a DNS host name (or dotted quad), no trailing dot."""
    return len(value) <= MAX_HOST_LENGTH and _DNS_NAME.fullmatch(value) is not None


def is_server_name(value: str) -> bool:
    """Whether `value` is a Matrix server name: `host[:port]`.

    `host` is a host name or IPv4 dotted quad, or an IPv6 literal in
    brackets; `port` is 1 to 5 ASCII digits. The intersection of the spec's
    grammar and Synapse's: a name accepted here is accepted by both.
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
    return is_host_name(host)


_IPV6_CHARS = re.compile(r"[0-9A-Fa-f:.]{2,45}")


def _parse_port(text: str) -> int:
    if not _PORT.fullmatch(text):
        raise HostParseError(f"bad port {text!r}")
    port = int(text)
    if not 0 < port < 65536:
        raise HostParseError(f"port out of range: {port}")
    return port


@functools.lru_cache(maxsize=4096)
def parse_authority(value: str) -> tuple[str, int | None]:
    """Parse `host`, `host:port`, `[v6]`, `[v6]:port` (a Host header value).

    Cached (bounded): the same few Host values arrive on every request.
    """
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise HostParseError("unterminated IPv6 literal")
        host = value[1:end]
        rest = value[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise HostParseError(f"not an IPv6 literal: {host!r}") from None
        if not rest:
            return _normalise_host(host), None
        if not rest.startswith(":"):
            raise HostParseError("garbage after IPv6 literal")
        return _normalise_host(host), _parse_port(rest[1:])
    if value.count(":") > 1:
        raise HostParseError("IPv6 literal without brackets")
    host, sep, port = value.partition(":")
    return _normalise_host(host), (_parse_port(port) if sep else None)


def parse_connect_target(value: str) -> tuple[str, int]:
    """Parse a CONNECT target: `host:port`, `[v6]:port` or a bare `v6:port`.

    Synapse writes IPv6 literals without brackets (`2001:db8::1:8448`): the
    port is then the part after the last colon.
    """
    if value.startswith("["):
        host, port = parse_authority(value)
    elif value.count(":") > 1:
        addr, _, port_text = value.rpartition(":")
        try:
            ipaddress.IPv6Address(addr)
        except ValueError:
            raise HostParseError(f"not an IPv6 literal: {addr!r}") from None
        host, port = _normalise_host(addr), _parse_port(port_text)
    else:
        host, port = parse_authority(value)
    if port is None:
        raise HostParseError("CONNECT target without a port")
    return host, port


@functools.lru_cache(maxsize=4096)
def parse_sni(value: bytes | None) -> str | None:
    if not value:
        return None
    try:
        return _normalise_host(value.decode("ascii"))
    except (UnicodeDecodeError, HostParseError):
        # An SNI sbg cannot parse matches nothing: callers treat it as a
        # name that belongs to no configured server.
        return "\x00invalid"


def server_name_authority(server_name: str) -> tuple[str, int | None]:
    """Split a Matrix server name (`host[:port]`) as `parse_authority` does."""
    return parse_authority(server_name)


def format_authority(host: str, port: int | None) -> str:
    h = f"[{host}]" if ":" in host else host
    return h if port is None else f"{h}:{port}"


def normalise_name(name: str) -> str:
    """A host name or IP literal as sbg compares them: lower case, no brackets.

    A trailing dot is removed; IP literals take their canonical text form.
    """
    host = name.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.rstrip(".")
