"""The `inbound`, `outbound` and `limits` sections."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal, cast

from sbg.config import model
from sbg.config.reader import (
    BaseReader,
    key_path,
)
from sbg.config.units import (
    parse_host_pattern,
    parse_url,
)

DEFAULT_TRUSTS = ("system", "none")
_INBOUND_KEYS = ("max_body_size", "request_timeout", "idle_timeout", "strict_origin_checks")
_OUTBOUND_KEYS = (
    "ca",
    "proxy_auth",
    "upstream_proxy",
    "default_trust",
    "request_timeout",
    "idle_timeout",
    "allowed_non_matrix_urls",
)
_PROXY_AUTH_KEYS = ("username", "password_file")
_NON_MATRIX_KEYS = ("host", "port", "path", "methods")
NON_MATRIX_METHODS = ("GET", "POST", "PUT")
_HTTP_METHOD = re.compile(r"[A-Z]+")
_LIMITS_KEYS = (
    "max_connections",
    "max_connections_per_ip",
    "max_inflight_upstream",
    "max_inflight_per_server",
    "max_tunnels",
    "header_timeout",
    "rate_limit_per_ip",
    "max_buffered_bytes",
)


class SettingsReader(BaseReader):
    """`inbound`, `outbound` (CA, proxy credentials, non-Matrix URLs) and `limits`."""

    def inbound(self, value: object) -> model.InboundSettings:
        m = self.mapping(value, "inbound", _INBOUND_KEYS)
        if m is None:
            return model.InboundSettings()
        d = model.InboundSettings()
        return model.InboundSettings(
            max_body_size=self.size(m, "max_body_size", "inbound", d.max_body_size),
            request_timeout=self.duration(m, "request_timeout", "inbound", d.request_timeout),
            idle_timeout=self.duration(m, "idle_timeout", "inbound", d.idle_timeout),
            strict_origin_checks=self.boolean(
                m, "strict_origin_checks", "inbound", d.strict_origin_checks
            ),
        )

    def outbound(self, value: object) -> model.OutboundSettings:
        path = "outbound"
        m = self.mapping(value, path, _OUTBOUND_KEYS)
        if m is None:
            return model.OutboundSettings()
        d = model.OutboundSettings()
        upstream_proxy = None
        text = self.string(m, "upstream_proxy", path)
        if text is not None:
            try:
                _, host, port = parse_url(text, ("http",))
                upstream_proxy = (host, port)
            except ValueError as e:
                self.error(key_path(path, "upstream_proxy"), str(e))
        return model.OutboundSettings(
            ca=self.tls_files(m, "ca", path, ca=True),
            proxy_auth=self.proxy_auth(m.get("proxy_auth"), key_path(path, "proxy_auth")),
            upstream_proxy=upstream_proxy,
            default_trust=cast(
                Literal["system", "none"],
                self.choice(m, "default_trust", path, DEFAULT_TRUSTS, d.default_trust),
            ),
            request_timeout=self.duration(m, "request_timeout", path, d.request_timeout),
            idle_timeout=self.duration(m, "idle_timeout", path, d.idle_timeout),
            allowed_non_matrix_urls=self.non_matrix_urls(m, path),
        )

    def proxy_auth(self, value: object, path: str) -> model.ProxyAuth | None:
        if value is None:
            return None
        m = self.mapping(value, path, _PROXY_AUTH_KEYS)
        if m is None:
            return None
        username = self.string(m, "username", path, required=True)
        if username is not None and (":" in username or not username.isprintable()):
            self.error(key_path(path, "username"), "must not contain ':' or control characters")
        password_file = self.file_path(m, "password_file", path, required=True)
        if username is None or password_file is None:
            return None
        password = None
        if not self.skip_files:
            password = self.secret(key_path(path, "password_file"), password_file, token=False)
        return model.ProxyAuth(username=username, password_file=password_file, password=password)

    def non_matrix_urls(self, m: Mapping[str, object], path: str) -> tuple[model.NonMatrixURL, ...]:
        result = []
        for item_path, value in self.items(m, "allowed_non_matrix_urls", path):
            entry = self.mapping(value, item_path, _NON_MATRIX_KEYS)
            if entry is None:
                continue
            host = None
            text = self.string(entry, "host", item_path, required=True)
            if text is not None:
                try:
                    pattern = parse_host_pattern(text)
                except ValueError as e:
                    self.error(key_path(item_path, "host"), str(e))
                else:
                    if pattern.port is not None:
                        self.error(
                            key_path(item_path, "host"), "must be a host without a port (use port:)"
                        )
                    else:
                        host = pattern.host
            port = self.integer(entry, "port", item_path, default=443, minimum=1, maximum=65535)
            regex = None
            source = self.string(entry, "path", item_path, required=True)
            if source is not None:
                try:
                    regex = re.compile(source)
                except (re.error, RecursionError, OverflowError) as e:
                    self.error(key_path(item_path, "path"), f"not a valid regular expression: {e}")
            methods = self.methods(entry, item_path)
            if host is not None and port is not None and regex is not None:
                result.append(model.NonMatrixURL(host=host, port=port, path=regex, methods=methods))
                self.non_matrix_paths.append(key_path(item_path, "host"))
        return tuple(result)

    def methods(self, entry: Mapping[str, object], path: str) -> frozenset[str]:
        """An allowed URL's `methods` (default GET, POST, PUT), upper case."""
        if entry.get("methods") is None:
            return frozenset(NON_MATRIX_METHODS)
        result = set()
        items = self.items(entry, "methods", path)
        if not items:
            self.error(key_path(path, "methods"), "must list at least one method")
        for item_path, item in items:
            text = self.string_value(item, item_path, required=True)
            if text is None:
                continue
            if not _HTTP_METHOD.fullmatch(text.upper()) or text.upper() == "CONNECT":
                self.error(item_path, f"not an HTTP method: {text!r}")
                continue
            result.add(text.upper())
        return frozenset(result) or frozenset(NON_MATRIX_METHODS)

    def limits(self, value: object) -> model.Limits:
        m = self.mapping(value, "limits", _LIMITS_KEYS)
        d = model.Limits()
        if m is None:
            return d

        def count(key: str, default: int) -> int:
            return self.integer(m, key, "limits", default=default, minimum=1) or default

        return model.Limits(
            max_connections=count("max_connections", d.max_connections),
            max_connections_per_ip=count("max_connections_per_ip", d.max_connections_per_ip),
            max_inflight_upstream=count("max_inflight_upstream", d.max_inflight_upstream),
            max_inflight_per_server=count("max_inflight_per_server", d.max_inflight_per_server),
            max_tunnels=count("max_tunnels", d.max_tunnels),
            header_timeout=self.duration(m, "header_timeout", "limits", d.header_timeout),
            rate_limit_per_ip=self.rate_limit(
                m.get("rate_limit_per_ip"), key_path("limits", "rate_limit_per_ip")
            ),
            max_buffered_bytes=self.size(m, "max_buffered_bytes", "limits", d.max_buffered_bytes),
        )
