"""`sbg check-config`: exit status, summary, and one line per problem."""

from __future__ import annotations

import io
import os
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from sbg.commands.check_config import run
from testbed.configtools import (
    DELETE,
    INTERNAL_HOST,
    INTERNAL_SERVER,
    PARTNER_HOST,
    PARTNER_SERVER,
    Material,
    make_material,
    write_config,
)


class CheckConfigTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        self.material: Material = make_material(self.directory)

    def check(
        self, overrides: dict[str, Any] | None = None, *, skip_files: bool = False
    ) -> tuple[int, str, str]:
        path = write_config(self.directory, overrides, material=self.material)
        return self.check_path(path, skip_files=skip_files)

    def check_path(self, path: str, *, skip_files: bool = False) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = run(path, skip_files, out, err)
        return code, out.getvalue(), err.getvalue()

    def test_valid_config_summary(self) -> None:
        code, out, err = self.check(
            {
                "external_homeservers[1]": {
                    "server_name": "friend.example",
                    "federation_hosts": ["matrix.friend.example:8448"],
                    "verify_keys": {"ed25519:f1": "A" * 43, "ed25519:f2": "B" * 43},
                    "trust_level": "partner",
                    "enabled": False,
                },
                "listeners[0].x_forwarded": True,
            }
        )
        self.assertEqual((code, err), (0, ""))
        self.assertIn(": OK", out.splitlines()[0])
        for expected in (
            "inbound  127.0.0.1:0 (TLS, X-Forwarded-For trusted)",
            "outbound 127.0.0.1:0",
            "admin    127.0.0.1:0 (token required)",
            f"{INTERNAL_SERVER} -> http://127.0.0.1:8008",
            f"hosts: {INTERNAL_HOST}",
            f"{PARTNER_SERVER} (trust level external)",
            f"keys: {self.material.partner_key_id} (pinned)",
            f"hosts: {PARTNER_HOST}",
            "friend.example (trust level partner, DISABLED)",
            "keys: ed25519:f1, ed25519:f2 (pinned)",
            "hosts: matrix.friend.example:8448",
            "  external:",
            "  partner:",
            "public_rooms",
            "max body 16M",
        ):
            self.assertIn(expected, out)
        # One screen.
        self.assertLessEqual(len(out.splitlines()), 40)
        self.assertTrue(all(len(line) <= 80 for line in out.splitlines()[1:]), out)
        # Secrets never appear.
        self.assertNotIn(self.material.admin_token, out)
        self.assertNotIn(self.material.proxy_password, out)

    def test_problems_one_line_each_starting_with_key_path(self) -> None:
        code, out, err = self.check(
            {
                "log_level": "chatty",
                'external_homeservers[0].verify_keys."ed25519:x"': "tooshort",
                "admin_token_file": DELETE,
                "listeners[2].bind_addresses": ["0.0.0.0"],
            }
        )
        self.assertEqual(code, 1)
        self.assertEqual(out, "")
        self.assertTrue(err.endswith("\n"))
        self.assertEqual(
            err.splitlines(),
            [
                "log_level: must be one of debug | info | warning | error, not 'chatty'",
                'external_homeservers[0].verify_keys."ed25519:x": not 32 bytes of unpadded base64',
                "listeners[2].bind_addresses[0]: admin listener on non-loopback address "
                "0.0.0.0 requires admin_token_file",
            ],
        )

    def test_missing_file_names_the_file(self) -> None:
        path = os.path.join(self.directory, "nope.yaml")
        code, out, err = self.check_path(path)
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err, f"{path}: cannot read: No such file or directory\n")

    def test_garbage_file(self) -> None:
        path = os.path.join(self.directory, "garbage.yaml")
        with open(path, "wb") as f:
            f.write(os.urandom(64) + b"\xff\xfe")
        code, out, err = self.check_path(path)
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(len(err.splitlines()), 1)
        self.assertTrue(err.startswith(f"{path}: not UTF-8"), err)

    def test_skip_files(self) -> None:
        overrides = {"internal_homeservers[0].tls.certificate": "missing.crt"}
        code, out, err = self.check(overrides)
        self.assertEqual((code, out), (1, ""))
        self.assertTrue(err.startswith("internal_homeservers[0].tls.certificate: cannot read"))
        code, out, err = self.check(overrides, skip_files=True)
        self.assertEqual((code, err), (0, ""))
        self.assertIn("--skip-files", out)
