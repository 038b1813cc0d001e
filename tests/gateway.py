"""sbg running in-process on real loopback sockets, for protocol tests.

`start_gateway` writes a complete configuration (`testbed.configtools`),
starts a stand-in internal homeserver (`tests.standin`) as its upstream,
builds the real `GatewayService` (every listener on 127.0.0.1, port 0) and
returns the bound addresses. Requests are sent with `tests.rawhttp` over
real TCP and TLS.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from signedjson.key import generate_signing_key
from twisted.internet import reactor, threads
from twisted.trial.unittest import TestCase

from sbg.config.load import load_config
from sbg.config.model import Config
from sbg.matrix.xmatrix import sign_request, signed_bytes_with_raw_body
from sbg.service import GatewayService
from testbed.configtools import (
    INTERNAL_HOST,
    INTERNAL_SERVER,
    PARTNER_HOST,
    PARTNER_SERVER,
    Material,
    make_material,
    write_config,
)
from tests.rawhttp import (
    RawResponse,
    build_request,
    exchange,
    exchange_many,
    tunnel_sync,
)
from tests.standin import StandinState, start_standin


class AuditCapture(logging.Handler):
    """Collects the audit records sbg emits (the `sbg.audit` logger)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "sbg_audit", None)
        if isinstance(fields, dict):
            self.records.append(dict(fields))


@dataclass
class Gateway:
    test: TestCase
    material: Material
    config: Config
    config_path: str
    service: GatewayService
    upstream: StandinState
    ports: dict[str, int]
    audit: AuditCapture

    # -- inbound -----------------------------------------------------------

    def signed_headers(
        self,
        method: str,
        target: bytes,
        content: Any = None,
        *,
        origin: str = PARTNER_SERVER,
        destination: str = INTERNAL_SERVER,
        signing_key: Any = None,
        host: bytes = INTERNAL_HOST.encode(),
    ) -> list[tuple[bytes, bytes]]:
        key = signing_key or self.material.partner_signing_key
        auth = sign_request(key, method, target, origin, destination, content)
        headers = [(b"Host", host), (b"Authorization", auth)]
        if content is not None:
            headers.append((b"Content-Type", b"application/json"))
        return headers

    def raw_signed_headers(
        self, method: str, target: bytes, body: bytes, *, destination: str = INTERNAL_SERVER
    ) -> list[tuple[bytes, bytes]]:
        """Headers signing `body` as it is (not its canonical encoding): what
        a hostile but trusted origin can do with its own key."""
        key = self.material.partner_signing_key
        message = signed_bytes_with_raw_body(
            method, target.decode(), PARTNER_SERVER, destination, body
        )
        sig = base64.b64encode(key.sign(message).signature).decode().rstrip("=")
        key_id = f"{key.alg}:{key.version}"
        auth = (
            f'X-Matrix origin="{PARTNER_SERVER}",destination="{destination}",'
            f'key="{key_id}",sig="{sig}"'
        ).encode()
        return [(b"Host", INTERNAL_HOST.encode()), (b"Authorization", auth)]

    def signed_request(self, method: str, target: bytes, content: Any = None, **kw: Any) -> bytes:
        body = json.dumps(content).encode() if content is not None else None
        return build_request(
            method.encode(), target, self.signed_headers(method, target, content, **kw), body
        )

    def forged_key(self) -> Any:
        """A signing key with the partner's key id that the partner does not
        own: what a forger without the partner's secret signs with."""
        return generate_signing_key(self.material.partner_key_id.split(":")[1])

    def inbound(
        self, request: bytes, *, sni: str | None = INTERNAL_HOST, check_hostname: bool = True
    ) -> Any:
        """Send one raw request to the inbound TLS listener."""
        return exchange(
            "127.0.0.1",
            self.ports["inbound"],
            request,
            tls=True,
            sni=sni,
            ca_file=self.material.internal_ca.certificate,
            check_hostname=check_hostname,
        )

    def inbound_many(self, requests: list[bytes], *, sni: str | None = INTERNAL_HOST) -> Any:
        return exchange_many(
            "127.0.0.1",
            self.ports["inbound"],
            requests,
            tls=True,
            sni=sni,
            ca_file=self.material.internal_ca.certificate,
        )

    def outbound(
        self,
        connect: bytes,
        requests: list[bytes],
        *,
        sni: str | None = PARTNER_HOST,
        proxy_headers: list[tuple[bytes, bytes]] | None = None,
    ) -> Any:
        """CONNECT through the outbound listener and send `requests` inside."""
        return threads.deferToThread(
            tunnel_sync,
            self.ports["outbound"],
            connect,
            requests,
            sni=sni,
            ca_file=self.material.outbound_ca.certificate,
            proxy_headers=proxy_headers,
        )

    def admin(self, request: bytes) -> Any:
        return exchange("127.0.0.1", self.ports["admin"], request)

    def last_audit(self) -> dict[str, Any]:
        return self.audit.records[-1]


def assert_refused(
    test: TestCase,
    gw: Gateway,
    resp: RawResponse,
    status: int,
    errcode: str,
    upstream_before: int = 0,
    *,
    code: str,
) -> None:
    """The attacker's view: status and errcode, and nothing reached upstream;
    sbg's: a `deny` audit record with this reason `code` (so a test cannot
    pass for the wrong row of the decision order)."""
    test.assertEqual(resp.status, status, resp.body)
    test.assertEqual(resp.json()["errcode"], errcode)
    test.assertEqual(
        len(gw.upstream.requests), upstream_before, "a refused request reached the upstream"
    )
    test.assertEqual(gw.last_audit()["decision"], "deny")
    test.assertEqual(gw.last_audit()["status"], status)
    test.assertEqual(gw.last_audit()["code"], code)


async def start_gateway(
    test: TestCase,
    overrides: dict[str, Any] | Callable[[Material], dict[str, Any]] | None = None,
    *,
    upstream: StandinState | None = None,
) -> Gateway:
    material = make_material(test.mktemp())
    state, port = start_standin(upstream)
    test.addCleanup(port.stopListening)
    upstream_url = f"http://127.0.0.1:{port.getHost().port}"
    all_overrides: dict[str, Any] = {"internal_homeservers[0].upstream": upstream_url}
    all_overrides.update((overrides(material) if callable(overrides) else overrides) or {})
    path = write_config(material.directory, all_overrides, material=material)
    config = load_config(path)
    audit = AuditCapture()
    audit_logger = logging.getLogger("sbg.audit")
    audit_logger.addHandler(audit)
    audit_logger.setLevel(logging.INFO)
    test.addCleanup(audit_logger.removeHandler, audit)
    service = GatewayService(config, reactor, install_signals=False)
    service.startService()
    test.addCleanup(service.stopService)
    ports: dict[str, int] = {}
    for listener, _address, lp in await service.listening():
        ports.setdefault(listener.type, lp.getHost().port)  # type: ignore[attr-defined]
    return Gateway(test, material, config, path, service, state, ports, audit)


def bare(state: dict[str, Any]) -> dict[str, Any]:
    """A kill-switch state (`GET /_sbg/kill`, the state file) with only each
    entry's server and direction (no reason, time or actor)."""
    return {
        "engaged": [{"server": e["server"], "direction": e["direction"]} for e in state["engaged"]]
    }


def rewrite(
    gw: Gateway, overrides: dict[str, Any] | None = None, filename: str = "sbg.yaml"
) -> str:
    """Write the gateway's configuration again, with OVERRIDES."""
    base: dict[str, Any] = {
        "internal_homeservers[0].upstream": f"http://127.0.0.1:{gw.upstream.port}",
    }
    base.update(overrides or {})
    return write_config(gw.material.directory, base, material=gw.material, filename=filename)
