"""The admin listener (docs/decisions.md): token, kill-switch API, and its effects.

sbg runs in-process on real loopback sockets; the admin API is called with
raw HTTP, the way an operator's curl or an attacker on the monitoring
network would. A kill switch is checked where it matters: the next
federation request inbound and outbound, and tunnels already open.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import time
from typing import Any

from twisted.internet import threads

from testbed.configtools import INTERNAL_HOST, PARTNER_SERVER
from tests.asynctest import TestCase
from tests.gateway import Gateway, bare, rewrite, start_gateway
from tests.inbound_requests import TXN, txn_body
from tests.outbound_tunnels import CONNECT, open_tunnel, send_on, signed, start, txn
from tests.rawhttp import RawResponse, build_request, exchange

UNSET: Any = object()


def admin_request(
    method: str,
    path: str,
    body: Any = UNSET,
    *,
    token: str | None,
    raw_body: bytes | None = None,
    scheme: bytes = b"Bearer",
) -> bytes:
    headers = [(b"Host", b"127.0.0.1")]
    if token is not None:
        headers.append((b"Authorization", scheme + b" " + token.encode()))
    data = raw_body
    if body is not UNSET:
        data = json.dumps(body).encode()
    if data is not None:
        headers.append((b"Content-Type", b"application/json"))
    elif method == "POST":
        data = b""
    return build_request(method.encode(), path.encode(), headers, data)


async def call(gw: Gateway, method: str, path: str, body: Any = UNSET, **kw: Any) -> RawResponse:
    kw.setdefault("token", gw.material.admin_token)
    resp: RawResponse = await gw.admin(admin_request(method, path, body, **kw))
    return resp


def metric_lines(text: bytes, name: bytes) -> list[bytes]:
    return [line for line in text.splitlines() if line.startswith(name + b"{")]


def state_file(gw: Gateway) -> Any:
    with open(os.path.join(gw.config.state_dir, "killswitch.json"), encoding="utf-8") as f:
        return json.load(f)


GLOBAL_BOTH = [
    {"server": None, "direction": "inbound"},
    {"server": None, "direction": "outbound"},
]


class TokenTests(TestCase):
    async def test_health_open_without_token(self) -> None:
        gw = await start_gateway(self)
        resp = await call(gw, "GET", "/health", token=None)
        self.assertEqual(resp.status, 200)
        self.assertEqual(resp.json(), {"status": "ok"})

    async def test_metrics_open_without_token(self) -> None:
        gw = await start_gateway(self)
        resp = await call(gw, "GET", "/metrics", token=None)
        self.assertEqual(resp.status, 200)
        self.assertTrue((resp.header(b"Content-Type") or b"").startswith(b"text/plain"))
        self.assertIn(b"# TYPE sbg_requests_total counter", resp.body)
        self.assertIn(b"# TYPE sbg_killswitch_engaged gauge", resp.body)

    async def test_kill_api_needs_the_token(self) -> None:
        gw = await start_gateway(self)
        token = gw.material.admin_token
        attempts: list[dict[str, Any]] = [
            {"token": None},
            {"token": "wrong"},
            {"token": token + "x"},
            {"token": token[:-1]},
            {"token": token, "scheme": b"Basic"},
            {"token": token, "scheme": b"Bearer" + token.encode()},
            {"token": "", "scheme": b"Bearer"},
        ]
        for kw in attempts:
            for method, path, body in (
                ("GET", "/_sbg/kill", UNSET),
                ("POST", "/_sbg/kill", {}),
                ("POST", "/_sbg/unkill", {}),
            ):
                resp = await call(gw, method, path, body, **kw)
                self.assertEqual(resp.status, 401, (kw, method, path))
                self.assertEqual(resp.json()["errcode"], "M_UNAUTHORIZED")
                self.assertNotIn(token.encode(), resp.body)
        # Nothing was engaged by the refused calls, and nothing persisted.
        self.assertEqual(gw.service.killswitch.engaged, frozenset())
        self.assertFalse(os.path.exists(os.path.join(gw.config.state_dir, "killswitch.json")))

    async def test_two_authorization_headers_refused(self) -> None:
        gw = await start_gateway(self)
        good = b"Bearer " + gw.material.admin_token.encode()
        req = build_request(
            b"POST",
            b"/_sbg/kill",
            [(b"Authorization", b"Bearer wrong"), (b"Authorization", good)],
            b"{}",
        )
        resp = await gw.admin(req)
        self.assertEqual(resp.status, 401)
        self.assertEqual(gw.service.killswitch.engaged, frozenset())

    async def test_right_token_accepted_scheme_case_insensitive(self) -> None:
        gw = await start_gateway(self)
        resp = await call(gw, "GET", "/_sbg/kill")
        self.assertEqual(resp.status, 200)
        self.assertEqual(bare(resp.json()), {"engaged": []})
        resp = await call(gw, "GET", "/_sbg/kill", scheme=b"bearer")
        self.assertEqual(resp.status, 200)

    async def test_no_token_file_means_open_api(self) -> None:
        gw = await start_gateway(self, {"admin_token_file": None})
        resp = await call(gw, "POST", "/_sbg/kill", {}, token=None)
        self.assertEqual(resp.status, 200)
        self.assertEqual(bare(resp.json()), {"engaged": GLOBAL_BOTH})

    async def test_kill_api_not_on_the_federation_listeners(self) -> None:
        gw = await start_gateway(self)
        req = admin_request("POST", "/_sbg/kill", {}, token=gw.material.admin_token)
        req = req.replace(b"Host: 127.0.0.1", b"Host: " + INTERNAL_HOST.encode())
        resp = await gw.inbound(req)
        self.assertNotEqual(resp.status, 200)
        resp = await exchange("127.0.0.1", gw.ports["outbound"], req)
        self.assertNotEqual(resp.status, 200)
        self.assertEqual(gw.service.killswitch.engaged, frozenset())
        self.assertEqual(gw.upstream.requests, [])


class KillApiTests(TestCase):
    async def test_global_both_is_two_entries_and_persisted(self) -> None:
        gw = await start_gateway(self)
        resp = await call(gw, "POST", "/_sbg/kill", {})
        self.assertEqual(resp.status, 200, resp.body)
        self.assertEqual(bare(resp.json()), {"engaged": GLOBAL_BOTH})
        # Written to state_dir before the call returned.
        self.assertEqual(bare(state_file(gw)), {"engaged": GLOBAL_BOTH})
        resp = await call(gw, "GET", "/_sbg/kill")
        self.assertEqual(bare(resp.json()), {"engaged": GLOBAL_BOTH})
        resp = await call(gw, "POST", "/_sbg/unkill", {"server": None})
        self.assertEqual(resp.status, 200)
        self.assertEqual(bare(resp.json()), {"engaged": []})
        self.assertEqual(bare(state_file(gw)), {"engaged": []})

    async def test_server_and_direction(self) -> None:
        gw = await start_gateway(self)
        resp = await call(
            gw, "POST", "/_sbg/kill", {"server": PARTNER_SERVER, "direction": "inbound"}
        )
        self.assertEqual(
            bare(resp.json()), {"engaged": [{"server": PARTNER_SERVER, "direction": "inbound"}]}
        )
        resp = await call(gw, "POST", "/_sbg/kill", {"direction": "outbound"})
        self.assertEqual(
            bare(resp.json()),
            {
                "engaged": [
                    {"server": None, "direction": "outbound"},
                    {"server": PARTNER_SERVER, "direction": "inbound"},
                ]
            },
        )
        # Lifting the other direction of a switch leaves the engaged one alone.
        resp = await call(
            gw, "POST", "/_sbg/unkill", {"server": PARTNER_SERVER, "direction": "outbound"}
        )
        self.assertIn(
            {"server": PARTNER_SERVER, "direction": "inbound"}, bare(resp.json())["engaged"]
        )
        resp = await call(gw, "POST", "/_sbg/unkill", {"server": PARTNER_SERVER})
        self.assertEqual(
            bare(resp.json()), {"engaged": [{"server": None, "direction": "outbound"}]}
        )

    async def test_unknown_server_404(self) -> None:
        gw = await start_gateway(self)
        for path in ("/_sbg/kill", "/_sbg/unkill"):
            resp = await call(gw, "POST", path, {"server": "evil.example"})
            self.assertEqual(resp.status, 404)
            self.assertEqual(resp.json()["errcode"], "M_NOT_FOUND")
        # An internal server is not an external server either.
        resp = await call(gw, "POST", "/_sbg/kill", {"server": "internal.example"})
        self.assertEqual(resp.status, 404)
        self.assertEqual(gw.service.killswitch.engaged, frozenset())

    async def test_switch_of_a_removed_server_can_be_lifted(self) -> None:
        gw = await start_gateway(self)
        await call(gw, "POST", "/_sbg/kill", {"server": PARTNER_SERVER, "direction": "outbound"})
        rewrite(gw, {"external_homeservers": []})
        self.assertTrue(gw.service.reload())
        # A reload never lifts it, and it cannot be engaged anew...
        resp = await call(gw, "GET", "/_sbg/kill")
        self.assertEqual(
            bare(resp.json())["engaged"], [{"server": PARTNER_SERVER, "direction": "outbound"}]
        )
        resp = await call(gw, "POST", "/_sbg/kill", {"server": PARTNER_SERVER})
        self.assertEqual(resp.status, 404)
        # ...but the operator can lift it; then it is unknown.
        resp = await call(gw, "POST", "/_sbg/unkill", {"server": PARTNER_SERVER})
        self.assertEqual(resp.status, 200, resp.body)
        self.assertEqual(bare(resp.json()), {"engaged": []})
        resp = await call(gw, "POST", "/_sbg/unkill", {"server": PARTNER_SERVER})
        self.assertEqual(resp.status, 404)

    async def test_reload_replaces_the_token(self) -> None:
        gw = await start_gateway(self)
        old = gw.material.admin_token
        token_file = os.path.join(gw.material.directory, "secrets", "new_token")
        with open(token_file, "w", encoding="utf-8") as f:
            f.write("new-admin-token\n")
        rewrite(gw, {"admin_token_file": token_file})
        self.assertTrue(gw.service.reload())
        resp = await call(gw, "GET", "/_sbg/kill", token=old)
        self.assertEqual(resp.status, 401)
        resp = await call(gw, "GET", "/_sbg/kill", token="new-admin-token")
        self.assertEqual(resp.status, 200)

    async def test_malformed_bodies_400(self) -> None:
        gw = await start_gateway(self)
        bad: list[bytes] = [
            b"{not json",
            b"[]",
            b'"both"',
            b"null",
            b'{"direction": "sideways"}',
            b'{"direction": null}',
            b'{"direction": 1}',
            b'{"server": 42}',
            b'{"server": ["partner.example"]}',
            b'{"servers": "partner.example"}',
            b"\xff\xfe",
            b"[" * 60_000,
            b'{"server": ' * 5_000,
        ]
        for raw in bad:
            resp = await call(gw, "POST", "/_sbg/kill", raw_body=raw)
            self.assertEqual(resp.status, 400, raw)
            self.assertEqual(resp.json()["errcode"], "M_BAD_JSON", raw)
        self.assertEqual(gw.service.killswitch.engaged, frozenset())

    async def test_empty_body_is_the_global_switch(self) -> None:
        gw = await start_gateway(self)
        resp = await call(gw, "POST", "/_sbg/kill")
        self.assertEqual(resp.status, 200)
        self.assertEqual(bare(resp.json()), {"engaged": GLOBAL_BOTH})

    async def test_unwritable_state_still_engages_and_says_so(self) -> None:
        # The state cannot be persisted: the switch holds at once all the
        # same (failing closed), and the caller is told it would not
        # survive a restart.
        gw = await start_gateway(self)
        shutil.rmtree(gw.config.state_dir)
        with open(gw.config.state_dir, "w") as f:
            f.write("not a directory")
        resp = await call(gw, "POST", "/_sbg/kill", {"reason": "incident 42"})
        self.assertEqual(resp.status, 500)
        self.assertEqual(resp.json()["errcode"], "M_UNKNOWN")
        self.assertIn("engaged but not persisted", resp.json()["error"])
        self.assertEqual(
            gw.service.killswitch.engaged, frozenset({(None, "inbound"), (None, "outbound")})
        )
        resp = await call(gw, "GET", "/_sbg/kill")
        self.assertEqual(bare(resp.json()), {"engaged": GLOBAL_BOTH})
        self.assertEqual(resp.json()["engaged"][0]["reason"], "incident 42")
        # Traffic stops: refused, never forwarded.
        answer = await gw.inbound(gw.signed_request("PUT", TXN, txn_body()))
        self.assertEqual(answer.status, 403)
        self.assertEqual(gw.last_audit()["code"], "killswitch")
        self.assertEqual(gw.upstream.requests, [])
        errors = gw.service.metrics.killswitch_errors.labels("persist")._value.get()
        self.assertEqual(errors, 1.0)
        # A lift that cannot be persisted changes nothing.
        resp = await call(gw, "POST", "/_sbg/unkill", {})
        self.assertEqual(resp.status, 500)
        self.assertIn("nothing was lifted", resp.json()["error"])
        self.assertTrue(gw.service.killswitch.is_killed(None, "inbound"))

    async def test_body_over_64k_refused_before_it_is_read(self) -> None:
        gw = await start_gateway(self)
        resp = await call(
            gw, "POST", "/_sbg/kill", raw_body=b'{"reason": "' + b"x" * 70_000 + b'"}'
        )
        self.assertEqual(resp.status, 413)
        self.assertEqual(gw.service.killswitch.engaged, frozenset())
        # Without the token too: nobody gets a large body held.
        resp = await call(gw, "POST", "/_sbg/kill", raw_body=b"x" * 70_000, token=None)
        self.assertEqual(resp.status, 413)

    async def test_reason_time_and_actor_are_recorded(self) -> None:
        gw = await start_gateway(self)
        before = int(time.time() * 1000)
        resp = await call(
            gw, "POST", "/_sbg/kill", {"server": PARTNER_SERVER, "reason": "suspicious traffic"}
        )
        self.assertEqual(resp.status, 200)
        for entry in resp.json()["engaged"]:
            self.assertEqual(entry["reason"], "suspicious traffic")
            self.assertEqual(entry["by"], "127.0.0.1")
            self.assertGreaterEqual(entry["since_ts"], before)
            self.assertLessEqual(entry["since_ts"], int(time.time() * 1000))
        # They survive a restart with the rest of the state.
        self.assertEqual(state_file(gw)["engaged"][0]["reason"], "suspicious traffic")
        resp = await call(gw, "POST", "/_sbg/kill", {"reason": 7})
        self.assertEqual(resp.status, 400)

    async def test_gauge_follows_the_switches(self) -> None:
        gw = await start_gateway(self)
        name = b"sbg_killswitch_engaged"
        metrics = await call(gw, "GET", "/metrics", token=None)
        self.assertEqual(metric_lines(metrics.body, name), [])
        await call(gw, "POST", "/_sbg/kill", {"server": PARTNER_SERVER, "direction": "outbound"})
        await call(gw, "POST", "/_sbg/kill", {"direction": "inbound"})
        metrics = await call(gw, "GET", "/metrics", token=None)
        self.assertEqual(
            sorted(metric_lines(metrics.body, name)),
            [
                b'sbg_killswitch_engaged{direction="inbound",server="global"} 1.0',
                b'sbg_killswitch_engaged{direction="outbound",server="partner.example"} 1.0',
            ],
        )
        await call(gw, "POST", "/_sbg/unkill", {"direction": "inbound"})
        metrics = await call(gw, "GET", "/metrics", token=None)
        self.assertEqual(
            metric_lines(metrics.body, name),
            [b'sbg_killswitch_engaged{direction="outbound",server="partner.example"} 1.0'],
        )


class KillEffectTests(TestCase):
    async def test_inbound_global_switch_refuses_next_request(self) -> None:
        gw = await start_gateway(self)
        resp = await gw.inbound(gw.signed_request("PUT", TXN + b"1", txn_body()))
        self.assertEqual(resp.status, 200)
        await call(gw, "POST", "/_sbg/kill", {"direction": "inbound"})
        for req in (
            gw.signed_request("PUT", TXN + b"2", txn_body()),
            build_request(b"GET", b"/_matrix/key/v2/server", [(b"Host", INTERNAL_HOST.encode())]),
        ):
            resp = await gw.inbound(req)
            self.assertEqual(resp.status, 403, resp.body)
            self.assertEqual(resp.json()["errcode"], "M_FORBIDDEN")
            self.assertEqual(gw.last_audit()["decision"], "deny")
        self.assertEqual(len(gw.upstream.requests), 1)
        await call(gw, "POST", "/_sbg/unkill", {"direction": "inbound"})
        resp = await gw.inbound(gw.signed_request("PUT", TXN + b"3", txn_body()))
        self.assertEqual(resp.status, 200)
        self.assertEqual(len(gw.upstream.requests), 2)

    async def test_inbound_server_switch(self) -> None:
        gw = await start_gateway(self)
        await call(gw, "POST", "/_sbg/kill", {"server": PARTNER_SERVER, "direction": "inbound"})
        resp = await gw.inbound(gw.signed_request("PUT", TXN, txn_body()))
        self.assertEqual(resp.status, 403)
        self.assertEqual(resp.json()["errcode"], "M_FORBIDDEN")
        self.assertEqual(gw.last_audit()["reason"].endswith("(kill switch)"), True)
        # Only that server is cut off: unauthenticated key requests still pass.
        req = build_request(b"GET", b"/_matrix/key/v2/server", [(b"Host", INTERNAL_HOST.encode())])
        resp = await gw.inbound(req)
        self.assertEqual(resp.status, 200)
        self.assertEqual(len(gw.upstream.requests), 1)

    async def test_outbound_direction_only_leaves_inbound_open(self) -> None:
        gw = await start_gateway(self)
        await call(gw, "POST", "/_sbg/kill", {"server": PARTNER_SERVER, "direction": "outbound"})
        resp = await gw.inbound(gw.signed_request("PUT", TXN, txn_body()))
        self.assertEqual(resp.status, 200)

    async def test_outbound_switch_refuses_connect(self) -> None:
        gw, ext = await start(self)
        answer, [resp], _ = await gw.outbound(CONNECT, [signed("PUT", TXN, txn())])
        self.assertEqual(resp.status, 200)
        for body in (
            {"server": PARTNER_SERVER, "direction": "outbound"},
            {"direction": "outbound"},
        ):
            await call(gw, "POST", "/_sbg/kill", body)
            answer, responses, _ = await gw.outbound(CONNECT, [signed("PUT", TXN, txn())])
            self.assertEqual(answer.status, 403, answer.raw_head)
            self.assertEqual(responses, [])
            await call(gw, "POST", "/_sbg/unkill", body)
        self.assertEqual(len(ext.requests), 1)
        answer, [resp], _ = await gw.outbound(CONNECT, [signed("PUT", TXN, txn())])
        self.assertEqual(resp.status, 200)

    async def test_inbound_switch_leaves_outbound_open(self) -> None:
        gw, _ext = await start(self)
        await call(gw, "POST", "/_sbg/kill", {"direction": "inbound"})
        _answer, [resp], _ = await gw.outbound(CONNECT, [signed("PUT", TXN, txn())])
        self.assertEqual(resp.status, 200)

    async def test_switch_closes_open_tunnels(self) -> None:
        gw, ext = await start(self)
        sock = await open_tunnel(self, gw)
        # An inbound switch leaves the tunnel alone: a second request passes.
        await call(gw, "POST", "/_sbg/kill", {"server": PARTNER_SERVER, "direction": "inbound"})
        resp = await threads.deferToThread(send_on, sock, signed("PUT", TXN + b"b", txn()))
        self.assertEqual(resp.status, 200)
        await call(gw, "POST", "/_sbg/kill", {"server": PARTNER_SERVER, "direction": "outbound"})
        # The kill closed the tunnel: the client sees the end of the stream.
        self.assertTrue(await threads.deferToThread(closed_by_peer, sock))
        self.assertEqual(len(ext.requests), 2)

    async def test_global_switch_closes_open_tunnels(self) -> None:
        gw, ext = await start(self)
        sock = await open_tunnel(self, gw)
        await call(gw, "POST", "/_sbg/kill", {"direction": "outbound"})
        self.assertTrue(await threads.deferToThread(closed_by_peer, sock))
        self.assertEqual(len(ext.requests), 1)


def closed_by_peer(sock: ssl.SSLSocket) -> bool:
    try:
        return sock.recv(1) == b""
    except (ssl.SSLError, ConnectionError):
        return True
    except TimeoutError:
        return False


class AdminTimerTests(TestCase):
    async def test_idle_and_slow_connections_are_closed(self) -> None:
        import sbg.admin

        self.patch(sbg.admin, "IDLE_TIMEOUT", 0.5)
        gw = await start_gateway(self)

        def measure(first: bytes) -> float:
            sock = socket.create_connection(("127.0.0.1", gw.ports["admin"]), timeout=10)
            try:
                started = time.monotonic()
                if first:
                    sock.sendall(first)
                # A byte every 0.2 s resets an idle timer, never the request's.
                while True:
                    try:
                        if not sock.recv(1, socket.MSG_DONTWAIT):
                            return time.monotonic() - started
                    except BlockingIOError:
                        pass
                    except ConnectionResetError:
                        return time.monotonic() - started
                    if first:
                        sock.sendall(b"X")
                    time.sleep(0.2)
                    if time.monotonic() - started > 8:
                        return -1.0
            finally:
                sock.close()

        idle = await threads.deferToThread(measure, b"")
        self.assertGreater(idle, 0.3)
        self.assertLess(idle, 5.0)
        trickle = await threads.deferToThread(measure, b"GET /health HTTP/1.1\r\nX-Slow: ")
        self.assertGreater(trickle, 0.3)
        self.assertLess(trickle, 5.0)
