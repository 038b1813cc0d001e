"""The man pages sbg(1) and sbg.yaml(5) keep up with the code.

Every command and option of `sbg` is in sbg(1); every configuration key the
loader accepts has its own entry in sbg.yaml(5); both carry this version;
the example in sbg.yaml(5) is a valid configuration.
"""

from __future__ import annotations

import argparse
import os
import re

from twisted.trial.unittest import SynchronousTestCase

import sbg.config.load as load
from sbg import __version__
from sbg.cli import build_parser
from sbg.config.load import parse_config_text
from sbg.errors import ConfigErrors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAN = os.path.join(ROOT, "man")


def read(name: str) -> str:
    with open(os.path.join(MAN, name), encoding="utf-8") as f:
        return f.read()


def plain(roff: str) -> str:
    """The text of a roff source, without font escapes and with plain hyphens."""
    text = re.sub(r"\\f[BIRP]", "", roff)
    text = text.replace("\\-", "-").replace("\\(dq", '"').replace("\\(em", "-")
    return text


def commands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, list[str]]:
    """Every command path of PARSER ("keys fetch") -> its option strings."""
    found: dict[str, list[str]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                path = f"{prefix} {name}".strip()
                found.update(commands(sub, path))
    options = [
        s
        for action in parser._actions
        for s in action.option_strings
        if not isinstance(action, argparse._SubParsersAction)
    ]
    if prefix and not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions):
        found[prefix] = options
    elif not prefix:
        found[""] = options
    return found


def config_keys() -> dict[str, tuple[str, ...]]:
    """The loader's tables of accepted keys, by table name."""
    return dict(load.KEY_TABLES)


class SbgManPageTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.roff = read("sbg.1")
        self.text = plain(self.roff)

    def test_every_command_and_option(self) -> None:
        found = commands(build_parser())
        self.assertIn("keys fetch", found)
        self.assertIn("--version", found[""])
        for path, options in found.items():
            if path:
                # In the synopsis, as the user types it.
                self.assertIn(f"sbg {path}", self.text, path)
            for option in options:
                self.assertRegex(self.text, rf"(?<![\w-]){re.escape(option)}(?![\w-])", option)

    def test_twistd_command_and_signals(self) -> None:
        self.assertIn("twistd3 -n --pidfile= sbg -c FILE", self.text)
        for word in ("SIGHUP", "SIGTERM", "NOTIFY_SOCKET", "/etc/sbg/sbg.yaml", "/var/lib/sbg"):
            self.assertIn(word, self.text)

    def test_version(self) -> None:
        self.assertRegex(self.roff, rf'(?m)^\.TH SBG 1 "[^"]+" "sbg {re.escape(__version__)}"')


class ConfigManPageTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.roff = read("sbg.yaml.5")

    def test_every_key_has_an_entry(self) -> None:
        tables = config_keys()
        self.assertIn("_TOP_KEYS", tables)
        self.assertGreaterEqual(len(tables), 10)
        # An entry is a tagged paragraph: ".TP" then ".B key".
        entries = set(re.findall(r"(?m)^\.TP\n\.B (\S+)$", self.roff))
        for table, keys in tables.items():
            for key in keys:
                self.assertIn(key, entries, f"{table}: {key}")

    def test_top_level_keys_in_their_section(self) -> None:
        section = self.roff.split(".SH TOP-LEVEL KEYS", 1)[1].split("\n.SH ", 1)[0]
        entries = re.findall(r"(?m)^\.TP\n\.B (\S+)$", section)
        self.assertEqual(sorted(entries), sorted(load._TOP_KEYS))

    def test_version(self) -> None:
        self.assertRegex(
            self.roff, rf'(?m)^\.TH SBG\.YAML 5 "[^"]+" "sbg {re.escape(__version__)}"'
        )

    def test_example_is_a_valid_configuration(self) -> None:
        example = self.roff.split(".SH EXAMPLE\n.nf\n", 1)[1].split("\n.fi\n", 1)[0]
        text = plain(example) + "\n"
        try:
            config = parse_config_text(
                text, base_dir="/etc/sbg", path="sbg.yaml(5)", skip_files=True
            )
        except ConfigErrors as e:
            self.fail("\n".join(e.lines()))
        self.assertEqual(
            [hs.server_name for hs in config.external_homeservers], ["partner.example"]
        )
