"""Reload (SIGHUP; docs/configuration.md, Reload and restart) through `GatewayService.reload()`.

The gateway runs in-process; the test rewrites its configuration file and
reloads, then checks what the next request sees, what a request already in
flight sees, and that a broken file changes nothing.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import socket
import ssl
from typing import Any

from signedjson.key import encode_verify_key_base64, generate_signing_key, get_verify_key
from twisted.internet import defer, reactor, task, threads

from sbg.commands.check_config import run as check_config
from testbed.configtools import (
    DELETE,
    EXTERNAL_GROUPS,
    INTERNAL_HOST,
    PARTNER_HOST,
    PARTNER_SERVER,
)
from testbed.pki import issue_server_cert, make_ca
from tests.asynctest import TestCase
from tests.gateway import Gateway, rewrite, start_gateway
from tests.inbound_requests import TXN, txn_body
from tests.outbound_tunnels import CONNECT, signed, start, txn
from tests.rawhttp import RawResponse, exchange_sync, tunnel_sync

PROFILE = b"/_matrix/federation/v1/query/profile?user_id=%40a%3Ainternal.example"
PUBLIC_ROOMS = b"/_matrix/federation/v1/publicRooms"


class LogCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelno, record.getMessage()))


def capture_logs(test: TestCase, name: str = "sbg") -> LogCapture:
    capture = LogCapture()
    log = logging.getLogger(name)
    log.addHandler(capture)
    old = log.level
    log.setLevel(logging.DEBUG)

    def restore() -> None:
        log.removeHandler(capture)
        log.setLevel(old)

    test.addCleanup(restore)
    return capture


def served_certificate(gw: Gateway) -> bytes:
    """The DER certificate the inbound listener presents for the internal host."""
    ctx = ssl.create_default_context(cafile=gw.material.internal_ca.certificate)
    raw = socket.create_connection(("127.0.0.1", gw.ports["inbound"]), timeout=10)
    with ctx.wrap_socket(raw, server_hostname=INTERNAL_HOST) as sock:
        der = sock.getpeercert(binary_form=True)
    assert der is not None
    return der


def reloads(gw: Gateway, result: str) -> float:
    value = gw.service.metrics.registry.get_sample_value(
        "sbg_config_reloads_total", {"result": result}
    )
    return value or 0.0


class ReloadAppliesTests(TestCase):
    async def test_disabling_the_server_refuses_the_next_request(self) -> None:
        gw = await start_gateway(self)
        resp = await gw.inbound(gw.signed_request("PUT", TXN + b"1", txn_body()))
        self.assertEqual(resp.status, 200)
        rewrite(gw, {"external_homeservers[0].enabled": False})
        self.assertTrue(gw.service.reload())
        resp = await gw.inbound(gw.signed_request("PUT", TXN + b"2", txn_body()))
        self.assertEqual(resp.status, 403, resp.body)
        self.assertEqual(resp.json()["errcode"], "M_FORBIDDEN")
        self.assertEqual(len(gw.upstream.requests), 1)
        self.assertEqual(reloads(gw, "success"), 1)
        # And back.
        rewrite(gw)
        self.assertTrue(gw.service.reload())
        resp = await gw.inbound(gw.signed_request("PUT", TXN + b"3", txn_body()))
        self.assertEqual(resp.status, 200)
        self.assertEqual(reloads(gw, "success"), 2)

    async def test_group_added_to_trust_level(self) -> None:
        gw = await start_gateway(self)
        resp = await gw.inbound(gw.signed_request("GET", PUBLIC_ROOMS))
        self.assertEqual(resp.status, 403)
        rewrite(gw, {"trust_levels.external.inbound": [*EXTERNAL_GROUPS, "public_rooms"]})
        self.assertTrue(gw.service.reload())
        resp = await gw.inbound(gw.signed_request("GET", PUBLIC_ROOMS))
        self.assertEqual(resp.status, 200, resp.body)
        self.assertEqual(len(gw.upstream.requests), 1)

    async def test_trust_level_switched(self) -> None:
        gw = await start_gateway(self)
        rewrite(gw, {"external_homeservers[0].trust_level": "partner"})
        self.assertTrue(gw.service.reload())
        resp = await gw.inbound(gw.signed_request("GET", PUBLIC_ROOMS))
        self.assertEqual(resp.status, 200, resp.body)

    async def test_keys_replaced(self) -> None:
        gw = await start_gateway(self)
        new_key = generate_signing_key("b_new")
        rewrite(
            gw,
            {
                "external_homeservers[0].verify_keys": {
                    "ed25519:b_new": encode_verify_key_base64(get_verify_key(new_key))
                }
            },
        )
        self.assertTrue(gw.service.reload())
        # The old key is no longer accepted; the new one is.
        resp = await gw.inbound(gw.signed_request("PUT", TXN + b"1", txn_body()))
        self.assertEqual(resp.status, 401, resp.body)
        resp = await gw.inbound(
            gw.signed_request("PUT", TXN + b"2", txn_body(), signing_key=new_key)
        )
        self.assertEqual(resp.status, 200, resp.body)
        self.assertEqual(len(gw.upstream.requests), 1)

    async def test_outbound_connect_uses_the_new_policy(self) -> None:
        gw, ext = await start(self)
        config = dict(_outbound_overrides(gw))
        config["external_homeservers[0].enabled"] = False
        rewrite(gw, config)
        self.assertTrue(gw.service.reload())
        answer, responses, _ = await gw.outbound(CONNECT, [signed("PUT", TXN, txn())])
        self.assertEqual(answer.status, 403)
        self.assertEqual(responses, [])
        self.assertEqual(ext.requests, [])

    async def test_new_request_on_a_kept_alive_tunnel_uses_the_new_policy(self) -> None:
        # A tunnel opened before the reload: its next request is a new
        # request, and a disabled server must be refused.
        gw, ext = await start(self)
        from tests.outbound_tunnels import open_tunnel, send_on

        sock = await open_tunnel(self, gw)
        config = dict(_outbound_overrides(gw))
        config["external_homeservers[0].enabled"] = False
        rewrite(gw, config)
        self.assertTrue(gw.service.reload())
        try:
            resp: RawResponse | None = await threads.deferToThread(
                send_on, sock, signed("PUT", TXN + b"b", txn())
            )
        except OSError:
            resp = None  # the tunnel was closed: also a refusal
        if resp is not None:
            self.assertEqual(resp.status, 403, resp.body)
        self.assertEqual(len(ext.requests), 1)

    async def test_renewed_certificate_served(self) -> None:
        gw = await start_gateway(self)
        before = await threads.deferToThread(served_certificate, gw)
        renewed = issue_server_cert(
            gw.material.internal_ca,
            os.path.join(gw.material.directory, "renewed"),
            "internal",
            [INTERNAL_HOST, "internal.example"],
        )
        rewrite(
            gw,
            {
                "internal_homeservers[0].tls.certificate": renewed.certificate,
                "internal_homeservers[0].tls.private_key": renewed.private_key,
            },
        )
        self.assertTrue(gw.service.reload())
        after = await threads.deferToThread(served_certificate, gw)
        with open(renewed.certificate, "rb") as f:
            expected = ssl.PEM_cert_to_DER_cert(f.read().decode())
        self.assertNotEqual(before, after)
        self.assertEqual(after, expected)

    async def test_certificate_renewed_at_the_same_path_is_read_again(self) -> None:
        gw = await start_gateway(self)
        before = await threads.deferToThread(served_certificate, gw)
        path = gw.material.internal_tls
        # Renewed in place (as certbot or an operator's cron does): same
        # paths, same configuration file.
        renewed = issue_server_cert(
            gw.material.internal_ca,
            os.path.dirname(path.certificate),
            os.path.basename(path.certificate)[: -len(".crt")],
            [INTERNAL_HOST, "internal.example"],
        )
        self.assertEqual(renewed, path)
        # Served from memory until the reload: the renewal alone changes nothing.
        self.assertEqual(await threads.deferToThread(served_certificate, gw), before)
        self.assertTrue(gw.service.reload())
        after = await threads.deferToThread(served_certificate, gw)
        with open(path.certificate, "rb") as f:
            expected = ssl.PEM_cert_to_DER_cert(f.read().decode())
        self.assertNotEqual(before, after)
        self.assertEqual(after, expected)

    async def test_interception_ca_renewed_at_the_same_path_is_read_again(self) -> None:
        gw, _ext = await start(self)
        ca = gw.material.outbound_ca
        with open(ca.certificate, "rb") as f:
            old_pem = f.read()
        old_file = os.path.join(gw.material.directory, "old-ca.crt")
        with open(old_file, "wb") as f:
            f.write(old_pem)
        renewed = make_ca(
            os.path.dirname(ca.certificate),
            "sbg interception test CA, renewed",
            os.path.basename(ca.certificate)[: -len(".crt")],
        )
        self.assertEqual(renewed, ca)
        self.assertTrue(gw.service.reload())
        # A new tunnel's certificate is minted by the renewed CA: a client
        # trusting only the renewed CA accepts it, one trusting only the
        # old CA does not.
        answer, [resp], _ = await gw.outbound(CONNECT, [signed("PUT", TXN, txn())])
        self.assertEqual((answer.status, resp.status), (200, 200))
        with self.assertRaises(ssl.SSLCertVerificationError):
            await threads.deferToThread(
                tunnel_sync, gw.ports["outbound"], CONNECT, [], sni=PARTNER_HOST, ca_file=old_file
            )

    async def test_listener_change_logged_as_needing_restart(self) -> None:
        gw = await start_gateway(self)
        logs = capture_logs(self)
        rewrite(
            gw,
            {
                "listeners[0].port": 1,
                "external_homeservers[0].enabled": False,
            },
        )
        self.assertTrue(gw.service.reload())
        self.assertTrue(
            any(
                level == logging.WARNING and "restart" in text and "listener" in text
                for level, text in logs.lines
            ),
            logs.lines,
        )
        # The listener still serves (on its old port); the rest applied.
        resp = await gw.inbound(gw.signed_request("PUT", TXN, txn_body()))
        self.assertEqual(resp.status, 403)

        def warned() -> bool:
            found = any("listener changes" in text for _level, text in logs.lines)
            logs.lines.clear()
            return found

        self.assertTrue(warned())
        # Still not applied on the next reload of the same file: say so again.
        self.assertTrue(gw.service.reload())
        self.assertTrue(warned())
        # Back to what is running: nothing to restart for.
        rewrite(gw)
        self.assertTrue(gw.service.reload())
        self.assertFalse(warned())

    async def test_reload_never_lifts_a_kill_switch(self) -> None:
        gw = await start_gateway(self)
        gw.service.killswitch.engage(PARTNER_SERVER, "inbound")
        gw.service.killswitch.engage(None, "outbound")
        rewrite(gw)
        self.assertTrue(gw.service.reload())
        # Even a different state_dir does not move or lift the switches.
        rewrite(gw, {"state_dir": os.path.join(gw.material.directory, "other-state")})
        self.assertTrue(gw.service.reload())
        self.assertEqual(
            gw.service.killswitch.engaged, {(PARTNER_SERVER, "inbound"), (None, "outbound")}
        )
        resp = await gw.inbound(gw.signed_request("PUT", TXN, txn_body()))
        self.assertEqual(resp.status, 403)
        self.assertEqual(gw.upstream.requests, [])


def _outbound_overrides(gw: Gateway) -> dict[str, Any]:
    """The overrides `tests.test_outbound.start` used, read back from the config."""
    ext = gw.config.external_homeservers[0]
    return {
        "external_homeservers[0].addresses": {
            name: f"{addr[0]}:{addr[1]}" for name, addr in ext.addresses
        },
        "outbound.proxy_auth": DELETE,
    }


class ReloadRefusedTests(TestCase):
    async def check_refused(self, gw: Gateway, broken: str) -> None:
        """Reload BROKEN (the config file's new text); nothing may change."""
        logs = capture_logs(self)
        with open(gw.config_path, "w", encoding="utf-8") as f:
            f.write(broken)
        err = io.StringIO()
        self.assertEqual(check_config(gw.config_path, False, io.StringIO(), err), 1)
        expected = err.getvalue().splitlines()
        self.assertTrue(expected)
        before = reloads(gw, "failure")
        policy = gw.service.runtime.policy
        self.assertFalse(gw.service.reload())
        self.assertIs(gw.service.runtime.policy, policy)
        self.assertEqual(reloads(gw, "failure"), before + 1)
        self.assertEqual(reloads(gw, "success"), 0)
        errors = [text for level, text in logs.lines if level >= logging.ERROR]
        for line in expected:
            self.assertTrue(any(line in text for text in errors), (line, errors))
        # Still serving under the old policy.
        resp = await gw.inbound(gw.signed_request("PUT", TXN, txn_body()))
        self.assertEqual(resp.status, 200, resp.body)

    async def test_semantic_errors(self) -> None:
        gw = await start_gateway(self)
        rewrite(
            gw,
            {
                "external_homeservers[0].enabled": False,
                "external_homeservers[0].trust_level": "nosuch",
                "trust_levels.external.inbound": ["transactions", "no_such_group"],
            },
            filename="broken.yaml",
        )
        with open(os.path.join(gw.material.directory, "broken.yaml"), encoding="utf-8") as f:
            await self.check_refused(gw, f.read())

    async def test_yaml_syntax_error(self) -> None:
        gw = await start_gateway(self)
        with open(gw.config_path, encoding="utf-8") as f:
            text = f.read()
        await self.check_refused(gw, text.replace("enabled: true", "enabled: [true"))

    async def test_missing_certificate_file(self) -> None:
        gw = await start_gateway(self)
        rewrite(
            gw,
            {
                "external_homeservers[0].enabled": False,
                "internal_homeservers[0].tls.certificate": "tls/missing.crt",
            },
            filename="broken.yaml",
        )
        with open(os.path.join(gw.material.directory, "broken.yaml"), encoding="utf-8") as f:
            await self.check_refused(gw, f.read())

    async def test_key_not_matching_certificate(self) -> None:
        # A renewed certificate installed with the old key.
        gw = await start_gateway(self)
        rewrite(
            gw,
            {
                "external_homeservers[0].enabled": False,
                "internal_homeservers[0].tls.private_key": gw.material.partner_tls.private_key,
            },
            filename="broken.yaml",
        )
        with open(os.path.join(gw.material.directory, "broken.yaml"), encoding="utf-8") as f:
            await self.check_refused(gw, f.read())

    async def test_not_a_mapping(self) -> None:
        gw = await start_gateway(self)
        await self.check_refused(gw, "- just\n- a list\n")

    async def test_deleted_file(self) -> None:
        gw = await start_gateway(self)
        os.unlink(gw.config_path)
        policy = gw.service.runtime.policy
        self.assertFalse(gw.service.reload())
        self.assertIs(gw.service.runtime.policy, policy)
        self.assertEqual(reloads(gw, "failure"), 1)


class ReloadUnderLoadTests(TestCase):
    async def test_in_flight_request_finishes_under_its_policy(self) -> None:
        gw = await start_gateway(self)
        gw.upstream.delay = 0.5
        pending = gw.inbound(gw.signed_request("PUT", TXN + b"1", txn_body()))
        while not gw.upstream.requests:
            await task.deferLater(reactor, 0.01, lambda: None)
        rewrite(gw, {"external_homeservers[0].enabled": False})
        self.assertTrue(gw.service.reload())
        resp = await pending
        self.assertEqual(resp.status, 200, resp.body)
        self.assertEqual(resp.json(), {"ok": True})
        self.assertEqual(gw.audit.records[-1]["decision"], "allow")
        gw.upstream.delay = 0
        resp = await gw.inbound(gw.signed_request("PUT", TXN + b"2", txn_body()))
        self.assertEqual(resp.status, 403)
        self.assertEqual(len(gw.upstream.requests), 1)

    async def test_steady_stream_drops_nothing(self) -> None:
        gw = await start_gateway(self)
        allowed = rewrite(gw, filename="allowed.yaml")
        groups = [g for g in EXTERNAL_GROUPS if g != "queries_profile"]
        refused = rewrite(gw, {"trust_levels.external.inbound": groups}, filename="refused.yaml")
        request = gw.signed_request("GET", PROFILE)
        port = gw.ports["inbound"]
        ca = gw.material.internal_ca.certificate

        def kept_alive(n: int) -> list[RawResponse]:
            return exchange_sync(
                "127.0.0.1", port, [request] * n, tls=True, sni=INTERNAL_HOST, ca_file=ca
            )

        def one_per_connection(n: int) -> list[RawResponse]:
            out = []
            for _ in range(n):
                out += exchange_sync(
                    "127.0.0.1", port, [request], tls=True, sni=INTERNAL_HOST, ca_file=ca
                )
            return out

        clients = defer.gatherResults(
            [
                threads.deferToThread(kept_alive, 60),
                threads.deferToThread(kept_alive, 60),
                threads.deferToThread(one_per_connection, 40),
                threads.deferToThread(one_per_connection, 40),
            ]
        )
        done: list[bool] = []
        clients.addBoth(lambda r: (done.append(True), r)[1])
        swaps = 0
        while not done:
            source = refused if swaps % 2 == 0 else allowed
            shutil.copyfile(source, gw.config_path + ".new")
            os.replace(gw.config_path + ".new", gw.config_path)
            self.assertTrue(gw.service.reload())
            swaps += 1
            await task.deferLater(reactor, 0.02, lambda: None)
        results: list[list[RawResponse]] = await clients
        responses = [r for batch in results for r in batch]
        self.assertEqual(len(responses), 200)
        statuses = [r.status for r in responses]
        self.assertEqual(set(statuses) - {200, 403}, set(), statuses)
        for r in responses:
            if r.status == 403:
                self.assertEqual(r.json()["errcode"], "M_FORBIDDEN")
            else:
                self.assertEqual(r.json(), {"ok": True})
        self.assertGreaterEqual(swaps, 3)
        self.assertEqual(reloads(gw, "success"), swaps)
        # Every allowed request reached the upstream once; no refused one did.
        self.assertEqual(len(gw.upstream.requests), statuses.count(200))
        # One decision each, matching the answer the client got.
        self.assertEqual(len(gw.audit.records), 200)
        decisions = sorted(str(a["status"]) + a["decision"] for a in gw.audit.records)
        self.assertEqual(
            decisions, sorted(str(s) + ("allow" if s == 200 else "deny") for s in statuses)
        )
        # Both policies were seen by the stream.
        self.assertIn(200, statuses)
        self.assertIn(403, statuses)
