"""The room rules module and bad configuration: real Synapse refuses to start.

For each problem (no `sbg_config` in the module's config, a file that
cannot be read, a file that is not a valid sbg config, an unknown trust
level) a real Synapse process with the module exits with status 1, prints
no traceback, and names the problem on one line. The module's own line is
inside Synapse's usual frame for configuration errors:

    Error in configuration at 'modules.<item 0>.config':
      Failed to parse config for module 'sbg.synapse.RoomRules':
        <the one line>
"""

import os
import time
from typing import Any

import yaml
from twisted.trial.unittest import TestCase

from testbed.e2e.harness import HS_INT, Cluster, require_synapse
from testbed.e2e.processes import tail

EXIT_TIMEOUT = 90.0
KEY = "l8Hft5qXKn1vfHrg3p4+W8gELQVo8N13JkluMfmn2sQ"


def sbg_yaml(trust_level: str = "external") -> dict[str, Any]:
    return {
        "listeners": [{"type": "inbound", "port": 8448}],
        "internal_homeservers": [
            {
                "server_name": HS_INT.server_name,
                "federation_hosts": [HS_INT.host],
                "upstream": "http://127.0.0.1:8009",
            }
        ],
        "external_homeservers": [
            {
                "server_name": "hs-ext.test:8448",
                "verify_keys": {"ed25519:a": KEY},
                "trust_level": trust_level,
            }
        ],
        "trust_levels": {"external": {"inbound": ["transactions"], "outbound": ["transactions"]}},
    }


class StartupRefusalTests(TestCase):
    timeout = 300

    def cluster(self, module_config: Any) -> Cluster:
        """hs-int alone, with the room rules module configured so (not started)."""
        require_synapse()
        module = {"module": "sbg.synapse.RoomRules", "config": module_config}
        cluster = Cluster(
            os.path.abspath(self.mktemp()),
            homeservers=(HS_INT,),
            room_rules=True,
            extra_config={HS_INT.key: {"modules": [module]}},
        )
        self.addCleanup(cluster.stop)
        return cluster

    def start_refused(self, module_config: Any) -> tuple[int | None, str]:
        """Start hs-int with the module configured so; return its exit status
        and everything it wrote."""
        hs = self.cluster(module_config)[HS_INT.key]
        started = time.monotonic()
        hs.start()
        while hs.process.running() and time.monotonic() - started < EXIT_TIMEOUT:
            time.sleep(0.2)
        self.assertFalse(hs.process.running(), f"Synapse did not stop:\n{tail(hs.log_path)}")
        code = hs.stop()
        with open(hs.log_path, encoding="utf-8", errors="replace") as f:
            output = f.read()
        print(f"\n[e2e] Synapse exited {code} after {time.monotonic() - started:.1f}s:\n{output}")
        return code, output

    def assertOneLine(self, output: str, *fragments: str) -> None:
        self.assertNotIn("Traceback", output)
        lines = [line for line in output.splitlines() if all(f in line for f in fragments)]
        self.assertEqual(len(lines), 1, output)
        self.assertIn("Failed to parse config for module 'sbg.synapse.RoomRules'", output)

    def test_no_sbg_config(self) -> None:
        code, output = self.start_refused({})
        self.assertEqual(code, 1)
        self.assertOneLine(output, "sbg_config is missing")

    def test_unreadable_file(self) -> None:
        code, output = self.start_refused({"sbg_config": "/nonexistent/sbg.yaml"})
        self.assertEqual(code, 1)
        self.assertOneLine(output, "/nonexistent/sbg.yaml", "cannot read")

    def test_invalid_file(self) -> None:
        path = os.path.abspath(os.path.join(self.mktemp(), "sbg.yaml"))
        os.makedirs(os.path.dirname(path))
        with open(path, "w") as f:
            f.write("listeners: [\n")
        code, output = self.start_refused({"sbg_config": path})
        self.assertEqual(code, 1)
        self.assertOneLine(output, path, "not valid YAML")

    def test_unknown_trust_level(self) -> None:
        path = os.path.abspath(os.path.join(self.mktemp(), "sbg.yaml"))
        os.makedirs(os.path.dirname(path))
        with open(path, "w") as f:
            yaml.safe_dump(sbg_yaml(trust_level="nope"), f)
        code, output = self.start_refused({"sbg_config": path})
        self.assertEqual(code, 1)
        self.assertOneLine(output, path, "external_homeservers[0].trust_level", "'nope'")

    def test_a_valid_file_starts(self) -> None:
        """The same setup with a valid file: Synapse starts (the refusals above
        are the module's, not the harness's)."""
        path = os.path.abspath(os.path.join(self.mktemp(), "sbg.yaml"))
        os.makedirs(os.path.dirname(path))
        with open(path, "w") as f:
            yaml.safe_dump(sbg_yaml(), f)
        cluster = self.cluster({"sbg_config": path})
        took = cluster.start()
        with open(cluster[HS_INT.key].log_path) as f:
            self.assertIn(f"room rules: {path} loaded (1 internal, 1 external servers)", f.read())
        print(f"\n[e2e] Synapse with the room rules ready in {took:.1f}s")
