"""`sbg keys fetch` against the stand-in key server (real TLS on loopback).

The command blocks, so it runs in a thread while the reactor serves the
stand-in. Its output must load as YAML into the right `verify_keys`.
"""

from __future__ import annotations

import io
import os
import socket
import time
from typing import Any

import yaml
from signedjson.key import generate_signing_key
from twisted.internet import threads
from twisted.trial.unittest import TestCase

from sbg.cli import main
from sbg.commands.keys_fetch import run
from testbed.configtools import PARTNER_SERVER
from testbed.tlstools import deferred_test
from tests.keyserver import DAY_MS, KeyServer, b64, key_id, make_pki, start_key_server


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code = code
        self.out = out
        self.err = err


def _run(server_name: str, host: str | None, ca: str | None) -> Result:
    out, err = io.StringIO(), io.StringIO()
    code = run(server_name, host, ca, out, err)
    return Result(code, out.getvalue(), err.getvalue())


class KeysFetchCommandTests(TestCase):
    def setUp(self) -> None:
        self.pki = make_pki(self.mktemp())
        self.k1 = generate_signing_key("k1")
        self.k2 = generate_signing_key("k2")

    def serve(self, tls: Any = None, **kw: Any) -> tuple[KeyServer, str]:
        state = KeyServer(PARTNER_SERVER, [self.k1], **kw)
        port = start_key_server(self, state, tls or self.pki.tls)
        return state, f"127.0.0.1:{port}"

    async def fetch(self, host: str | None, ca: str | None, name: str = PARTNER_SERVER) -> Result:
        result: Result = await threads.deferToThread(_run, name, host, ca)
        return result

    def assert_one_line_error(self, result: Result, *words: str) -> None:
        self.assertEqual(result.code, 1)
        self.assertEqual(result.out, "")
        self.assertTrue(result.err.startswith("sbg keys fetch: "), result.err)
        self.assertEqual(result.err.count("\n"), 1, result.err)
        self.assertNotIn("Traceback", result.err)
        for w in words:
            self.assertIn(w, result.err)

    @deferred_test
    async def test_prints_pasteable_verify_keys(self) -> None:
        state, host = self.serve()
        result = await self.fetch(host, self.pki.ca.certificate)
        self.assertEqual(result.code, 0, result.err)
        self.assertEqual(
            yaml.safe_load(result.out), {"verify_keys": {key_id(self.k1): b64(self.k1)}}
        )
        # SNI and Host name SERVER_NAME, not the address connected to.
        self.assertEqual(state.snis, [PARTNER_SERVER.encode()])
        self.assertEqual(state.host_headers, [PARTNER_SERVER.encode()])

    @deferred_test
    async def test_rotated_server_old_keys_only_in_a_comment(self) -> None:
        state, host = self.serve()
        state.rotate(self.k2, expired_ts=int(time.time() * 1000) - 1000)
        result = await self.fetch(host, self.pki.ca.certificate)
        self.assertEqual(result.code, 0, result.err)
        self.assertEqual(
            yaml.safe_load(result.out), {"verify_keys": {key_id(self.k2): b64(self.k2)}}
        )
        [old_line] = [line for line in result.out.splitlines() if key_id(self.k1) in line]
        self.assertTrue(old_line.startswith("#"), old_line)
        self.assertIn(b64(self.k1), old_line)

    @deferred_test
    async def test_every_listed_key_printed(self) -> None:
        _state, host = self.serve()
        _state.current = [self.k1, self.k2]
        result = await self.fetch(host, self.pki.ca.certificate)
        self.assertEqual(result.code, 0, result.err)
        self.assertEqual(
            yaml.safe_load(result.out)["verify_keys"],
            {key_id(self.k1): b64(self.k1), key_id(self.k2): b64(self.k2)},
        )

    @deferred_test
    async def test_through_the_cli(self) -> None:
        _state, host = self.serve()
        out, err = io.StringIO(), io.StringIO()
        argv = ["keys", "fetch", PARTNER_SERVER, "--host", host, "--ca", self.pki.ca.certificate]
        code = await threads.deferToThread(main, argv, out, err)
        self.assertEqual(code, 0, err.getvalue())
        self.assertEqual(
            yaml.safe_load(out.getvalue()), {"verify_keys": {key_id(self.k1): b64(self.k1)}}
        )

    @deferred_test
    async def test_wrong_ca_refused(self) -> None:
        state, host = self.serve()
        result = await self.fetch(host, self.pki.other_ca.certificate)
        self.assert_one_line_error(result, "certificate verify failed")
        self.assertEqual(state.hits, 0)

    @deferred_test
    async def test_certificate_from_other_ca_refused(self) -> None:
        state, host = self.serve(tls=self.pki.other_tls)
        result = await self.fetch(host, self.pki.ca.certificate)
        self.assert_one_line_error(result, "certificate verify failed")
        self.assertEqual(state.hits, 0)

    @deferred_test
    async def test_system_roots_do_not_trust_test_ca(self) -> None:
        state, host = self.serve()
        self.assert_one_line_error(await self.fetch(host, None), "certificate verify failed")
        self.assertEqual(state.hits, 0)

    @deferred_test
    async def test_name_checked_is_server_name(self) -> None:
        # The certificate is valid for partner.example, not for this name.
        state, host = self.serve()
        result = await self.fetch(host, self.pki.ca.certificate, name="other.example")
        self.assert_one_line_error(result, "other.example")
        self.assertEqual(state.hits, 0)

    @deferred_test
    async def test_unreachable(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            free = s.getsockname()[1]
        result = await self.fetch(f"127.0.0.1:{free}", self.pki.ca.certificate)
        self.assert_one_line_error(result, f"127.0.0.1:{free}")

    @deferred_test
    async def test_missing_ca_file(self) -> None:
        result = await self.fetch("127.0.0.1:1", os.path.join(self.mktemp(), "nope.pem"))
        self.assert_one_line_error(result, "nope.pem")

    @deferred_test
    async def test_ca_file_not_pem(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("not a certificate\n")
        self.assert_one_line_error(await self.fetch("127.0.0.1:1", path), "--ca")

    @deferred_test
    async def test_wrong_server_name_in_response(self) -> None:
        _state, host = self.serve(name_in_response="evil.example")
        result = await self.fetch(host, self.pki.ca.certificate)
        self.assert_one_line_error(result, "server_name")

    @deferred_test
    async def test_expired_response(self) -> None:
        _state, host = self.serve(valid_until_ms=int(time.time() * 1000) - DAY_MS)
        result = await self.fetch(host, self.pki.ca.certificate)
        self.assert_one_line_error(result, "valid_until_ts")

    @deferred_test
    async def test_unsigned_response(self) -> None:
        _state, host = self.serve(signers=[])
        result = await self.fetch(host, self.pki.ca.certificate)
        self.assert_one_line_error(result, "not self-signed")

    @deferred_test
    async def test_response_not_signed_by_every_key(self) -> None:
        state, host = self.serve(signers=[self.k1])
        state.current = [self.k1, self.k2]
        result = await self.fetch(host, self.pki.ca.certificate)
        self.assert_one_line_error(result, "not self-signed by " + key_id(self.k2))

    @deferred_test
    async def test_response_too_large(self) -> None:
        _state, host = self.serve(padding=1024 * 1024, streamed=True)
        result = await self.fetch(host, self.pki.ca.certificate)
        self.assert_one_line_error(result, "larger than")

    @deferred_test
    async def test_not_200(self) -> None:
        _state, host = self.serve(status=302, headers={b"location": b"https://evil.example/"})
        result = await self.fetch(host, self.pki.ca.certificate)
        self.assert_one_line_error(result, "HTTP 302")

    def test_bad_host_argument(self) -> None:
        result = _run(PARTNER_SERVER, "not a host:x", None)
        self.assert_one_line_error(result, "--host")

    def test_bad_server_name(self) -> None:
        self.assert_one_line_error(_run("bad name!", None, None), "not a server name")
