"""sbg as the operator runs it: `twistd -n --pidfile= sbg -c FILE` in a real process.

Signals (SIGHUP, SIGTERM, SIGKILL), exit statuses, what reaches stdout,
stderr and `--logfile`, and the kill switch across a crash. The upstream
internal homeserver is a stand-in in this (test) process; every blocking
step runs in a thread so the reactor can serve it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import time
from datetime import datetime, timedelta

from twisted.internet import threads

from sbg.commands.check_config import run as check_config
from testbed.configtools import (
    PARTNER_SERVER,
    PROXY_USERNAME,
)
from tests.asynctest import TestCase
from tests.gateway import bare
from tests.inbound_requests import TXN, txn_body
from tests.processes import (
    connect_head,
    make_setup,
    run_gateway,
    sleep,
    spawn,
    wait_until,
)

AUDIT_FIELDS = {
    "ts",
    "direction",
    "peer",
    "origin",
    "destination",
    "method",
    "path",
    "group",
    "decision",
    "status",
    "reason",
    "duration_ms",
    "bytes_in",
    "bytes_out",
}


def connection_refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


class SighupTests(TestCase):
    async def test_reload_applied_and_broken_file_refused(self) -> None:
        setup = make_setup(self)
        proc = await run_gateway(self, setup)
        resp = await setup.inbound(setup.signed("PUT", TXN + b"1", txn_body()))
        self.assertEqual(resp.status, 200, resp.body)

        setup.write({"external_homeservers[0].enabled": False})
        proc.signal(signal.SIGHUP)
        await wait_until(lambda: "configuration reloaded" in proc.output(), 10, "reload", proc)
        resp = await setup.inbound(setup.signed("PUT", TXN + b"2", txn_body()))
        self.assertEqual(resp.status, 403, resp.body)

        with open(setup.path, "a", encoding="utf-8") as f:
            f.write("no_such_key: 1\n")
        expected = io.StringIO()
        self.assertEqual(check_config(setup.path, False, io.StringIO(), expected), 1)
        proc.signal(signal.SIGHUP)
        await wait_until(lambda: "reload refused" in proc.output(), 10, "refusal", proc)
        for line in expected.getvalue().splitlines():
            self.assertIn(line, proc.output())
        # Still running, under the last good policy (the server disabled).
        self.assertIsNone(proc.popen.poll())
        resp = await setup.inbound(setup.signed("PUT", TXN + b"3", txn_body()))
        self.assertEqual(resp.status, 403, resp.body)
        metrics = (await setup.admin("GET", "/metrics", token=False)).body
        self.assertIn(b'sbg_config_reloads_total{result="success"} 1.0', metrics)
        self.assertIn(b'sbg_config_reloads_total{result="failure"} 1.0', metrics)
        self.assertEqual(len(setup.upstream.requests), 1)


class SigtermTests(TestCase):
    async def test_in_flight_request_completes_and_exit_0(self) -> None:
        setup = make_setup(self)
        setup.upstream.delay = 1.0
        proc = await run_gateway(self, setup)
        pending = setup.inbound(setup.signed("PUT", TXN, txn_body()))
        await wait_until(lambda: bool(setup.upstream.requests), 10, "the upstream request")
        sent = time.monotonic()
        proc.signal(signal.SIGTERM)
        # New connections are refused while the request drains.
        await wait_until(lambda: "no new connections" in proc.output(), 5, "SIGTERM handling", proc)
        self.assertTrue(await threads.deferToThread(connection_refused, setup.ports["inbound"]))
        resp = await pending
        self.assertEqual(resp.status, 200, resp.body)
        self.assertEqual(resp.json(), {"ok": True})
        status = await proc.wait()
        self.assertEqual(status, 0, proc.output() + proc.errors())
        self.assertGreater(time.monotonic() - sent, 0.5)
        self.assertIn("all requests finished", proc.output())
        self.assertNotIn("Traceback", proc.output() + proc.errors())

    async def test_idle_gateway_exits_0(self) -> None:
        setup = make_setup(self)
        proc = await run_gateway(self, setup)
        proc.signal(signal.SIGTERM)
        self.assertEqual(await proc.wait(), 0, proc.output() + proc.errors())

    async def test_grace_shorter_than_the_request(self) -> None:
        setup = make_setup(self, {"shutdown_grace": 0.5})
        setup.upstream.delay = 3.0
        proc = await run_gateway(self, setup)
        pending = setup.inbound(setup.signed("PUT", TXN, txn_body()))
        await wait_until(lambda: bool(setup.upstream.requests), 10, "the upstream request")
        sent = time.monotonic()
        proc.signal(signal.SIGTERM)
        status = await proc.wait()
        elapsed = time.monotonic() - sent
        self.assertEqual(status, 0, proc.output() + proc.errors())
        self.assertLess(elapsed, 2.5)
        self.assertIn("shutdown grace", proc.output())
        # The cut request got no response.
        try:
            resp = await pending
            self.assertNotEqual(resp.status, 200)
        except OSError:
            pass
        # Let the stand-in's delayed answer run before the test ends.
        await sleep(max(0.0, 3.2 - (time.monotonic() - sent)))


class KillSwitchRestartTests(TestCase):
    async def test_switch_survives_sigkill_and_restart(self) -> None:
        setup = make_setup(self)
        proc = await run_gateway(self, setup)
        resp = await setup.admin(
            "POST", "/_sbg/kill", {"server": PARTNER_SERVER, "direction": "inbound"}
        )
        self.assertEqual(resp.status, 200, resp.body)
        proc.signal(signal.SIGKILL)
        self.assertEqual(await proc.wait(), -signal.SIGKILL)

        again = await run_gateway(self, setup, name="sbg2")
        resp = await setup.admin("GET", "/_sbg/kill")
        self.assertEqual(
            bare(resp.json()), {"engaged": [{"server": PARTNER_SERVER, "direction": "inbound"}]}
        )
        resp = await setup.inbound(setup.signed("PUT", TXN, txn_body()))
        self.assertEqual(resp.status, 403, resp.body)
        self.assertEqual(resp.json()["errcode"], "M_FORBIDDEN")
        self.assertEqual(setup.upstream.requests, [])
        metrics = (await setup.admin("GET", "/metrics", token=False)).body
        self.assertIn(
            b'sbg_killswitch_engaged{direction="inbound",server="partner.example"} 1.0', metrics
        )
        again.signal(signal.SIGTERM)
        self.assertEqual(await again.wait(), 0)

    async def test_corrupt_state_refuses_to_start(self) -> None:
        setup = make_setup(self)
        state_dir = os.path.join(setup.material.directory, "state")
        os.makedirs(state_dir, exist_ok=True)
        with open(os.path.join(state_dir, "killswitch.json"), "w") as f:
            f.write("{half a fil")
        proc = spawn(self, setup)
        self.assertEqual(await proc.wait(), 1)
        self.assertIn("killswitch.json", proc.errors())
        self.assertNotIn("Traceback", proc.errors() + proc.output())


class JsonLogTests(TestCase):
    async def test_every_line_json_and_no_secrets(self) -> None:
        setup = make_setup(self, {"log_format": "json"})
        proc = await run_gateway(self, setup)
        marker_body = "BODYMARKER" + "x" * 8
        marker_query = "QUERYMARKER"
        content = txn_body()
        content["edus"][0]["content"]["marker"] = marker_body  # type: ignore[index]
        allowed = setup.signed("PUT", TXN + b"1", content)
        signature = allowed.split(b'sig="', 1)[1].split(b'"', 1)[0].decode()
        query = b"/_matrix/federation/v1/query/profile?user_id=%40a%3Ainternal.example&t="
        query += marker_query.encode()
        forged = allowed.replace(signature.encode(), b"A" * len(signature))
        for req, status in ((allowed, 200), (setup.signed("GET", query), 200), (forged, 401)):
            resp = await setup.inbound(req)
            self.assertEqual(resp.status, status, resp.body)
        # Outbound: right and wrong proxy credentials.
        password = setup.material.proxy_password
        for creds, status in ((password, 200), ("wrong-" + password, 407)):
            token = base64.b64encode(f"{PROXY_USERNAME}:{creds}".encode())
            head = await threads.deferToThread(
                connect_head, setup.ports["outbound"], b"Basic " + token
            )
            self.assertTrue(head.startswith(f"HTTP/1.1 {status}".encode()), head)
        # Admin: a kill with the token, a refused one with a wrong token.
        self.assertEqual((await setup.admin("POST", "/_sbg/kill", {})).status, 200)
        self.assertEqual((await setup.admin("POST", "/_sbg/unkill", {})).status, 200)
        # Twisted's own lines go through sbg's observer too (shutdown).
        proc.signal(signal.SIGTERM)
        self.assertEqual(await proc.wait(), 0)

        text = proc.output()
        lines = text.splitlines()
        self.assertGreater(len(lines), 5)
        records = []
        for line in lines:
            obj = json.loads(line)
            self.assertIsInstance(obj, dict, line)
            records.append(obj)
        loggers = {r.get("logger", "") for r in records}
        self.assertTrue(any(name.startswith("twisted") for name in loggers), loggers)
        audit = [r for r in records if r.get("logger") == "sbg.audit"]
        # 3 inbound, 2 CONNECT.
        self.assertEqual(len(audit), 5, audit)
        for r in audit:
            self.assertEqual(AUDIT_FIELDS - set(r), set(), r)
            ts = datetime.fromisoformat(r["ts"])
            self.assertEqual(ts.utcoffset(), timedelta(0), r["ts"])
            self.assertIn(r["direction"], ("inbound", "outbound"))
            self.assertIn(r["decision"], ("allow", "deny", "would_deny"))
            self.assertIs(type(r["status"]), int)
            self.assertNotIn("?", r["path"])
            self.assertIsInstance(r["duration_ms"], (int, float))
            self.assertIs(type(r["bytes_in"]), int)
            self.assertIs(type(r["bytes_out"]), int)
        inbound = [r for r in audit if r["direction"] == "inbound"]
        self.assertEqual([r["status"] for r in inbound], [200, 200, 401])
        self.assertEqual(inbound[0]["origin"], PARTNER_SERVER)
        self.assertEqual(inbound[0]["destination"], "internal.example")
        self.assertEqual(inbound[1]["path"], "/_matrix/federation/v1/query/profile")
        outbound = [r for r in audit if r["direction"] == "outbound"]
        self.assertEqual([r["method"] for r in outbound], ["CONNECT", "CONNECT"])
        self.assertEqual([r["status"] for r in outbound], [200, 407])
        for secret in (
            marker_body,
            marker_query,
            signature,
            "A" * len(signature),
            setup.material.admin_token,
            password,
            base64.b64encode(f"{PROXY_USERNAME}:{password}".encode()).decode(),
        ):
            self.assertNotIn(secret, text)
        self.assertEqual(proc.errors(), "")


class StartupFailureTests(TestCase):
    async def test_broken_config_exit_1_with_check_config_lines(self) -> None:
        setup = make_setup(
            self,
            {
                "external_homeservers[0].trust_level": "nosuch",
                "inbound.max_body_size": "lots",
            },
        )
        expected = io.StringIO()
        self.assertEqual(check_config(setup.path, False, io.StringIO(), expected), 1)
        proc = spawn(self, setup)
        self.assertEqual(await proc.wait(), 1)
        errors = proc.errors()
        for line in expected.getvalue().splitlines():
            self.assertIn(line + "\n", errors)
        self.assertNotIn("Traceback", errors + proc.output())
        self.assertTrue(await threads.deferToThread(connection_refused, setup.ports["admin"]))

    async def test_missing_config_file(self) -> None:
        setup = make_setup(self)
        os.unlink(setup.path)
        proc = spawn(self, setup)
        self.assertEqual(await proc.wait(), 1)
        self.assertIn(setup.path, proc.errors())
        self.assertNotIn("Traceback", proc.errors() + proc.output())

    async def test_port_in_use(self) -> None:
        setup = make_setup(self)
        blocker = socket.socket()
        blocker.bind(("127.0.0.1", setup.ports["outbound"]))
        blocker.listen(1)
        self.addCleanup(blocker.close)
        proc = spawn(self, setup)
        self.assertEqual(await proc.wait(), 1)
        text = proc.output() + proc.errors()
        self.assertNotIn("Traceback", text)
        [line] = [x for x in text.splitlines() if "Couldn't listen" in x]
        self.assertIn(f"127.0.0.1:{setup.ports['outbound']}", line)


class LogfileTests(TestCase):
    async def test_logfile_option(self) -> None:
        setup = make_setup(self, {"log_format": "json"})
        logfile = os.path.join(setup.directory, "sbg.log")
        proc = await run_gateway(self, setup, "--logfile", logfile)
        resp = await setup.inbound(setup.signed("PUT", TXN, txn_body()))
        self.assertEqual(resp.status, 200)
        proc.signal(signal.SIGTERM)
        self.assertEqual(await proc.wait(), 0)
        with open(logfile, encoding="utf-8") as f:
            lines = f.read().splitlines()
        records = [json.loads(line) for line in lines]
        messages = " ".join(str(r.get("message")) for r in records)
        self.assertIn("sbg started", messages)
        self.assertIn("all requests finished", messages)
        self.assertEqual(sum(1 for r in records if r.get("logger") == "sbg.audit"), 1)
        self.assertNotIn("sbg started", proc.output())
        self.assertNotIn("sbg.audit", proc.output())
