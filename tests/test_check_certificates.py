"""`sbg check-config` on certificate dates and names, and on `state_dir`.

Every certificate and CA the configuration names is checked (an internal
server's `tls.certificate` and `upstream_ca`, `outbound.ca.certificate`, an
external server's `tls_ca`): expired is an error naming the key path and
the date, expiring within 30 days a warning (exit 0). The same lines refuse
a reload and a start.
"""

from __future__ import annotations

import datetime
import io
import logging
import os
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from sbg.commands.check_config import run
from testbed.configtools import (
    INTERNAL_HOST,
    INTERNAL_SERVER,
    Material,
    make_material,
    write_config,
)
from testbed.tlstools import CertFiles, issue_cert, make_ca
from tests.asynctest import TestCase
from tests.gateway import rewrite, start_gateway
from tests.processes import make_setup, run_gateway, spawn, wait_until

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


def when(t: datetime.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def dated_ca(directory: str, name: str, *, days_left: float) -> CertFiles:
    """A CA whose notAfter is DAYS_LEFT days from now (negative: past)."""
    return make_ca(
        os.path.join(directory, name),
        f"{name} CA",
        not_before=NOW - 400 * DAY,
        not_after=(NOW + days_left * DAY).replace(microsecond=0),
    )


def dated_cert(
    ca: CertFiles, directory: str, name: str, names: list[str], *, days_left: float
) -> CertFiles:
    return issue_cert(
        ca,
        os.path.join(directory, name),
        name,
        names,
        not_before=NOW - 100 * DAY,
        not_after=(NOW + days_left * DAY).replace(microsecond=0),
    )


def concat(path: str, *files: str) -> str:
    with open(path, "wb") as out:
        for name in files:
            with open(name, "rb") as f:
                out.write(f.read())
    return path


class CertificateDateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        self.m: Material = make_material(self.directory)

    def check(self, overrides: dict[str, Any]) -> tuple[int, str, str]:
        path = write_config(self.directory, overrides, material=self.m)
        out, err = io.StringIO(), io.StringIO()
        code = run(path, False, out, err)
        return code, out.getvalue(), err.getvalue()

    def _expired_and_soon(self) -> dict[str, tuple[str, str, dict[str, Any]]]:
        """key path -> (expired file, soon expiring file, overrides template)."""
        d = self.directory
        cases: dict[str, tuple[str, str, dict[str, Any]]] = {}
        # Inbound certificate (key and certificate must match: both issued).
        old = dated_cert(self.m.internal_ca, d, "old-in", [INTERNAL_HOST], days_left=-3)
        soon = dated_cert(self.m.internal_ca, d, "soon-in", [INTERNAL_HOST], days_left=10)
        cases["internal_homeservers[0].tls.certificate"] = (
            old.certificate,
            soon.certificate,
            {"internal_homeservers[0].tls.private_key": "{key}"},
        )
        cases["internal_homeservers[0].upstream_ca"] = (
            dated_ca(d, "old-up", days_left=-3).certificate,
            dated_ca(d, "soon-up", days_left=10).certificate,
            {"internal_homeservers[0].upstream": "https://127.0.0.1:8448"},
        )
        old_ca = dated_ca(d, "old-out", days_left=-3)
        soon_ca = dated_ca(d, "soon-out", days_left=10)
        cases["outbound.ca.certificate"] = (
            old_ca.certificate,
            soon_ca.certificate,
            {"outbound.ca.private_key": "{key}"},
        )
        cases["external_homeservers[0].tls_ca"] = (
            dated_ca(d, "old-ext", days_left=-3).certificate,
            dated_ca(d, "soon-ext", days_left=10).certificate,
            {},
        )
        return cases

    @staticmethod
    def _overrides(key: str, cert: str, template: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {key: cert}
        for k, v in template.items():
            out[k] = cert[: -len(".crt")] + ".key" if v == "{key}" else v
        return out

    def test_expired_is_an_error_with_key_path_and_date(self) -> None:
        for key, (old, _soon, template) in self._expired_and_soon().items():
            code, out, err = self.check(self._overrides(key, old, template))
            self.assertEqual(code, 1, (key, err))
            self.assertEqual(out, "")
            lines = err.splitlines()
            mine = [line for line in lines if line.startswith(key + ": ")]
            self.assertEqual(len(mine), 1, (key, lines))
            expiry = (NOW - 3 * DAY).replace(microsecond=0)
            self.assertIn(f"{old} expired on {when(expiry)}", mine[0])

    def test_expiring_within_30_days_is_a_warning(self) -> None:
        for key, (_old, soon, template) in self._expired_and_soon().items():
            code, out, err = self.check(self._overrides(key, soon, template))
            self.assertEqual(code, 0, (key, err))
            self.assertIn(": OK", out)
            lines = err.splitlines()
            self.assertEqual(len(lines), 1, (key, lines))
            self.assertTrue(lines[0].startswith(f"warning: {key}: {soon} "), lines[0])
            expiry = (NOW + 10 * DAY).replace(microsecond=0)
            self.assertIn(when(expiry), lines[0])
            self.assertRegex(lines[0], r"in (9|10) days")

    def test_valid_certificates_say_nothing(self) -> None:
        code, _out, err = self.check({})
        self.assertEqual((code, err), (0, ""))

    def test_bundle_with_one_expired_ca_still_trusts_the_other(self) -> None:
        old = dated_ca(self.directory, "b-old", days_left=-30)
        bundle = concat(
            os.path.join(self.directory, "bundle.pem"),
            old.certificate,
            self.m.partner_ca.certificate,
        )
        code, _out, err = self.check({"external_homeservers[0].tls_ca": bundle})
        self.assertEqual(code, 0, err)
        (line,) = err.splitlines()
        self.assertTrue(line.startswith("warning: external_homeservers[0].tls_ca: "), line)
        self.assertIn("certificate 1 (CN=b-old CA) expired on", line)
        # Every CA of the bundle expired: nothing is trusted any more.
        older = dated_ca(self.directory, "b-older", days_left=-1)
        dead = concat(os.path.join(self.directory, "dead.pem"), old.certificate, older.certificate)
        code, _out, err = self.check({"external_homeservers[0].tls_ca": dead})
        self.assertEqual(code, 1)
        self.assertEqual(len(err.splitlines()), 2, err)

    def test_expired_intermediate_in_the_chain_is_a_warning(self) -> None:
        inter = dated_ca(self.directory, "inter", days_left=-1)
        leaf = issue_cert(inter, self.directory, "leaf", [INTERNAL_HOST, INTERNAL_SERVER])
        chain = concat(
            os.path.join(self.directory, "chain.crt"), leaf.certificate, inter.certificate
        )
        code, _out, err = self.check(
            {
                "internal_homeservers[0].tls.certificate": chain,
                "internal_homeservers[0].tls.private_key": leaf.private_key,
            }
        )
        self.assertEqual(code, 0, err)
        (line,) = err.splitlines()
        self.assertIn("certificate 2 (CN=inter CA) expired on", line)
        self.assertIn("clients that build the chain through it refuse it", line)


class CertificateNameTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        self.m = make_material(self.directory)

    def check(self, names: list[str], hosts: list[str]) -> tuple[int, str]:
        cert = issue_cert(self.m.internal_ca, self.directory, "named", names)
        path = write_config(
            self.directory,
            {
                "internal_homeservers[0].tls.certificate": cert.certificate,
                "internal_homeservers[0].tls.private_key": cert.private_key,
                "internal_homeservers[0].federation_hosts": hosts,
            },
            material=self.m,
        )
        err = io.StringIO()
        return run(path, False, io.StringIO(), err), err.getvalue()

    def test_certificate_for_the_wrong_host(self) -> None:
        code, err = self.check(["wrong.example"], [INTERNAL_HOST])
        self.assertEqual(code, 1)
        self.assertEqual(
            err.splitlines(),
            [
                f"internal_homeservers[0].tls.certificate: {self.directory}/named.crt is not "
                f"valid for {INTERNAL_HOST} (internal_homeservers[0].federation_hosts[0]): "
                "it names wrong.example"
            ],
        )

    def test_every_host_must_be_covered(self) -> None:
        code, err = self.check(
            [INTERNAL_HOST, "*.example.org"],
            [INTERNAL_HOST, "a.example.org:8448", "b.c.example.org", "127.0.0.1"],
        )
        self.assertEqual(code, 1)
        lines = err.splitlines()
        self.assertEqual(len(lines), 2, lines)
        self.assertIn("not valid for b.c.example.org (", lines[0])
        self.assertIn("federation_hosts[2]", lines[0])
        self.assertIn("not valid for 127.0.0.1 (", lines[1])

    def test_wildcard_and_case(self) -> None:
        code, err = self.check(["*.Internal.Example"], [INTERNAL_HOST.upper()])
        self.assertEqual((code, err), (0, ""))


class StateDirTests(SynchronousTestCase):
    def test_state_dir_that_is_a_file(self) -> None:
        directory = os.path.abspath(self.mktemp())
        m = make_material(directory)
        not_a_dir = os.path.join(directory, "passwd")
        with open(not_a_dir, "w") as f:
            f.write("root:x:0:0::/root:/bin/sh\n")
        path = write_config(directory, {"state_dir": not_a_dir}, material=m)
        err = io.StringIO()
        self.assertEqual(run(path, False, io.StringIO(), err), 1)
        self.assertEqual(err.getvalue(), f"state_dir: {not_a_dir} exists and is not a directory\n")
        # Missing is fine: the gateway creates it.
        path = write_config(directory, {"state_dir": "nowhere/yet"}, material=m)
        self.assertEqual(run(path, False, io.StringIO(), io.StringIO()), 0)


class ReloadAndStartTests(TestCase):
    async def test_reload_with_an_expired_certificate_is_refused_with_the_same_lines(self) -> None:
        gw = await start_gateway(self)
        old = dated_cert(
            gw.material.internal_ca,
            gw.material.directory,
            "expired",
            [INTERNAL_HOST, INTERNAL_SERVER],
            days_left=-2,
        )
        rewrite(
            gw,
            {
                "internal_homeservers[0].tls.certificate": old.certificate,
                "internal_homeservers[0].tls.private_key": old.private_key,
            },
        )
        expected = io.StringIO()
        self.assertEqual(run(gw.config_path, False, io.StringIO(), expected), 1)
        lines = expected.getvalue().splitlines()
        self.assertEqual(len(lines), 1)
        seen: list[str] = []

        class Capture(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                seen.append(record.getMessage())

        handler = Capture()
        logging.getLogger("sbg.service").addHandler(handler)
        self.addCleanup(logging.getLogger("sbg.service").removeHandler, handler)
        policy = gw.service.runtime.policy
        self.assertFalse(gw.service.reload())
        self.assertIs(gw.service.runtime.policy, policy)
        self.assertEqual(seen, [f"reload refused: {lines[0]}"])

    async def test_start_refused_one_line_per_problem(self) -> None:
        setup = make_setup(self)
        m = setup.material
        old = dated_cert(
            m.internal_ca,
            setup.directory,
            "expired",
            [INTERNAL_HOST, INTERNAL_SERVER],
            days_left=-2,
        )
        not_a_dir = os.path.join(setup.directory, "state-file")
        with open(not_a_dir, "w") as f:
            f.write("x")
        setup.overrides.update(
            {
                "internal_homeservers[0].tls.certificate": old.certificate,
                "internal_homeservers[0].tls.private_key": old.private_key,
                "state_dir": not_a_dir,
            }
        )
        setup.write()
        expected = io.StringIO()
        self.assertEqual(run(setup.path, False, io.StringIO(), expected), 1)
        lines = expected.getvalue().splitlines()
        self.assertEqual(len(lines), 2, lines)
        proc = spawn(self, setup)
        self.assertEqual(await proc.wait(), 1)
        errors = proc.errors()
        for line in lines:
            self.assertIn(line + "\n", errors)
        self.assertNotIn("Traceback", errors + proc.output())

    async def test_start_logs_the_warnings(self) -> None:
        setup = make_setup(self)
        soon = dated_cert(
            setup.material.internal_ca,
            setup.directory,
            "soon",
            [INTERNAL_HOST, INTERNAL_SERVER],
            days_left=12,
        )
        setup.overrides.update(
            {
                "internal_homeservers[0].tls.certificate": soon.certificate,
                "internal_homeservers[0].tls.private_key": soon.private_key,
            }
        )
        setup.write()
        proc = await run_gateway(self, setup)
        await wait_until(
            lambda: (
                "[sbg.config] WARNING: internal_homeservers[0].tls.certificate: " in proc.output()
            ),
            10,
            "the warning",
            proc,
        )
        self.assertIn(f"{soon.certificate} expires on", proc.output())
