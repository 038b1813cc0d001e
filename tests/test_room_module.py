"""The parts of the room rules module that need no Synapse: its configuration
source, the facts it reads from Synapse's objects, and the repair runner.

The module itself runs inside real Synapse processes in the end-to-end suite
(tests/e2e/test_rooms.py); here the Synapse side of the repair runner is a
recording stand-in (`RecordingOps`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

import sbg
from sbg.config.model import RoomSettings
from sbg.policy.room_repair import Kick, Leave, Repair, SetState
from sbg.policy.rooms import RoomRefusal
from sbg.synapse.facts import join_servers_from_url, room_request, stripped_state
from sbg.synapse.repairs import RepairRunner, Trigger
from sbg.synapse.source import (
    RulesError,
    RulesSource,
    parse_module_config,
    read_servers,
)
from tests.asynctest import TestCase

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "l8Hft5qXKn1vfHrg3p4+W8gELQVo8N13JkluMfmn2sQ"


def config_dict() -> dict[str, Any]:
    """A valid sbg.yaml: two internal servers, a V1 and a V2 external one."""
    return {
        "listeners": [{"type": "inbound", "port": 8448, "tls": False}],
        "internal_homeservers": [
            {
                "server_name": "a.example",
                "federation_hosts": ["a.example"],
                "upstream": "http://10.0.0.1:8008",
            },
            {
                "server_name": "b.example:8448",
                "federation_hosts": ["b.example"],
                "upstream": "http://10.0.0.2:8008",
            },
        ],
        "external_homeservers": [
            {"server_name": "v1.example", "verify_keys": {"ed25519:a": KEY}},
            {
                "server_name": "v2.example",
                "verify_keys": {"ed25519:a": KEY},
                "trust_level": "partner",
            },
            {"server_name": "off.example", "verify_keys": {"ed25519:a": KEY}, "enabled": False},
        ],
        "trust_levels": {
            "external": {"inbound": ["transactions"], "outbound": ["transactions"]},
            "partner": {
                "inbound": ["transactions"],
                "outbound": ["transactions"],
                "rooms": {"invite": "private_rooms", "join_public": True, "max_power_level": 50},
            },
        },
    }


def write_sbg_yaml(directory: str, overrides: Mapping[str, Any] | None = None) -> str:
    """A valid sbg.yaml (its files need not exist: none is named)."""
    data = config_dict()
    data.update(overrides or {})
    path = os.path.join(directory, "sbg.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    return path


class ModuleConfigTests(SynchronousTestCase):
    def test_sbg_config(self) -> None:
        self.assertEqual(
            parse_module_config({"sbg_config": "/etc/sbg/sbg.yaml"}).sbg_config, "/etc/sbg/sbg.yaml"
        )

    def test_bad_module_configs_are_one_line_each(self) -> None:
        cases = [
            (None, "sbg_config is missing"),
            ({}, "sbg_config is missing"),
            ({"sbg_config": ""}, "sbg_config must be the path"),
            ({"sbg_config": 3}, "sbg_config must be the path"),
            ({"sbg_config": "/x", "reload": 1}, "unknown key 'reload'"),
            (["/etc/sbg/sbg.yaml"], "must be a mapping"),
        ]
        for config, fragment in cases:
            with self.assertRaises(RulesError) as e:
                parse_module_config(config)
            self.assertIn(fragment, str(e.exception))
            self.assertNotIn("\n", str(e.exception))


class SourceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def test_reads_servers_and_levels(self) -> None:
        path = write_sbg_yaml(self.dir)
        servers = read_servers(path)
        self.assertEqual(servers.internal, frozenset({"a.example", "b.example:8448"}))
        self.assertEqual(set(servers.external), {"v1.example", "v2.example"})  # not disabled ones
        self.assertEqual(servers.external["v1.example"], RoomSettings())
        self.assertEqual(servers.external["v2.example"], RoomSettings("private_rooms", True, 50))

    def test_problems_are_one_line(self) -> None:
        cases = [
            (os.path.join(self.dir, "missing.yaml"), "cannot read"),
        ]
        bad_level = write_sbg_yaml(
            self.dir,
            {
                "external_homeservers": [
                    {**config_dict()["external_homeservers"][0], "trust_level": "nope"}
                ]
            },
        )
        cases.append((bad_level, "is not a key of trust_levels"))
        os.makedirs(os.path.join(self.dir, "two"))
        two = write_sbg_yaml(os.path.join(self.dir, "two"), {"log_level": "loud", "mode": "x"})
        cases.append((two, "2 problems: log_level: must be one of"))
        for path, fragment in cases:
            with self.assertRaises(RulesError) as e:
                read_servers(path)
            self.assertIn(fragment, str(e.exception))
            self.assertIn(path, str(e.exception))
            self.assertNotIn("\n", str(e.exception))

    def test_a_file_that_becomes_invalid_keeps_the_last_good_rules(self) -> None:
        path = write_sbg_yaml(self.dir)
        source = RulesSource.open(parse_module_config({"sbg_config": path}))
        source.with_local_server("hs.local:8448")
        seen: list[object] = []
        source.on_change(seen.append)
        good = source.servers
        self.assertFalse(source.refresh())  # unchanged
        with open(path, "w") as f:
            f.write("listeners: [\n")
        os.utime(path, ns=(1, 1))
        with self.assertLogs("sbg.synapse", "ERROR") as logs:
            self.assertFalse(source.refresh())
        self.assertIn("the last good rules stay in force", logs.output[0])
        self.assertIs(source.servers, good)
        os.remove(path)
        with self.assertLogs("sbg.synapse", "ERROR"):
            self.assertFalse(source.refresh())
        self.assertIs(source.servers, good)
        # A good file again: new rules, this homeserver still internal.
        data = config_dict()
        data["external_homeservers"] = []
        with open(path, "w") as f:
            yaml.safe_dump(data, f)
        self.assertTrue(source.refresh())
        self.assertEqual(dict(source.servers.external), {})
        self.assertIn("hs.local:8448", source.servers.internal)
        self.assertEqual(seen, [source.servers])


class FactsTests(SynchronousTestCase):
    def test_join_servers_from_url(self) -> None:
        cases = [
            (
                "/_matrix/client/v3/join/%21r%3Ahs.example?server_name=a.example&via=b.example%3A8448",
                ["b.example:8448", "a.example", "hs.example"],
            ),
            ("/_matrix/client/v3/join/%23lobby%3Aext.example%3A8448", ["ext.example:8448"]),
            ("/_matrix/client/r0/join/!abcdef?via=x.example", ["x.example"]),
            ("/_matrix/client/v3/knock/%21abc?via=x.example&via=x.example", ["x.example"]),
            ("/_matrix/client/v3/rooms/%21r%3Ahs.example/join", ["hs.example"]),
            ("/_matrix/client/v3/rooms/%21r%3Ahs.example/leave", []),
            ("/_matrix/client/v3/createRoom", []),
            ("", []),
        ]
        for url, want in cases:
            self.assertEqual(join_servers_from_url(url), want, url)

    def test_room_request(self) -> None:
        r = room_request("@a:i", {})
        self.assertEqual((r.rule, r.public, r.invitees, r.privileged), (None, False, (), ()))
        r = room_request("@a:i", {"visibility": "public"})
        self.assertTrue(r.public)
        r = room_request(
            "@a:i",
            {
                "preset": "trusted_private_chat",
                "invite": ["@b:e", 3],
                "invite_3pid": [{}],
                "initial_state": [
                    {
                        "type": "im.vector.room.access_rules",
                        "state_key": "",
                        "content": {"rule": "direct"},
                    },
                    {"type": "m.room.join_rules", "content": {"join_rule": "knock"}},
                    "garbage",
                ],
                "creation_content": {"additional_creators": ["@c:i"]},
                "power_level_content_override": {"users": {"@b:e": 50}},
            },
        )
        self.assertEqual(r.rule, "direct")
        self.assertTrue(r.public)
        self.assertEqual(r.invitees, ("@b:e",))
        self.assertEqual(r.third_party_invites, 1)
        self.assertEqual(r.privileged, ("@b:e", "@c:i"))
        self.assertEqual(r.power_levels, {"users": {"@b:e": 50}})

    def test_stripped_state(self) -> None:
        @dataclass
        class Invite:
            unsigned: Mapping[str, Any]

        self.assertEqual(stripped_state(Invite({})), [])  # type: ignore[arg-type]
        self.assertEqual(stripped_state(Invite({"invite_room_state": "x"})), [])  # type: ignore[arg-type]
        items = [{"type": "m.room.create"}, 3]
        self.assertEqual(stripped_state(Invite({"invite_room_state": items})), [items[0]])  # type: ignore[arg-type]


@dataclass
class RecordingOps:
    """The Synapse side of the repairs, recording what it was asked (or failing)."""

    done: list[tuple[str, ...]] = field(default_factory=list)
    fail: bool = False

    async def kick(self, room_id: str, actor: str, user: str, reason: str) -> None:
        self._do("kick", room_id, actor, user, reason)

    async def leave(self, room_id: str, user: str, reason: str) -> None:
        self._do("leave", room_id, user, reason)

    async def set_state(
        self, room_id: str, actor: str, event_type: str, state_key: str, content: Mapping[str, Any]
    ) -> None:
        self._do("set", room_id, actor, event_type, state_key, repr(dict(content)))

    def _do(self, *what: str) -> None:
        if self.fail:
            raise RuntimeError("refused")
        self.done.append(what)


class RepairRunnerTests(TestCase):
    def setUp(self) -> None:
        self.ops = RecordingOps()
        self.counted: list[str] = []
        self.runner = RepairRunner(self.ops, self.counted.append)

    def run_plan(self, repairs: list[Repair], room: str = "!r") -> defer.Deferred[None]:
        async def plan(room_id: str, trigger: Trigger) -> list[Repair]:
            return repairs

        return defer.ensureDeferred(self.runner.run(room, Trigger("$e", "@v:p", "x"), plan))

    async def test_repairs_are_carried_out_logged_and_counted(self) -> None:
        broke = RoomRefusal(4, "power_level_above_max")
        with self.assertLogs("sbg.synapse", "INFO") as logs:
            await self.run_plan(
                [
                    Repair(Kick("@b:e"), "@a:i", RoomRefusal(2, "not_invited")),
                    Repair(Leave("@a:i"), "@a:i", RoomRefusal(3, "external_public_room")),
                    Repair(SetState("m.room.power_levels", "", {"users": {}}), "@a:i", broke),
                    Repair(SetState("m.room.server_acl", "", {"allow": ["i"]}), "@a:i", None),
                ]
            )
        self.assertEqual([d[0] for d in self.ops.done], ["kick", "leave", "set", "set"])
        self.assertEqual(self.ops.done[0][4], "room rules: R2 not_invited")
        self.assertEqual(self.counted, ["R8", "R8", "R8"])  # not the ACL upkeep
        text = "\n".join(logs.output)
        self.assertIn("R8 undid R4 power_level_above_max by @v:p ($e) in !r", text)
        self.assertIn("R7 set m.room.server_acl as @a:i in !r", text)

    async def test_nobody_able_to_repair_is_an_error(self) -> None:
        with self.assertLogs("sbg.synapse", "ERROR") as logs:
            await self.run_plan([Repair(Kick("@b:e"), None, RoomRefusal(2, "not_invited"))])
        self.assertEqual(self.ops.done, [])
        self.assertEqual(self.counted, ["R8"])
        self.assertIn("R8 cannot undo R2 not_invited", logs.output[0])

    async def test_a_failed_repair_is_not_retried_at_once(self) -> None:
        self.ops.fail = True
        repair = Repair(SetState("m.room.server_acl", "", {}), "@a:i", None)
        with self.assertLogs("sbg.synapse", "ERROR") as logs:
            await self.run_plan([repair])
            await self.run_plan([repair])
        self.assertEqual(len(logs.output), 1)
        self.ops.fail = False
        await self.run_plan([repair], room="!other")
        self.assertEqual(len(self.ops.done), 1)

    async def test_the_rules_let_a_repair_through_only_while_it_is_sent(self) -> None:
        seen: list[bool] = []
        content = {"rule": "restricted"}

        class Ops(RecordingOps):
            async def set_state(
                self, room_id: str, actor: str, t: str, k: str, c: Mapping[str, Any]
            ) -> None:
                seen.append(runner.is_repair(room_id, t, k, c))
                seen.append(runner.is_repair(room_id, t, k, {"rule": "direct"}))

        self.runner = runner = RepairRunner(Ops(), self.counted.append)
        await self.run_plan(
            [Repair(SetState("im.vector.room.access_rules", "", content), "@a:i", None)]
        )
        self.assertEqual(seen, [True, False])
        self.assertFalse(self.runner.is_repair("!r", "im.vector.room.access_rules", "", content))

    async def test_one_room_at_a_time(self) -> None:
        """Events of one room are planned in order, each with its own planner."""
        gate: defer.Deferred[None] = defer.Deferred()
        order: list[str] = []

        def planner(name: str) -> Callable[[str, Trigger], Awaitable[list[Repair]]]:
            async def plan(room_id: str, trigger: Trigger) -> list[Repair]:
                order.append(f"{name} for {trigger.event_id}")
                if trigger.event_id == "$1":
                    await gate
                return []

            return plan

        first = defer.ensureDeferred(
            self.runner.run("!r", Trigger("$1", "@v:p", "x"), planner("a"))
        )
        second = defer.ensureDeferred(
            self.runner.run("!r", Trigger("$2", "@v:p", "x"), planner("b"))
        )
        other = defer.ensureDeferred(
            self.runner.run("!s", Trigger("$3", "@v:p", "x"), planner("c"))
        )
        self.assertEqual(order, ["a for $1", "c for $3"])  # $2 waits for $1, !s does not
        gate.callback(None)
        await first
        await second
        await other
        self.assertEqual(order, ["a for $1", "c for $3", "b for $2"])


class NoSynapseInTheGatewayTests(SynchronousTestCase):
    """The gateway never imports synapse, even where Synapse is installed."""

    def test_importing_every_gateway_module_imports_no_synapse(self) -> None:
        script = textwrap.dedent(
            """
            import importlib, pkgutil, sys

            class Refuse:
                def find_spec(self, name, path=None, target=None):
                    if name == "synapse" or name.startswith("synapse."):
                        raise ImportError("the gateway imported " + name)
                    return None

            sys.meta_path.insert(0, Refuse())
            import sbg
            names = [m.name for m in pkgutil.walk_packages(sbg.__path__, "sbg.")]
            skipped = {"sbg.synapse.module", "sbg.synapse.synapse_ops"}
            for name in names:
                if name not in skipped:
                    importlib.import_module(name)
            import sbg.synapse
            assert not any(m == "synapse" or m.startswith("synapse.") for m in sys.modules)
            print(len(names), "modules")
            """
        )
        done = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": REPO},
            check=False,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("modules", done.stdout)

    def test_only_the_module_files_name_synapse(self) -> None:
        # The package as imported: the source tree's, or the installed one.
        where = os.path.dirname(os.path.dirname(os.path.abspath(sbg.__file__)))
        found = []
        for directory, _dirs, files in os.walk(os.path.join(where, "sbg")):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(directory, name)
                with open(path, encoding="utf-8") as f:
                    text = f.read()
                if "from synapse" in text or "import synapse" in text:
                    found.append(os.path.relpath(path, where))
        self.assertEqual(sorted(found), ["sbg/synapse/module.py", "sbg/synapse/synapse_ops.py"])
