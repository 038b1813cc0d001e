"""The `cluster` block: validated like every other key, each problem with
its key path; absent, nothing changes."""

from __future__ import annotations

import hashlib
import os
import socket
from typing import Any
from unittest import mock

from twisted.trial.unittest import SynchronousTestCase

from sbg.config.cluster import parse_redis_url
from sbg.config.load import load_config
from sbg.config.model import Config
from sbg.config.summary import format_summary
from sbg.errors import ConfigErrors
from testbed.configtools import make_material, write_config


class ClusterConfigTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        self.material = make_material(os.path.join(self.dir, "material"))
        self.n = 0

    def path(self, overrides: dict[str, Any]) -> str:
        self.n += 1
        return write_config(os.path.join(self.dir, str(self.n)), overrides, material=self.material)

    def load(self, overrides: dict[str, Any], **kw: Any) -> Config:
        return load_config(self.path(overrides), **kw)

    def problems(self, overrides: dict[str, Any], **kw: Any) -> list[str]:
        try:
            self.load(overrides, **kw)
        except ConfigErrors as e:
            return e.lines()
        self.fail("the configuration was accepted")

    def test_absent_is_a_node_alone(self) -> None:
        config = self.load({})
        self.assertIsNone(config.cluster)
        self.assertIn("cluster: none", format_summary(config))

    def test_tcp_with_password_file(self) -> None:
        secret = os.path.join(self.dir, "redis.pw")
        with open(secret, "w") as f:
            f.write("s3cret\n")
        config = self.load(
            {
                "cluster": {
                    "redis": "redis://10.0.0.20:6380/3",
                    "password_file": secret,
                    "node_name": "gw-a",
                }
            }
        )
        c = config.cluster
        assert c is not None
        self.assertEqual((c.host, c.port, c.db, c.unix_socket), ("10.0.0.20", 6380, 3, None))
        self.assertEqual(
            (c.password, c.node_name, c.redis), ("s3cret", "gw-a", "redis://10.0.0.20:6380/3")
        )
        self.assertNotIn("s3cret", repr(c))
        self.assertIn("cluster: node gw-a, Redis redis://10.0.0.20:6380/3", format_summary(config))

    def test_unix_socket_and_defaults(self) -> None:
        c = self.load({"cluster": {"redis": "unix:///run/redis/redis-server.sock"}}).cluster
        assert c is not None
        self.assertEqual((c.host, c.unix_socket, c.db), (None, "/run/redis/redis-server.sock", 0))
        self.assertEqual(c.node_name, socket.gethostname())
        self.assertIsNone(c.password)
        self.assertEqual(parse_redis_url("unix:///r.sock?db=2"), (None, 6379, "/r.sock", 2))
        self.assertEqual(parse_redis_url("redis://[::1]"), ("::1", 6379, None, 0))
        self.assertEqual(
            parse_redis_url("redis://redis.example:7000"), ("redis.example", 7000, None, 0)
        )

    def test_sentinel(self) -> None:
        url = "sentinel://10.0.0.21:26380,10.0.0.22,[fd00::23]/sbg-redis/2"
        c = self.load({"cluster": {"redis": url, "node_name": "gw-a"}}).cluster
        assert c is not None
        self.assertEqual(
            c.sentinels, (("10.0.0.21", 26380), ("10.0.0.22", 26379), ("fd00::23", 26379))
        )
        self.assertEqual((c.service, c.db, c.host, c.unix_socket), ("sbg-redis", 2, None, None))

    def test_problems_have_key_paths(self) -> None:
        cases = {
            "https://10.0.0.20:6379": "cluster.redis: must be redis://host:port/db, unix://",
            "sentinel://s1:26379": "cluster.redis: must be",
            "sentinel://s1:26379,s2:99999/sbg": "cluster.redis: a sentinel address: port out",
            "sentinel://a:pw@s1/sbg": "cluster.redis: no credentials in the URL",
            "redis://user:pw@10.0.0.20:6379/0": "cluster.redis: no credentials in the URL",
            "rediss://10.0.0.20:6379/0": "cluster.redis: TLS to Redis (rediss://) is not supported",
            "redis://10.0.0.20:99999/0": "cluster.redis: must be",
            "redis://10.0.0.20:6379/70000": "cluster.redis: the database number",
            "redis://10.0.0.20:6379/0?x=1": "cluster.redis: must be",
            "unix://relative.sock": "cluster.redis: must be",
            "redis://": "cluster.redis: must be",
        }
        for url, expected in cases.items():
            lines = self.problems({"cluster": {"redis": url, "node_name": "gw-a"}})
            self.assertEqual(len(lines), 1, lines)
            self.assertTrue(lines[0].startswith(expected), (url, lines))
        self.assertEqual(
            self.problems({"cluster": {"node_name": "gw-a"}}), ["cluster.redis: is required"]
        )
        self.assertEqual(
            self.problems({"cluster": {"redis": "redis://r:6379/0", "nodename": "x"}}),
            ["cluster.nodename: unknown key (did you mean node_name?)"],
        )
        self.assertEqual(
            self.problems({"cluster": "redis://r"}), ["cluster: must be a mapping, not a string"]
        )
        bad_name = self.problems({"cluster": {"redis": "redis://r:6379/0", "node_name": "gw a"}})
        self.assertEqual(len(bad_name), 1)
        self.assertTrue(bad_name[0].startswith("cluster.node_name: must be 1 to 63"))
        missing = self.problems(
            {"cluster": {"redis": "redis://r:6379/0", "password_file": "nope/pw"}}
        )
        self.assertEqual(len(missing), 1)
        self.assertTrue(missing[0].startswith("cluster.password_file: cannot read "))
        # --skip-files does not open it.
        self.load(
            {"cluster": {"redis": "redis://r:6379/0", "password_file": "nope/pw"}},
            skip_files=True,
        )

    def test_an_unusable_host_name_needs_node_name(self) -> None:
        with mock.patch("socket.gethostname", return_value="a host"):
            lines = self.problems({"cluster": {"redis": "redis://r:6379/0"}})
        self.assertEqual(len(lines), 1)
        self.assertTrue(lines[0].startswith("cluster.node_name: the host name 'a host'"))

    def test_without_the_redis_library_the_block_is_refused(self) -> None:
        with mock.patch("importlib.util.find_spec", return_value=None):
            lines = self.problems({"cluster": {"redis": "redis://r:6379/0"}})
        self.assertEqual(len(lines), 1)
        self.assertIn("python3-redis", lines[0])

    def test_sha256_of_the_file_as_loaded(self) -> None:
        path = self.path({})
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        self.assertEqual(load_config(path).sha256, digest)
