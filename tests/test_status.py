"""`GET /_sbg/status`: what the gateway is doing, per partner, at a glance.

sbg runs in-process on real sockets; requests cross it for real (inbound
over TLS, outbound through a CONNECT tunnel) and the status is read the way
an operator's script would, over HTTP with the admin token.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from signedjson.key import generate_signing_key
from twisted.internet import threads

from sbg.tls.pem import certificate_expiry
from testbed.configtools import INTERNAL_SERVER, PARTNER_HOST, PARTNER_SERVER
from tests.asynctest import TestCase
from tests.gateway import Gateway, rewrite, start_gateway
from tests.inbound_requests import TXN, txn_body
from tests.keyserver import KeyServer, key_id, start_key_server
from tests.outbound_tunnels import open_tunnel, send_on, signed, start
from tests.rawhttp import RawResponse, build_request

UNSET: Any = object()


async def call(
    gw: Gateway, method: str, path: str, body: Any = UNSET, *, token: Any = UNSET
) -> RawResponse:
    """The admin API, as curl would call it (the gateway's token by default)."""
    token = gw.material.admin_token if token is UNSET else token
    headers = [(b"Host", b"127.0.0.1")]
    if token is not None:
        headers.append((b"Authorization", b"Bearer " + token.encode()))
    data = None if body is UNSET else json.dumps(body).encode()
    if data is not None:
        headers.append((b"Content-Type", b"application/json"))
    resp: RawResponse = await gw.admin(build_request(method.encode(), path.encode(), headers, data))
    return resp


async def status(gw: Gateway) -> dict[str, Any]:
    resp = await call(gw, "GET", "/_sbg/status")
    assert resp.status == 200, resp
    body: dict[str, Any] = resp.json()
    return body


def partner(body: dict[str, Any]) -> dict[str, Any]:
    (entry,) = [s for s in body["external_servers"] if s["server_name"] == PARTNER_SERVER]
    return entry


def now_ms() -> int:
    return int(time.time() * 1000)


class StatusBodyTests(TestCase):
    async def test_needs_the_token(self) -> None:
        gw = await start_gateway(self)
        for token in (None, "wrong"):
            resp = await call(gw, "GET", "/_sbg/status", token=token)
            self.assertEqual(resp.status, 401)
            self.assertEqual(resp.json()["errcode"], "M_UNAUTHORIZED")
            self.assertNotIn(b"sha256", resp.body)

    async def test_a_fresh_gateway(self) -> None:
        before = now_ms()
        gw = await start_gateway(self)
        body = await status(gw)
        with open(gw.config_path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        self.assertEqual(body["config"]["sha256"], digest)
        self.assertEqual(body["config"]["path"], gw.config.path)
        self.assertEqual(body["config"]["mode"], "enforce")
        self.assertGreaterEqual(body["config"]["loaded_ts"], before)
        self.assertGreaterEqual(body["started_ts"], before)
        self.assertLessEqual(body["started_ts"], body["now_ts"])
        self.assertGreaterEqual(body["uptime_seconds"], 0)
        self.assertEqual(body["workers"], {"alive": 1, "configured": 1})
        self.assertEqual(body["kill_switches"], [])
        p = partner(body)
        self.assertEqual(p["enabled"], True)
        self.assertEqual(p["trust_level"], gw.config.external_homeservers[0].trust_level)
        self.assertEqual(p["key_fetch"], "pinned")
        self.assertEqual(p["pinned_keys"], [gw.material.partner_key_id])
        self.assertEqual(p["fetched_keys"], [])
        ca = gw.material.partner_ca.certificate
        self.assertEqual(
            p["tls_ca"],
            {"path": ca, "expires_ts": int(certificate_expiry(ca).timestamp() * 1000)},
        )
        never = {"last_allowed_ts": None, "last_refused_ts": None, "last_would_deny_ts": None}
        self.assertEqual(p["inbound"], never)
        self.assertEqual(p["outbound"], never)
        self.assertEqual(p["killed"], {"inbound": False, "outbound": False})
        kinds = {(c["kind"], c["name"]) for c in body["certificates"]}
        self.assertIn(("inbound_tls", INTERNAL_SERVER), kinds)
        self.assertIn(("tls_ca", PARTNER_SERVER), kinds)
        self.assertIn(("outbound_ca", "outbound"), kinds)

    async def test_last_allowed_and_refused_inbound(self) -> None:
        gw = await start_gateway(self)
        t0 = now_ms()
        ok = await gw.inbound(gw.signed_request("PUT", TXN, txn_body()))
        self.assertEqual(ok.status, 200)
        t1 = now_ms()
        p = partner(await status(gw))
        self.assertTrue(t0 <= p["inbound"]["last_allowed_ts"] <= t1, (t0, p, t1))
        self.assertIsNone(p["inbound"]["last_refused_ts"])
        self.assertIsNone(p["outbound"]["last_allowed_ts"])

        # A signature by a key the partner does not own: refused, and it is
        # the partner's (the origin is a configured server).
        forged = gw.signed_request(
            "PUT",
            TXN + b"2",
            txn_body(),
            signing_key=gw.forged_key(),
        )
        self.assertEqual((await gw.inbound(forged)).status, 401)
        t2 = now_ms()
        body = await status(gw)
        p = partner(body)
        self.assertTrue(t1 <= p["inbound"]["last_refused_ts"] <= t2)
        self.assertTrue(t0 <= p["inbound"]["last_allowed_ts"] <= t1)
        # A request no configured server can be named for.
        self.assertIsNone(body["unattributed"]["inbound"]["last_refused_ts"])
        stray = await gw.inbound(gw.signed_request("GET", b"/_synapse/admin/v1/users"))
        self.assertEqual(stray.status, 404)
        body = await status(gw)
        self.assertGreaterEqual(body["unattributed"]["inbound"]["last_refused_ts"], t2)
        self.assertEqual(partner(body)["inbound"], p["inbound"])

    async def test_last_allowed_and_refused_outbound(self) -> None:
        gw, _state = await start(self)
        t0 = now_ms()
        sock = await open_tunnel(self, gw)  # the CONNECT, then a transaction
        p = partner(await status(gw))
        self.assertGreaterEqual(p["outbound"]["last_allowed_ts"], t0)
        self.assertIsNone(p["outbound"]["last_refused_ts"])
        self.assertIsNone(p["inbound"]["last_allowed_ts"])
        # An endpoint outside the partner's trust level, in the same tunnel.
        t1 = now_ms()
        resp = await threads.deferToThread(
            send_on, sock, signed("GET", b"/_matrix/federation/v1/publicRooms")
        )
        self.assertEqual(resp.status, 403)
        p = partner(await status(gw))
        self.assertGreaterEqual(p["outbound"]["last_refused_ts"], t1)

    async def test_kill_switches_with_reason_and_killed_flags(self) -> None:
        gw = await start_gateway(self)
        t0 = now_ms()
        resp = await call(
            gw,
            "POST",
            "/_sbg/kill",
            {"server": PARTNER_SERVER, "direction": "inbound", "reason": "incident 42"},
        )
        self.assertEqual(resp.status, 200)
        body = await status(gw)
        (entry,) = body["kill_switches"]
        self.assertEqual(entry["server"], PARTNER_SERVER)
        self.assertEqual(entry["direction"], "inbound")
        self.assertEqual(entry["reason"], "incident 42")
        self.assertEqual(entry["by"], "127.0.0.1")
        self.assertGreaterEqual(entry["since_ts"], t0)
        self.assertEqual(partner(body)["killed"], {"inbound": True, "outbound": False})
        await call(gw, "POST", "/_sbg/kill", {"direction": "outbound"})
        body = await status(gw)
        self.assertEqual(partner(body)["killed"], {"inbound": True, "outbound": True})

    async def test_reload_shows_the_new_file(self) -> None:
        gw = await start_gateway(self)
        before = await status(gw)
        time.sleep(0.01)
        rewrite(gw, {"external_homeservers[0].enabled": False})
        self.assertTrue(gw.service.reload())
        after = await status(gw)
        with open(gw.config_path, "rb") as f:
            self.assertEqual(after["config"]["sha256"], hashlib.sha256(f.read()).hexdigest())
        self.assertNotEqual(after["config"]["sha256"], before["config"]["sha256"])
        self.assertGreater(after["config"]["loaded_ts"], before["config"]["loaded_ts"])
        self.assertEqual(after["started_ts"], before["started_ts"])
        self.assertFalse(partner(after)["enabled"])
        # A refused reload changes nothing.
        with open(gw.config_path, "a", encoding="utf-8") as f:
            f.write("no_such_key: 1\n")
        self.assertFalse(gw.service.reload())
        self.assertEqual((await status(gw))["config"], after["config"])

    async def test_fetched_keys_with_their_expiry(self) -> None:
        k1 = generate_signing_key("k1")
        keys = KeyServer(PARTNER_SERVER, [k1])

        def overrides(material: Any) -> dict[str, Any]:
            port = start_key_server(self, keys, material.partner_tls)
            return {
                "external_homeservers[0].key_fetch": "fetch",
                "external_homeservers[0].addresses": {f"{PARTNER_HOST}:8448": f"127.0.0.1:{port}"},
            }

        gw = await start_gateway(self, overrides)
        self.assertEqual(partner(await status(gw))["fetched_keys"], [])
        resp = await gw.inbound(gw.signed_request("PUT", TXN, txn_body(), signing_key=k1))
        self.assertEqual(resp.status, 200, resp.body)
        p = partner(await status(gw))
        self.assertEqual(p["key_fetch"], "fetch")
        self.assertEqual(
            p["fetched_keys"], [{"key_id": key_id(k1), "valid_until_ts": keys.valid_until_ms}]
        )

    async def test_further_sections_are_added_by_name(self) -> None:
        gw = await start_gateway(self)
        calls: list[int] = []

        def nodes() -> dict[str, Any]:
            calls.append(1)
            return {"nodes": [{"name": "gw-a"}]}

        gw.service.status_state.sections["cluster"] = nodes
        body = await status(gw)
        self.assertEqual(body["cluster"], {"nodes": [{"name": "gw-a"}]})
        self.assertEqual(len(calls), 1)
        self.assertIn("external_servers", body)

    async def test_monitor_mode_and_would_deny(self) -> None:
        gw = await start_gateway(self, {"mode": "monitor"})
        body = await status(gw)
        self.assertEqual(body["config"]["mode"], "monitor")
        self.assertEqual(partner(body)["mode"], "monitor")
        # publicRooms is outside the `external` trust level: monitor mode
        # forwards it and records a would_deny, not an allow.
        t0 = now_ms()
        resp = await gw.inbound(gw.signed_request("GET", b"/_matrix/federation/v1/publicRooms"))
        self.assertEqual(resp.status, 200)
        p = partner(await status(gw))
        self.assertGreaterEqual(p["inbound"]["last_would_deny_ts"], t0)
        self.assertIsNone(p["inbound"]["last_allowed_ts"])
        self.assertIsNone(p["inbound"]["last_refused_ts"])
