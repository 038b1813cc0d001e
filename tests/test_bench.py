"""The benchmark runner's own logic: base-revision extraction and checks,
extra external servers, the ratio line (bench/baseline.py, bench/externals.py,
bench/run.py)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

import sbg
import twisted.plugins
from bench import baseline, run
from bench.externals import extra_externals
from sbg.config.load import load_config
from testbed.configtools import PARTNER_SERVER, make_material

PYTHON = sys.executable
# Where the sbg this test process runs comes from (the source tree, or the
# installed package when the suite runs against it).
LOADED = os.path.dirname(os.path.dirname(os.path.abspath(sbg.__file__)))


def _plugin_file() -> str:
    for d in twisted.plugins.__path__:
        path = os.path.join(d, "sbg_plugin.py")
        if os.path.exists(path):
            return path
    raise AssertionError("no sbg_plugin.py next to twisted.plugins")


def _installed_plugins() -> list[str]:
    """sbg plugins a twistd of PYTHON finds without any PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [PYTHON, "-c", "import twisted.plugins as p; print('\\n'.join(p.__path__))"],
        env=env,
        cwd="/",
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [
        os.path.join(d, "sbg_plugin.py")
        for d in out
        if os.path.exists(os.path.join(d, "sbg_plugin.py"))
    ]


def _repository(directory: str) -> str:
    """A git repository whose one commit holds the sbg this process runs."""
    os.makedirs(directory)
    shutil.copytree(
        os.path.dirname(os.path.abspath(sbg.__file__)),
        os.path.join(directory, "sbg"),
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    os.makedirs(os.path.join(directory, "twisted", "plugins"))
    shutil.copy(_plugin_file(), os.path.join(directory, "twisted", "plugins"))
    env = dict(
        os.environ,
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.test",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.test",
    )
    for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "sbg"]):
        subprocess.run(["git", "-C", directory, *args], check=True, env=env, capture_output=True)
    return directory


class ExternalsTests(SynchronousTestCase):
    def test_extra_servers_are_distinct_pinned_and_accepted(self) -> None:
        """The runner's configurations with --externals 4 load, with 3 distinct
        extra servers, each with its own host and a 32-byte pinned key, at the
        partner's trust level; each sbg target has its own ports and state."""
        directory = self.mktemp()
        material = make_material(os.path.join(directory, "material"))
        names = [f"{t}-{k}" for t in run.SBG_TARGETS for k in ("in", "out", "admin")]
        env = run.Env(directory, material, "wrk", run._free_ports([*names, "up-http", "up-tls"]))
        args = argparse.Namespace(
            targets=["sbg", run.BASE], sbg_log_level="warning", sbg_workers=1, cluster=[]
        )
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

    def test_instructions_per_request_and_their_ratio(self) -> None:
        workload = run.Workload("W3", "t", "tunnel", 1, targets=("sbg", run.BASE))
        result = {"duration_us": 1e6, "bytes": 0, "p50_us": 1000, "p99_us": 2000, "cpu_s": 0.5}
        text = run.table(
            workload,
            {
                "sbg": [dict(result, requests=1000, instructions=2_100_000_000)],
                run.BASE: [dict(result, requests=500, instructions=1_000_000_000)],
            },
            "sbg@abc1234",
        )
        self.assertIn(
            "Instructions per request (callgrind): sbg 2,100,000, sbg@abc1234 2,000,000", text
        )
        self.assertTrue(text.splitlines()[-1].endswith("instructions/req 1.050"))

    def test_no_instruction_figures_without_callgrind(self) -> None:
        workload = run.Workload("W3", "t", "tunnel", 1, targets=("sbg",))
        result = {"duration_us": 1e6, "bytes": 0, "p50_us": 1, "p99_us": 2, "requests": 10}
        self.assertNotIn("nstructions", run.table(workload, {"sbg": [result]}))


class BaselineTests(SynchronousTestCase):
    def test_resolve_refuses_an_unknown_revision(self) -> None:
        repo = _repository(os.path.abspath(self.mktemp()))
        with self.assertRaises(baseline.BaseError):
            baseline.resolve(repo, "no-such-revision-xyz")

    def test_extract_and_launch_checks_where_the_code_comes_from(self) -> None:
        """The extracted tree's sbg runs when it is first on PYTHONPATH; the
        launcher refuses to run twistd when another tree's sbg would be loaded."""
        work = os.path.abspath(self.mktemp())
        repo = _repository(os.path.join(work, "repo"))
        full, short = baseline.resolve(repo, "HEAD")
        self.assertTrue(full.startswith(short))
        source = baseline.extract(repo, full, os.path.join(work, "src"))
        self.assertTrue(os.path.exists(os.path.join(source, "twisted/plugins/sbg_plugin.py")))

        argv = baseline.launcher_argv(PYTHON, source, ["sbg", "--version"])
        ok = subprocess.run(
            argv, env=dict(os.environ, PYTHONPATH=source), capture_output=True, text=True, cwd=work
        )
        installed = _installed_plugins()
        if installed:
            # sbg is installed system-wide (the Debian package, when the
            # suite runs against it): its plugin is on every twistd's plugin
            # path, so the launcher must refuse, naming it.
            self.assertEqual(ok.returncode, 1, ok.stdout)
            self.assertIn(baseline.REFUSAL, ok.stderr)
            self.assertIn(installed[0], ok.stderr)
            return
        self.assertEqual(ok.returncode, 0, ok.stderr)
        self.assertIn("sbg ", ok.stdout)  # twistd ran the plugin's --version
        self.assertEqual(
            baseline.code_origin(ok.stdout, source), os.path.join(source, "sbg", "__init__.py")
        )

        # The sbg of this process, not the extracted one, would be loaded.
        wrong = subprocess.run(
            argv, env=dict(os.environ, PYTHONPATH=LOADED), capture_output=True, text=True, cwd=work
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
        repo = _repository(os.path.abspath(self.mktemp()))
        # An empty tree never holds sbg.
        empty = subprocess.run(
            ["git", "-C", repo, "hash-object", "-w", "-t", "tree", "/dev/null"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        with self.assertRaises(baseline.BaseError) as caught:
            baseline.extract(repo, empty, os.path.join(os.path.abspath(self.mktemp()), "src"))
        self.assertIn("has no sbg/__init__.py", str(caught.exception))
