"""The version: `sbg --version`, `sbg_build_info`, the changelog, the command itself."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase

import sbg
from sbg import __version__
from sbg.cli import main
from sbg.metrics import Metrics, WorkersCollector

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The `sbg` command installed beside the Python running the tests: the
# virtualenv's (`make venv`), or /usr/bin/sbg for the Debian package.
COMMAND = os.path.join(os.path.dirname(sys.executable), "sbg")


def _without_pythonpath() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


class VersionTests(SynchronousTestCase):
    def test_version_is_x_y_z(self) -> None:
        self.assertRegex(__version__, r"^\d+\.\d+\.\d+$")

    def test_version_option(self) -> None:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), self.assertRaises(SystemExit) as stopped:
            main(["--version"])
        self.assertEqual(stopped.exception.code, 0)
        self.assertEqual(out.getvalue(), f"sbg {__version__}\n")

    def test_changelog_has_this_release(self) -> None:
        with open(os.path.join(ROOT, "CHANGELOG.md"), encoding="utf-8") as f:
            headings = re.findall(r"^## (\S+)", f.read(), re.MULTILINE)
        # The newest entry first, and it is this version.
        self.assertEqual(headings[0], __version__)


class InstalledCommandTests(SynchronousTestCase):
    def test_command_prints_the_version(self) -> None:
        result = subprocess.run(
            [COMMAND, "--version"],
            env=_without_pythonpath(),
            cwd="/",
            capture_output=True,
            text=True,
            check=False,
        )
        self.assertEqual(
            (result.returncode, result.stdout, result.stderr), (0, f"sbg {__version__}\n", "")
        )

    def test_command_runs_the_code_under_test(self) -> None:
        # The command's Python, without PYTHONPATH and away from the source
        # tree, imports the very sbg these tests import.
        result = subprocess.run(
            [sys.executable, "-c", "import sbg; print(sbg.__file__)"],
            env=_without_pythonpath(),
            cwd="/",
            capture_output=True,
            text=True,
            check=True,
        )
        self.assertEqual(result.stdout.strip(), os.path.abspath(sbg.__file__))
        # ... and that Python is the command's.
        with open(COMMAND, encoding="utf-8") as f:
            self.assertEqual(f.readline().strip(), "#!" + sys.executable)


class BuildInfoTests(SynchronousTestCase):
    def samples(self, text: bytes) -> list[str]:
        return [
            line for line in text.decode("utf-8").splitlines() if line.startswith("sbg_build_info")
        ]

    def test_build_info_gauge(self) -> None:
        self.assertEqual(
            self.samples(Metrics().render()), [f'sbg_build_info{{version="{__version__}"}} 1.0']
        )

    def test_build_info_once_with_workers(self) -> None:
        # The supervisor's own gauge; a worker's is not added to it.
        with tempfile.TemporaryDirectory() as directory:
            collector = WorkersCollector(Metrics(), directory)
            self.assertEqual(
                self.samples(collector.render()),
                [f'sbg_build_info{{version="{__version__}"}} 1.0'],
            )
