"""An immutable policy snapshot compiled from one configuration.

Everything a decision needs is precomputed here at load time (host routing
tables, key objects, trust levels), so per-request work does not grow with
the configuration. A reload builds a new snapshot and swaps one reference;
a request keeps the snapshot it started with.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from sbg.config.model import (
    Config,
    ExternalHomeserver,
    HostPattern,
    InternalHomeserver,
    TrustLevel,
)
from sbg.hosts import HostParseError, parse_authority
from sbg.matrix.keys import KeyRing

# A Host header without a port: federation is HTTPS.
DEFAULT_PORT = 443

_HostTable = dict[str, list[tuple[int | None, object]]]


def _add(table: _HostTable, pattern: HostPattern, value: object) -> None:
    table.setdefault(pattern.host, []).append((pattern.port, value))


def _lookup(table: _HostTable, host: str, port: int | None) -> object | None:
    entries = table.get(host)
    if not entries:
        return None
    p = DEFAULT_PORT if port is None else port
    for want, value in entries:
        if want is None or want == p:
            return value
    return None


@dataclass(frozen=True)
class Policy:
    """Everything a decision needs from one configuration, compiled at load time."""

    config: Config
    keyring: KeyRing
    internal_by_name: Mapping[str, InternalHomeserver]
    external_by_name: Mapping[str, ExternalHomeserver]
    trust_levels: Mapping[str, TrustLevel]
    internal_names: frozenset[str]
    enabled_external_names: frozenset[str]
    # Groups some enabled external server may use inbound (the only ones an
    # unauthenticated request may use).
    inbound_groups_any: frozenset[str]
    _internal_hosts: _HostTable = field(repr=False)
    _internal_server_hosts: _HostTable = field(repr=False)
    _external_fed_hosts: _HostTable = field(repr=False)
    _external_client_hosts: _HostTable = field(repr=False)
    _external_server_hosts: _HostTable = field(repr=False)

    @classmethod
    def build(cls, config: Config) -> Policy:
        internal_hosts: _HostTable = {}
        internal_server_hosts: _HostTable = {}
        for hs in config.internal_homeservers:
            for p in hs.federation_hosts:
                _add(internal_hosts, p, hs)
            _add(internal_server_hosts, _server_pattern(hs.server_name), hs)
        fed: _HostTable = {}
        client: _HostTable = {}
        server_hosts: _HostTable = {}
        for ext in config.external_homeservers:
            for p in ext.federation_hosts:
                _add(fed, p, ext)
            for p in ext.client_hosts:
                _add(client, p, ext)
            _add(server_hosts, _server_pattern(ext.server_name), ext)
        levels = {t.name: t for t in config.trust_levels}
        enabled = [e for e in config.external_homeservers if e.enabled]
        inbound_any: set[str] = set()
        for e in enabled:
            level = levels.get(e.trust_level)
            if level is not None:
                inbound_any |= level.inbound
        return cls(
            config=config,
            keyring=KeyRing({e.server_name: e.verify_keys for e in config.external_homeservers}),
            internal_by_name={hs.server_name: hs for hs in config.internal_homeservers},
            external_by_name={e.server_name: e for e in config.external_homeservers},
            trust_levels=levels,
            internal_names=frozenset(hs.server_name for hs in config.internal_homeservers),
            enabled_external_names=frozenset(e.server_name for e in enabled),
            inbound_groups_any=frozenset(inbound_any),
            _internal_hosts=internal_hosts,
            _internal_server_hosts=internal_server_hosts,
            _external_fed_hosts=fed,
            _external_client_hosts=client,
            _external_server_hosts=server_hosts,
        )

    # -- routing -----------------------------------------------------------

    def internal_for_sni(self, host: str) -> InternalHomeserver | None:
        """The internal homeserver an SNI host name belongs to (any port)."""
        for table in (self._internal_hosts, self._internal_server_hosts):
            for _port, value in table.get(host, ()):
                if isinstance(value, InternalHomeserver):
                    return value
        return None

    def internal_for_host(self, host: str, port: int | None) -> InternalHomeserver | None:
        """The internal homeserver whose `federation_hosts` match."""
        v = _lookup(self._internal_hosts, host, port)
        return v if isinstance(v, InternalHomeserver) else None

    def internal_for_server_name(self, host: str, port: int | None) -> InternalHomeserver | None:
        """The internal homeserver whose `server_name` is this authority."""
        v = _lookup(self._internal_server_hosts, host, port)
        return v if isinstance(v, InternalHomeserver) else None

    def external_for_federation_host(
        self, host: str, port: int | None
    ) -> ExternalHomeserver | None:
        v = _lookup(self._external_fed_hosts, host, port)
        return v if isinstance(v, ExternalHomeserver) else None

    def external_for_client_host(self, host: str, port: int | None) -> ExternalHomeserver | None:
        v = _lookup(self._external_client_hosts, host, port)
        return v if isinstance(v, ExternalHomeserver) else None

    def external_for_server_name(self, host: str, port: int | None) -> ExternalHomeserver | None:
        v = _lookup(self._external_server_hosts, host, port)
        return v if isinstance(v, ExternalHomeserver) else None

    def external_for_sni(self, host: str) -> ExternalHomeserver | None:
        """The external server an SNI host name belongs to (any port)."""
        for table in (
            self._external_fed_hosts,
            self._external_server_hosts,
            self._external_client_hosts,
        ):
            for _port, value in table.get(host, ()):
                if isinstance(value, ExternalHomeserver):
                    return value
        return None

    def mode(self, server: ExternalHomeserver | None) -> str:
        """enforce | monitor: the server's trust level's, else the global one."""
        if server is not None:
            level = self.trust_levels.get(server.trust_level)
            if level is not None and level.mode is not None:
                return level.mode
        return self.config.mode

    def groups(self, server: ExternalHomeserver, direction: str) -> frozenset[str]:
        level = self.trust_levels.get(server.trust_level)
        if level is None:
            return frozenset()
        return level.inbound if direction == "inbound" else level.outbound


def _server_pattern(server_name: str) -> HostPattern:
    """A server name as a host pattern: `name` alone is port 443 (well-known)."""
    try:
        host, port = parse_authority(server_name)
    except HostParseError:
        return HostPattern(server_name.lower(), -1)
    return HostPattern(host, port if port is not None else DEFAULT_PORT)
