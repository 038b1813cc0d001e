"""Failed TLS handshakes leave a trace: one WARNING line (`sbg.tls`) and a count.

Real clients against the real gateway on loopback: a client that does not
trust sbg's certificate, one that checks another name, one that speaks
plain HTTP, TLS 1.1 or only ciphers sbg does not offer, one that stalls or
hangs up mid-handshake; inside an outbound tunnel, an internal homeserver
that does not trust sbg's CA; and sbg's own connections to a partner whose
certificate does not verify. A TCP probe that sends nothing is not one.
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import os
import socket
import ssl
import time
from typing import Any

from twisted.internet import threads

from sbg.logsetup import LogWriter, WriterHandler
from testbed.configtools import DELETE, INTERNAL_HOST, PARTNER_HOST, PARTNER_SERVER, Material
from testbed.tlstools import issue_cert
from tests.asynctest import TestCase
from tests.gateway import Gateway, start_gateway
from tests.outbound_tunnels import CONNECT, signed, txn
from tests.processes import sleep
from tests.rawhttp import build_request, tunnel_sync
from tests.standin import start_standin

# The first bytes of a TLS ClientHello record: a handshake that never ends.
PARTIAL_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 16


class TLSCapture(logging.Handler):
    """The `sbg.tls` records (their structured fields)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "sbg.tls":
            self.records.append(record)

    def fields(self) -> list[dict[str, Any]]:
        return [dict(getattr(r, "sbg_fields", {})) for r in self.records]


def capture(test: TestCase) -> TLSCapture:
    handler = TLSCapture()
    log = logging.getLogger("sbg.tls")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    test.addCleanup(log.removeHandler, handler)
    return handler


def failures(gw: Gateway, listener: str, reason: str) -> float:
    value = gw.service.metrics.registry.get_sample_value(
        "sbg_tls_handshake_failures_total", {"listener": listener, "reason": reason}
    )
    return value or 0.0


async def one_record(test: TestCase, tls: TLSCapture, count: int = 1) -> dict[str, Any]:
    """Wait for the gateway's line about the handshake (it sees the failure
    a moment after the client does)."""
    deadline = time.monotonic() + 10
    while len(tls.records) < count and time.monotonic() < deadline:
        await sleep(0.02)
    await sleep(0.1)  # and no second line
    test.assertEqual(len(tls.records), count, [r.getMessage() for r in tls.records])
    record = tls.records[-1]
    test.assertEqual(record.levelno, logging.WARNING)
    return tls.fields()[-1]


def tls_client(
    port: int,
    *,
    cafile: str,
    server_hostname: str | None,
    configure: Any = None,
) -> str:
    """Try a TLS handshake; what the client said about it."""
    ctx = ssl.create_default_context(cafile=cafile)
    if server_hostname is None:
        ctx.check_hostname = False
    if configure is not None:
        configure(ctx)
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        with ctx.wrap_socket(raw, server_hostname=server_hostname) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            return "handshake completed"
    except (ssl.SSLError, OSError) as e:
        return str(e)
    finally:
        raw.close()


def raw_client(port: int, data: bytes, *, wait_close: float = 0.0) -> bytes:
    """Send DATA on a plain TCP connection; read until closed (or WAIT_CLOSE)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        if data:
            sock.sendall(data)
        if not wait_close:
            return b""
        sock.settimeout(wait_close)
        got = b""
        while True:
            try:
                chunk = sock.recv(4096)
            except ConnectionResetError:
                return got
            if not chunk:
                return got
            got += chunk
    finally:
        sock.close()


class InboundHandshakeTests(TestCase):
    async def _start(self) -> None:
        self.gw = await start_gateway(self, {"inbound.idle_timeout": "1s"})
        self.tls = capture(self)
        self.port = self.gw.ports["inbound"]

    async def test_client_that_does_not_trust_the_certificate(self) -> None:
        await self._start()
        # The partner trusts another CA than the one of the inbound certificate.
        said = await threads.deferToThread(
            tls_client,
            self.port,
            cafile=self.gw.material.partner_ca.certificate,
            server_hostname=INTERNAL_HOST,
        )
        self.assertIn("CERTIFICATE_VERIFY_FAILED", said)
        fields = await one_record(self, self.tls)
        self.assertEqual(
            fields,
            {
                "listener": "inbound",
                "peer": "127.0.0.1",
                "sni": INTERNAL_HOST,
                "reason": "unknown_ca",
            },
        )
        self.assertIn("not signed by a CA", self.tls.records[0].getMessage())
        self.assertEqual(failures(self.gw, "inbound", "unknown_ca"), 1)
        # Nothing reached the internal homeserver, nothing was audited.
        self.assertEqual(self.gw.upstream.requests, [])
        self.assertEqual(self.gw.audit.records, [])

    async def test_client_that_checks_another_name(self) -> None:
        await self._start()
        said = await threads.deferToThread(
            tls_client,
            self.port,
            cafile=self.gw.material.internal_ca.certificate,
            server_hostname="wrong.example",
        )
        self.assertIn("CERTIFICATE_VERIFY_FAILED", said)
        fields = await one_record(self, self.tls)
        self.assertEqual(fields["reason"], "bad_certificate")
        self.assertEqual(fields["sni"], "wrong.example")
        self.assertEqual(failures(self.gw, "inbound", "bad_certificate"), 1)

    async def test_plain_http_to_the_tls_port(self) -> None:
        await self._start()
        await threads.deferToThread(
            raw_client, self.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", wait_close=5
        )
        fields = await one_record(self, self.tls)
        self.assertEqual(fields["reason"], "not_tls")
        self.assertIsNone(fields["sni"])
        self.assertEqual(failures(self.gw, "inbound", "not_tls"), 1)

    async def test_tls_1_1_client(self) -> None:
        await self._start()

        def old(ctx: ssl.SSLContext) -> None:
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")

        said = await threads.deferToThread(
            tls_client,
            self.port,
            cafile=self.gw.material.internal_ca.certificate,
            server_hostname=INTERNAL_HOST,
            configure=old,
        )
        self.assertNotEqual(said, "handshake completed")
        fields = await one_record(self, self.tls)
        self.assertEqual(fields["reason"], "protocol_version")
        self.assertEqual(failures(self.gw, "inbound", "protocol_version"), 1)

    async def test_client_without_a_shared_cipher(self) -> None:
        await self._start()

        def rsa_key_exchange_only(ctx: ssl.SSLContext) -> None:
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
            ctx.set_ciphers("AES128-SHA:@SECLEVEL=0")

        said = await threads.deferToThread(
            tls_client,
            self.port,
            cafile=self.gw.material.internal_ca.certificate,
            server_hostname=INTERNAL_HOST,
            configure=rsa_key_exchange_only,
        )
        self.assertNotEqual(said, "handshake completed")
        fields = await one_record(self, self.tls)
        self.assertEqual(fields["reason"], "no_shared_cipher")

    async def test_stalled_handshake_is_a_timeout(self) -> None:
        await self._start()
        started = time.monotonic()
        await threads.deferToThread(raw_client, self.port, PARTIAL_HELLO, wait_close=10)
        self.assertLess(time.monotonic() - started, 8, "idle timeout did not close it")
        fields = await one_record(self, self.tls)
        self.assertEqual(fields["reason"], "timeout")
        self.assertEqual(failures(self.gw, "inbound", "timeout"), 1)

    async def test_hang_up_mid_handshake_is_closed(self) -> None:
        await self._start()
        await threads.deferToThread(raw_client, self.port, PARTIAL_HELLO)
        fields = await one_record(self, self.tls)
        self.assertEqual(fields["reason"], "closed")

    async def test_tcp_probe_is_not_a_failure(self) -> None:
        await self._start()
        # A load balancer's health check: connect, close, nothing sent.
        for _ in range(3):
            await threads.deferToThread(raw_client, self.port, b"")
        # ... and a working client right after: nothing logged either.
        said = await threads.deferToThread(
            tls_client,
            self.port,
            cafile=self.gw.material.internal_ca.certificate,
            server_hostname=INTERNAL_HOST,
        )
        self.assertEqual(said, "handshake completed")
        await sleep(0.3)
        self.assertEqual(self.tls.records, [])
        total = sum(failures(self.gw, "inbound", r) for r in ("closed", "timeout", "other"))
        self.assertEqual(total, 0)


def _partner_with(test: TestCase, cert: tuple[str, str]) -> dict[str, Any]:
    """Overrides: partner.example served by a stand-in with CERT."""
    _state, port = start_standin(tls=cert)
    test.addCleanup(port.stopListening)
    target = f"127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]
    return {
        "external_homeservers[0].addresses": {
            f"{PARTNER_HOST}:8448": target,
            f"{PARTNER_SERVER}:443": target,
        },
        "outbound.proxy_auth": DELETE,
    }


class OutboundHandshakeTests(TestCase):
    async def _gateway(self, cert: Any) -> Gateway:
        gw = await start_gateway(self, lambda m: _partner_with(self, cert(m)))
        self.tls = capture(self)
        return gw

    async def _through_tunnel(self, gw: Gateway, ca_file: str) -> Any:
        return await threads.deferToThread(
            tunnel_sync,
            gw.ports["outbound"],
            CONNECT,
            [signed("PUT", b"/_matrix/federation/v1/send/1", txn())],
            sni=PARTNER_HOST,
            ca_file=ca_file,
        )

    async def test_internal_server_that_does_not_trust_the_interception_ca(self) -> None:
        gw = await self._gateway(lambda m: (m.partner_tls.certificate, m.partner_tls.private_key))
        # Synapse without sbg's CA in federation_custom_ca_list.
        try:
            await self._through_tunnel(gw, gw.material.internal_ca.certificate)
        except ssl.SSLError as e:
            self.assertIn("CERTIFICATE_VERIFY_FAILED", str(e))
        else:
            self.fail("the client trusted a certificate it should not")
        fields = await one_record(self, self.tls)
        self.assertEqual(
            fields,
            {
                "listener": "outbound_client",
                "peer": "127.0.0.1",
                "sni": PARTNER_HOST,
                "reason": "unknown_ca",
            },
        )
        self.assertEqual(failures(gw, "outbound_client", "unknown_ca"), 1)
        # The CONNECT itself was allowed (and audited as such).
        self.assertEqual([r["method"] for r in gw.audit.records], ["CONNECT"])

    async def _upstream_failure(self, cert: Any) -> tuple[Gateway, dict[str, Any], Any]:
        gw = await self._gateway(cert)
        answer, responses, _ = await self._through_tunnel(gw, gw.material.outbound_ca.certificate)
        self.assertEqual(answer.status, 200)
        fields = await one_record(self, self.tls)
        return gw, fields, responses

    async def test_partner_certificate_from_an_unpinned_ca(self) -> None:
        # The partner presents a certificate of the internal CA; its pin is
        # the partner CA.
        def cert(m: Material) -> tuple[str, str]:
            files = issue_cert(m.internal_ca, m.directory, "stray", [PARTNER_HOST])
            return files.certificate, files.private_key

        gw, fields, responses = await self._upstream_failure(cert)
        self.assertEqual(responses[0].status, 502)
        self.assertEqual(
            fields,
            {
                "listener": "outbound_upstream",
                "peer": "127.0.0.1",
                "sni": PARTNER_HOST,
                "reason": "unknown_ca",
            },
        )
        self.assertIn("X509 error 20", self.tls.records[0].getMessage())
        self.assertEqual(failures(gw, "outbound_upstream", "unknown_ca"), 1)

    async def test_partner_certificate_for_another_name(self) -> None:
        def cert(m: Material) -> tuple[str, str]:
            files = issue_cert(m.partner_ca, m.directory, "other", ["other.example"])
            return files.certificate, files.private_key

        gw, fields, responses = await self._upstream_failure(cert)
        self.assertEqual(responses[0].status, 502)
        self.assertEqual(fields["reason"], "name_mismatch")
        self.assertEqual(failures(gw, "outbound_upstream", "name_mismatch"), 1)

    async def test_partner_certificate_expired(self) -> None:
        now = datetime.datetime.now(datetime.UTC)

        def cert(m: Material) -> tuple[str, str]:
            files = issue_cert(
                m.partner_ca,
                os.path.join(m.directory, "old"),
                "expired",
                [PARTNER_HOST],
                not_before=now - datetime.timedelta(days=30),
                not_after=now - datetime.timedelta(days=1),
            )
            return files.certificate, files.private_key

        gw, fields, _ = await self._upstream_failure(cert)
        self.assertEqual(fields["reason"], "certificate_expired")
        self.assertEqual(failures(gw, "outbound_upstream", "certificate_expired"), 1)


class InternalUpstreamHandshakeTests(TestCase):
    async def test_https_upstream_not_from_its_upstream_ca(self) -> None:
        # The internal server's https upstream presents a certificate of the
        # partner CA; its upstream_ca is the internal CA.
        def overrides(m: Material) -> dict[str, Any]:
            _state, port = start_standin(tls=(m.partner_tls.certificate, m.partner_tls.private_key))
            self.addCleanup(port.stopListening)
            return {
                "internal_homeservers[0].upstream": f"https://127.0.0.1:{port.getHost().port}",  # type: ignore[attr-defined]
                "internal_homeservers[0].upstream_ca": m.internal_ca.certificate,
            }

        gw = await start_gateway(self, overrides)
        tls = capture(self)
        request = build_request(
            b"GET", b"/_matrix/key/v2/server", [(b"Host", INTERNAL_HOST.encode())]
        )
        resp = await gw.inbound(request)
        self.assertEqual(resp.status, 502)
        fields = await one_record(self, tls)
        self.assertEqual(
            fields,
            {
                "listener": "inbound_upstream",
                "peer": "127.0.0.1",
                "sni": "127.0.0.1",
                "reason": "unknown_ca",
            },
        )
        self.assertEqual(failures(gw, "inbound_upstream", "unknown_ca"), 1)


class JsonLineTests(TestCase):
    async def test_json_line_carries_the_fields(self) -> None:
        gw = await start_gateway(self)
        out = io.StringIO()
        handler = WriterHandler(LogWriter(out, "json", "info"))
        log = logging.getLogger("sbg.tls")
        log.addHandler(handler)
        self.addCleanup(log.removeHandler, handler)
        tls = capture(self)
        await threads.deferToThread(
            tls_client,
            gw.ports["inbound"],
            cafile=gw.material.partner_ca.certificate,
            server_hostname=INTERNAL_HOST,
        )
        await one_record(self, tls)
        (line,) = out.getvalue().splitlines()
        obj = json.loads(line)
        self.assertEqual(obj["logger"], "sbg.tls")
        self.assertEqual(obj["level"], "warning")
        self.assertEqual(
            {k: obj[k] for k in ("listener", "peer", "sni", "reason")},
            {
                "listener": "inbound",
                "peer": "127.0.0.1",
                "sni": INTERNAL_HOST,
                "reason": "unknown_ca",
            },
        )
        self.assertTrue(obj["message"].startswith("TLS handshake failed: listener=inbound"))
