"""`sbg status` against a gateway running in this process.

The command is synchronous (urllib): it runs in a thread so the reactor,
which runs the gateway, can answer it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from sbg import __version__
from sbg.commands.status import format_status
from testbed.configtools import PARTNER_SERVER
from tests.asynctest import TestCase
from tests.commands import cli_config, sbg, set_environment
from tests.gateway import start_gateway
from tests.inbound_requests import TXN, txn_body
from tests.processes import free_port


class StatusCommandTests(TestCase):
    async def test_json_is_one_object_on_one_line(self) -> None:
        gw = await start_gateway(self)
        ok = await gw.inbound(gw.signed_request("PUT", TXN, txn_body()))
        self.assertEqual(ok.status, 200)
        code, out, err = await sbg("status", "-c", cli_config(gw), "--json")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out.count("\n"), 1)
        body = json.loads(out)
        self.assertEqual(body["config"]["sha256"], gw.config.sha256)
        (partner,) = body["external_servers"]
        self.assertEqual(partner["server_name"], PARTNER_SERVER)
        self.assertIsInstance(partner["inbound"]["last_allowed_ts"], int)

    async def test_text_for_a_person(self) -> None:
        gw = await start_gateway(self)
        await gw.inbound(gw.signed_request("PUT", TXN, txn_body()))
        config = cli_config(gw)
        code, _out, err = await sbg(
            "kill",
            "-c",
            config,
            "--server",
            PARTNER_SERVER,
            "--direction",
            "outbound",
            "--reason",
            "maintenance",
        )
        self.assertEqual(code, 0, err)
        code, out, err = await sbg("status", "-c", config)
        self.assertEqual((code, err), (0, ""))
        lines = out.splitlines()
        self.assertTrue(lines[0].startswith(f"sbg {__version__}, up "), lines[0])
        for expected in (
            f"  sha256 {gw.config.sha256}",
            "workers: 1 of 1 alive",
            "kill switches engaged:",
            f"  {PARTNER_SERVER} outbound since ",
            "by 127.0.0.1: maintenance",
            f"  {PARTNER_SERVER}: enabled, trust level external (enforce)",
            "    KILLED: outbound",
            f"    pinned keys: {gw.material.partner_key_id} (key_fetch: pinned)",
            f"    tls_ca {gw.material.partner_ca.certificate}: expires ",
            "    outbound: last allowed never, last refused never",
        ):
            self.assertIn(expected, out)
        inbound = next(line for line in lines if line.startswith("    inbound:"))
        self.assertRegex(inbound, r"last allowed \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(\d+s ago\)")
        self.assertIn("last refused never", inbound)

    async def test_admin_url_and_token_file(self) -> None:
        gw = await start_gateway(self)
        token = os.path.join(gw.material.directory, "secrets", "admin_token")
        url = f"http://127.0.0.1:{gw.ports['admin']}"
        code, out, err = await sbg(
            "status", "-c", "/nonexistent.yaml", "--admin", url, "--token-file", token, "--json"
        )
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(json.loads(out)["workers"], {"alive": 1, "configured": 1})
        # Without a token: the API refuses, exit 1, one line.
        code, out, err = await sbg("status", "-c", "/nonexistent.yaml", "--admin", url)
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err, "sbg: admin API answered 401: admin token required\n")

    async def test_unreachable_admin_listener_exit_1(self) -> None:
        code, out, err = await sbg(
            "status", "-c", "/nonexistent.yaml", "--admin", f"http://127.0.0.1:{free_port()}"
        )
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(len(err.splitlines()), 1)
        self.assertIn("cannot reach the admin listener", err)
        self.assertNotIn("Traceback", err)

    async def test_never_through_a_proxy_from_the_environment(self) -> None:
        gw = await start_gateway(self)
        config = cli_config(gw)
        # A proxy nobody listens on: going through it would fail.
        dead = f"http://127.0.0.1:{free_port()}"
        proxies = ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY")
        set_environment(self, {**dict.fromkeys(proxies, dead), "no_proxy": None, "NO_PROXY": None})
        code, out, err = await sbg("status", "-c", config, "--json")
        self.assertEqual((code, err), (0, ""))
        self.assertIn(PARTNER_SERVER, out)


class FormatTests(TestCase):
    def test_unknown_sections_are_shown_as_json(self) -> None:
        body: dict[str, Any] = {
            "version": "9.9.9",
            "now_ts": 1_700_000_000_000,
            "started_ts": 1_700_000_000_000 - 90_061_000,
            "uptime_seconds": 90061,
            "config": {
                "path": "/etc/sbg/sbg.yaml",
                "sha256": "ab",
                "loaded_ts": 1,
                "mode": "enforce",
            },
            "workers": {"alive": 3, "configured": 4},
            "kill_switches": [],
            "certificates": [],
            "external_servers": [],
            "unattributed": {},
            "cluster": {"nodes": ["gw-a"]},
            "frontier": {"open": False},
        }
        text = format_status(body)
        self.assertIn("sbg 9.9.9, up 1d 1h 1m", text)
        self.assertIn("workers: 3 of 4 alive", text)
        self.assertIn("kill switches: none engaged", text)
        self.assertIn("external servers: none", text)
        self.assertIn('frontier: {"open": false}', text)

    def test_the_cluster_section_names_nodes_and_marks_a_differing_config(self) -> None:
        now = 1_700_000_000_000
        node = {"version": "0.3.0", "workers": 2, "started_ts": now - 60_000, "instance": "x"}
        body: dict[str, Any] = {
            "now_ts": now,
            "config": {"path": "/etc/sbg/sbg.yaml", "sha256": "aa" * 32},
            "cluster": {
                "node": "gw-a",
                "redis": "redis://10.0.0.20:6379/0",
                "cluster": "connected",
                "pending": [{"server": None, "direction": "inbound"}],
                "nodes": [
                    {
                        **node,
                        "node": "gw-a",
                        "config_sha256": "aa" * 32,
                        "last_seen_ts": now - 2_000,
                    },
                    {
                        **node,
                        "node": "gw-b",
                        "config_sha256": "bb" * 32,
                        "last_seen_ts": now - 4_000,
                    },
                ],
            },
        }
        lines = format_status(body).splitlines()
        self.assertIn("cluster: node gw-a, Redis redis://10.0.0.20:6379/0 connected", lines)
        self.assertIn("  not yet in Redis: (global) inbound", lines)
        a = lines.index(
            "    gw-a: sbg 0.3.0, 2 workers, last seen 2023-11-14 22:13:18 UTC (2s ago)"
        )
        self.assertEqual(lines[a + 1], f"      config sha256 {'aa' * 32}")
        b = lines.index(
            "    gw-b: sbg 0.3.0, 2 workers, last seen 2023-11-14 22:13:16 UTC (4s ago)"
        )
        self.assertEqual(
            lines[b + 1],
            f"      config sha256 {'bb' * 32} (CONFIGURATION DIFFERS FROM THIS NODE'S)",
        )
