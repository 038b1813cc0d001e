"""Inbound behind a TLS terminator: `x_forwarded` and the client address."""

from __future__ import annotations

from testbed.configtools import PARTNER_SERVER
from tests.asynctest import TestCase
from tests.gateway import assert_refused, start_gateway
from tests.inbound_requests import TXN, txn_body
from tests.rawhttp import exchange


def plain(overrides: dict[str, object]) -> dict[str, object]:
    out: dict[str, object] = {"listeners[0].tls": False, "listeners[0].x_forwarded": True}
    out.update(overrides)
    return out


class ForwardedTests(TestCase):
    async def test_client_address_is_last_forwarded_element(self) -> None:
        gw = await start_gateway(
            self, plain({"external_homeservers[0].source_ips": ["198.51.100.0/24"]})
        )
        req = gw.signed_request("PUT", TXN, txn_body())
        head, sep, body = req.partition(b"\r\n\r\n")
        req = head + b"\r\nX-Forwarded-For: 10.9.9.9, 198.51.100.7" + sep + body
        resp = await exchange("127.0.0.1", gw.ports["inbound"], req)
        self.assertEqual(resp.status, 200, resp.body)
        [seen] = gw.upstream.requests
        got = {k.lower(): v for k, v in seen.headers}
        # The received chain, with the terminator's address appended.
        self.assertEqual(got[b"x-forwarded-for"], [b"10.9.9.9, 198.51.100.7, 127.0.0.1"])
        self.assertEqual(gw.last_audit()["peer"], "198.51.100.7")

    async def test_forged_address_outside_source_ips_is_refused(self) -> None:
        gw = await start_gateway(
            self, plain({"external_homeservers[0].source_ips": ["198.51.100.0/24"]})
        )
        req = gw.signed_request("PUT", TXN, txn_body())
        head, sep, body = req.partition(b"\r\n\r\n")
        # The attacker's own value comes first; the terminator appended theirs.
        req = head + b"\r\nX-Forwarded-For: 198.51.100.7, 203.0.113.9" + sep + body
        resp = await exchange("127.0.0.1", gw.ports["inbound"], req)
        assert_refused(self, gw, resp, 403, "M_FORBIDDEN", code="source_ip")
        self.assertEqual(gw.last_audit()["origin"], PARTNER_SERVER)

    async def test_without_x_forwarded_the_header_is_not_trusted(self) -> None:
        gw = await start_gateway(
            self,
            {
                "listeners[0].tls": False,
                "external_homeservers[0].source_ips": ["198.51.100.0/24"],
            },
        )
        req = gw.signed_request("PUT", TXN, txn_body())
        head, sep, body = req.partition(b"\r\n\r\n")
        req = head + b"\r\nX-Forwarded-For: 198.51.100.7" + sep + body
        resp = await exchange("127.0.0.1", gw.ports["inbound"], req)
        assert_refused(self, gw, resp, 403, "M_FORBIDDEN", code="source_ip")
        self.assertEqual(gw.last_audit()["peer"], "127.0.0.1")

    async def test_garbage_last_element_gives_no_client_address(self) -> None:
        gw = await start_gateway(
            self, plain({"external_homeservers[0].source_ips": ["127.0.0.0/8"]})
        )
        req = gw.signed_request("PUT", TXN, txn_body())
        head, sep, body = req.partition(b"\r\n\r\n")
        # Not an address: the terminator's own (allowed) address must not
        # stand in for the client's.
        req = head + b"\r\nX-Forwarded-For: 127.0.0.1, not-an-ip" + sep + body
        resp = await exchange("127.0.0.1", gw.ports["inbound"], req)
        assert_refused(self, gw, resp, 403, "M_FORBIDDEN", code="source_ip")
