"""Metrics (docs/metrics.md), scraped from the admin listener's `/metrics`.

sbg runs in-process on real loopback sockets (tests.gateway); requests are
sent over real TLS, then `/metrics` is fetched from the admin listener and
parsed with prometheus_client's own parser, so what is asserted is what a
Prometheus server would store.
"""

from __future__ import annotations

import base64
import datetime
import os
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client.parser import text_string_to_metric_families
from signedjson.key import generate_signing_key
from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol

from sbg.certmetrics import configured_certificates, update_certificate_expiry
from sbg.config.load import load_config
from sbg.matrix.groups import GROUPS
from sbg.metrics import Metrics
from sbg.reasons import REFUSAL_CODES
from testbed.configtools import (
    INTERNAL_HOST,
    INTERNAL_SERVER,
    PARTNER_SERVER,
    PROXY_USERNAME,
    make_material,
    write_config,
)
from tests.asynctest import TestCase
from tests.gateway import Gateway, start_gateway
from tests.inbound_requests import TXN, txn_body
from tests.rawhttp import build_request

Samples = list[tuple[str, dict[str, str], float]]


def parse(text: str) -> Samples:
    return [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


async def scrape(test: TestCase, gw: Gateway) -> Samples:
    resp = await gw.admin(build_request(b"GET", b"/metrics", [(b"Host", b"127.0.0.1")]))
    test.assertEqual(resp.status, 200)
    test.assertTrue((resp.header(b"Content-Type") or b"").startswith(b"text/plain"))
    return parse(resp.body.decode("utf-8"))


def value(samples: Samples, metric: str, /, **labels: str) -> float | None:
    """The value of the one sample `metric` with exactly `labels`, or None."""
    found = [v for n, lab, v in samples if n == metric and lab == labels]
    assert len(found) <= 1, (metric, labels, found)
    return found[0] if found else None


def series(samples: Samples, name: str) -> list[dict[str, str]]:
    return [lab for n, lab, _v in samples if n == name]


def not_after(path: str) -> float:
    """The earliest notAfter in a PEM file, read independently of sbg."""
    with open(path, "rb") as f:
        data = f.read()
    ends = []
    for block in data.split(b"-----END CERTIFICATE-----")[:-1]:
        cert = x509.load_pem_x509_certificate(block + b"-----END CERTIFICATE-----\n")
        end = getattr(cert, "not_valid_after_utc", None)  # cryptography >= 42
        if end is None:
            end = cert.not_valid_after.replace(tzinfo=datetime.UTC)
        ends.append(end.timestamp())
    return min(ends)


def write_ca_bundle(path: str, *days: int) -> None:
    """Self-signed CA certificates, one per entry of `days` (validity), in order."""
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    pems = []
    for i, d in enumerate(days):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"bundle CA {i}")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=d))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        pems.append(cert.public_bytes(serialization.Encoding.PEM))
    with open(path, "wb") as f:
        f.write(b"".join(pems))


class _Silent(Protocol):
    def dataReceived(self, data: bytes) -> None:
        pass


class RequestMetricsTests(TestCase):
    async def test_decisions_refusals_and_durations(self) -> None:
        gw = await start_gateway(self)
        ok = await gw.inbound(gw.signed_request("PUT", TXN, txn_body()))
        self.assertEqual(ok.status, 200)
        # Step 19: publicRooms is not in the `external` trust level.
        denied = await gw.inbound(gw.signed_request("GET", b"/_matrix/federation/v1/publicRooms"))
        self.assertEqual(denied.status, 403)
        # Step 12: a key the origin does not own.
        forged = gw.signed_request(
            "PUT",
            TXN + b"2",
            txn_body(),
            signing_key=gw.forged_key(),
        )
        self.assertEqual((await gw.inbound(forged)).status, 401)
        # Step 5, before the origin is known.
        unknown = await gw.inbound(gw.signed_request("GET", b"/_synapse/admin/v1/users"))
        self.assertEqual(unknown.status, 404)

        m = await scrape(self, gw)
        req = "sbg_requests_total"
        inbound = {"direction": "inbound"}
        self.assertEqual(
            value(m, req, **inbound, server=PARTNER_SERVER, group="transactions", decision="allow"),
            1.0,
        )
        self.assertEqual(
            value(m, req, **inbound, server=PARTNER_SERVER, group="public_rooms", decision="deny"),
            1.0,
        )
        self.assertEqual(
            value(m, req, **inbound, server=PARTNER_SERVER, group="transactions", decision="deny"),
            1.0,
        )
        self.assertEqual(
            value(m, req, **inbound, server="unknown", group="unknown", decision="deny"), 1.0
        )
        ref = "sbg_refusals_total"
        self.assertEqual(
            value(m, ref, **inbound, server=PARTNER_SERVER, reason="group_not_allowed"), 1.0
        )
        self.assertEqual(
            value(m, ref, **inbound, server=PARTNER_SERVER, reason="bad_signature"), 1.0
        )
        self.assertEqual(value(m, ref, **inbound, server="unknown", reason="unknown_endpoint"), 1.0)
        self.assertEqual(len(series(m, ref)), 3)
        # The allowed request is not a refusal; nothing failed upstream.
        self.assertEqual(series(m, "sbg_upstream_errors_total"), [])

        # One observation per request, in cumulative buckets.
        dur = "sbg_request_duration_seconds"
        self.assertEqual(value(m, dur + "_count", **inbound), 4.0)
        self.assertEqual(value(m, dur + "_count", direction="outbound"), 0.0)
        total = value(m, dur + "_sum", **inbound)
        assert total is not None
        self.assertGreater(total, 0.0)
        self.assertLess(total, 60.0)
        buckets = sorted(
            (float(lab["le"]), v)
            for n, lab, v in m
            if n == dur + "_bucket" and lab["direction"] == "inbound"
        )
        self.assertEqual(buckets[-1], (float("inf"), 4.0))
        counts = [v for _le, v in buckets]
        self.assertEqual(counts, sorted(counts))
        self.assertEqual(value(m, "sbg_inflight_requests", **inbound), 0.0)

    async def test_inflight_and_upstream_errors(self) -> None:
        silent = reactor.listenTCP(0, Factory.forProtocol(_Silent), interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        url = f"http://127.0.0.1:{silent.getHost().port}"
        gw = await start_gateway(
            self, {"internal_homeservers[0].upstream": url, "inbound.request_timeout": "2s"}
        )
        pending = gw.inbound(gw.signed_request("PUT", TXN, txn_body()))
        # Wait until sbg is forwarding it (the upstream never answers).
        for _ in range(100):
            m = await scrape(self, gw)
            if value(m, "sbg_inflight_requests", direction="inbound") == 1.0:
                break
            await _sleep(0.02)
        self.assertEqual(value(m, "sbg_inflight_requests", direction="inbound"), 1.0)
        self.assertEqual(value(m, "sbg_inflight_requests", direction="outbound"), 0.0)
        resp = await pending
        self.assertEqual(resp.status, 504)
        m = await scrape(self, gw)
        self.assertEqual(value(m, "sbg_inflight_requests", direction="inbound"), 0.0)
        self.assertEqual(
            value(m, "sbg_upstream_errors_total", direction="inbound", reason="timeout"), 1.0
        )
        # An upstream failure is an allowed request, not a refusal.
        self.assertEqual(series(m, "sbg_refusals_total"), [])
        self.assertEqual(
            value(
                m,
                "sbg_requests_total",
                direction="inbound",
                server=PARTNER_SERVER,
                group="transactions",
                decision="allow",
            ),
            1.0,
        )

    async def test_upstream_unreachable_is_counted(self) -> None:
        gw = await start_gateway(self, {"internal_homeservers[0].upstream": "http://127.0.0.1:9"})
        resp = await gw.inbound(gw.signed_request("PUT", TXN, txn_body()))
        self.assertEqual(resp.status, 502)
        m = await scrape(self, gw)
        self.assertEqual(
            series(m, "sbg_upstream_errors_total"), [{"direction": "inbound", "reason": "connect"}]
        )
        self.assertEqual(
            value(m, "sbg_upstream_errors_total", direction="inbound", reason="connect"), 1.0
        )


class AttackerLabelTests(TestCase):
    async def test_attacker_chosen_values_never_become_labels(self) -> None:
        gw = await start_gateway(self)
        marker = "mallory"
        # Host and SNI nobody configured.
        req = gw.signed_request("PUT", TXN, txn_body(), host=b"matrix.mallory.example")
        resp = await gw.inbound(req, sni="sni.mallory.example", check_hostname=False)
        self.assertEqual(resp.status, 404)
        # A path not in the table.
        resp = await gw.inbound(gw.signed_request("GET", b"/_matrix/federation/v1/mallory_path/x"))
        self.assertEqual(resp.status, 404)
        # An origin nobody configured, signing with its own key.
        evil = "origin.mallory.example"
        req = gw.signed_request(
            "PUT", TXN, txn_body(evil), origin=evil, signing_key=generate_signing_key("x")
        )
        self.assertEqual((await gw.inbound(req)).status, 403)
        # A malformed X-Matrix header carrying the marker.
        headers = [
            (b"Host", INTERNAL_HOST.encode()),
            (b"Authorization", b'X-Matrix origin="mallory",key="mallory",sig="mallory",x'),
        ]
        req = build_request(b"GET", b"/_matrix/federation/v1/user/devices/%40a%3Ab", headers)
        self.assertEqual((await gw.inbound(req)).status, 401)
        # A signed destination nobody configured, from the real partner.
        req = gw.signed_request("PUT", TXN, txn_body(), destination="dest.mallory.example")
        self.assertEqual((await gw.inbound(req)).status, 401)
        # Outbound: a CONNECT target nobody configured.
        creds = base64.b64encode(f"{PROXY_USERNAME}:{gw.material.proxy_password}".encode())
        answer, _, _ = await gw.outbound(
            b"connect.mallory.example:8448",
            [],
            proxy_headers=[(b"Proxy-Authorization", b"Basic " + creds)],
        )
        self.assertEqual(answer.status, 403)

        m = await scrape(self, gw)
        for name, labels, _v in m:
            for label, text in labels.items():
                self.assertNotIn(marker, text, f"{name}{{{label}={text!r}}}")
        configured = {"unknown", PARTNER_SERVER}
        for labels in series(m, "sbg_refusals_total"):
            self.assertIn(labels["reason"], REFUSAL_CODES)
            self.assertIn(labels["server"], configured)
        for labels in series(m, "sbg_requests_total"):
            self.assertIn(labels["server"], configured)
            self.assertIn(labels["group"], set(GROUPS) | {"unknown"})
        ref = "sbg_refusals_total"
        self.assertEqual(
            value(m, ref, direction="inbound", server="unknown", reason="unknown_host"), 1.0
        )
        self.assertEqual(
            value(m, ref, direction="inbound", server="unknown", reason="unknown_endpoint"), 1.0
        )
        self.assertEqual(
            value(m, ref, direction="inbound", server="unknown", reason="unknown_origin"), 1.0
        )
        self.assertEqual(
            value(m, ref, direction="inbound", server="unknown", reason="malformed_auth"), 1.0
        )
        self.assertEqual(
            value(m, ref, direction="inbound", server=PARTNER_SERVER, reason="bad_destination"),
            1.0,
        )
        self.assertEqual(
            value(m, ref, direction="outbound", server="unknown", reason="unknown_destination"),
            1.0,
        )


class KillSwitchAndReloadTests(TestCase):
    async def test_killswitch_gauge_follows_the_switches(self) -> None:
        gw = await start_gateway(self)
        m = await scrape(self, gw)
        self.assertEqual(series(m, "sbg_killswitch_engaged"), [])
        gw.service.killswitch.engage(PARTNER_SERVER, "inbound")
        gw.service.killswitch.engage(None, "outbound")
        m = await scrape(self, gw)
        self.assertEqual(
            value(m, "sbg_killswitch_engaged", server=PARTNER_SERVER, direction="inbound"), 1.0
        )
        self.assertEqual(
            value(m, "sbg_killswitch_engaged", server="global", direction="outbound"), 1.0
        )
        self.assertEqual(len(series(m, "sbg_killswitch_engaged")), 2)
        # A request the switch refuses is counted with its reason.
        resp = await gw.inbound(gw.signed_request("PUT", TXN, txn_body()))
        self.assertEqual(resp.status, 403)
        gw.service.killswitch.lift(PARTNER_SERVER, "inbound")
        m = await scrape(self, gw)
        self.assertEqual(
            series(m, "sbg_killswitch_engaged"), [{"server": "global", "direction": "outbound"}]
        )
        self.assertEqual(
            value(
                m,
                "sbg_refusals_total",
                direction="inbound",
                server=PARTNER_SERVER,
                reason="killswitch",
            ),
            1.0,
        )

    async def test_config_reloads_by_result(self) -> None:
        gw = await start_gateway(self)
        m = await scrape(self, gw)
        self.assertEqual(value(m, "sbg_config_reloads_total", result="success"), 0.0)
        self.assertEqual(value(m, "sbg_config_reloads_total", result="failure"), 0.0)
        self.assertTrue(gw.service.reload())
        with open(gw.config_path, "a") as f:
            f.write("no_such_key: 1\n")
        self.assertFalse(gw.service.reload())
        self.assertFalse(gw.service.reload())
        m = await scrape(self, gw)
        self.assertEqual(value(m, "sbg_config_reloads_total", result="success"), 1.0)
        self.assertEqual(value(m, "sbg_config_reloads_total", result="failure"), 2.0)


class CertificateExpiryTests(TestCase):
    async def test_every_configured_certificate_has_its_expiry(self) -> None:
        holder: dict[str, str] = {}

        def overrides(material: Any) -> dict[str, Any]:
            bundle = os.path.join(material.directory, "pins", "bundle.pem")
            # The longer-lived CA first: the gauge must be the earliest one.
            write_ca_bundle(bundle, 30, 3)
            upstream_ca = os.path.join(material.directory, "pins", "upstream-ca.pem")
            write_ca_bundle(upstream_ca, 7)
            holder.update(bundle=bundle, upstream_ca=upstream_ca)
            return {
                "internal_homeservers[0].upstream": "https://127.0.0.1:9",
                "internal_homeservers[0].upstream_ca": upstream_ca,
                "external_homeservers[0].tls_ca": bundle,
            }

        gw = await start_gateway(self, overrides)
        mat = gw.material
        m = await scrape(self, gw)
        name = "sbg_certificate_expiry_timestamp_seconds"
        expected = {
            ("inbound_tls", INTERNAL_SERVER, mat.internal_tls.certificate),
            ("upstream_ca", INTERNAL_SERVER, holder["upstream_ca"]),
            ("tls_ca", PARTNER_SERVER, holder["bundle"]),
            ("outbound_ca", "outbound", mat.outbound_ca.certificate),
        }
        self.assertEqual({(s["kind"], s["name"], s["path"]) for s in series(m, name)}, expected)
        for kind, server, path in expected:
            got = value(m, name, kind=kind, name=server, path=path)
            self.assertEqual(got, not_after(path), kind)
        # The bundle's value is its 3-day certificate, not the first one.
        now = datetime.datetime.now(datetime.UTC).timestamp()
        bundle_expiry = value(m, name, kind="tls_ca", name=PARTNER_SERVER, path=holder["bundle"])
        assert bundle_expiry is not None
        self.assertLess(abs(bundle_expiry - (now + 3 * 86400)), 120)

    async def test_reload_replaces_the_series(self) -> None:
        gw = await start_gateway(self)
        mat = gw.material
        name = "sbg_certificate_expiry_timestamp_seconds"
        m = await scrape(self, gw)
        old_ca = mat.partner_ca.certificate
        self.assertEqual(
            value(m, name, kind="tls_ca", name=PARTNER_SERVER, path=old_ca), not_after(old_ca)
        )
        # The partner's pinned CA moves to a renewed file: the old series goes.
        renewed = os.path.join(mat.directory, "pins", "renewed.pem")
        write_ca_bundle(renewed, 400)
        upstream = gw.config.internal_homeservers[0].upstream
        write_config(
            mat.directory,
            {
                "internal_homeservers[0].upstream": upstream,
                "external_homeservers[0].tls_ca": renewed,
            },
            material=mat,
        )
        self.assertTrue(gw.service.reload())
        m = await scrape(self, gw)
        self.assertEqual(
            {(s["kind"], s["path"]) for s in series(m, name)},
            {
                ("inbound_tls", mat.internal_tls.certificate),
                ("tls_ca", renewed),
                ("outbound_ca", mat.outbound_ca.certificate),
            },
        )
        self.assertEqual(
            value(m, name, kind="tls_ca", name=PARTNER_SERVER, path=renewed), not_after(renewed)
        )
        # A refused reload changes nothing.
        with open(gw.config_path, "a") as f:
            f.write("no_such_key: 1\n")
        self.assertFalse(gw.service.reload())
        again = await scrape(self, gw)
        self.assertEqual(series(again, name), series(m, name))


class CertificateExpiryUnitTests(TestCase):
    def test_unreadable_file_gets_no_series_and_stale_ones_go(self) -> None:
        material = make_material(self.mktemp())
        path = write_config(material.directory, {}, material=material)
        config = load_config(path)
        metrics = Metrics()
        metrics.cert_expiry.labels("tls_ca", "gone.example", "/nonexistent").set(1)
        os.remove(material.partner_ca.certificate)  # after loading: a file deleted later
        update_certificate_expiry(config, metrics)
        samples = parse(metrics.render().decode())
        kinds = {lab["kind"] for lab in series(samples, "sbg_certificate_expiry_timestamp_seconds")}
        self.assertEqual(kinds, {"inbound_tls", "outbound_ca"})
        self.assertEqual(
            [r[0] for r in configured_certificates(config)],
            ["inbound_tls", "tls_ca", "outbound_ca"],
        )


class ProcessMetricsTests(TestCase):
    async def test_one_process_exports_its_own(self) -> None:
        gw = await start_gateway(self)
        samples = await scrape(self, gw)
        rss = value(samples, "process_resident_memory_bytes")
        assert rss is not None
        with open("/proc/self/statm", encoding="ascii") as f:
            mine = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        # This process's own figure (the gateway runs in it), no label.
        self.assertLess(abs(rss - mine), 32 * 1024 * 1024)
        for name in ("process_cpu_seconds_total", "process_open_fds", "process_start_time_seconds"):
            found = value(samples, name)
            self.assertIsNotNone(found, name)
            assert found is not None
            self.assertGreater(found, 0, name)


def _sleep(seconds: float) -> defer.Deferred[None]:
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d
