"""Running the `sbg` command against a gateway running in this process.

The command is synchronous (urllib): `sbg` runs it in a thread so the
reactor, which runs the gateway, can answer it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import Any

from twisted.internet import threads

from sbg.cli import main
from testbed.configtools import write_config
from tests.asynctest import TestCase
from tests.gateway import Gateway


def set_environment(test: TestCase, values: Mapping[str, str | None]) -> None:
    """Set (None: remove) environment variables until the test ends."""
    saved = {k: os.environ.get(k) for k in values}

    def restore() -> None:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    test.addCleanup(restore)
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


async def sbg(*argv: str) -> tuple[int, str, str]:
    """(exit status, standard output, standard error) of `sbg ARGV...`."""
    out, err = io.StringIO(), io.StringIO()
    status = await threads.deferToThread(main, list(argv), out, err)
    return int(status), out.getvalue(), err.getvalue()


def cli_config(gw: Gateway, overrides: dict[str, Any] | None = None) -> str:
    """A configuration file naming the running gateway's admin port."""
    all_overrides: dict[str, Any] = {
        "internal_homeservers[0].upstream": f"http://127.0.0.1:{gw.upstream.port}",
        "listeners[2].port": gw.ports["admin"],
    }
    all_overrides.update(overrides or {})
    return write_config(
        gw.material.directory, all_overrides, material=gw.material, filename="cli.yaml"
    )
