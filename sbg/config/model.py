"""The configuration as immutable, typed values.

`sbg.config.load` builds these from the YAML file (docs/configuration.md) and
validates them; the rest of sbg only ever sees these objects. Paths are
already resolved against the config file's directory, sizes are bytes and
durations are seconds.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Literal

ListenerType = Literal["inbound", "outbound", "admin"]
RoomInvite = Literal["open_rooms", "private_rooms", "none"]
Mode = Literal["enforce", "monitor"]
Direction = Literal["inbound", "outbound"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class HostPattern:
    """A `federation_hosts` / `client_hosts` entry: `host` or `host:port`.

    `host` is lower-cased (IP literals are kept in their canonical text form,
    without brackets); `port` is None when any port matches.
    """

    host: str
    port: int | None


@dataclass(frozen=True)
class Listener:
    """A `listeners` entry: one inbound, outbound or admin listener."""

    type: ListenerType
    port: int
    bind_addresses: tuple[str, ...]
    tls: bool = False
    x_forwarded: bool = False


@dataclass(frozen=True)
class TLSFiles:
    certificate: str
    private_key: str


@dataclass(frozen=True)
class InboundSettings:
    max_body_size: int = 16 * 1024 * 1024
    request_timeout: float = 600.0
    idle_timeout: float = 60.0
    strict_origin_checks: bool = True


@dataclass(frozen=True)
class ProxyAuth:
    """The `outbound.proxy_auth` credentials the homeservers must present."""

    username: str
    password_file: str
    # The password itself (file read at load time, trailing newline
    # stripped); None when the loader ran with skip_files.
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class NonMatrixURL:
    """An `allowed_non_matrix_urls` entry: HTTPS the homeservers may reach."""

    host: str
    port: int
    path: re.Pattern[str]
    methods: frozenset[str] = frozenset({"GET", "POST", "PUT"})


@dataclass(frozen=True)
class OutboundSettings:
    """The `outbound` section."""

    ca: TLSFiles | None = None
    proxy_auth: ProxyAuth | None = None
    upstream_proxy: tuple[str, int] | None = None  # (host, port) of http://host:port
    default_trust: Literal["system", "none"] = "system"
    request_timeout: float = 600.0
    idle_timeout: float = 60.0
    allowed_non_matrix_urls: tuple[NonMatrixURL, ...] = ()


@dataclass(frozen=True)
class InternalHomeserver:
    """An `internal_homeservers` entry: a homeserver behind the border."""

    server_name: str
    federation_hosts: tuple[HostPattern, ...]
    upstream: str  # http(s)://host:port, no path
    upstream_ca: str | None = None
    tls: TLSFiles | None = None


@dataclass(frozen=True)
class ExternalHomeserver:
    """An `external_homeservers` entry: a trusted server outside the border."""

    server_name: str
    federation_hosts: tuple[HostPattern, ...] = ()
    client_hosts: tuple[HostPattern, ...] = ()
    # key id ("ed25519:abc") -> 32 raw public key bytes
    verify_keys: tuple[tuple[str, bytes], ...] = ()
    key_fetch: Literal["pinned", "fetch"] = "pinned"
    tls_ca: str | None = None
    # "host:port" (lower-cased host) -> (ip, port)
    addresses: tuple[tuple[str, tuple[str, int]], ...] = ()
    source_ips: tuple[IPNetwork, ...] = ()
    trust_level: str = "external"
    enabled: bool = True


@dataclass(frozen=True)
class RateLimit:
    """A token bucket: `per_second` tokens added per second, up to `burst`."""

    per_second: float
    burst: int


@dataclass(frozen=True)
class Limits:
    """Resource bounds (all per process)."""

    max_connections: int = 10000  # per listener
    max_connections_per_ip: int = 256  # per listener and peer address
    max_inflight_upstream: int = 1024  # requests being forwarded, all servers
    max_inflight_per_server: int = 256  # requests being forwarded, one external server
    max_tunnels: int = 4096  # open outbound CONNECT tunnels
    header_timeout: float = 30.0  # to receive a whole request (slowloris)
    rate_limit_per_ip: RateLimit | None = None  # inbound, per peer address
    # Request bodies held in memory at once (both directions); beyond it 503.
    max_buffered_bytes: int = 256 * 1024 * 1024


@dataclass(frozen=True)
class RoomSettings:
    """What the users of a trust level's servers may do in rooms (docs/room-rules.md).

    The defaults are the V1 profile: invited into open rooms only, never in
    a public room, never above power level 0.
    """

    # open_rooms: `unrestricted` or `direct` rooms that are not public;
    # private_rooms: any room that is not public; none: never invited.
    invite: RoomInvite = "open_rooms"
    # May join public rooms (ours, and internal users may join theirs).
    join_public: bool = False
    # The highest power level its users may hold in a room.
    max_power_level: int = 0


@dataclass(frozen=True)
class TrustLevel:
    """A `trust_levels` entry: the endpoint groups that cross the border, per direction."""

    name: str
    inbound: frozenset[str]
    outbound: frozenset[str]
    # None: the global `mode`.
    mode: Mode | None = None
    # Inbound requests per origin server; None: unlimited.
    rate_limit: RateLimit | None = None
    # Room rules of the Synapse module (sbg.synapse.RoomRules).
    rooms: RoomSettings = RoomSettings()


@dataclass(frozen=True)
class ClusterSettings:
    """The `cluster` block: the Redis through which several gateway nodes
    share their kill switch, and this node's name in it.

    `host` and `port` for a TCP Redis, `unix_socket` (host None) for a
    socket, or `sentinels` and `service` (host None) for the primary that
    Redis Sentinel names; `password` is `password_file`'s content (None: no
    password, or the loader ran with skip_files).
    """

    redis: str  # the URL as configured (it holds no secret)
    node_name: str
    host: str | None = None
    port: int = 6379
    unix_socket: str | None = None
    db: int = 0
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str | None = None
    password_file: str | None = None
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Config:
    """The whole configuration file, validated (`sbg.config.load`)."""

    path: str  # absolute path of the file this was loaded from
    listeners: tuple[Listener, ...]
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    state_dir: str = "/var/lib/sbg"
    admin_token_file: str | None = None
    # The token itself (file read at load time); None with skip_files.
    admin_token: str | None = field(default=None, repr=False)
    shutdown_grace: float = 30.0
    inbound: InboundSettings = InboundSettings()
    outbound: OutboundSettings = OutboundSettings()
    internal_homeservers: tuple[InternalHomeserver, ...] = ()
    external_homeservers: tuple[ExternalHomeserver, ...] = ()
    trust_levels: tuple[TrustLevel, ...] = ()
    mode: Mode = "enforce"
    limits: Limits = Limits()
    # Processes serving the listeners (a later multi-process mode); >= 1.
    workers: int = 1
    # Several gateway nodes sharing the kill switch; None: this node alone.
    cluster: ClusterSettings | None = None
    # SHA-256 (hex) of the file's bytes, as loaded ("" for parsed text).
    sha256: str = field(default="", compare=False)
    # What deserves attention without being an error (a certificate that
    # expires within 30 days), each line starting with its key path.
    warnings: tuple[str, ...] = field(default=(), compare=False)
