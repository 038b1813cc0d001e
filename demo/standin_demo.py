"""The inbound border against a stand-in homeserver (no Synapse needed).

Starts `twistd -n sbg` with a generated configuration in front of a small
recording homeserver stand-in, then plays an external server's requests: a
signed transaction from the trusted server goes through; a forged one, an
unknown server and a path traversal are refused. Prints what the stand-in
received and sbg's audit lines.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from signedjson.key import generate_signing_key

from sbg.matrix.xmatrix import sign_request
from tests.configtools import (
    DELETE,
    INTERNAL_HOST,
    INTERNAL_SERVER,
    PARTNER_SERVER,
    make_material,
    write_config,
)
from tests.rawhttp import build_request, exchange_sync

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _standin() -> tuple[int, list[str]]:
    """A plain-HTTP stand-in homeserver in a thread; returns (port, log)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            seen.append(f"{self.command} {self.path}")
            body = b"{}"
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_PUT = do_POST = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1], seen


def main() -> int:
    work = tempfile.mkdtemp(prefix="sbg-demo-")
    material = make_material(work)
    port, seen = _standin()
    path = write_config(
        work,
        {
            "internal_homeservers[0].upstream": f"http://127.0.0.1:{port}",
            "listeners[0].port": 18448,
            "listeners[2].port": 19000,
            "listeners[1]": DELETE,
        },
        material=material,
    )
    log_path = os.path.join(work, "sbg.log")
    env = dict(os.environ, PYTHONPATH=ROOT)
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [twistd, "-n", "--pidfile=", "sbg", "-c", path], stdout=log, stderr=log, env=env
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen("http://127.0.0.1:19000/health", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    with open(log_path) as f:
                        print(f.read())
                    return 1
                time.sleep(0.1)
        print(f"sbg is up: inbound https://127.0.0.1:18448 as {INTERNAL_SERVER}\n")
        txn = b"/_matrix/federation/v1/send/demo1"
        content = {"origin": PARTNER_SERVER, "origin_server_ts": 1, "pdus": [], "edus": []}
        body = json.dumps(content).encode()

        def send(
            title: str, method: bytes, target: bytes, auth: bytes | None, data: bytes | None
        ) -> None:
            headers = [(b"Host", INTERNAL_HOST.encode())]
            if auth is not None:
                headers.append((b"Authorization", auth))
            req = build_request(method, target, headers, data)
            [resp] = exchange_sync(
                "127.0.0.1",
                18448,
                [req],
                tls=True,
                sni=INTERNAL_HOST,
                ca_file=material.internal_ca.certificate,
            )
            detail = resp.body.decode(errors="replace")[:100]
            print(f"  {title:<44} -> {resp.status} {detail}")

        key = material.partner_signing_key
        send(
            "trusted partner.example, signed /send",
            b"PUT",
            txn,
            sign_request(key, "PUT", txn, PARTNER_SERVER, INTERNAL_SERVER, content),
            body,
        )
        forger = generate_signing_key(key.version)
        send(
            "forged signature claiming partner.example",
            b"PUT",
            txn,
            sign_request(forger, "PUT", txn, PARTNER_SERVER, INTERNAL_SERVER, content),
            body,
        )
        evil = generate_signing_key("evil")
        send(
            "unknown server evil.example",
            b"PUT",
            txn,
            sign_request(evil, "PUT", txn, "evil.example", INTERNAL_SERVER, content),
            body,
        )
        trav = b"/_matrix/federation/v1/send/../../../_synapse/admin/v1/users"
        send("path traversal to the admin API", b"GET", trav, None, None)
        print(f"\nthe stand-in homeserver received: {seen}")
        time.sleep(0.3)
        print("\nsbg's audit lines:")
        with open(log_path) as f:
            for line in f:
                if "sbg.audit" in line:
                    print("  " + line.rstrip())
        return 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=40)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
