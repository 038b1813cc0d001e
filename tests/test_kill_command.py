"""`sbg kill` / `sbg unkill` against a gateway running in this process.

The command is synchronous (urllib): it runs in a thread so the reactor,
which runs the gateway, can answer it.
"""

from __future__ import annotations

import os
import socket

from testbed.configtools import DELETE, PARTNER_SERVER
from tests.asynctest import TestCase
from tests.commands import cli_config, sbg, set_environment
from tests.gateway import start_gateway
from tests.processes import free_port


def write_file(test: TestCase, text: str) -> str:
    path = os.path.abspath(test.mktemp())
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


class FromConfigTests(TestCase):
    async def test_kill_and_unkill_global(self) -> None:
        gw = await start_gateway(self)
        config = cli_config(gw)
        status, out, err = await sbg("kill", "-c", config)
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(
            out.splitlines(),
            ["engaged kill switches:", "  (global) inbound", "  (global) outbound"],
        )
        self.assertTrue(gw.service.killswitch.is_killed(None, "inbound"))
        self.assertTrue(gw.service.killswitch.is_killed(None, "outbound"))
        status, out, err = await sbg("unkill", "--config", config)
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(out.splitlines(), ["no kill switch engaged"])
        self.assertEqual(gw.service.killswitch.engaged, frozenset())

    async def test_server_and_direction(self) -> None:
        gw = await start_gateway(self)
        config = cli_config(gw)
        status, out, _ = await sbg(
            "kill", "-c", config, "--server", PARTNER_SERVER, "--direction", "outbound"
        )
        self.assertEqual(status, 0)
        self.assertEqual(
            out.splitlines(), ["engaged kill switches:", f"  {PARTNER_SERVER} outbound"]
        )
        self.assertEqual(gw.service.killswitch.engaged, {(PARTNER_SERVER, "outbound")})
        status, out, _ = await sbg("kill", "-c", config, "--direction", "inbound")
        self.assertEqual(
            out.splitlines(),
            ["engaged kill switches:", "  (global) inbound", f"  {PARTNER_SERVER} outbound"],
        )
        status, out, _ = await sbg("unkill", "-c", config, "--server", PARTNER_SERVER)
        self.assertEqual(status, 0)
        self.assertEqual(out.splitlines(), ["engaged kill switches:", "  (global) inbound"])

    async def test_unknown_server_fails_with_one_line(self) -> None:
        gw = await start_gateway(self)
        status, out, err = await sbg("kill", "-c", cli_config(gw), "--server", "evil.example")
        self.assertEqual(status, 1)
        self.assertEqual(out, "")
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn("404", err)
        self.assertIn("evil.example", err)
        self.assertEqual(gw.service.killswitch.engaged, frozenset())

    async def test_config_token_file_other_than_the_gateways_is_refused(self) -> None:
        gw = await start_gateway(self)
        wrong = write_file(self, "not-the-token\n")
        status, _out, err = await sbg("kill", "-c", cli_config(gw, {"admin_token_file": wrong}))
        self.assertEqual(status, 1)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn("401", err)
        self.assertNotIn("not-the-token", err)
        self.assertEqual(gw.service.killswitch.engaged, frozenset())

    async def test_emergency_stop_needs_no_certificate(self) -> None:
        # A broken certificate must not stand between the operator and the
        # kill switch: the command does not open certificate files.
        gw = await start_gateway(self)
        config = cli_config(gw, {"internal_homeservers[0].tls.certificate": "missing.crt"})
        status, _out, err = await sbg("kill", "-c", config)
        self.assertEqual((status, err), (0, ""))
        self.assertTrue(gw.service.killswitch.is_killed(None, "inbound"))

    async def test_no_admin_listener(self) -> None:
        gw = await start_gateway(self)
        config = cli_config(gw, {"listeners[2]": DELETE})
        status, _out, err = await sbg("kill", "-c", config)
        self.assertEqual(status, 1)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn("no admin listener", err)

    async def test_missing_config_file(self) -> None:
        status, out, err = await sbg("kill", "-c", "/nonexistent/sbg.yaml")
        self.assertEqual(status, 1)
        self.assertEqual(out, "")
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn("/nonexistent/sbg.yaml", err)
        self.assertNotIn("Traceback", err)


class AdminUrlTests(TestCase):
    async def test_admin_url_and_token_file(self) -> None:
        gw = await start_gateway(self)
        token_file = write_file(self, gw.material.admin_token + "\n")
        url = f"http://127.0.0.1:{gw.ports['admin']}"
        status, out, err = await sbg(
            "kill", "--admin", url, "--token-file", token_file, "-c", "/nonexistent.yaml"
        )
        self.assertEqual((status, err), (0, ""))
        self.assertIn("(global) inbound", out)
        self.assertTrue(gw.service.killswitch.is_killed(PARTNER_SERVER, "outbound"))
        status, out, err = await sbg(
            "unkill", "--admin", url + "/", "--token-file", token_file, "-c", "/nonexistent.yaml"
        )
        self.assertEqual((status, out), (0, "no kill switch engaged\n"))

    async def test_admin_url_takes_the_token_from_the_config(self) -> None:
        gw = await start_gateway(self)
        url = f"http://127.0.0.1:{gw.ports['admin']}"
        status, _out, err = await sbg("kill", "--admin", url, "-c", gw.config_path)
        self.assertEqual((status, err), (0, ""))
        self.assertTrue(gw.service.killswitch.is_killed(None, "outbound"))

    async def test_admin_url_without_token_refused(self) -> None:
        gw = await start_gateway(self)
        url = f"http://127.0.0.1:{gw.ports['admin']}"
        status, out, err = await sbg("kill", "--admin", url, "-c", "/nonexistent.yaml")
        self.assertEqual(status, 1)
        self.assertEqual(out, "")
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn("401", err)
        self.assertEqual(gw.service.killswitch.engaged, frozenset())

    async def test_wrong_token_file_refused(self) -> None:
        gw = await start_gateway(self)
        url = f"http://127.0.0.1:{gw.ports['admin']}"
        wrong = write_file(self, "guess\n")
        status, _out, err = await sbg("kill", "--admin", url, "--token-file", wrong)
        self.assertEqual(status, 1)
        self.assertIn("401", err)
        self.assertEqual(gw.service.killswitch.engaged, frozenset())

    async def test_missing_token_file(self) -> None:
        gw = await start_gateway(self)
        url = f"http://127.0.0.1:{gw.ports['admin']}"
        missing = os.path.join(self.mktemp(), "token")
        status, _out, err = await sbg("kill", "--admin", url, "--token-file", missing)
        self.assertEqual(status, 1)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn(missing, err)
        self.assertNotIn("Traceback", err)
        self.assertEqual(gw.service.killswitch.engaged, frozenset())

    async def test_unreachable_admin_listener(self) -> None:
        url = f"http://127.0.0.1:{free_port()}"
        status, out, err = await sbg("kill", "--admin", url, "-c", "/nonexistent.yaml")
        self.assertEqual(status, 1)
        self.assertEqual(out, "")
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn("cannot reach the admin listener", err)
        self.assertNotIn("Traceback", err)

    async def test_unreachable_from_config(self) -> None:
        gw = await start_gateway(self)
        config = cli_config(gw, {"listeners[2].port": free_port()})
        status, _out, err = await sbg("unkill", "-c", config)
        self.assertEqual(status, 1)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn("cannot reach the admin listener", err)

    async def test_not_an_admin_listener(self) -> None:
        # --admin pointing at the inbound (TLS) listener by mistake.
        gw = await start_gateway(self)
        token_file = write_file(self, gw.material.admin_token + "\n")
        url = f"http://127.0.0.1:{gw.ports['inbound']}"
        status, _out, err = await sbg("kill", "--admin", url, "--token-file", token_file)
        self.assertEqual(status, 1)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertNotIn("Traceback", err)
        self.assertEqual(gw.service.killswitch.engaged, frozenset())


class _RecordingProxy:
    """A TCP listener standing in for an HTTP proxy: records what reaches it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.seen: list[bytes] = []

    def drain(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(0.5)
            try:
                self.seen.append(conn.recv(65536))
            except OSError:
                self.seen.append(b"")
            conn.close()


class ProxyEnvironmentTests(TestCase):
    async def test_kill_never_goes_through_a_proxy_from_the_environment(self) -> None:
        gw = await start_gateway(self)
        config = cli_config(gw)
        proxy = _RecordingProxy()
        self.addCleanup(proxy.sock.close)
        address = f"http://127.0.0.1:{proxy.port}"
        set_environment(
            self, {"http_proxy": address, "HTTP_PROXY": address, "no_proxy": None, "NO_PROXY": None}
        )
        status, out, err = await sbg("kill", "-c", config, "--reason", "drill")
        self.assertEqual((status, err), (0, ""))
        self.assertIn("(reason: drill)", out)
        self.assertTrue(gw.service.killswitch.is_killed(None, "inbound"))
        status, _out, err = await sbg("unkill", "-c", config)
        self.assertEqual((status, err), (0, ""))
        proxy.drain()
        # Neither the token nor the request went anywhere near the proxy.
        self.assertEqual(proxy.seen, [])
