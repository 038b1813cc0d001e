"""The configuration loader: every rule of docs/configuration.md, with its key path."""

from __future__ import annotations

import ipaddress
import os
import re
import tempfile
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sbg.config.load import key_path, load_config, parse_config_text
from sbg.config.model import Config, HostPattern, RoomSettings
from sbg.config.units import format_duration, format_size, parse_duration, parse_size
from sbg.errors import ConfigErrors
from testbed.configtools import (
    DELETE,
    INTERNAL_HOST,
    PARTNER_HOST,
    PARTNER_SERVER,
    Material,
    config_dict,
    make_material,
    write_config,
)

# A problem line: a key path (dots, [indexes], "quoted keys"), ": ", a message.
_PART = r'(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*")'
_LINE = re.compile(rf"^{_PART}(?:\.{_PART}|\[[0-9]+\])*: \S")


class ConfigTestCase(SynchronousTestCase):
    """Writes variants of the valid test configuration and loads them."""

    material: Material
    _tmp: str

    def setUp(self) -> None:
        self._tmp = os.path.abspath(self.mktemp())
        os.makedirs(self._tmp)
        self.material = make_material(os.path.join(self._tmp, "material"))

    def write(self, overrides: dict[str, Any] | None = None) -> str:
        directory = tempfile.mkdtemp(dir=self._tmp)
        return write_config(directory, overrides, material=self.material)

    def load(self, overrides: dict[str, Any] | None = None, *, skip_files: bool = False) -> Config:
        return load_config(self.write(overrides), skip_files=skip_files)

    def problems(
        self, overrides: dict[str, Any] | None = None, *, skip_files: bool = False
    ) -> list[str]:
        return self.problems_of(self.write(overrides), skip_files=skip_files)

    def problems_of(self, path: str, *, skip_files: bool = False) -> list[str]:
        try:
            load_config(path, skip_files=skip_files)
        except ConfigErrors as e:
            self.assertTrue(e.errors)
            return e.lines()
        self.fail(f"{path} was accepted")

    def assertProblem(
        self,
        overrides: dict[str, Any],
        key_path: str,
        fragment: str = "",
        *,
        skip_files: bool = False,
    ) -> str:
        """OVERRIDES cause exactly one problem, at KEY_PATH, mentioning FRAGMENT."""
        lines = self.problems(overrides, skip_files=skip_files)
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith(key_path + ": "), lines)
        self.assertIn(fragment, lines[0])
        return lines[0]


class ValidConfigTests(ConfigTestCase):
    def test_complete_config_loads(self) -> None:
        path = self.write()
        config = load_config(path)
        m = self.material
        self.assertEqual(config.path, path)
        self.assertEqual([li.type for li in config.listeners], ["inbound", "outbound", "admin"])
        self.assertTrue(config.listeners[0].tls)
        self.assertEqual(config.admin_token, m.admin_token)
        assert config.outbound.proxy_auth is not None
        self.assertEqual(config.outbound.proxy_auth.password, m.proxy_password)
        assert config.outbound.ca is not None
        self.assertEqual(config.outbound.ca.certificate, m.outbound_ca.certificate)
        internal = config.internal_homeservers[0]
        self.assertEqual(internal.federation_hosts, (HostPattern(INTERNAL_HOST, None),))
        self.assertEqual(internal.upstream, "http://127.0.0.1:8008")
        external = config.external_homeservers[0]
        self.assertEqual(external.server_name, PARTNER_SERVER)
        self.assertEqual(external.federation_hosts, (HostPattern(PARTNER_HOST, None),))
        self.assertEqual(external.tls_ca, m.partner_ca.certificate)
        self.assertEqual(len(external.verify_keys), 1)
        key_id, raw = external.verify_keys[0]
        self.assertEqual(key_id, m.partner_key_id)
        self.assertEqual(raw, m.partner_signing_key.verify_key.encode())
        levels = {t.name: t for t in config.trust_levels}
        self.assertEqual(set(levels), {"external", "partner"})
        self.assertIn("public_rooms", levels["partner"].inbound)
        self.assertNotIn("public_rooms", levels["external"].inbound)

    def test_defaults_are_the_documented_ones(self) -> None:
        text = yaml.safe_dump(
            {
                "listeners": [{"type": "inbound", "port": 8448}, {"type": "admin", "port": 9000}],
                "internal_homeservers": [
                    {
                        "server_name": "a.example",
                        "federation_hosts": ["matrix.a.example"],
                        "upstream": "http://10.0.0.1:8008",
                    }
                ],
            }
        )
        config = parse_config_text(text, base_dir="/etc/sbg", path="/etc/sbg/sbg.yaml")
        self.assertEqual(config.state_dir, "/var/lib/sbg")
        self.assertEqual(config.log_level, "info")
        self.assertEqual(config.log_format, "text")
        self.assertIsNone(config.admin_token_file)
        self.assertEqual(config.shutdown_grace, 30.0)
        self.assertEqual(config.workers, 1)
        self.assertEqual(config.inbound.max_body_size, 16 * 1024 * 1024)
        self.assertEqual(config.inbound.request_timeout, 600.0)
        self.assertEqual(config.inbound.idle_timeout, 60.0)
        self.assertTrue(config.inbound.strict_origin_checks)
        self.assertEqual(config.outbound.default_trust, "system")
        self.assertEqual(config.outbound.request_timeout, 600.0)
        self.assertEqual(config.outbound.idle_timeout, 60.0)
        self.assertIsNone(config.outbound.ca)
        self.assertIsNone(config.outbound.proxy_auth)
        self.assertIsNone(config.outbound.upstream_proxy)
        self.assertEqual(config.outbound.allowed_non_matrix_urls, ())
        self.assertEqual(config.external_homeservers, ())
        self.assertEqual(config.listeners[0].bind_addresses, ("0.0.0.0",))
        self.assertFalse(config.listeners[0].tls)
        self.assertFalse(config.listeners[0].x_forwarded)
        self.assertEqual(config.listeners[1].bind_addresses, ("127.0.0.1",))

    def test_external_defaults(self) -> None:
        config = self.load(
            {
                "external_homeservers[0]": {
                    "server_name": "b.example",
                    "verify_keys": {"ed25519:k": "A" * 43},
                }
            }
        )
        ext = config.external_homeservers[0]
        self.assertEqual(ext.key_fetch, "pinned")
        self.assertEqual(ext.trust_level, "external")
        self.assertTrue(ext.enabled)
        self.assertEqual(ext.federation_hosts, ())
        self.assertEqual((ext.tls_ca, ext.addresses, ext.source_ips), (None, (), ()))

    def test_null_section_keeps_defaults(self) -> None:
        config = self.load({"inbound": None})
        self.assertEqual(config.inbound.max_body_size, 16 * 1024 * 1024)


class UnknownKeyTests(ConfigTestCase):
    def test_top_level(self) -> None:
        self.assertProblem({"log_levle": "info"}, "log_levle", "did you mean log_level?")

    def test_listener(self) -> None:
        self.assertProblem({"listeners[0].tsl": True}, "listeners[0].tsl", "unknown key")

    def test_nested_sections(self) -> None:
        lines = self.problems(
            {
                "inbound.max_body": "1M",
                "outbound.ca.chain": "x.pem",
                "outbound.proxy_auth.user": "x",
                "internal_homeservers[0].tls.key": "k.pem",
                'external_homeservers[0]."trust level"': "x",
                "trust_levels.external.both": [],
            }
        )
        self.assertEqual(
            sorted(line.split(": ")[0] for line in lines),
            sorted(
                [
                    "inbound.max_body",
                    "outbound.ca.chain",
                    "outbound.proxy_auth.user",
                    "internal_homeservers[0].tls.key",
                    'external_homeservers[0]."trust level"',
                    "trust_levels.external.both",
                ]
            ),
        )
        self.assertTrue(all("unknown key" in line for line in lines), lines)

    def test_non_matrix_url_entry(self) -> None:
        self.assertProblem(
            {
                "outbound.allowed_non_matrix_urls": [
                    {"host": "push.example.net", "path": "/.*", "paths": "/x"}
                ]
            },
            "outbound.allowed_non_matrix_urls[0].paths",
            "unknown key",
        )

    def test_duplicate_key(self) -> None:
        path = self.write()
        with open(path, encoding="utf-8") as f:
            text = f.read()
        text = text.replace("log_level: info\n", "log_level: info\nlog_level: debug\n")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        lines = self.problems_of(path)
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith("log_level: duplicate key"), lines)


class RoomSettingsTests(ConfigTestCase):
    """Each trust level's `rooms:` block (the room rules of docs/room-rules.md)."""

    def test_absent_is_the_v1_profile(self) -> None:
        levels = {t.name: t for t in self.load().trust_levels}
        for level in levels.values():
            self.assertEqual(level.rooms, RoomSettings("open_rooms", False, 0))
        self.assertEqual(RoomSettings(), RoomSettings("open_rooms", False, 0))

    def test_null_and_empty_are_the_v1_profile(self) -> None:
        for value in (None, {}):
            config = self.load({"trust_levels.partner.rooms": value})
            levels = {t.name: t for t in config.trust_levels}
            self.assertEqual(levels["partner"].rooms, RoomSettings())

    def test_a_v2_profile(self) -> None:
        config = self.load(
            {
                "trust_levels.partner.rooms": {
                    "invite": "private_rooms",
                    "join_public": True,
                    "max_power_level": 50,
                }
            }
        )
        levels = {t.name: t for t in config.trust_levels}
        self.assertEqual(levels["partner"].rooms, RoomSettings("private_rooms", True, 50))
        self.assertEqual(levels["external"].rooms, RoomSettings())

    def test_every_invite_value(self) -> None:
        for value in ("open_rooms", "private_rooms", "none"):
            config = self.load({"trust_levels.external.rooms.invite": value})
            levels = {t.name: t for t in config.trust_levels}
            self.assertEqual(levels["external"].rooms.invite, value)

    def test_bad_values_have_their_key_path(self) -> None:
        cases: list[tuple[str, object, str]] = [
            ("invite", "everyone", "must be one of open_rooms | private_rooms | none"),
            ("invite", 3, "must be a string"),
            ("join_public", "yes", "must be true or false"),
            ("max_power_level", "50", "must be an integer"),
            ("max_power_level", 100, "must be between 0 and 99, not 100"),
            ("max_power_level", -1, "must be between 0 and 99, not -1"),
            ("max_power_level", True, "must be an integer"),
        ]
        for key, value, fragment in cases:
            path = f"trust_levels.partner.rooms.{key}"
            self.assertProblem({path: value}, path, fragment)

    def test_rooms_must_be_a_mapping(self) -> None:
        self.assertProblem(
            {"trust_levels.external.rooms": ["open_rooms"]},
            "trust_levels.external.rooms",
            "must be a mapping, not a list",
        )

    def test_unknown_key(self) -> None:
        self.assertProblem(
            {"trust_levels.external.rooms.max_powerlevel": 1},
            "trust_levels.external.rooms.max_powerlevel",
            "did you mean max_power_level?",
        )

    def test_every_problem_of_the_block_is_reported(self) -> None:
        lines = self.problems(
            {
                "trust_levels.external.rooms.invite": "all",
                "trust_levels.external.rooms.join_public": 1,
                "trust_levels.partner.rooms.max_power_level": 1000,
            }
        )
        self.assertEqual(
            sorted(line.split(": ")[0] for line in lines),
            [
                "trust_levels.external.rooms.invite",
                "trust_levels.external.rooms.join_public",
                "trust_levels.partner.rooms.max_power_level",
            ],
        )


class SizeAndDurationTests(ConfigTestCase):
    def test_size_units(self) -> None:
        self.assertEqual(parse_size("16M"), 16 * 1024 * 1024)
        self.assertEqual(parse_size("512K"), 512 * 1024)
        self.assertEqual(parse_size("2G"), 2 * 1024**3)
        self.assertEqual(parse_size(1000), 1000)
        self.assertEqual(parse_size("1000"), 1000)
        self.assertEqual(format_size(16 * 1024 * 1024), "16M")
        self.assertEqual(format_size(1000), "1000")

    def test_size_in_config(self) -> None:
        self.assertEqual(self.load({"inbound.max_body_size": "512K"}).inbound.max_body_size, 524288)
        self.assertEqual(self.load({"inbound.max_body_size": 1234}).inbound.max_body_size, 1234)

    def test_bad_sizes(self) -> None:
        for bad in ("16MB", "lots", "1.5M", -1, 0, True, [16]):
            self.assertProblem({"inbound.max_body_size": bad}, "inbound.max_body_size")

    def test_duration_units(self) -> None:
        self.assertEqual(parse_duration("30s"), 30.0)
        self.assertEqual(parse_duration("5m"), 300.0)
        self.assertEqual(parse_duration("1h"), 3600.0)
        self.assertEqual(parse_duration(45), 45.0)
        self.assertEqual(parse_duration(1.5), 1.5)
        self.assertEqual(parse_duration("250ms"), 0.25)
        self.assertEqual(format_duration(600.0), "10m")
        self.assertEqual(format_duration(45.0), "45s")

    def test_duration_in_config(self) -> None:
        config = self.load({"outbound.request_timeout": "5m", "shutdown_grace": 0})
        self.assertEqual(config.outbound.request_timeout, 300.0)
        self.assertEqual(config.shutdown_grace, 0.0)

    def test_bad_durations(self) -> None:
        for bad in ("5 minutes", "5M", "soon", -3, 0, ".inf", False):
            self.assertProblem({"inbound.idle_timeout": bad}, "inbound.idle_timeout")
        self.assertProblem({"shutdown_grace": "1y"}, "shutdown_grace", "not a duration")
        self.assertProblem({"shutdown_grace": float("inf")}, "shutdown_grace")


class PathAndSecretTests(ConfigTestCase):
    def test_paths_are_relative_to_the_config_file(self) -> None:
        path = self.write({"state_dir": "var/state"})
        config = load_config(path, skip_files=True)
        self.assertEqual(config.state_dir, os.path.join(os.path.dirname(path), "var", "state"))
        config = load_config(self.write({"state_dir": "/srv/sbg"}), skip_files=True)
        self.assertEqual(config.state_dir, "/srv/sbg")

    def test_secret_trailing_newline_stripped(self) -> None:
        directory = tempfile.mkdtemp(dir=self._tmp)
        with open(os.path.join(directory, "token"), "w") as f:
            f.write("s3cret-token\r\n")
        with open(os.path.join(directory, "password"), "w") as f:
            f.write("pass word\n")
        path = write_config(
            directory,
            {"admin_token_file": "token", "outbound.proxy_auth.password_file": "password"},
            material=self.material,
        )
        config = load_config(path)
        self.assertEqual(config.admin_token, "s3cret-token")
        assert config.outbound.proxy_auth is not None
        self.assertEqual(config.outbound.proxy_auth.password, "pass word")
        self.assertEqual(
            config.outbound.proxy_auth.password_file, os.path.join(directory, "password")
        )

    def test_skip_files_reads_no_secret(self) -> None:
        config = self.load(
            {"admin_token_file": "missing", "outbound.proxy_auth.password_file": "missing"},
            skip_files=True,
        )
        self.assertIsNone(config.admin_token)
        assert config.outbound.proxy_auth is not None
        self.assertIsNone(config.outbound.proxy_auth.password)

    def test_missing_secret_files(self) -> None:
        lines = self.problems(
            {"admin_token_file": "missing", "outbound.proxy_auth.password_file": "nope"}
        )
        self.assertEqual(len(lines), 2, lines)
        self.assertTrue(lines[0].startswith("admin_token_file: cannot read "), lines)
        self.assertIn("No such file", lines[0])
        self.assertTrue(lines[1].startswith("outbound.proxy_auth.password_file: "), lines)

    def test_bad_secret_contents(self) -> None:
        directory = tempfile.mkdtemp(dir=self._tmp)
        for name, data in (("empty", b"\n"), ("two", b"a\nb\n"), ("spaced", b"a b\n")):
            with open(os.path.join(directory, name), "wb") as f:
                f.write(data)
        for name, fragment in (("empty", "is empty"), ("two", "one line"), ("spaced", "spaces")):
            path = write_config(directory, {"admin_token_file": name}, material=self.material)
            lines = self.problems_of(path)
            self.assertEqual(len(lines), 1, lines)
            self.assertTrue(lines[0].startswith("admin_token_file: "), lines)
            self.assertIn(fragment, lines[0])

    def test_proxy_username_without_colon(self) -> None:
        self.assertProblem(
            {"outbound.proxy_auth.username": "a:b"}, "outbound.proxy_auth.username", "':'"
        )


class HostTests(ConfigTestCase):
    def test_host_patterns(self) -> None:
        config = self.load(
            {
                "external_homeservers[0].federation_hosts": [
                    "Matrix.Partner.Example:8448",
                    "[2001:DB8::1]:8448",
                    "2001:db8::2",
                    "192.0.2.7",
                ]
            }
        )
        self.assertEqual(
            config.external_homeservers[0].federation_hosts,
            (
                HostPattern("matrix.partner.example", 8448),
                HostPattern("2001:db8::1", 8448),
                HostPattern("2001:db8::2", None),
                HostPattern("192.0.2.7", None),
            ),
        )

    def test_bad_host_patterns(self) -> None:
        for bad in ("host:99999", "host:abc", "host:", "bad host", "2001:db8::zz", "[::1", 7):
            self.assertProblem(
                {"external_homeservers[0].client_hosts": ["ok.example", bad]},
                "external_homeservers[0].client_hosts[1]",
            )

    def test_server_name_kept_as_written(self) -> None:
        config = self.load({"internal_homeservers[0].server_name": "Internal.Example:8448"})
        self.assertEqual(config.internal_homeservers[0].server_name, "Internal.Example:8448")

    def test_bad_server_names(self) -> None:
        for bad in ("bad name", "x.example:0", "::1", "", "x.example:port"):
            self.assertProblem(
                {"external_homeservers[0].server_name": bad}, "external_homeservers[0].server_name"
            )

    def test_addresses(self) -> None:
        config = self.load(
            {
                "external_homeservers[0].addresses": {
                    "Matrix.Partner.Example:8448": "192.0.2.10:8448",
                    "[2001:db8::5]:443": "[2001:db8::6]:443",
                }
            }
        )
        self.assertEqual(
            config.external_homeservers[0].addresses,
            (
                ("matrix.partner.example:8448", ("192.0.2.10", 8448)),
                ("[2001:db8::5]:443", ("2001:db8::6", 443)),
            ),
        )

    def test_address_must_be_ip_and_port(self) -> None:
        for bad in ("partner.example:8448", "192.0.2.10", "2001:db8::6:443", 8448):
            self.assertProblem(
                {"external_homeservers[0].addresses": {"m.partner.example:8448": bad}},
                'external_homeservers[0].addresses."m.partner.example:8448"',
            )

    def test_address_key_needs_port(self) -> None:
        self.assertProblem(
            {"external_homeservers[0].addresses": {"m.partner.example": "192.0.2.1:8448"}},
            'external_homeservers[0].addresses."m.partner.example"',
            "port",
        )

    def test_source_ips(self) -> None:
        config = self.load({"external_homeservers[0].source_ips": ["192.0.2.0/24", "2001:db8::1"]})
        self.assertEqual(
            config.external_homeservers[0].source_ips,
            (ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8::1/128")),
        )
        for bad in ("192.0.2.1/24", "nonsense", "10.0.0.0/33"):
            self.assertProblem(
                {"external_homeservers[0].source_ips": ["10.0.0.0/8", bad]},
                "external_homeservers[0].source_ips[1]",
                "CIDR",
            )

    def test_upstream(self) -> None:
        config = self.load({"internal_homeservers[0].upstream": "HTTPS://HS.Internal:8448/"})
        self.assertEqual(config.internal_homeservers[0].upstream, "https://hs.internal:8448")
        for bad in (
            "http://10.0.0.1:8008/_matrix",
            "ftp://10.0.0.1:21",
            "http://10.0.0.1",
            "10.0.0.1:8008",
            "http://user@10.0.0.1:8008",
            "http://10.0.0.1:8008?x",
        ):
            self.assertProblem(
                {"internal_homeservers[0].upstream": bad}, "internal_homeservers[0].upstream"
            )

    def test_upstream_ca_needs_https(self) -> None:
        self.assertProblem(
            {"internal_homeservers[0].upstream_ca": "ca.pem"},
            "internal_homeservers[0].upstream_ca",
            "https",
            skip_files=True,
        )

    def test_upstream_proxy(self) -> None:
        config = self.load({"outbound.upstream_proxy": "http://proxy.corp:3128"})
        self.assertEqual(config.outbound.upstream_proxy, ("proxy.corp", 3128))
        for bad in ("https://proxy.corp:3128", "http://proxy.corp", "proxy.corp:3128"):
            self.assertProblem({"outbound.upstream_proxy": bad}, "outbound.upstream_proxy")


class VerifyKeyTests(ConfigTestCase):
    def test_key_value_must_be_32_bytes(self) -> None:
        for bad in ("A" * 42, "A" * 44, "not base64!", "A" * 43 + "-", ""):
            line = self.assertProblem(
                {'external_homeservers[0].verify_keys."ed25519:x"': bad},
                'external_homeservers[0].verify_keys."ed25519:x"',
            )
            if bad:
                self.assertEqual(
                    line,
                    'external_homeservers[0].verify_keys."ed25519:x": '
                    "not 32 bytes of unpadded base64",
                )

    def test_padded_key_tolerated(self) -> None:
        config = self.load({"external_homeservers[0].verify_keys": {"ed25519:p": "A" * 43 + "="}})
        self.assertEqual(config.external_homeservers[0].verify_keys, (("ed25519:p", bytes(32)),))

    def test_key_id_grammar(self) -> None:
        for bad in ("ed25519:a-b", "curve25519:x", "ed25519:", "x"):
            self.assertProblem(
                {"external_homeservers[0].verify_keys": {bad: "A" * 43}},
                key_path("external_homeservers[0].verify_keys", bad),
                "key id",
            )

    def test_pinned_without_keys(self) -> None:
        for keys in (DELETE, {}, None):
            self.assertProblem(
                {"external_homeservers[0].verify_keys": keys},
                "external_homeservers[0].verify_keys",
                "key_fetch: pinned",
            )

    def test_fetch_without_keys_is_fine(self) -> None:
        config = self.load(
            {
                "external_homeservers[0].verify_keys": DELETE,
                "external_homeservers[0].key_fetch": "fetch",
            }
        )
        self.assertEqual(config.external_homeservers[0].key_fetch, "fetch")
        self.assertEqual(config.external_homeservers[0].verify_keys, ())

    def test_fetch_needs_a_federation_host(self) -> None:
        self.assertProblem(
            {
                "external_homeservers[0].key_fetch": "fetch",
                "external_homeservers[0].federation_hosts": [],
            },
            "external_homeservers[0].key_fetch",
            "federation_hosts",
        )


class NonMatrixURLTests(ConfigTestCase):
    def test_entry(self) -> None:
        config = self.load(
            {"outbound.allowed_non_matrix_urls": [{"host": "Push.Example.NET", "path": "/x/.*"}]}
        )
        (entry,) = config.outbound.allowed_non_matrix_urls
        self.assertEqual((entry.host, entry.port), ("push.example.net", 443))
        self.assertTrue(entry.path.fullmatch("/x/notify?a=b"))
        self.assertFalse(entry.path.fullmatch("/y"))

    def test_regex_must_compile(self) -> None:
        self.assertProblem(
            {"outbound.allowed_non_matrix_urls": [{"host": "push.example.net", "path": "/(x"}]},
            "outbound.allowed_non_matrix_urls[0].path",
            "regular expression",
        )

    def test_host_without_port_and_valid_port(self) -> None:
        self.assertProblem(
            {"outbound.allowed_non_matrix_urls": [{"host": "push.example.net:443", "path": "/"}]},
            "outbound.allowed_non_matrix_urls[0].host",
        )
        self.assertProblem(
            {
                "outbound.allowed_non_matrix_urls": [
                    {"host": "push.example.net", "port": 70000, "path": "/"}
                ]
            },
            "outbound.allowed_non_matrix_urls[0].port",
        )

    def test_federation_host_cannot_be_non_matrix(self) -> None:
        # Otherwise federation requests could match the entry and skip the
        # trust level and destination checks.
        self.assertProblem(
            {"outbound.allowed_non_matrix_urls": [{"host": PARTNER_HOST, "path": "/.*"}]},
            "outbound.allowed_non_matrix_urls[0].host",
            "external_homeservers[0].federation_hosts[0]",
        )

    def test_several_entries_for_one_host(self) -> None:
        config = self.load(
            {
                "outbound.allowed_non_matrix_urls": [
                    {"host": "push.example.net", "path": "/a"},
                    {"host": "push.example.net", "path": "/b"},
                ]
            }
        )
        self.assertEqual(len(config.outbound.allowed_non_matrix_urls), 2)


class CrossCheckTests(ConfigTestCase):
    def test_server_both_internal_and_external(self) -> None:
        self.assertProblem(
            {
                "external_homeservers[0].server_name": "Internal.Example",
                "external_homeservers[0].federation_hosts": ["other.example"],
            },
            "external_homeservers[0].server_name",
            "internal_homeservers[0]",
        )

    def test_two_servers_claim_one_host(self) -> None:
        self.assertProblem(
            {"external_homeservers[0].federation_hosts": [INTERNAL_HOST.upper()]},
            "external_homeservers[0].federation_hosts[0]",
            "internal_homeservers[0].federation_hosts[0]",
        )

    def test_host_without_port_conflicts_with_any_port(self) -> None:
        self.assertProblem(
            {"external_homeservers[0].client_hosts": [INTERNAL_HOST + ":8448"]},
            "external_homeservers[0].client_hosts[0]",
            "internal_homeservers[0].federation_hosts[0]",
        )

    def test_different_ports_do_not_conflict(self) -> None:
        second = {
            "server_name": "other.example",
            "federation_hosts": ["shared.example:8448", f"{PARTNER_SERVER}:8448"],
            "verify_keys": {"ed25519:k": "A" * 43},
        }
        config = self.load(
            {
                "external_homeservers[0].federation_hosts": ["shared.example:443"],
                "external_homeservers[1]": second,
            }
        )
        self.assertEqual(len(config.external_homeservers), 2)

    def test_server_name_claims_port_443(self) -> None:
        second = {
            "server_name": "other.example",
            "federation_hosts": [PARTNER_SERVER],
            "verify_keys": {"ed25519:k": "A" * 43},
        }
        self.assertProblem(
            {"external_homeservers[1]": second},
            "external_homeservers[1].federation_hosts[0]",
            "external_homeservers[0].server_name",
        )

    def test_one_server_may_repeat_its_own_hosts(self) -> None:
        config = self.load({"external_homeservers[0].client_hosts": [PARTNER_HOST, PARTNER_SERVER]})
        self.assertEqual(len(config.external_homeservers[0].client_hosts), 2)

    def test_unknown_trust_level(self) -> None:
        self.assertProblem(
            {"external_homeservers[0].trust_level": "friends"},
            "external_homeservers[0].trust_level",
            "not a key of trust_levels",
        )

    def test_unknown_trust_level_lists_the_known_ones_escaped(self) -> None:
        # A key with a line break in it must not break the error onto two lines.
        line = self.assertProblem(
            {"trust_levels": {"ext\nernal": {"inbound": ["discovery"]}}},
            "external_homeservers[0].trust_level",
            "'external' is not a key of trust_levels ('ext\\nernal')",
        )
        self.assertNotIn("\n", line)

    def test_unknown_group(self) -> None:
        self.assertProblem(
            {"trust_levels.external.outbound[3]": "event"},
            "trust_levels.external.outbound[3]",
            "unknown endpoint group",
        )

    def test_outbound_listener_needs_ca(self) -> None:
        self.assertProblem({"outbound.ca": DELETE}, "outbound.ca", "listeners[1]")
        config = self.load({"outbound.ca": DELETE, "listeners[1]": DELETE})
        self.assertIsNone(config.outbound.ca)

    def test_tls_listener_needs_internal_tls(self) -> None:
        self.assertProblem(
            {"internal_homeservers[0].tls": DELETE},
            "internal_homeservers[0].tls",
            "listeners[0]",
        )
        config = self.load({"internal_homeservers[0].tls": DELETE, "listeners[0].tls": False})
        self.assertIsNone(config.internal_homeservers[0].tls)

    def test_admin_listener_on_non_loopback_needs_token(self) -> None:
        for address in ("0.0.0.0", "::", "10.0.0.5", "::ffff:127.0.0.1"):
            self.assertProblem(
                {"admin_token_file": DELETE, "listeners[2].bind_addresses": ["127.0.0.1", address]},
                "listeners[2].bind_addresses[1]",
                "admin_token_file",
            )

    def test_admin_listener_on_loopback_needs_no_token(self) -> None:
        config = self.load(
            {"admin_token_file": DELETE, "listeners[2].bind_addresses": ["127.0.0.2", "::1"]}
        )
        self.assertIsNone(config.admin_token_file)
        config = self.load({"listeners[2].bind_addresses": ["0.0.0.0"]})
        self.assertEqual(config.listeners[2].bind_addresses, ("0.0.0.0",))

    def test_bind_addresses_are_ip_literals(self) -> None:
        self.assertProblem(
            {"listeners[2].bind_addresses": ["localhost"]},
            "listeners[2].bind_addresses[0]",
            "not an IP address",
        )

    def test_same_address_and_port_twice(self) -> None:
        self.assertProblem(
            {"listeners[1].port": 3128, "listeners[2].port": 3128},
            "listeners[2].port",
            "listeners[1]",
        )


class ListenerTests(ConfigTestCase):
    def test_listener_types(self) -> None:
        self.assertProblem(
            {"listeners[1].type": "proxy"}, "listeners[1].type", "inbound | outbound | admin"
        )
        self.assertProblem({"listeners[1].type": DELETE}, "listeners[1].type", "required")

    def test_tls_and_x_forwarded_only_inbound(self) -> None:
        self.assertProblem({"listeners[1].tls": False}, "listeners[1].tls", "inbound")
        self.assertProblem(
            {"listeners[2].x_forwarded": True}, "listeners[2].x_forwarded", "inbound"
        )

    def test_port(self) -> None:
        for bad in (65536, -1, "8448", None):
            self.assertProblem({"listeners[0].port": bad}, "listeners[0].port")

    def test_listeners_required(self) -> None:
        self.assertProblem({"listeners": DELETE}, "listeners", "required")
        self.assertProblem({"listeners": []}, "listeners", "at least one")

    def test_internal_homeservers_required(self) -> None:
        lines = self.problems({"internal_homeservers": []})
        self.assertEqual(lines, ["internal_homeservers: must list at least one homeserver"])

    def test_internal_needs_a_federation_host(self) -> None:
        self.assertProblem(
            {"internal_homeservers[0].federation_hosts": []},
            "internal_homeservers[0].federation_hosts",
            "at least one",
        )

    def test_workers(self) -> None:
        self.assertEqual(self.load({"workers": 1}).workers, 1)
        self.assertEqual(self.load({"workers": DELETE}).workers, 1)
        self.assertEqual(self.load({"workers": 4}).workers, 4)
        self.assertProblem({"workers": 65}, "workers", "between 1 and 64")
        for bad in (0, -2, True, "2"):
            self.assertProblem({"workers": bad}, "workers")

    def test_enums(self) -> None:
        self.assertProblem({"log_level": "verbose"}, "log_level", "debug | info")
        self.assertProblem({"log_format": "xml"}, "log_format")
        self.assertProblem({"outbound.default_trust": "all"}, "outbound.default_trust")
        self.assertProblem(
            {"external_homeservers[0].key_fetch": "trust"}, "external_homeservers[0].key_fetch"
        )

    def test_booleans_are_booleans(self) -> None:
        self.assertProblem(
            {"external_homeservers[0].enabled": "no"}, "external_homeservers[0].enabled"
        )
        self.assertProblem({"inbound.strict_origin_checks": 0}, "inbound.strict_origin_checks")


def _write_pem_key(path: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    with open(path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )


class FileCheckTests(ConfigTestCase):
    def test_mismatched_key(self) -> None:
        self.assertProblem(
            {"internal_homeservers[0].tls.private_key": self.material.partner_tls.private_key},
            "internal_homeservers[0].tls.private_key",
            "does not match the certificate",
        )

    def test_missing_certificate(self) -> None:
        self.assertProblem(
            {"internal_homeservers[0].tls.certificate": "nowhere.crt"},
            "internal_homeservers[0].tls.certificate",
            "No such file",
        )

    def test_not_pem(self) -> None:
        directory = tempfile.mkdtemp(dir=self._tmp)
        with open(os.path.join(directory, "junk.pem"), "wb") as f:
            f.write(b"\x00\x01 nothing here\n")
        broken = os.path.join(directory, "broken.pem")
        with open(broken, "wb") as f:
            f.write(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        lines = self.problems_of(
            write_config(
                directory,
                {
                    "internal_homeservers[0].tls.certificate": "junk.pem",
                    "internal_homeservers[0].tls.private_key": "junk.pem",
                    "external_homeservers[0].tls_ca": "broken.pem",
                },
                material=self.material,
            )
        )
        self.assertEqual(len(lines), 3, lines)
        self.assertTrue(lines[0].startswith("internal_homeservers[0].tls.certificate: "), lines)
        self.assertIn("no PEM certificate", lines[0])
        self.assertTrue(lines[1].startswith("internal_homeservers[0].tls.private_key: "), lines)
        self.assertIn("not a PEM private key", lines[1])
        self.assertTrue(lines[2].startswith("external_homeservers[0].tls_ca: "), lines)
        self.assertIn("does not parse", lines[2])

    def test_encrypted_key(self) -> None:
        directory = tempfile.mkdtemp(dir=self._tmp)
        with open(self.material.internal_tls.private_key, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
        with open(os.path.join(directory, "enc.key"), "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.BestAvailableEncryption(b"pw"),
                )
            )
        lines = self.problems_of(
            write_config(
                directory,
                {"internal_homeservers[0].tls.private_key": "enc.key"},
                material=self.material,
            )
        )
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith("internal_homeservers[0].tls.private_key: "))
        self.assertIn("encrypted", lines[0])

    def test_chain_file_uses_the_first_certificate(self) -> None:
        directory = tempfile.mkdtemp(dir=self._tmp)
        chain = os.path.join(directory, "chain.pem")
        with open(chain, "wb") as out:
            for source in (
                self.material.internal_tls.certificate,
                self.material.internal_ca.certificate,
            ):
                with open(source, "rb") as f:
                    out.write(f.read())
        config = load_config(
            write_config(
                directory,
                {"internal_homeservers[0].tls.certificate": "chain.pem"},
                material=self.material,
            )
        )
        assert config.internal_homeservers[0].tls is not None
        self.assertEqual(config.internal_homeservers[0].tls.certificate, chain)

    def test_interception_ca_must_be_a_ca(self) -> None:
        self.assertProblem(
            {
                "outbound.ca.certificate": self.material.partner_tls.certificate,
                "outbound.ca.private_key": self.material.partner_tls.private_key,
            },
            "outbound.ca.certificate",
            "not a CA certificate",
        )

    def test_ca_files(self) -> None:
        lines = self.problems(
            {
                "internal_homeservers[0].upstream": "https://10.0.0.1:8448",
                "internal_homeservers[0].upstream_ca": "missing-ca.pem",
                "external_homeservers[0].tls_ca": self.material.partner_tls.private_key,
            }
        )
        self.assertEqual(len(lines), 2, lines)
        self.assertTrue(lines[0].startswith("internal_homeservers[0].upstream_ca: cannot read"))
        self.assertTrue(lines[1].startswith("external_homeservers[0].tls_ca: "), lines)
        self.assertIn("no PEM certificate", lines[1])
        config = self.load(
            {
                "internal_homeservers[0].upstream": "https://10.0.0.1:8448",
                "internal_homeservers[0].upstream_ca": self.material.internal_ca.certificate,
            }
        )
        self.assertEqual(
            config.internal_homeservers[0].upstream_ca, self.material.internal_ca.certificate
        )

    def test_skip_files_opens_nothing(self) -> None:
        missing = {
            "outbound.ca.certificate": "none/ca.crt",
            "outbound.ca.private_key": "none/ca.key",
            "outbound.proxy_auth.password_file": "none/pw",
            "admin_token_file": "none/token",
            "internal_homeservers[0].upstream": "https://10.0.0.1:8448",
            "internal_homeservers[0].upstream_ca": "none/up.pem",
            "internal_homeservers[0].tls.certificate": "none/tls.crt",
            "internal_homeservers[0].tls.private_key": "none/tls.key",
            "external_homeservers[0].tls_ca": "none/pin.pem",
        }
        config = self.load(missing, skip_files=True)
        self.assertIsNone(config.admin_token)
        lines = self.problems(missing)
        self.assertEqual(len(lines), len(missing) - 1, lines)
        self.assertTrue(all("cannot read" in line for line in lines), lines)

    def test_key_of_other_type_does_not_match(self) -> None:
        directory = tempfile.mkdtemp(dir=self._tmp)
        _write_pem_key(os.path.join(directory, "other.key"))
        lines = self.problems_of(
            write_config(
                directory, {"outbound.ca.private_key": "other.key"}, material=self.material
            )
        )
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith("outbound.ca.private_key: "), lines)
        self.assertIn("does not match", lines[0])


class AllProblemsTests(ConfigTestCase):
    def test_every_problem_is_reported(self) -> None:
        lines = self.problems(
            {
                "log_level": "loud",
                "inbound.max_body_size": "big",
                "listeners[0].port": "x",
                "external_homeservers[0].trust_level": "nope",
                'external_homeservers[0].verify_keys."ed25519:x"': "short",
                "trust_levels.partner.inbound[0]": "everything",
                "internal_homeservers[0].tls.private_key": "missing.key",
            }
        )
        prefixes = [line.split(": ")[0] for line in lines]
        self.assertEqual(
            sorted(prefixes),
            sorted(
                [
                    "log_level",
                    "inbound.max_body_size",
                    "listeners[0].port",
                    "external_homeservers[0].trust_level",
                    'external_homeservers[0].verify_keys."ed25519:x"',
                    "trust_levels.partner.inbound[0]",
                    "internal_homeservers[0].tls.private_key",
                ]
            ),
        )

    def test_cross_checks_still_run_next_to_other_problems(self) -> None:
        lines = self.problems(
            {
                "external_homeservers[0].enabled": "maybe",
                "external_homeservers[0].federation_hosts": [INTERNAL_HOST],
                "outbound.ca": DELETE,
            }
        )
        prefixes = sorted(line.split(": ")[0] for line in lines)
        self.assertEqual(
            prefixes,
            sorted(
                [
                    "external_homeservers[0].enabled",
                    "external_homeservers[0].federation_hosts[0]",
                    "outbound.ca",
                ]
            ),
        )


class NoFollowOnProblemTests(ConfigTestCase):
    """A wrong value is reported once, not again by the cross-checks that need it."""

    def test_wrong_internal_tls(self) -> None:
        self.assertProblem(
            {"internal_homeservers[0].tls": ["a.crt"]}, "internal_homeservers[0].tls", "mapping"
        )

    def test_wrong_outbound_section(self) -> None:
        self.assertProblem({"outbound": [1]}, "outbound", "must be a mapping, not a list")

    def test_wrong_admin_token_file(self) -> None:
        self.assertProblem(
            {"admin_token_file": 5, "listeners[2].bind_addresses": ["0.0.0.0"]},
            "admin_token_file",
            "must be a string",
        )


class GarbageInputTests(ConfigTestCase):
    def write_raw(self, data: bytes) -> str:
        directory = tempfile.mkdtemp(dir=self._tmp)
        path = os.path.join(directory, "sbg.yaml")
        with open(path, "wb") as f:
            f.write(data)
        return path

    def assertFileProblem(self, data: bytes, fragment: str) -> None:
        path = self.write_raw(data)
        lines = self.problems_of(path)
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith(path + ": "), lines)
        self.assertIn(fragment, lines[0])
        self.assertNotIn("\n", lines[0])

    def test_binary_file(self) -> None:
        self.assertFileProblem(bytes(range(256)) * 4, "not UTF-8")

    def test_nul_bytes(self) -> None:
        self.assertFileProblem(b"listeners: \x00\n", "not valid YAML")

    def test_syntax_error(self) -> None:
        self.assertFileProblem(b"listeners:\n  - type: inbound\n   port: [\n", "line ")

    def test_top_level_list_and_scalar(self) -> None:
        self.assertFileProblem(b"- listeners\n- x\n", "must be a mapping, not a list")
        self.assertFileProblem(b"just text\n", "must be a mapping, not a string")

    def test_empty_file(self) -> None:
        self.assertFileProblem(b"# nothing\n", "empty")

    def test_two_documents(self) -> None:
        self.assertFileProblem(b"a: 1\n---\nb: 2\n", "single document")

    def test_deep_nesting(self) -> None:
        self.assertFileProblem(b"a: " + b"[" * 20000, "not valid YAML")

    def test_unsafe_tag(self) -> None:
        self.assertFileProblem(b"a: !!python/object/apply:os.system ['true']\n", "constructor")

    def test_bad_timestamp(self) -> None:
        self.assertFileProblem(b"state_dir: 2020-13-45\n", "not valid YAML")

    def test_missing_file_and_directory(self) -> None:
        path = os.path.join(self._tmp, "does-not-exist.yaml")
        self.assertEqual(
            self.problems_of(path), [f"{path}: cannot read: No such file or directory"]
        )
        lines = self.problems_of(self._tmp)
        self.assertEqual(len(lines), 1)
        self.assertTrue(lines[0].startswith(self._tmp + ": cannot read"), lines)

    def test_huge_file(self) -> None:
        path = self.write_raw(b"")
        with open(path, "r+b") as f:
            f.truncate(17 * 1024 * 1024)
        lines = self.problems_of(path)
        self.assertEqual(lines, [f"{path}: too large to be a configuration"])

    def test_deeply_wrong_types(self) -> None:
        path = self.write_raw(
            yaml.safe_dump(
                {
                    "listeners": "all of them",
                    "inbound": [1, 2],
                    "outbound": {"ca": "ca.pem", "allowed_non_matrix_urls": {"a": 1}},
                    "internal_homeservers": [None, 3, {"server_name": ["x"], "tls": []}],
                    "external_homeservers": {"partner": {}},
                    "trust_levels": [{"external": []}],
                    "state_dir": {"a": 1},
                    7: "seven",
                }
            ).encode()
        )
        lines = self.problems_of(path)
        for line in lines:
            self.assertRegex(line, _LINE)
        prefixes = {line.split(": ")[0] for line in lines}
        for expected in (
            "listeners",
            "inbound",
            "outbound.ca",
            "outbound.allowed_non_matrix_urls",
            "internal_homeservers[0].server_name",
            "internal_homeservers[1]",
            "internal_homeservers[2].server_name",
            "internal_homeservers[2].tls",
            "external_homeservers",
            "trust_levels",
            "state_dir",
            "7",
        ):
            self.assertIn(expected, prefixes)


_garbage = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    result = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            result += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            result += _paths(item, (*prefix, index))
    return result


class FuzzTests(ConfigTestCase):
    @settings(
        max_examples=300,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(data=st.data())
    def test_garbage_anywhere_gives_config_errors(self, data: st.DataObject) -> None:
        config = config_dict(self.material)
        paths = _paths(config)
        for _ in range(data.draw(st.integers(1, 3))):
            path = data.draw(st.sampled_from(paths))
            node: Any = config
            try:
                for step in path[:-1]:
                    node = node[step]
                node[path[-1]] = data.draw(_garbage)
            except (KeyError, IndexError, TypeError):
                continue  # an earlier replacement removed this path
        text = yaml.safe_dump(config)
        try:
            parse_config_text(text, base_dir=self.material.directory, path="fuzz.yaml")
        except ConfigErrors as e:
            self.assertTrue(e.errors)
            for line in e.lines():
                self.assertNotIn("\n", line)
                self.assertRegex(line, _LINE)
