"""The decision orders as tables: facts in, decision and reason code out.

One row per check of the inbound order (`docs/decisions.md`, inbound steps
4-21) and of the outbound order (outbound steps 3-19), each labelled with
its step, run against the pure deciders of `sbg.policy` with a
configuration built in memory: no sockets, no Twisted, no clock. The
listener-level tests prove the wiring; these prove the decisions, step by
step.
"""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import re
from collections.abc import Mapping
from typing import Any

from signedjson.key import generate_signing_key, get_verify_key
from twisted.trial.unittest import SynchronousTestCase

from sbg.config.model import (
    Config,
    ExternalHomeserver,
    HostPattern,
    InboundSettings,
    InternalHomeserver,
    Limits,
    Listener,
    NonMatrixURL,
    OutboundSettings,
    ProxyAuth,
    TLSFiles,
    TrustLevel,
)
from sbg.policy.inbound import HeadFacts, decide_head, decide_trust
from sbg.policy.outbound import (
    ConnectFacts,
    RequestFacts,
    classify,
    decide_connect,
    decide_request,
)
from sbg.policy.snapshot import Policy

INT = "int.example"
INT2 = "int2.example"
EXT = "ext.example"
OFF = "off.example"  # disabled
NET = "net.example"  # source_ips
MON = "mon.example"  # a level in monitor mode
KEY = generate_signing_key("k1")
KEY_ID = "ed25519:k1"
GROUPS = frozenset({"discovery", "keys", "transactions", "joins", "invites", "events"})


def _ext(name: str, **kw: Any) -> ExternalHomeserver:
    raw = bytes(get_verify_key(KEY).encode())
    return ExternalHomeserver(
        server_name=name,
        federation_hosts=(HostPattern(f"matrix.{name}", None),),
        client_hosts=(HostPattern(f"client.{name}", None),),
        verify_keys=((KEY_ID, raw),),
        **kw,
    )


def make_config(**kw: Any) -> Config:
    tls = TLSFiles("/x.crt", "/x.key")
    base = Config(
        path="/etc/sbg/sbg.yaml",
        listeners=(Listener("inbound", 8448, ("0.0.0.0",), tls=True),),
        internal_homeservers=(
            InternalHomeserver(
                INT, (HostPattern(f"matrix.{INT}", None),), "http://10.0.0.1:8008", tls=tls
            ),
            InternalHomeserver(
                INT2, (HostPattern(f"matrix.{INT2}", None),), "http://10.0.0.2:8008", tls=tls
            ),
        ),
        external_homeservers=(
            _ext(EXT),
            _ext(OFF, enabled=False),
            _ext(NET, source_ips=(ipaddress.ip_network("192.0.2.0/24"),)),
            _ext(MON, trust_level="watched"),
        ),
        trust_levels=(
            TrustLevel("external", GROUPS, GROUPS),
            TrustLevel(
                "watched",
                frozenset({"discovery", "keys"}),
                frozenset({"discovery"}),
                mode="monitor",
            ),
        ),
        outbound=OutboundSettings(
            ca=tls,
            proxy_auth=ProxyAuth("sender", "/p", password="secret"),
            allowed_non_matrix_urls=(
                NonMatrixURL(
                    "push.example.net",
                    443,
                    re.compile("/_matrix/push/v1/notify"),
                    frozenset({"POST"}),
                ),
            ),
        ),
        inbound=InboundSettings(max_body_size=1000),
        limits=Limits(max_tunnels=10),
    )
    return dataclasses.replace(base, **kw)


POLICY = Policy.build(make_config())
SIG = base64.b64encode(b"\x00" * 64).decode().rstrip("=")


def xmatrix(origin: str = EXT, destination: str | None = INT, key: str = KEY_ID) -> bytes:
    parts = [f'origin="{origin}"', f'key="{key}"', f'sig="{SIG}"']
    if destination is not None:
        parts.insert(1, f'destination="{destination}"')
    return ("X-Matrix " + ",".join(parts)).encode()


class Lookups:
    """The runtime state a head decision reads, as plain data."""

    def __init__(self, killed: set[str | None] | None = None, refetch: bool = False) -> None:
        self._killed = killed or set()
        self._refetch = refetch

    def killed(self, server: str | None) -> bool:
        return None in self._killed or server in self._killed

    def keys_for(self, origin: ExternalHomeserver) -> Mapping[str, Any]:
        return POLICY.keyring.keys_for(origin.server_name)

    def may_refetch(self, origin: ExternalHomeserver) -> bool:
        return self._refetch


def head(policy: Policy = POLICY, lookups: Lookups | None = None, **kw: Any) -> Any:
    facts: dict[str, Any] = {
        "tls": True,
        "sni": f"matrix.{INT}",
        "host": [f"matrix.{INT}".encode()],
        "method": b"PUT",
        "target": b"/_matrix/federation/v1/send/1",
        "authorization": [xmatrix()],
        "peer": "198.51.100.7",
        "has_body": True,
        "declared_length": 100,
    }
    facts.update(kw)
    return decide_head(policy, HeadFacts(**facts), lookups or Lookups())


class InboundHeadTableTests(SynchronousTestCase):
    """Inbound steps 4-13: each step's refusal, in order."""

    ROWS: list[tuple[str, dict[str, Any], Lookups | None, str | None]] = [
        ("accepted", {}, None, None),
        ("step 4: unknown Host", {"host": [b"evil.example"]}, None, "unknown_host"),
        ("step 4: no Host", {"host": []}, None, "unknown_host"),
        ("step 4: two Hosts", {"host": [b"matrix.int.example"] * 2}, None, "unknown_host"),
        ("step 4: SNI of another internal server", {"sni": f"matrix.{INT2}"}, None, "sni_mismatch"),
        (
            "step 5: server name is for discovery only",
            {"host": [INT.encode()]},
            None,
            "unknown_host",
        ),
        (
            "step 5: not in the table",
            {"target": b"/_synapse/admin/v1/users"},
            None,
            "unknown_endpoint",
        ),
        ("step 5: another method", {"method": b"GET"}, None, "method_not_allowed"),
        (
            "step 5: dot segment",
            {"target": b"/_matrix/federation/v1/send/../x"},
            None,
            "malformed_target",
        ),
        ("step 6: global kill switch", {}, Lookups({None}), "killswitch"),
        ("step 7: rate limit per address", {"ip_rate_wait": 0.5}, None, "rate_limited_ip"),
        ("step 9: no X-Matrix", {"authorization": None}, None, "missing_auth"),
        ("step 9: two headers", {"authorization": [xmatrix(), xmatrix()]}, None, "multiple_auth"),
        ("step 9: malformed", {"authorization": [b"X-Matrix origin=a"]}, None, "malformed_auth"),
        (
            "step 10: unknown origin",
            {"authorization": [xmatrix("evil.example")]},
            None,
            "unknown_origin",
        ),
        ("step 10: disabled origin", {"authorization": [xmatrix(OFF)]}, None, "unknown_origin"),
        ("step 10: origin killed", {}, Lookups({EXT}), "killswitch"),
        ("step 10: outside source_ips", {"authorization": [xmatrix(NET)]}, None, "source_ip"),
        (
            "step 11: wrong destination",
            {"authorization": [xmatrix(destination=INT2)]},
            None,
            "bad_destination",
        ),
        (
            "step 11: no destination",
            {"authorization": [xmatrix(destination=None)]},
            None,
            "bad_destination",
        ),
        (
            "step 12: unknown key",
            {"authorization": [xmatrix(key="ed25519:zz")]},
            None,
            "unknown_key",
        ),
        ("step 13: declared too large", {"declared_length": 1001}, None, "body_too_large"),
        (
            "step 13: no body",
            {"has_body": False, "declared_length": 0},
            None,
            "bad_json",
        ),
        (
            "step 13: a GET with a body",
            {"method": b"GET", "target": b"/_matrix/federation/v1/event/$e", "declared_length": 5},
            None,
            "unexpected_body",
        ),
    ]

    def test_rows(self) -> None:
        for name, facts, lookups, code in self.ROWS:
            out = head(lookups=lookups, **facts)
            got = out.refusal.code if out.refusal is not None else None
            self.assertEqual(got, code, name)

    def test_accepted_head_carries_the_facts(self) -> None:
        out = head()
        self.assertIsNone(out.refusal)
        self.assertEqual(out.internal.server_name, INT)
        self.assertEqual(out.origin.server_name, EXT)
        self.assertEqual(out.match.endpoint.group, "transactions")
        self.assertEqual(out.body_cap, 1000)
        self.assertFalse(out.refetch_key)

    def test_refused_head_still_carries_what_it_established(self) -> None:
        out = head(authorization=[xmatrix(destination=INT2)])
        self.assertEqual((out.internal.server_name, out.origin.server_name), (INT, EXT))
        self.assertEqual(out.auth.origin, EXT)

    def test_unknown_key_of_a_fetching_server_waits_for_the_body(self) -> None:
        out = head(lookups=Lookups(refetch=True), authorization=[xmatrix(key="ed25519:new")])
        self.assertIsNone(out.refusal)
        self.assertTrue(out.refetch_key)

    def test_unauthenticated_endpoints(self) -> None:
        key = {"method": b"GET", "target": b"/_matrix/key/v2/server", "authorization": None}
        key.update(has_body=False, declared_length=None)
        self.assertIsNone(head(**key).refusal)
        # Through the server name too: discovery and keys answer there.
        version = dict(key, target=b"/_matrix/federation/v1/version", host=[INT.encode()])
        self.assertIsNone(head(**version).refusal)
        # A group no enabled server's level allows, whatever the mode.
        query = dict(key, target=b"/_matrix/key/v2/query/x.example")
        for mode in ("enforce", "monitor"):
            policy = Policy.build(make_config(mode=mode))
            self.assertEqual(head(policy, **query).refusal.code, "group_not_allowed", mode)
        # An unauthenticated body is capped at 1 MiB whatever max_body_size.
        big = Policy.build(make_config(inbound=InboundSettings(max_body_size=16 << 20)))
        onbind = dict(key, method=b"POST", target=b"/_matrix/federation/v1/3pid/onbind")
        onbind.update(has_body=True, declared_length=(1 << 20) + 1)
        levels = (TrustLevel("external", GROUPS | {"third_party_invites"}, GROUPS),)
        big = Policy.build(
            make_config(inbound=InboundSettings(max_body_size=16 << 20), trust_levels=levels)
        )
        self.assertEqual(head(big, **onbind).refusal.code, "body_too_large")


def trust(content: Any, origin: str = EXT, rate_wait: float = 0.0, **head_kw: Any) -> Any:
    h = head(authorization=[xmatrix(origin)], **head_kw)
    assert h.refusal is None, h.refusal
    return decide_trust(POLICY, h, content, rate_wait)


def txn(origin: str = EXT, **kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"origin": origin, "origin_server_ts": 1, "pdus": [], "edus": []}
    body.update(kw)
    return body


def typing(user: str) -> dict[str, Any]:
    return {"edu_type": "m.typing", "content": {"room_id": "!r:x", "user_id": user, "typing": True}}


def member(sender: str, state_key: str, membership: str) -> dict[str, Any]:
    return {
        "type": "m.room.member",
        "sender": sender,
        "state_key": state_key,
        "room_id": "!r:x",
        "content": {"membership": membership},
    }


class InboundTrustTableTests(SynchronousTestCase):
    """Inbound steps 18-20: the origin's rate limit, the trust level, origin
    consistency, and what monitor mode softens."""

    ROWS: list[tuple[str, Any, str | None]] = [
        ("accepted", txn(), None),
        ("step 20: transaction origin", txn(origin=INT2), "origin_mismatch"),
        (
            "step 20: EDU for another server's user",
            txn(edus=[typing("@a:other.example")]),
            "edu_user_mismatch",
        ),
        (
            "step 20: speaking as an internal user",
            txn(edus=[typing(f"@a:{INT}")]),
            "impersonates_internal_user",
        ),
        (
            "step 20: PDU of another server",
            txn(pdus=[dict(member("@a:other.example", "@b:x", "invite"), type="m.room.message")]),
            "pdu_sender_mismatch",
        ),
        (
            "step 20: relayed join of a known server",
            txn(pdus=[member(f"@a:{NET}", f"@a:{NET}", "join")]),
            None,
        ),
        (
            "step 20: relayed join of an unknown server",
            txn(pdus=[member("@a:unknown.example", "@a:unknown.example", "join")]),
            "untrusted_relayed_sender",
        ),
        ("step 20: malformed shapes", txn(pdus="nope"), "malformed_content"),
    ]

    def test_rows(self) -> None:
        for name, content, code in self.ROWS:
            decision = trust(content)
            got = decision.refusal.code if decision.refusal is not None else None
            self.assertEqual(got, code, name)
            self.assertEqual(decision.would_deny, (), name)

    def test_step19_group_of_the_origin_level(self) -> None:
        invite = {"target": b"/_matrix/federation/v2/invite/!r:x/$e", "method": b"PUT"}
        self.assertIsNone(
            trust({"event": member(f"@a:{EXT}", f"@b:{INT}", "invite")}, **invite).refusal
        )
        decision = trust({"event": member(f"@a:{MON}", f"@b:{INT}", "invite")}, MON, **invite)
        # MON's level is in monitor mode: the refusal is softened, and only it.
        self.assertIsNone(decision.refusal)
        self.assertEqual([r.code for r in decision.would_deny], ["group_not_allowed"])
        self.assertEqual(decision.effect, "would_deny")

    def test_monitor_softens_origin_consistency_of_a_verified_request(self) -> None:
        h = head(authorization=[xmatrix(MON)], target=b"/_matrix/key/v2/server", method=b"GET")
        # (The head of an unauthenticated endpoint: no origin, nothing to soften.)
        self.assertIsNone(h.auth)
        self.assertEqual(decide_trust(POLICY, h, None).effect, "allow")

    def test_origin_rate_limit_is_never_softened(self) -> None:
        decision = trust(txn(), rate_wait=2.0)
        self.assertEqual(decision.refusal.code, "rate_limited_origin")
        self.assertEqual(decision.refusal.retry_after_ms, 2001)

    def test_strict_origin_checks_off(self) -> None:
        policy = Policy.build(
            make_config(inbound=InboundSettings(max_body_size=1000, strict_origin_checks=False))
        )
        h = head(policy)
        self.assertIsNone(decide_trust(policy, h, txn(origin=INT2)).refusal)


def connect(policy: Policy = POLICY, killed: set[str | None] | None = None, **kw: Any) -> Any:
    creds = base64.b64encode(b"sender:secret")
    facts: dict[str, Any] = {
        "method": b"CONNECT",
        "target": f"matrix.{EXT}:8448".encode(),
        "proxy_authorization": [b"Basic " + creds],
        "open_tunnels": 0,
        "has_ca": True,
    }
    facts.update(kw)
    dead = killed or set()
    return decide_connect(policy, ConnectFacts(**facts), lambda s: None in dead or s in dead)


class OutboundConnectTableTests(SynchronousTestCase):
    """Outbound steps 3-9: the CONNECT."""

    ROWS: list[tuple[str, dict[str, Any], set[str | None] | None, str | None]] = [
        ("accepted", {}, None, None),
        ("step 3: no credentials", {"proxy_authorization": []}, None, "proxy_auth"),
        (
            "step 3: wrong password",
            {"proxy_authorization": [b"Basic " + base64.b64encode(b"sender:x")]},
            None,
            "proxy_auth",
        ),
        (
            "step 3 before the plain-HTTP refusal",
            {"method": b"GET", "target": b"http://x/", "proxy_authorization": []},
            None,
            "proxy_auth",
        ),
        ("step 4: plain HTTP", {"method": b"GET", "target": b"http://x/"}, None, "plain_http"),
        ("step 4: not CONNECT", {"method": b"DELETE", "target": b"/x"}, None, "method_not_allowed"),
        ("step 5: malformed target", {"target": b"no-port"}, None, "malformed_request"),
        ("step 6: too many tunnels", {"open_tunnels": 10}, None, "overloaded"),
        ("step 7: unknown target", {"target": b"evil.example:8448"}, None, "unknown_destination"),
        (
            "step 7: disabled server",
            {"target": f"matrix.{OFF}:8448".encode()},
            None,
            "unknown_destination",
        ),
        ("step 8: server killed", {}, {EXT}, "killswitch"),
        ("step 8: global kill switch", {}, {None}, "killswitch"),
        ("step 9: no CA", {"has_ca": False}, None, "no_ca"),
        (
            "step 7: server name, not on 443",
            {"target": f"{EXT}:8448".encode()},
            None,
            "unknown_destination",
        ),
    ]

    def test_rows(self) -> None:
        for name, facts, killed, code in self.ROWS:
            out = connect(killed=killed, **facts)
            got = out.refusal.code if out.refusal is not None else None
            self.assertEqual(got, code, name)

    def test_kinds_of_tunnel(self) -> None:
        for target, kind in [
            (f"matrix.{EXT}:8448", "federation"),
            (f"client.{EXT}:443", "client"),
            (f"{EXT}:443", "discovery"),
            ("push.example.net:443", "non_matrix"),
        ]:
            out = connect(target=target.encode())
            self.assertIsNone(out.refusal, target)
            self.assertEqual(out.tunnel.kind, kind, target)
        # The killed server is named in the refusal's tunnel (for the audit).
        self.assertEqual(connect(killed={EXT}).tunnel.server_name, EXT)


def request(
    tunnel: str = f"matrix.{EXT}:8448",
    policy: Policy = POLICY,
    killed: set[str | None] | None = None,
    **kw: Any,
) -> Any:
    host, port = tunnel.rsplit(":", 1)
    opened = classify(POLICY, host, int(port))
    assert opened is not None
    origin = kw.pop("origin", INT)
    destination = kw.pop("destination", EXT)
    facts: dict[str, Any] = {
        "host": [tunnel.encode()],
        "sni": host,
        "method": b"PUT",
        "target": b"/_matrix/federation/v1/send/1",
        "authorization": [xmatrix(origin, destination)],
        "declared_length": 10,
    }
    facts.update(kw)
    dead = killed or set()
    return decide_request(
        policy, opened, RequestFacts(**facts), lambda s: None in dead or s in dead
    )


class OutboundRequestTableTests(SynchronousTestCase):
    """Outbound steps 11-19, for a request in an open tunnel."""

    ROWS: list[tuple[str, dict[str, Any], str | None]] = [
        ("accepted", {}, None),
        (
            "step 14: Host of another server",
            {"host": [f"matrix.{NET}:8448".encode()]},
            "host_mismatch",
        ),
        ("step 12: two Hosts", {"host": [b"a", b"b"]}, "host_mismatch"),
        ("step 14: SNI of another server", {"sni": f"matrix.{NET}"}, "sni_mismatch"),
        ("step 15: not in the table", {"target": b"/_synapse/admin/v1/users"}, "unknown_endpoint"),
        (
            "step 17: group not in the level",
            {"method": b"GET", "target": b"/_matrix/federation/v1/publicRooms"},
            "group_not_allowed",
        ),
        ("step 18: signed for another server", {"destination": NET}, "bad_destination"),
        ("step 18: not an internal origin", {"origin": EXT}, "unknown_origin"),
        ("step 18: unsigned", {"authorization": None}, "missing_auth"),
        (
            "step 18: malformed signature header",
            {"authorization": [b"X-Matrix nope"]},
            "malformed_auth",
        ),
        ("body too large", {"declared_length": 1001}, "body_too_large"),
    ]

    def test_rows(self) -> None:
        for name, facts, code in self.ROWS:
            out = request(**facts)
            got = out.refusal.code if out.refusal is not None else None
            self.assertEqual(got, code, name)

    def test_step16_kill_switch(self) -> None:
        self.assertEqual(request(killed={EXT}).refusal.code, "killswitch")
        self.assertEqual(request(killed={None}).refusal.code, "killswitch")
        self.assertIsNone(request(killed={NET}).refusal)

    def test_tunnel_kinds_limit_the_groups(self) -> None:
        key = {"method": b"GET", "target": b"/_matrix/key/v2/server"}
        out = request(f"{EXT}:443", host=[EXT.encode()], sni=EXT, **key)
        self.assertEqual(out.refusal.code, "discovery_only")
        wk = dict(key, target=b"/.well-known/matrix/server", authorization=None)
        self.assertIsNone(request(f"{EXT}:443", host=[EXT.encode()], sni=EXT, **wk).refusal)
        client = request(
            f"client.{EXT}:443", host=[f"client.{EXT}".encode()], sni=f"client.{EXT}", **key
        )
        self.assertEqual(client.refusal.code, "group_not_allowed")

    def test_a_reload_applies_to_open_tunnels(self) -> None:
        disabled = make_config(
            external_homeservers=tuple(
                dataclasses.replace(e, enabled=False) if e.server_name == EXT else e
                for e in make_config().external_homeservers
            )
        )
        self.assertEqual(request(policy=Policy.build(disabled)).refusal.code, "unknown_destination")

    def test_monitor_mode_softens_step_17_only_for_what_an_internal_server_signed(self) -> None:
        monitored = Policy.build(make_config(mode="monitor"))
        rooms = {"method": b"GET", "target": b"/_matrix/federation/v1/publicRooms"}
        signed = request(policy=monitored, **rooms)
        self.assertIsNone(signed.refusal)
        self.assertEqual([r.code for r in signed.would_deny], ["group_not_allowed"])
        # Unsigned, or signed by a server that is not internal: refused.
        unsigned = request(policy=monitored, authorization=None, **rooms)
        self.assertEqual(unsigned.refusal.code, "group_not_allowed")
        foreign = request(policy=monitored, origin=EXT, **rooms)
        self.assertEqual(foreign.refusal.code, "group_not_allowed")

    def test_non_matrix_urls(self) -> None:
        push = "push.example.net:443"
        base = {"host": [b"push.example.net"], "sni": "push.example.net", "authorization": None}
        ok = request(push, method=b"POST", target=b"/_matrix/push/v1/notify", **base)
        self.assertIsNone(ok.refusal)
        for facts, code in [
            ({"method": b"POST", "target": b"/_matrix/push/v1/other"}, "non_matrix_not_allowed"),
            ({"method": b"GET", "target": b"/_matrix/push/v1/notify"}, "method_not_allowed"),
            ({"method": b"POST", "target": b"/_matrix/push/v1/%2e%2e/notify"}, "malformed_target"),
            ({"method": b"POST", "target": b"/_matrix/push/../push/v1/notify"}, "malformed_target"),
        ]:
            self.assertEqual(request(push, **base, **facts).refusal.code, code, facts)
        killed = request(
            push, killed={None}, method=b"POST", target=b"/_matrix/push/v1/notify", **base
        )
        self.assertEqual(killed.refusal.code, "killswitch")
        # A server's own switch does not cover a non-Matrix URL.
        spared = request(
            push, killed={EXT}, method=b"POST", target=b"/_matrix/push/v1/notify", **base
        )
        self.assertIsNone(spared.refusal)


class PurityTests(SynchronousTestCase):
    def test_policy_imports_no_twisted(self) -> None:
        import subprocess
        import sys

        code = (
            "import sys; import sbg.policy.inbound, sbg.policy.outbound, sbg.policy.decision, "
            "sbg.policy.snapshot, sbg.reasons; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('twisted', 'OpenSSL')); "
            "print(bad); sys.exit(1 if bad else 0)"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
