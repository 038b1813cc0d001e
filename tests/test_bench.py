"""The benchmark runner's own logic: base-revision extraction and checks,
extra external servers, the ratio line (bench/baseline.py, bench/externals.py,
bench/run.py)."""

from __future__ import annotations

import argparse
import os
import subprocess

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from bench import baseline, run
from bench.externals import extra_externals
from sbg.config.load import load_config
from tests.configtools import PARTNER_SERVER, make_material

ROOT = run.ROOT
PYTHON = os.path.join(ROOT, ".venv", "bin", "python")


def _needs_git() -> None:
    if not os.path.isdir(os.path.join(ROOT, ".git")):
        raise SkipTest("not a git checkout")


class ExternalsTests(SynchronousTestCase):
    def test_extra_servers_are_distinct_pinned_and_accepted(self) -> None:
        """The runner's configurations with --externals 4 load, with 3 distinct
        extra servers, each with its own host and a 32-byte pinned key, at the
        partner's trust level; each sbg target has its own ports and state."""
        directory = self.mktemp()
        material = make_material(os.path.join(directory, "material"))
        names = [f"{t}-{k}" for t in run.SBG_TARGETS for k in ("in", "out", "admin")]
        env = run.Env(directory, material, "wrk", run._free_ports([*names, "up-http", "up-tls"]))
        args = argparse.Namespace(targets=["sbg", run.BASE], sbg_log_level="warning", sbg_workers=1)
        extras = extra_externals(3, material.partner_ca.certificate, "partner")
        paths = run._sbg_configs(args, env, extras)
        configs = {t: load_config(p) for t, p in paths.items()}
        self.assertEqual(sorted(configs), sorted(run.SBG_TARGETS))

        servers = configs["sbg"].external_homeservers
        self.assertEqual(len(servers), 4)
        self.assertEqual(servers[0].server_name, PARTNER_SERVER)
        extra = servers[1:]
        self.assertEqual(
            [s.server_name for s in extra],
            ["ext0001.example", "ext0002.example", "ext0003.example"],
        )
        self.assertEqual(len({s.federation_hosts[0].host for s in extra}), 3)
        keys = [s.verify_keys[0][1] for s in extra]
        self.assertEqual(len(set(keys)), 3)
        self.assertTrue(all(len(k) == 32 for k in keys))
        self.assertTrue(all(s.enabled and s.trust_level == "partner" for s in extra))

        base = configs[run.BASE]
        self.assertNotEqual(base.state_dir, configs["sbg"].state_dir)
        self.assertEqual(
            [listener.port for listener in base.listeners],
            [env.ports[f"{run.BASE}-{k}"] for k in ("in", "out", "admin")],
        )
        self.assertEqual(len({p for p in env.ports.values()}), len(env.ports))

    def test_no_extras_by_default(self) -> None:
        self.assertEqual(extra_externals(0, None, "external"), [])


class RatioTests(SynchronousTestCase):
    def test_ratios_of_current_to_base(self) -> None:
        line = run.vs_base(
            "sbg@abc1234",
            {"rate": 1500.0, "cpu_us": 600.0},
            {"rate": 1000.0, "cpu_us": 800.0},
            [("req/s", "rate"), ("CPU µs/req", "cpu_us")],
        )
        self.assertEqual(line, "sbg / sbg@abc1234: req/s 1.500, CPU µs/req 0.750")

    def test_missing_figures_give_dashes_and_no_base_no_line(self) -> None:
        line = run.vs_base("sbg@x", None, {"rate": 1.0}, [("req/s", "rate")])
        self.assertEqual(line, f"sbg / sbg@x: req/s {run.DASH}")
        self.assertEqual(run.vs_base("", {"rate": 1.0}, {"rate": 1.0}, [("r", "rate")]), "")

    def test_table_names_the_base_and_separates_the_ratio_line(self) -> None:
        workload = run.Workload("W1", "t", "wrk", 1, targets=("sbg", run.BASE))
        result = {"duration_us": 1e6, "bytes": 0, "p50_us": 1000, "p99_us": 2000, "cpu_s": 0.5}
        text = run.table(
            workload,
            {"sbg": [dict(result, requests=2000)], run.BASE: [dict(result, requests=1000)]},
            "sbg@abc1234",
        )
        lines = text.splitlines()
        self.assertTrue(lines[-3].startswith("| sbg@abc1234 | 1,000 "))
        self.assertEqual(lines[-2], "")  # else Markdown reads the line as a table row
        self.assertEqual(lines[-1], "sbg / sbg@abc1234: req/s 2.000, CPU µs/req 0.500, p50 1.000")


class BaselineTests(SynchronousTestCase):
    def test_resolve_refuses_an_unknown_revision(self) -> None:
        _needs_git()
        with self.assertRaises(baseline.BaseError):
            baseline.resolve(ROOT, "no-such-revision-xyz")

    def test_extract_and_launch_checks_where_the_code_comes_from(self) -> None:
        """The extracted tree's sbg runs when it is first on PYTHONPATH; the
        launcher refuses to run twistd when another tree's sbg would be loaded."""
        _needs_git()
        full, short = baseline.resolve(ROOT, "HEAD")
        self.assertTrue(full.startswith(short))
        work = os.path.abspath(self.mktemp())
        source = baseline.extract(ROOT, full, os.path.join(work, "src"))
        self.assertTrue(os.path.exists(os.path.join(source, "twisted/plugins/sbg_plugin.py")))

        argv = baseline.launcher_argv(PYTHON, source, ["sbg", "--version"])
        ok = subprocess.run(
            argv, env=dict(os.environ, PYTHONPATH=source), capture_output=True, text=True, cwd=work
        )
        self.assertEqual(ok.returncode, 0, ok.stderr)
        self.assertIn("sbg ", ok.stdout)  # twistd ran the plugin's --version
        self.assertEqual(
            baseline.code_origin(ok.stdout, source), os.path.join(source, "sbg", "__init__.py")
        )

        wrong = subprocess.run(
            argv, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, cwd=work
        )
        self.assertEqual(wrong.returncode, 1)
        self.assertIn(baseline.REFUSAL, wrong.stderr)
        self.assertNotIn("sbg 0", wrong.stdout)  # twistd never ran
        with self.assertRaises(baseline.BaseError):
            baseline.code_origin(wrong.stdout, source)

    def test_code_origin_needs_the_report(self) -> None:
        with self.assertRaises(baseline.BaseError):
            baseline.code_origin("some log line\n", "/nowhere")

    def test_extract_refuses_a_tree_without_sbg(self) -> None:
        _needs_git()
        # The repository's first commit may or may not hold sbg; an empty tree never does.
        empty = subprocess.run(
            ["git", "-C", ROOT, "hash-object", "-t", "tree", "/dev/null"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        with self.assertRaises(baseline.BaseError) as caught:
            baseline.extract(ROOT, empty, os.path.join(os.path.abspath(self.mktemp()), "src"))
        self.assertIn("has no sbg/__init__.py", str(caught.exception))
