"""The sbg of another git revision, run beside the current one (`--base REV`).

The revision's tree is extracted with `git archive` (no worktree), and every
sbg target is started through `launcher_argv`: a small `python -c` program
that first checks, inside the started process, that the `sbg` package and
the twistd plugin come from the expected source tree, prints where they come
from on a `BENCH-SBG-CODE` line, and only then runs twistd.
"""

from __future__ import annotations

import json
import os
import subprocess

CODE_MARK = "BENCH-SBG-CODE "
REFUSAL = "bench: refusing to start:"

# Runs in the started process: argv is [source_root, *twistd_arguments].
_LAUNCHER = """\
import importlib.util, json, os, sys
root = os.path.realpath(sys.argv[1])
import sbg
import twisted.plugins
tap = importlib.util.find_spec("sbg.tap")
code = {
    "sbg": sbg.__file__,
    "tap": tap.origin if tap is not None else None,
    "plugins": [
        os.path.join(p, "sbg_plugin.py")
        for p in twisted.plugins.__path__
        if os.path.exists(os.path.join(p, "sbg_plugin.py"))
    ],
}
print("BENCH-SBG-CODE " + json.dumps(code), flush=True)
def inside(path):
    return path is not None and os.path.realpath(path).startswith(root + os.sep)
files = [code["sbg"], code["tap"], *code["plugins"]]
if not code["plugins"] or not all(inside(f) for f in files):
    sys.exit(f"bench: refusing to start: sbg code {code} is not all from {root}")
from twisted.scripts.twistd import run
sys.argv = ["twistd", *sys.argv[2:]]
sys.exit(run())
"""


class BaseError(Exception):
    """The base revision cannot be extracted or started as asked."""


def _git(root: str, *args: str) -> str:
    out = subprocess.run(
        ["git", "-C", root, *args], capture_output=True, text=True, timeout=60, check=False
    )
    if out.returncode:
        raise BaseError(f"git {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout.strip()


def resolve(root: str, rev: str) -> tuple[str, str]:
    """The (full, short) commit id REV names in the repository at ROOT."""
    try:
        full = _git(root, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except BaseError:
        raise BaseError(f"{rev!r} names no commit of the repository at {root}") from None
    return full, _git(root, "rev-parse", "--short", full)


def extract(root: str, commit: str, dest: str) -> str:
    """`git -C ROOT archive COMMIT | tar -x -C DEST`; return DEST (created).

    Raises BaseError unless the tree holds sbg and its twistd plugin.
    """
    os.makedirs(dest)
    with subprocess.Popen(
        ["git", "-C", root, "archive", commit], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as archive:
        tar = subprocess.run(
            ["tar", "-x", "-C", dest], stdin=archive.stdout, capture_output=True, timeout=300
        )
        assert archive.stderr is not None
        err = archive.stderr.read().decode(errors="replace")
    if archive.returncode or tar.returncode:
        raise BaseError(
            f"git archive {commit} | tar -x failed: {err.strip()} "
            f"{tar.stderr.decode(errors='replace').strip()}"
        )
    for needed in ("sbg/__init__.py", "twisted/plugins/sbg_plugin.py"):
        if not os.path.exists(os.path.join(dest, needed)):
            raise BaseError(f"revision {commit} has no {needed}: it cannot run as sbg")
    return dest


def launcher_argv(python: str, source_root: str, twistd_args: list[str]) -> list[str]:
    """Run twistd with TWISTD_ARGS after checking that sbg comes from SOURCE_ROOT.

    The process must have SOURCE_ROOT first on its PYTHONPATH. `-P` keeps the
    working directory off `sys.path`.
    """
    return [python, "-P", "-c", _LAUNCHER, source_root, *twistd_args]


def code_origin(log_text: str, source_root: str) -> str:
    """Check the launcher's `BENCH-SBG-CODE` line in LOG_TEXT; return sbg's file.

    Raises BaseError when the line is missing or names a file outside
    SOURCE_ROOT.
    """
    root = os.path.realpath(source_root) + os.sep
    for line in log_text.splitlines():
        if line.startswith(CODE_MARK):
            code = json.loads(line[len(CODE_MARK) :])
            files = [code["sbg"], code["tap"], *code["plugins"]]
            if code["plugins"] and all(
                f is not None and os.path.realpath(f).startswith(root) for f in files
            ):
                return str(code["sbg"])
            raise BaseError(f"the started sbg runs code from outside {source_root}: {code}")
    raise BaseError("the started sbg did not report where its code comes from")
