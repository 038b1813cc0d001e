"""Logs cannot be forged: what comes from the wire is escaped in text logs.

A peer controls bytes that end up in log lines (a CONNECT target, a request
path, a method). In `log_format: text` every control character among them
(ESC, CR, LF, TAB, ...) is written as `\\xNN`, so a peer cannot erase a
line, recolour the terminal or fake a second record.
"""

from __future__ import annotations

import io
import logging
import socket

from twisted.internet import threads
from twisted.trial.unittest import SynchronousTestCase

from sbg.logsetup import LogWriter, WriterHandler, escape_controls
from testbed.configtools import DELETE
from tests.asynctest import TestCase
from tests.gateway import start_gateway


class EscapeTests(SynchronousTestCase):
    def test_every_control_character_is_escaped(self) -> None:
        raw = "".join(chr(c) for c in [*range(32), 127, *range(0x80, 0xA0)])
        escaped = escape_controls("a" + raw + "b")
        self.assertTrue(escaped.isprintable(), escaped)
        self.assertIn("\\x1b", escaped)
        self.assertIn("\\x0a\\x0b\\x0c\\x0d", escaped)
        self.assertIn("\\x09", escaped)
        self.assertEqual(escape_controls("plain é text"), "plain é text")

    def test_one_record_one_line(self) -> None:
        out = io.StringIO()
        writer = LogWriter(out, "text", "info")
        writer.write(
            levelno=logging.INFO,
            logger="sbg.audit",
            message="outbound deny 400 CONNECT evil\r\n2026-01-01T00:00:00 [sbg.audit] INFO: fake",
        )
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 1)
        self.assertIn("\\x0d\\x0a2026-01-01", lines[0])


class WireTests(TestCase):
    async def test_connect_line_with_control_bytes_is_logged_escaped(self) -> None:
        gw = await start_gateway(self, {"outbound.proxy_auth": DELETE})
        out = io.StringIO()
        handler = WriterHandler(LogWriter(out, "text", "info"))
        audit = logging.getLogger("sbg.audit")
        audit.addHandler(handler)
        self.addCleanup(audit.removeHandler, handler)

        def send() -> bytes:
            sock = socket.create_connection(("127.0.0.1", gw.ports["outbound"]), timeout=5)
            try:
                sock.sendall(b"CONNECT evil\x1b[2K\x1b[1Aok\x07\x08:443 HTTP/1.1\r\n\r\n")
                return sock.recv(4096)
            finally:
                sock.close()

        answer = await threads.deferToThread(send)
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer)
        text = out.getvalue()
        self.assertIn("evil\\x1b[2K\\x1b[1Aok\\x07\\x08:443", text)
        self.assertNotIn("\x1b", text)
        self.assertEqual(len(text.splitlines()), 1)
