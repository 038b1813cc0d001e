"""The `internal_homeservers` and `external_homeservers` sections, and the
checks that span servers (names and hosts claimed twice)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator, Mapping
from typing import Literal, cast

from sbg.config import model
from sbg.config.certificates import names_of, uncovered
from sbg.config.reader import (
    BaseReader,
    _Claim,
    _kind,
    key_path,
)
from sbg.config.units import (
    decode_verify_key,
    parse_server_name,
    parse_url,
)
from sbg.hosts import HostParseError, format_authority, parse_authority

# The port a server name without one is reached on for discovery.
DISCOVERY_PORT = 443
KEY_FETCH_MODES = ("pinned", "fetch")
_INTERNAL_KEYS = ("server_name", "federation_hosts", "upstream", "upstream_ca", "tls")
_EXTERNAL_KEYS = (
    "server_name",
    "federation_hosts",
    "client_hosts",
    "verify_keys",
    "key_fetch",
    "tls_ca",
    "addresses",
    "source_ips",
    "trust_level",
    "enabled",
)
_KEY_ID = re.compile(r"ed25519:[A-Za-z0-9_]+")


class HomeserversReader(BaseReader):
    """Internal and external homeservers and their cross-checks."""

    def internal_homeservers(
        self, top: Mapping[str, object]
    ) -> list[tuple[str, model.InternalHomeserver]]:
        if top.get("internal_homeservers") is None:
            self.error("internal_homeservers", "is required (at least one homeserver)")
            return []
        entries = self.items(top, "internal_homeservers", "")
        if not entries and isinstance(top.get("internal_homeservers"), list):
            self.error("internal_homeservers", "must list at least one homeserver")
        result = []
        for path, value in entries:
            m = self.mapping(value, path, _INTERNAL_KEYS)
            if m is None:
                continue
            server_name = self.server_name(m, path)
            hosts = self.host_patterns(m, "federation_hosts", path)
            if m.get("federation_hosts") in (None, []):
                self.error(
                    key_path(path, "federation_hosts"),
                    "at least one host is required (server_name alone only serves discovery)",
                )
            upstream = None
            text = self.string(m, "upstream", path, required=True)
            if text is not None:
                try:
                    scheme, host, port = parse_url(text, ("http", "https"))
                    upstream = f"{scheme}://{format_authority(host, port)}"
                except ValueError as e:
                    self.error(key_path(path, "upstream"), str(e))
            upstream_ca = self.ca_file(m, "upstream_ca", path)
            if upstream_ca is not None and upstream is not None and upstream.startswith("http:"):
                self.error(key_path(path, "upstream_ca"), "only used with an https upstream")
            tls = self.tls_files(m, "tls", path, ca=False)
            if tls is not None:
                self.check_certificate_names(path, tls.certificate, hosts)
            result.append(
                (
                    path,
                    model.InternalHomeserver(
                        server_name=server_name or "",
                        federation_hosts=hosts,
                        upstream=upstream or "",
                        upstream_ca=upstream_ca,
                        tls=tls,
                    ),
                )
            )
        return result

    def check_certificate_names(
        self, path: str, file: str, hosts: tuple[model.HostPattern, ...]
    ) -> None:
        """The inbound certificate covers every `federation_hosts` host: the
        external servers connect to those names and check them."""
        cert_path = key_path(key_path(path, "tls"), "certificate")
        certs = self.loaded_certificates.get(cert_path)
        if not certs:
            return
        item_paths = self.pattern_paths.get(key_path(path, "federation_hosts"), [])
        seen: set[str] = set()
        for pattern, item_path in zip(hosts, item_paths, strict=False):
            if pattern.host in seen or not uncovered(certs[0], [pattern.host]):
                continue
            seen.add(pattern.host)
            self.error(
                cert_path,
                f"{file} is not valid for {pattern.host} ({item_path}): it names "
                f"{', '.join(names_of(certs[0])) or 'no host'}",
            )

    def server_name(self, m: Mapping[str, object], path: str) -> str | None:
        text = self.string(m, "server_name", path, required=True)
        if text is None:
            return None
        try:
            parse_server_name(text)
        except ValueError as e:
            self.error(key_path(path, "server_name"), str(e))
            return None
        return text

    def external_homeservers(
        self, top: Mapping[str, object]
    ) -> list[tuple[str, model.ExternalHomeserver]]:
        result = []
        for path, value in self.items(top, "external_homeservers", ""):
            m = self.mapping(value, path, _EXTERNAL_KEYS)
            if m is None:
                continue
            server_name = self.server_name(m, path)
            federation_hosts = self.host_patterns(m, "federation_hosts", path)
            key_fetch = self.choice(m, "key_fetch", path, KEY_FETCH_MODES, "pinned")
            verify_keys = self.verify_keys(m, path)
            if key_fetch == "pinned" and not verify_keys and m.get("verify_keys") in (None, {}):
                self.error(
                    key_path(path, "verify_keys"),
                    "required with key_fetch: pinned (paste the output of sbg keys fetch)",
                )
            if key_fetch == "fetch" and m.get("federation_hosts") in (None, []):
                self.error(
                    key_path(path, "key_fetch"),
                    "fetch needs a federation_hosts entry to fetch the keys from",
                )
            result.append(
                (
                    path,
                    model.ExternalHomeserver(
                        server_name=server_name or "",
                        federation_hosts=federation_hosts,
                        client_hosts=self.host_patterns(m, "client_hosts", path),
                        verify_keys=verify_keys,
                        key_fetch=cast(Literal["pinned", "fetch"], key_fetch),
                        tls_ca=self.ca_file(m, "tls_ca", path),
                        addresses=self.addresses(m, path),
                        source_ips=self.source_ips(m, path),
                        trust_level=self.trust_level_name(m, path),
                        enabled=self.boolean(m, "enabled", path, True),
                    ),
                )
            )
        return result

    def trust_level_name(self, m: Mapping[str, object], path: str) -> str:
        """The `trust_level` (default `external`); "" when it is not a string."""
        if m.get("trust_level") is None:
            return "external"
        return self.string(m, "trust_level", path) or ""

    def verify_keys(self, m: Mapping[str, object], path: str) -> tuple[tuple[str, bytes], ...]:
        p = key_path(path, "verify_keys")
        value = m.get("verify_keys")
        if value is None:
            return ()
        if not isinstance(value, dict):
            self.error(p, f"must be a mapping of key id to public key, not {_kind(value)}")
            return ()
        result = []
        for key_id, encoded in value.items():
            item_path = key_path(p, key_id)
            ok = True
            if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
                self.error(item_path, "key id must be ed25519: followed by letters, digits or _")
                ok = False
            if not isinstance(encoded, str):
                self.error(item_path, f"must be a string (unpadded base64), not {_kind(encoded)}")
                continue
            try:
                raw = decode_verify_key(encoded)
            except ValueError as e:
                self.error(item_path, str(e))
                continue
            if ok:
                result.append((cast(str, key_id), raw))
        return tuple(result)

    def addresses(
        self, m: Mapping[str, object], path: str
    ) -> tuple[tuple[str, tuple[str, int]], ...]:
        p = key_path(path, "addresses")
        value = m.get("addresses")
        if value is None:
            return ()
        if not isinstance(value, dict):
            self.error(p, f'must be a mapping of "host:port" to "ip:port", not {_kind(value)}')
            return ()
        result: dict[str, tuple[str, int]] = {}
        for target, address in value.items():
            item_path = key_path(p, target)
            name = None
            try:
                if not isinstance(target, str):
                    raise HostParseError(f"{target!r} is not host:port")
                host, port = parse_authority(target)
                if port is None:
                    raise HostParseError(f"the port is missing in {target!r}")
                name = format_authority(host, port)
            except HostParseError as e:
                self.error(item_path, f"bad key: {e}")
            if name is not None and name in result:
                self.error(item_path, f"{name} is given twice")
            if not isinstance(address, str):
                self.error(item_path, f'must be a string "ip:port", not {_kind(address)}')
                continue
            try:
                ip, ip_port = parse_authority(address)
                ipaddress.ip_address(ip)
                if ip_port is None:
                    raise ValueError("port missing")
            except ValueError:
                self.error(item_path, f"must be ip:port (IPv6 as [addr]:port), not {address!r}")
                continue
            if name is not None:
                result[name] = (ip, ip_port)
        return tuple(result.items())

    def source_ips(self, m: Mapping[str, object], path: str) -> tuple[model.IPNetwork, ...]:
        result = []
        for item_path, item in self.items(m, "source_ips", path):
            text = self.string_value(item, item_path, required=True)
            if text is None:
                continue
            try:
                result.append(ipaddress.ip_network(text, strict=True))
            except ValueError as e:
                self.error(item_path, f"not a CIDR network: {e}")
        return tuple(result)

    def check_names(
        self,
        internals: list[tuple[str, model.InternalHomeserver]],
        externals: list[tuple[str, model.ExternalHomeserver]],
    ) -> None:
        seen: dict[str, str] = {}
        servers: list[tuple[str, str]] = [(p, hs.server_name) for p, hs in internals]
        servers += [(p, hs.server_name) for p, hs in externals]
        for path, name in servers:
            if not name:
                continue
            folded = name.lower()
            if folded in seen:
                self.error(
                    key_path(path, "server_name"),
                    f"{name} is also the server name of {seen[folded]}",
                )
            else:
                seen[folded] = path

    def check_claims(
        self,
        internals: list[tuple[str, model.InternalHomeserver]],
        externals: list[tuple[str, model.ExternalHomeserver]],
        outbound: model.OutboundSettings,
    ) -> None:
        claims: list[_Claim] = []
        for path, internal in internals:
            claims.extend(self.server_claims(path, internal))
        for path, external in externals:
            claims.extend(self.server_claims(path, external))
        # Several entries for one push gateway are fine; a federation host
        # on this list would let requests skip the federation checks.
        for entry, path in zip(
            outbound.allowed_non_matrix_urls, self.non_matrix_paths, strict=True
        ):
            pattern = model.HostPattern(entry.host, entry.port)
            claims.append(_Claim(pattern, path, "outbound.allowed_non_matrix_urls"))
        by_host: dict[str, list[_Claim]] = {}
        for claim in claims:
            for earlier in by_host.get(claim.pattern.host, []):
                same_name = earlier.server_name is not None and (
                    earlier.server_name == claim.server_name
                )
                if earlier.owner != claim.owner and not same_name and earlier.overlaps(claim):
                    self.error(
                        claim.path,
                        f"{format_authority(claim.pattern.host, claim.pattern.port)} is also "
                        f"claimed by {earlier.path}",
                    )
                    break
            by_host.setdefault(claim.pattern.host, []).append(claim)

    def server_claims(
        self, path: str, hs: model.InternalHomeserver | model.ExternalHomeserver
    ) -> Iterator[_Claim]:
        if hs.server_name:
            host, port = parse_server_name(hs.server_name)
            pattern = model.HostPattern(host, port if port is not None else DISCOVERY_PORT)
            yield _Claim(pattern, key_path(path, "server_name"), path, hs.server_name.lower())
        lists: list[tuple[str, tuple[model.HostPattern, ...]]] = [
            ("federation_hosts", hs.federation_hosts)
        ]
        if isinstance(hs, model.ExternalHomeserver):
            lists.append(("client_hosts", hs.client_hosts))
        for key, patterns in lists:
            paths = self.pattern_paths.get(key_path(path, key), [])
            for pattern, pattern_path in zip(patterns, paths, strict=True):
                yield _Claim(pattern, pattern_path, path)
