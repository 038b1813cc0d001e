"""The `listeners` section, and the checks that span listeners."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import cast

from sbg.config import model
from sbg.config.reader import (
    BaseReader,
    index_path,
    key_path,
)
from sbg.hosts import format_authority

LISTENER_TYPES = ("inbound", "outbound", "admin")
DEFAULT_BIND = {"admin": ("127.0.0.1",), "inbound": ("0.0.0.0",), "outbound": ("0.0.0.0",)}
_LISTENER_KEYS = ("type", "port", "bind_addresses", "tls", "x_forwarded")


class ListenersReader(BaseReader):
    """`listeners` and their cross-checks."""

    def listeners(self, top: Mapping[str, object]) -> list[tuple[str, model.Listener]]:
        if top.get("listeners") is None:
            self.error("listeners", "is required (at least one listener)")
            return []
        entries = self.items(top, "listeners", "")
        if not entries and isinstance(top.get("listeners"), list):
            self.error("listeners", "must list at least one listener")
        result = []
        for path, value in entries:
            listener = self.listener(value, path)
            if listener is not None:
                result.append((path, listener))
        return result

    def listener(self, value: object, path: str) -> model.Listener | None:
        m = self.mapping(value, path, _LISTENER_KEYS)
        if m is None:
            return None
        kind = self.choice(m, "type", path, LISTENER_TYPES, None)
        port = self.integer(m, "port", path, default=None, minimum=0, maximum=65535)
        addresses: list[str] = []
        if m.get("bind_addresses") is not None:
            entries = self.items(m, "bind_addresses", path)
            if not entries and isinstance(m.get("bind_addresses"), list):
                self.error(key_path(path, "bind_addresses"), "must list at least one address")
            for item_path, item in entries:
                text = self.string_value(item, item_path, required=True)
                if text is None:
                    continue
                try:
                    addresses.append(str(ipaddress.ip_address(text)))
                except ValueError:
                    self.error(item_path, f"not an IP address: {text!r}")
        for key in ("tls", "x_forwarded"):
            if kind is not None and kind != "inbound" and m.get(key) is not None:
                self.error(key_path(path, key), "only valid on an inbound listener")
        tls = self.boolean(m, "tls", path, False)
        x_forwarded = self.boolean(m, "x_forwarded", path, False)
        if kind is None or port is None:
            return None
        if m.get("bind_addresses") is None:
            addresses = list(DEFAULT_BIND[kind])
        return model.Listener(
            type=cast(model.ListenerType, kind),
            port=port,
            bind_addresses=tuple(addresses),
            tls=tls and kind == "inbound",
            x_forwarded=x_forwarded and kind == "inbound",
        )

    def check_listeners(
        self,
        listeners: list[tuple[str, model.Listener]],
        outbound: model.OutboundSettings,
        internals: list[tuple[str, model.InternalHomeserver]],
        admin_token_file: str | None,
    ) -> None:
        seen: dict[tuple[str, int], str] = {}
        tls_listener = next((p for p, li in listeners if li.type == "inbound" and li.tls), None)
        if tls_listener is not None:
            for hs_path, hs in internals:
                if hs.tls is None and not self.has_error(key_path(hs_path, "tls")):
                    self.error(
                        key_path(hs_path, "tls"),
                        f"required: the inbound listener {tls_listener} terminates TLS",
                    )
        for path, listener in listeners:
            for address in listener.bind_addresses:
                if listener.port and (address, listener.port) in seen:
                    self.error(
                        key_path(path, "port"),
                        f"{format_authority(address, listener.port)} is also used by "
                        f"{seen[(address, listener.port)]}",
                    )
                seen.setdefault((address, listener.port), path)
        outbound_listener = next((p for p, li in listeners if li.type == "outbound"), None)
        if outbound_listener and outbound.ca is None and not self.has_error("outbound.ca"):
            self.error("outbound.ca", f"required by the outbound listener {outbound_listener}")
        if admin_token_file is not None or self.has_error("admin_token_file"):
            return
        for path, listener in listeners:
            if listener.type != "admin":
                continue
            for n, address in enumerate(listener.bind_addresses):
                if not ipaddress.ip_address(address).is_loopback:
                    self.error(
                        index_path(key_path(path, "bind_addresses"), n),
                        f"admin listener on non-loopback address {address} "
                        "requires admin_token_file",
                    )
