"""A stand-in homeserver for protocol tests: records every byte it receives.

Used where a real Synapse cannot be had in a unit test (the real ones run in
`tests/e2e`). It answers each request with a small JSON body, or with a
large streamed body for paths under `/_matrix/federation/v1/media/`, and
keeps the raw bytes of every connection so tests can assert byte identity
and that a refused request never arrived.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.interfaces import IListeningPort
from twisted.web import http


@dataclass
class Seen:
    method: bytes
    uri: bytes
    headers: list[tuple[bytes, list[bytes]]]
    body: bytes


@dataclass
class StandinState:
    requests: list[Seen] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)
    # Size of the streamed body for media paths, and chunk size.
    media_size: int = 0
    chunk: int = 64 * 1024
    media_sent: int = 0
    port: int = 0
    status: int = 200
    response_body: bytes = b'{"ok": true}'
    # Seconds to wait before answering (a slow upstream); the request is
    # recorded on arrival.
    delay: float = 0.0

    @property
    def raw_bytes(self) -> bytes:
        return b"".join(self.raw)


class _StandinRequest(http.Request):
    def process(self) -> None:
        state: StandinState = self.channel.factory.state  # type: ignore[union-attr]
        assert self.content is not None
        self.content.seek(0)
        state.requests.append(
            Seen(
                self.method,
                self.uri,
                [(k, list(v)) for k, v in self.requestHeaders.getAllRawHeaders()],
                self.content.read(),
            )
        )
        if self.path.startswith(b"/_matrix/federation/v1/media/") and state.media_size:
            self._stream(state)
            return
        if state.delay > 0:
            _reactor.callLater(state.delay, self._answer, state)  # type: ignore[attr-defined]
            return
        self._answer(state)

    def _answer(self, state: StandinState) -> None:
        if self._disconnected:
            return
        self.setResponseCode(state.status)
        self.setHeader(b"Content-Type", b"application/json")
        self.setHeader(b"X-Standin", b"yes")
        self.setHeader(b"Content-Length", str(len(state.response_body)).encode())
        self.write(state.response_body)
        self.finish()

    def _stream(self, state: StandinState) -> None:
        """Write `media_size` bytes, honouring backpressure from the proxy."""
        self.setResponseCode(200)
        self.setHeader(b"Content-Type", b"application/octet-stream")
        self.setHeader(b"Content-Length", str(state.media_size).encode())
        request = self
        block = b"x" * state.chunk

        class Producer:
            sent = 0
            paused = False

            def resumeProducing(self) -> None:
                self.paused = False
                while not self.paused and self.sent < state.media_size:
                    n = min(state.chunk, state.media_size - self.sent)
                    self.sent += n
                    state.media_sent = self.sent
                    request.write(block[:n])
                if self.sent >= state.media_size and not request.finished:
                    request.unregisterProducer()
                    request.finish()

            def pauseProducing(self) -> None:
                self.paused = True

            def stopProducing(self) -> None:
                self.paused = True

        p = Producer()
        self.registerProducer(p, True)
        _reactor.callLater(0, p.resumeProducing)  # type: ignore[attr-defined]


class _RecordingChannel(http.HTTPChannel):
    requestFactory = _StandinRequest

    def dataReceived(self, data: bytes) -> None:
        self.factory.state.raw.append(data)  # type: ignore[attr-defined]
        super().dataReceived(data)


class _StandinFactory(http.HTTPFactory):
    protocol = _RecordingChannel

    def __init__(self, state: StandinState) -> None:
        super().__init__()
        self.state = state

    def buildProtocol(self, addr: Any) -> Any:
        p = _RecordingChannel()
        p.factory = self
        p.callLater = _reactor.callLater  # type: ignore[attr-defined]
        return p

    def log(self, request: Any) -> None:
        pass


def start_standin(
    state: StandinState | None = None,
    tls: tuple[str, str] | None = None,
    names: tuple[str, ...] = ("matrix.partner.example",),
) -> tuple[StandinState, IListeningPort]:
    """Listen on 127.0.0.1:0; with `tls` = (certificate file, key file), over TLS."""
    state = state or StandinState()
    factory = _StandinFactory(state)
    if tls is None:
        port = _reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        state.port = port.getHost().port
        return state, port
    from sbg.tls.server import build_sni_server_context

    options = build_sni_server_context([(list(names), tls[0], tls[1])])
    port = _reactor.listenSSL(0, factory, options, interface="127.0.0.1")  # type: ignore[attr-defined]
    state.port = port.getHost().port
    return state, port


def json_body(obj: Any) -> bytes:
    return json.dumps(obj).encode()
