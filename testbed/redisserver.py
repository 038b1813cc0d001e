"""A real `redis-server` (Debian's) for the tests, the end-to-end suite and
the benchmarks: on loopback, in a directory of its own, on a free port.

`make venv` (scripts/bootstrap) installs `redis-server` where it is missing,
as the end-to-end suite installs Synapse. By default the server keeps
nothing on disk: a restart, like a `SIGKILL` of a server without
persistence, loses every key (the harshest case for the cluster).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import time

from testbed.e2e.processes import ManagedProcess, clean_environment
from testbed.ports import free_port

REDIS_SERVER = "/usr/bin/redis-server"


class RedisMissing(Exception):
    """redis-server is not installed."""


def redis_server_binary() -> str:
    found = shutil.which("redis-server") or (REDIS_SERVER if os.path.exists(REDIS_SERVER) else None)
    if found is None:
        raise RedisMissing(
            "redis-server is not installed: `make venv` installs it as root "
            "(apt-get install redis-server)"
        )
    return found


class RedisServer:
    """One redis-server process; `start`, `stop` (SIGTERM), `kill` (SIGKILL)
    and `start` again on the same address."""

    def __init__(
        self,
        directory: str,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        password: str | None = None,
        unix_socket: bool = False,
        persistent: bool = False,
        replica_of: tuple[str, int] | None = None,
    ) -> None:
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.host = host
        self.port = port or free_port(host)
        self.password = password
        # A unix socket path must be short (108 bytes): not in the test's directory.
        self.socket_path = (
            os.path.join(tempfile.mkdtemp(prefix="sbg-redis-"), "redis.sock")
            if unix_socket
            else None
        )
        self.persistent = persistent
        self.replica_of = replica_of
        self.config_path = os.path.join(self.directory, "redis.conf")
        self._write_config()
        self.process = ManagedProcess(
            "redis-server",
            [redis_server_binary(), self.config_path],
            stdout_path=os.path.join(self.directory, "redis.log"),
            env=clean_environment(),
            cwd=self.directory,
        )

    @property
    def url(self) -> str:
        if self.socket_path is not None:
            return f"unix://{self.socket_path}"
        return f"redis://{self.host}:{self.port}/0"

    def _write_config(self) -> None:
        lines = [
            f"bind {self.host}",
            f"port {self.port}",
            f"dir {self.directory}",
            "daemonize no",
            "protected-mode no",
            "databases 16",
            "appendonly no",
            # Persistent: one snapshot at shutdown (SIGTERM), none otherwise.
            'save ""' if not self.persistent else "save 3600 1",
        ]
        if self.password is not None:
            lines += [f"requirepass {self.password}", f"masterauth {self.password}"]
        if self.replica_of is not None:
            lines.append(f"replicaof {self.replica_of[0]} {self.replica_of[1]}")
        if self.socket_path is not None:
            lines += [f"unixsocket {self.socket_path}", "unixsocketperm 700"]
        with open(self.config_path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

    def start(self, timeout: float = 10.0) -> None:
        self.process.start()
        self.process.wait_ready(self.answers, timeout, interval=0.02)

    def answers(self) -> bool:
        """Whether the server answers a PING (a password-protected one
        answers NOAUTH, which is an answer)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                reply = s.recv(64)
        except OSError:
            return False
        return reply.startswith((b"+PONG", b"-NOAUTH"))

    def stop(self) -> None:
        """SIGTERM (a persistent server saves first)."""
        self.process.stop(10.0)

    def kill(self) -> None:
        """SIGKILL: gone at once, nothing saved."""
        self.process.signal(signal.SIGKILL)
        self.process.stop(5.0)

    def wait_gone(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self.answers():
            if time.monotonic() > deadline:
                raise AssertionError("redis-server still answers")
            time.sleep(0.02)


class RedisSentinel:
    """One Redis Sentinel (`redis-server CONF --sentinel`) watching the
    primary `service` at `primary`, alone in its quorum, quick to fail over."""

    def __init__(
        self,
        directory: str,
        primary: tuple[str, int],
        service: str = "sbg",
        *,
        host: str = "127.0.0.1",
        password: str | None = None,
    ) -> None:
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.host, self.port, self.service = host, free_port(host), service
        config = os.path.join(self.directory, "sentinel.conf")
        lines = [
            f"bind {host}",
            f"port {self.port}",
            f"dir {self.directory}",
            "protected-mode no",
            f"sentinel monitor {service} {primary[0]} {primary[1]} 1",
            f"sentinel down-after-milliseconds {service} 1000",
            f"sentinel failover-timeout {service} 5000",
        ]
        if password is not None:
            lines.append(f"sentinel auth-pass {service} {password}")
        with open(config, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        self.process = ManagedProcess(
            "redis-sentinel",
            [redis_server_binary(), config, "--sentinel"],
            stdout_path=os.path.join(self.directory, "sentinel.log"),
            env=clean_environment(),
            cwd=self.directory,
        )

    def url(self, db: int = 0) -> str:
        return f"sentinel://{self.host}:{self.port}/{self.service}/{db}"

    def start(self, timeout: float = 10.0) -> None:
        self.process.start()
        self.process.wait_ready(self.answers, timeout, interval=0.02)

    def answers(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def replicas(self) -> int:
        """How many replicas of the primary the sentinel knows."""
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                s.sendall(f"SENTINEL replicas {self.service}\r\n".encode())
                reply = s.recv(65536)
        except OSError:
            return 0
        head = reply.split(b"\r\n", 1)[0]
        return int(head[1:]) if head.startswith(b"*") else 0

    def primary(self) -> tuple[str, int] | None:
        """The primary the sentinel names now."""
        request = f"SENTINEL get-master-addr-by-name {self.service}\r\n".encode()
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                s.sendall(request)
                reply = s.recv(256).decode()
        except OSError:
            return None
        parts = reply.split("\r\n")
        if not reply.startswith("*2") or len(parts) < 5:
            return None
        return parts[2], int(parts[4])

    def stop(self) -> None:
        self.process.stop(10.0)
