"""A stand-in identity server for third-party (email) invites.

No identity server (Sydent) is available to the tests, so this serves the
three calls Synapse makes for an email invite that matches no user:
`GET /_matrix/identity/v2/hash_details`, `POST /_matrix/identity/v2/lookup`
(no match) and `POST /_matrix/identity/v2/store-invite` (a token and a public
key). It answers over HTTPS on loopback; the homeserver using it sets
`use_insecure_ssl_client_just_for_testing_do_not_use` (which covers its
non-federation HTTP client only). Requests are recorded.
"""

import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from testbed.pki import CertFiles

PUBLIC_KEY = "ta8IQ0u1sp44HVpxYi7dFOdS/bfwDjcy4xLFlfY5KOA"


class IdentityStub:
    def __init__(self, address: str, port: int, tls: CertFiles) -> None:
        self.requests: list[tuple[str, str]] = []
        self.host = f"{address}:{port}"
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def answer(self, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                stub.requests.append(("GET", self.path))
                self.answer({"algorithms": ["none", "sha256"], "lookup_pepper": "pepper"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                stub.requests.append(("POST", self.path))
                if self.path.startswith("/_matrix/identity/v2/lookup"):
                    self.answer({"mappings": {}})
                    return
                self.answer(
                    {
                        "token": "sbg-e2e-invite-token",
                        "public_key": PUBLIC_KEY,
                        "public_keys": [
                            {
                                "public_key": PUBLIC_KEY,
                                "key_validity_url": f"https://{stub.host}/_matrix/identity/v2/pubkey/isvalid",
                            }
                        ],
                        "display_name": "g***@e***.org",
                    }
                )

        self._server = ThreadingHTTPServer((address, port), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls.certificate, tls.private_key)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
