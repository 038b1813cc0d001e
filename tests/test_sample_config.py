"""The shipped sample, conf/sbg.yaml: valid, complete and documented."""

from __future__ import annotations

import io
import os
import re

from twisted.trial.unittest import SynchronousTestCase

from sbg.commands.check_config import run
from sbg.config import load
from sbg.config.load import load_config
from sbg.config.model import RoomSettings
from sbg.errors import ConfigErrors
from sbg.matrix.groups import GROUPS

SAMPLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf", "sbg.yaml"
)

V1 = {
    "discovery",
    "keys",
    "transactions",
    "events",
    "joins",
    "leaves",
    "invites",
    "queries_profile",
    "devices",
    "e2ee",
    "media",
}
DISCOVERY = {"public_rooms", "queries_directory", "hierarchy", "knocks"}


class SampleConfigTests(SynchronousTestCase):
    def test_passes_check_config_skip_files(self) -> None:
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(run(SAMPLE, True, out, err), 0, err.getvalue())
        self.assertEqual(err.getvalue(), "")

    def test_without_skip_files_only_the_operators_files_are_missing(self) -> None:
        try:
            load_config(SAMPLE)
        except ConfigErrors as e:
            self.assertTrue(e.errors)
            for line in e.lines():
                self.assertRegex(line, r"^\S+\.(certificate|private_key): cannot read ")
        else:
            self.fail("the sample's certificate files should not exist in the tree")

    def test_realistic_setup(self) -> None:
        config = load_config(SAMPLE, skip_files=True)
        listeners = {li.type: li for li in config.listeners}
        self.assertEqual(set(listeners), {"inbound", "outbound", "admin"})
        self.assertEqual(listeners["inbound"].port, 8448)
        self.assertTrue(listeners["inbound"].tls)
        self.assertEqual(listeners["outbound"].port, 3128)
        self.assertEqual(
            (listeners["admin"].port, listeners["admin"].bind_addresses), (9000, ("127.0.0.1",))
        )
        self.assertEqual(len(config.internal_homeservers), 1)
        self.assertEqual(len(config.external_homeservers), 1)
        external = config.external_homeservers[0]
        self.assertEqual(external.key_fetch, "pinned")
        self.assertEqual([len(raw) for _, raw in external.verify_keys], [32])
        self.assertEqual(config.state_dir, "/var/lib/sbg")
        # Relative paths are the operator's, next to the file (/etc/sbg).
        assert config.outbound.ca is not None
        self.assertEqual(
            os.path.dirname(os.path.dirname(config.outbound.ca.certificate)),
            os.path.dirname(SAMPLE),
        )

    def test_trust_levels(self) -> None:
        config = load_config(SAMPLE, skip_files=True)
        levels = {t.name: t for t in config.trust_levels}
        self.assertEqual(set(levels), {"external", "partner"})
        self.assertEqual(levels["external"].inbound, V1)
        self.assertEqual(levels["external"].outbound, V1)
        self.assertEqual(levels["partner"].inbound, V1 | DISCOVERY)
        self.assertEqual(levels["partner"].outbound, V1 | DISCOVERY)
        self.assertLessEqual(V1 | DISCOVERY, GROUPS)

    def test_room_profiles(self) -> None:
        """`external` shows the V1 profile (the defaults), `partner` a V2 one."""
        config = load_config(SAMPLE, skip_files=True)
        levels = {t.name: t for t in config.trust_levels}
        self.assertEqual(levels["external"].rooms, RoomSettings())
        self.assertEqual(levels["external"].rooms, RoomSettings("open_rooms", False, 0))
        self.assertEqual(levels["partner"].rooms, RoomSettings("private_rooms", True, 50))
        with open(SAMPLE, encoding="utf-8") as f:
            text = f.read()
        self.assertEqual(text.count("rooms:\n"), 2)

    def test_every_key_is_documented(self) -> None:
        with open(SAMPLE, encoding="utf-8") as f:
            text = f.read()
        keys = set()
        for table in load.KEY_TABLES.values():
            keys.update(table)
        self.assertIn("verify_keys", keys)
        for key in sorted(keys):
            documented = re.search(rf"(?m)^\s*#?\s*(- )?{key}:", text)
            self.assertTrue(documented, f"{key} is not in the sample")
        for group in sorted(GROUPS):
            self.assertIn(group, text)
