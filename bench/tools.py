"""Install what the benchmarks need: nginx and wrk from Debian, mitmproxy and
py-spy from PyPI into their own virtualenv (bench/.venv-bench)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH_VENV = os.path.join(HERE, ".venv-bench")
_PIP_PACKAGES = ["mitmproxy", "py-spy"]
_STAMP = os.path.join(BENCH_VENV, ".installed")


def _find(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )


def ensure_debian_tools() -> tuple[str, str]:
    """Paths of nginx and wrk, installed with apt-get when missing."""
    missing = [pkg for pkg in ("nginx", "wrk") if _find(pkg) is None]
    if missing:
        print(f"bench: installing {' '.join(missing)} with apt-get", file=sys.stderr)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
            check=True,
            env=env,
            timeout=900,
        )
    nginx, wrk = _find("nginx"), _find("wrk")
    if nginx is None or wrk is None:
        raise RuntimeError("nginx or wrk is still missing after apt-get install")
    return nginx, wrk


def ensure_bench_venv() -> str:
    """The bench virtualenv's bin directory, with mitmproxy and py-spy installed."""
    bin_dir = os.path.join(BENCH_VENV, "bin")
    if not os.path.exists(_STAMP):
        print("bench: installing mitmproxy and py-spy into bench/.venv-bench", file=sys.stderr)
        venv = ["python3", "-m", "venv", BENCH_VENV]
        if (
            not os.path.exists(os.path.join(bin_dir, "python"))
            and subprocess.run(venv, timeout=300).returncode
        ):
            shutil.rmtree(BENCH_VENV, ignore_errors=True)
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
            subprocess.run(
                ["apt-get", "install", "-y", "-qq", "python3-venv"],
                check=True,
                env=env,
                timeout=900,
            )
            subprocess.run(venv, check=True, timeout=300)
        subprocess.run(
            [os.path.join(bin_dir, "pip"), "install", "-q", *_PIP_PACKAGES],
            check=True,
            timeout=900,
        )
        with open(_STAMP, "w") as f:
            f.write(" ".join(_PIP_PACKAGES) + "\n")
    return bin_dir
