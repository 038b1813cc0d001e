"""sd_notify: what sbg tells systemd, received on a real unix datagram socket.

The socket stands in for systemd's: it receives each datagram with the
sender's credentials (SO_PASSCRED), as systemd does, so the tests see
which process sent what, in which order.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from sbg import systemd
from tests.asynctest import TestCase
from tests.inbound_requests import TXN, txn_body
from tests.processes import (
    WORKERS,
    Process,
    Setup,
    alive,
    make_setup,
    ready,
    spawn,
    stop,
    wait_healthy,
    wait_until,
    worker_pids,
)

_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class Message:
    pid: int
    fields: dict[str, str]
    raw: bytes


class FakeSystemd:
    """A bound notification socket and the datagrams it received."""

    def __init__(self, address: str) -> None:
        """ADDRESS as NOTIFY_SOCKET names it: a path, or `@name`."""
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.2)
        self.messages: list[Message] = []
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed:
            try:
                data, ancillary, _flags, _addr = self.sock.recvmsg(
                    4096, socket.CMSG_SPACE(_CREDENTIALS.size)
                )
            except TimeoutError:
                continue
            except OSError:
                return
            pid = -1
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = _CREDENTIALS.unpack(payload[: _CREDENTIALS.size])[0]
            fields = dict(
                line.split("=", 1) for line in data.decode("utf-8").splitlines() if "=" in line
            )
            with self._lock:
                self.messages.append(Message(pid, fields, data))

    def received(self) -> list[Message]:
        with self._lock:
            return list(self.messages)

    def states(self) -> list[str]:
        """READY, RELOADING and STOPPING assignments, in the order received."""
        out = []
        for m in self.received():
            for key in ("RELOADING", "STOPPING", "READY"):
                if m.fields.get(key) == "1":
                    out.append(f"{key}=1")
        return out

    def close(self) -> None:
        self._closed = True
        self._thread.join(5)
        self.sock.close()


@contextmanager
def notify_socket(address: str) -> Iterator[None]:
    saved = os.environ.get(systemd.ENVIRONMENT_VARIABLE)
    os.environ[systemd.ENVIRONMENT_VARIABLE] = address
    try:
        yield
    finally:
        if saved is None:
            del os.environ[systemd.ENVIRONMENT_VARIABLE]
        else:
            os.environ[systemd.ENVIRONMENT_VARIABLE] = saved


def abstract_address() -> str:
    return f"@sbg-test-{uuid.uuid4().hex}"


class NotifyTests(SynchronousTestCase):
    def listen(self, address: str) -> FakeSystemd:
        fake = FakeSystemd(address)
        self.addCleanup(fake.close)
        return fake

    def wait_for(self, fake: FakeSystemd, count: int) -> list[Message]:
        deadline = time.monotonic() + 5
        while len(fake.received()) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return fake.received()

    def test_abstract_namespace_socket(self) -> None:
        fake = self.listen(abstract_address())
        with notify_socket(fake.address):
            self.assertTrue(systemd.notify("READY=1", "STATUS=up"))
        (message,) = self.wait_for(fake, 1)
        self.assertEqual(message.raw, b"READY=1\nSTATUS=up")
        self.assertEqual(message.pid, os.getpid())

    def test_socket_path(self) -> None:
        path = os.path.abspath(self.mktemp())
        fake = self.listen(path)
        with notify_socket(path):
            self.assertTrue(systemd.stopping())
        (message,) = self.wait_for(fake, 1)
        self.assertEqual(message.fields["STOPPING"], "1")

    def test_without_notify_socket_nothing_is_sent(self) -> None:
        saved = os.environ.pop(systemd.ENVIRONMENT_VARIABLE, None)
        try:
            self.assertFalse(systemd.ready())
        finally:
            if saved is not None:
                os.environ[systemd.ENVIRONMENT_VARIABLE] = saved

    def test_unreachable_socket_is_a_warning_not_an_error(self) -> None:
        missing = os.path.abspath(self.mktemp())
        with notify_socket(missing), self.assertLogs("sbg.systemd", "WARNING") as logs:
            self.assertFalse(systemd.ready())
        self.assertIn(missing, logs.output[0])
        with notify_socket("vsock:2:9999"), self.assertLogs("sbg.systemd", "WARNING"):
            self.assertFalse(systemd.ready())

    def test_reloading_brackets_the_reload(self) -> None:
        fake = self.listen(abstract_address())
        seen_during: list[list[str]] = []

        def reload(result: bool) -> bool:
            self.wait_for(fake, len(fake.received()) + 1)
            seen_during.append(fake.states())
            return result

        with notify_socket(fake.address):
            self.assertIs(systemd.reloading(lambda: reload(True)), True)
            self.assertIs(systemd.reloading(lambda: reload(False)), False)
        messages = self.wait_for(fake, 4)
        # RELOADING=1 had arrived before the reload ran, READY=1 after it.
        self.assertEqual(seen_during, [["RELOADING=1"], ["RELOADING=1", "READY=1", "RELOADING=1"]])
        self.assertEqual(fake.states(), ["RELOADING=1", "READY=1"] * 2)
        self.assertGreater(int(messages[0].fields["MONOTONIC_USEC"]), 0)
        self.assertLessEqual(int(messages[0].fields["MONOTONIC_USEC"]), time.monotonic_ns() // 1000)
        self.assertIn("configuration reloaded", messages[1].fields["STATUS"])
        self.assertIn("reload refused", messages[3].fields["STATUS"])

    def test_ready_follows_a_failing_reload(self) -> None:
        fake = self.listen(abstract_address())

        def broken() -> bool:
            raise RuntimeError("boom")

        with notify_socket(fake.address):
            self.assertRaises(RuntimeError, systemd.reloading, broken)
        self.wait_for(fake, 2)
        self.assertEqual(fake.states(), ["RELOADING=1", "READY=1"])
        self.assertIn("reload refused", fake.received()[1].fields["STATUS"])

    def test_ready_waits_for_a_deferred_reload(self) -> None:
        fake = self.listen(abstract_address())
        pending: defer.Deferred[bool] = defer.Deferred()
        with notify_socket(fake.address):
            self.assertIs(systemd.reloading(lambda: pending), pending)
            self.wait_for(fake, 1)
            time.sleep(0.1)
            self.assertEqual(fake.states(), ["RELOADING=1"])
            pending.callback(True)
        self.wait_for(fake, 2)
        self.assertEqual(fake.states(), ["RELOADING=1", "READY=1"])
        self.assertIn("configuration reloaded", fake.received()[1].fields["STATUS"])
        self.assertIs(self.successResultOf(pending), True)


def spawn_notified(test: TestCase, setup: Setup, address: str) -> Process:
    """`twistd -n --pidfile= sbg -c FILE` with NOTIFY_SOCKET=ADDRESS."""
    return spawn(test, setup, environ={systemd.ENVIRONMENT_VARIABLE: address})


def can_connect(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return False
    return True


def environment_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        entries = f.read().split(b"\0")
    return dict(e.decode("utf-8", "replace").split("=", 1) for e in entries if b"=" in e)


class ProcessNotifyTests(TestCase):
    """The real gateway process, as systemd runs it under `Type=notify`."""

    def fake_systemd(self) -> FakeSystemd:
        fake = FakeSystemd(abstract_address())
        self.addCleanup(fake.close)
        return fake

    async def states(self, fake: FakeSystemd, expected: list[str], proc: Process) -> None:
        await wait_until(
            lambda: len(fake.states()) >= len(expected),
            20,
            f"{expected} (so far {fake.states()})",
            proc,
        )
        self.assertEqual(fake.states(), expected)

    async def test_ready_reloading_stopping(self) -> None:
        fake = self.fake_systemd()
        setup = make_setup(self)
        proc = spawn_notified(self, setup, fake.address)

        await self.states(fake, ["READY=1"], proc)
        # READY=1 comes once every listener is bound.
        for port in setup.ports.values():
            self.assertTrue(can_connect(port), port)
        await wait_healthy(setup, proc)

        # A valid file: RELOADING=1, then READY=1 once it is in force.
        setup.write({"external_homeservers[0].enabled": False})
        proc.signal(signal.SIGHUP)
        await self.states(fake, ["READY=1", "RELOADING=1", "READY=1"], proc)
        self.assertIn("configuration reloaded", proc.output())
        resp = await setup.inbound(setup.signed("PUT", TXN, txn_body()))
        self.assertEqual(resp.status, 403, resp.body)
        self.assertIn("configuration reloaded", fake.received()[-1].fields["STATUS"])

        # A refused file: READY=1 all the same, with a STATUS that says so.
        with open(setup.path, "a", encoding="utf-8") as f:
            f.write("no_such_key: 1\n")
        proc.signal(signal.SIGHUP)
        await self.states(
            fake, ["READY=1", "RELOADING=1", "READY=1", "RELOADING=1", "READY=1"], proc
        )
        self.assertIn("reload refused", fake.received()[-1].fields["STATUS"])
        self.assertIn("reload refused", proc.output())

        proc.signal(signal.SIGTERM)
        self.assertEqual(await proc.wait(), 0, proc.output() + proc.errors())
        self.assertEqual(fake.states()[-1], "STOPPING=1")
        self.assertEqual(
            fake.states(),
            ["READY=1", "RELOADING=1", "READY=1", "RELOADING=1", "READY=1", "STOPPING=1"],
        )
        # Every message came from the process systemd would have started.
        self.assertEqual({m.pid for m in fake.received()}, {proc.pid})

    async def test_workers_only_the_supervisor_notifies(self) -> None:
        fake = self.fake_systemd()
        setup = make_setup(self, {"workers": WORKERS})
        proc = spawn_notified(self, setup, fake.address)
        self.addCleanup(stop, proc.popen)
        await self.states(fake, ["READY=1"], proc)
        await wait_until(lambda: ready(proc) == WORKERS, 30, "the workers", proc)
        pids = worker_pids(proc)
        self.assertEqual(len(pids), WORKERS)
        for pid in pids.values():
            self.assertNotIn(systemd.ENVIRONMENT_VARIABLE, environment_of(pid))
        self.assertEqual(environment_of(proc.pid)[systemd.ENVIRONMENT_VARIABLE], fake.address)

        setup.write({"workers": WORKERS, "external_homeservers[0].enabled": False})
        proc.signal(signal.SIGHUP)
        await self.states(fake, ["READY=1", "RELOADING=1", "READY=1"], proc)
        await wait_until(
            lambda: proc.output().count("configuration reloaded") == WORKERS + 1,
            20,
            "the workers' reloads",
            proc,
        )

        proc.signal(signal.SIGTERM)
        self.assertEqual(await proc.wait(timeout=40), 0, proc.output() + proc.errors())
        await wait_until(
            lambda: not any(alive(p) for p in pids.values()), 15, "the workers to exit"
        )
        self.assertEqual(fake.states(), ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"])
        self.assertEqual({m.pid for m in fake.received()}, {proc.pid})
