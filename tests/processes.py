"""sbg as a real `twistd -n sbg` process, for the tests that need one."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import reactor, task, threads

from testbed.configtools import (
    INTERNAL_HOST,
    PARTNER_HOST,
    PARTNER_SERVER,
    Material,
    make_material,
    write_config,
)
from testbed.ports import free_port
from tests.asynctest import TestCase
from tests.rawhttp import RawResponse, build_request, exchange_sync, read_head
from tests.standin import StandinState, start_standin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The twistd next to this Python (a virtualenv), else Debian's twistd3.
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
if not os.path.exists(TWISTD):
    TWISTD = shutil.which("twistd3") or shutil.which("twistd") or TWISTD


START_TIMEOUT = 30.0


def sleep(seconds: float) -> Any:
    return task.deferLater(reactor, seconds, lambda: None)


@dataclass
class Setup:
    """A configuration for a real process, with fixed free ports."""

    directory: str
    material: Material
    path: str
    ports: dict[str, int]
    upstream: StandinState
    overrides: dict[str, Any]

    def write(self, overrides: dict[str, Any] | None = None) -> str:
        return write_config(
            self.directory, {**self.overrides, **(overrides or {})}, material=self.material
        )

    def signed(self, method: str, target: bytes, content: Any = None, **kw: Any) -> bytes:
        from sbg.matrix.xmatrix import sign_request

        auth = sign_request(
            self.material.partner_signing_key,
            method,
            target,
            PARTNER_SERVER,
            "internal.example",
            content,
        )
        headers = [(b"Host", INTERNAL_HOST.encode()), (b"Authorization", auth)]
        body = None
        if content is not None:
            headers.append((b"Content-Type", b"application/json"))
            body = json.dumps(content).encode()
        return build_request(method.encode(), target, headers, body)

    def inbound_sync(self, request: bytes, timeout: float = 10.0) -> RawResponse:
        return exchange_sync(
            "127.0.0.1",
            self.ports["inbound"],
            [request],
            tls=True,
            sni=INTERNAL_HOST,
            ca_file=self.material.internal_ca.certificate,
            timeout=timeout,
        )[0]

    def inbound(self, request: bytes) -> Any:
        return threads.deferToThread(self.inbound_sync, request)

    def admin_sync(self, method: str, path: str, body: Any = None, token: bool = True) -> Any:
        headers = [(b"Host", b"127.0.0.1")]
        if token:
            headers.append((b"Authorization", b"Bearer " + self.material.admin_token.encode()))
        data = json.dumps(body).encode() if body is not None else None
        req = build_request(method.encode(), path.encode(), headers, data)
        return exchange_sync("127.0.0.1", self.ports["admin"], [req])[0]

    def admin(self, method: str, path: str, body: Any = None, token: bool = True) -> Any:
        return threads.deferToThread(self.admin_sync, method, path, body, token)


def connect_head(port: int, proxy_auth: bytes) -> bytes:
    """The outbound listener's answer head to a CONNECT to the partner."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        target = PARTNER_HOST.encode() + b":8448"
        s.sendall(
            b"CONNECT " + target + b" HTTP/1.1\r\nHost: " + target + b"\r\n"
            b"Proxy-Authorization: " + proxy_auth + b"\r\n\r\n"
        )
        return read_head(s)


def make_setup(test: TestCase, overrides: dict[str, Any] | None = None) -> Setup:
    directory = os.path.abspath(test.mktemp())
    material = make_material(directory)
    state, port = start_standin()
    test.addCleanup(port.stopListening)
    ports = {"inbound": free_port(), "outbound": free_port(), "admin": free_port()}
    all_overrides: dict[str, Any] = {
        "listeners[0].port": ports["inbound"],
        "listeners[1].port": ports["outbound"],
        "listeners[2].port": ports["admin"],
        "internal_homeservers[0].upstream": f"http://127.0.0.1:{state.port}",
    }
    all_overrides.update(overrides or {})
    path = write_config(directory, all_overrides, material=material)
    return Setup(directory, material, path, ports, state, all_overrides)


@dataclass
class Process:
    popen: subprocess.Popen[bytes]
    stdout: str
    stderr: str

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        with open(self.stdout, encoding="utf-8") as f:
            return f.read()

    def errors(self) -> str:
        with open(self.stderr, encoding="utf-8") as f:
            return f.read()

    def signal(self, signum: int) -> None:
        os.kill(self.popen.pid, signum)

    def wait(self, timeout: float = 20.0) -> Any:
        """Deferred: the exit status."""
        return threads.deferToThread(self.popen.wait, timeout)


def stop(popen: subprocess.Popen[bytes]) -> None:
    """Cleanup: end the process by its PID, whatever state the test left it in."""
    if popen.poll() is None:
        popen.send_signal(signal.SIGKILL)
    try:
        popen.wait(10)
    except subprocess.TimeoutExpired:
        pass


def spawn(
    test: TestCase,
    setup: Setup,
    *extra: str,
    name: str = "sbg",
    environ: dict[str, str] | None = None,
) -> Process:
    """`twistd -n --pidfile= [EXTRA] sbg -c FILE`, with ENVIRON added."""
    out = os.path.join(setup.directory, f"{name}.stdout")
    err = os.path.join(setup.directory, f"{name}.stderr")
    env = dict(os.environ, PYTHONPATH=ROOT, **(environ or {}))
    with open(out, "wb") as fo, open(err, "wb") as fe:
        popen = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", *extra, "sbg", "-c", setup.path],
            stdout=fo,
            stderr=fe,
            stdin=subprocess.DEVNULL,
            cwd=setup.directory,
            env=env,
        )
    test.addCleanup(stop, popen)
    return Process(popen, out, err)


async def wait_until(
    check: Callable[[], bool], timeout: float, what: str, proc: Process | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc is not None and proc.popen.poll() is not None:
            raise AssertionError(
                f"sbg exited ({proc.popen.returncode}) while waiting for {what}:\n"
                + proc.output()
                + proc.errors()
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await sleep(0.05)


async def wait_healthy(setup: Setup, proc: Process) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.popen.poll() is not None:
            raise AssertionError(
                f"sbg exited ({proc.popen.returncode}):\n{proc.output()}{proc.errors()}"
            )
        try:
            resp = await setup.admin("GET", "/health", token=False)
            if resp.status == 200 and resp.json().get("status") == "ok":
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("sbg did not become healthy:\n" + proc.output() + proc.errors())
        await sleep(0.1)


async def run_gateway(test: TestCase, setup: Setup, *extra: str, name: str = "sbg") -> Process:
    proc = spawn(test, setup, *extra, name=name)
    await wait_healthy(setup, proc)
    return proc


WORKERS = 2


_STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")


def worker_pids(proc: Process) -> dict[int, int]:
    """The live worker pids by index, from the supervisor's log."""
    pids: dict[int, int] = {}
    for index, pid in _STARTED.findall(proc.output()):
        pids[int(index)] = int(pid)
    return pids


def ready(proc: Process) -> int:
    """How many workers have started serving so far."""
    return proc.output().count("[sbg.service] INFO: sbg started")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
