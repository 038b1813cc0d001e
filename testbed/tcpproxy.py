"""A small TCP relay, for the tests and the end-to-end suite: a load
balancer in front of several gateway nodes, or the network between a node
and Redis, which `cut` partitions and `heal` mends.

Round robin over the backends, per connection; a backend that refuses
the connection is skipped (as HAProxy or a cloud TCP balancer does). While
cut, nothing goes through in either direction and new connections are held
without an answer (as packets that are dropped); `heal` closes whatever was
held, and new connections go through again.
"""

from __future__ import annotations

import itertools
import select
import socket
import threading
from collections.abc import Sequence

Address = tuple[str, int]
_CHUNK = 65536


class TCPProxy:
    """Listens on `listen` and relays every connection to a backend."""

    def __init__(self, listen: Address, backends: Sequence[Address]) -> None:
        self.backends = list(backends)
        self._rr = itertools.cycle(range(len(self.backends)))
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(listen)
        self._sock.listen(128)
        self.address: Address = self._sock.getsockname()[:2]
        self._cut = threading.Event()
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._held: list[socket.socket] = []
        self.connections: list[int] = [0] * len(self.backends)
        self._thread = threading.Thread(target=self._accept, name="tcpproxy", daemon=True)

    def start(self) -> TCPProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening (the port is free again) and end every relay."""
        self._stopped.set()
        try:
            # Wakes the thread blocked in accept(): close() alone would not,
            # and the socket would stay bound until it returned.
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(5)
        self.heal()

    def cut(self) -> None:
        """Partition: nothing goes through from now on."""
        self._cut.set()

    def heal(self) -> None:
        """End the partition: what was held is closed; new connections pass."""
        with self._lock:
            held, self._held = self._held, []
        self._cut.clear()
        for s in held:
            _close(s)

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _connect(self) -> socket.socket | None:
        for _ in range(len(self.backends)):
            index = next(self._rr)
            try:
                upstream = socket.create_connection(self.backends[index], timeout=2.0)
            except OSError:
                continue
            self.connections[index] += 1
            return upstream
        return None

    def _hold(self, *socks: socket.socket) -> None:
        with self._lock:
            self._held.extend(socks)

    def _serve(self, client: socket.socket) -> None:
        if self._cut.is_set():
            self._hold(client)
            return
        upstream = self._connect()
        if upstream is None:
            _close(client)
            return
        upstream.settimeout(None)
        try:
            self._pump(client, upstream)
        finally:
            if not self._cut.is_set():
                _close(client)
                _close(upstream)

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        peers = {client: upstream, upstream: client}
        while not self._stopped.is_set():
            if self._cut.is_set():
                self._hold(client, upstream)
                return
            try:
                readable, _, _ = select.select(list(peers), [], [], 0.05)
                for s in readable:
                    data = s.recv(_CHUNK)
                    if not data or self._cut.is_set():
                        if not data:
                            return
                        break
                    peers[s].sendall(data)
            except OSError:
                return


def _close(s: socket.socket) -> None:
    try:
        s.close()
    except OSError:
        pass
