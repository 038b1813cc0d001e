"""Source-side facts of the packaging (setup.cfg, twisted/plugins, debian/).

These read the source tree next to `tests/`; they are skipped when the suite
runs from a copy of `tests/` against the installed package (ci-deb-check).
Building and installing the .deb is checked by scripts/ci-deb-check.
"""

from __future__ import annotations

import configparser
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent
DEBIAN = ROOT / "debian"

# setup.cfg requirement name (lower case) -> Debian 12 package.
DEBIAN_NAMES = {
    "twisted": "python3-twisted",
    "treq": "python3-treq",
    "service-identity": "python3-service-identity",
    "pyopenssl": "python3-openssl",
    "cryptography": "python3-cryptography",
    "signedjson": "python3-signedjson",
    "canonicaljson": "python3-canonicaljson",
    "pynacl": "python3-nacl",
    "prometheus-client": "python3-prometheus-client",
    "pyyaml": "python3-yaml",
}


def _require_source_tree() -> None:
    if not (ROOT / "setup.cfg").is_file() or not DEBIAN.is_dir():
        raise SkipTest("the source tree (setup.cfg, debian/) is not next to tests/")


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _unit_section(text: str, section: str) -> dict[str, list[str]]:
    """The `Key=value` lines of one section of a unit file, in order."""
    values: dict[str, list[str]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            continue
        if current == section:
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def _seconds(value: str) -> float:
    """A systemd time span of the forms used here: `45`, `45s`, `1min 30s`."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


def _control_paragraphs() -> list[dict[str, str]]:
    paragraphs: list[dict[str, str]] = []
    for block in re.split(r"\n\s*\n", _read(DEBIAN / "control")):
        fields: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line.startswith("#"):
                continue
            if line[:1] in (" ", "\t") and key is not None:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields:
            paragraphs.append(fields)
    return paragraphs


def _binary_depends() -> dict[str, str]:
    """Depends of the binary package sbg: package name -> version relation."""
    (binary,) = [p for p in _control_paragraphs() if p.get("Package") == "sbg"]
    depends: dict[str, str] = {}
    for item in binary["Depends"].replace("\n", " ").split(","):
        item = item.strip()
        m = re.fullmatch(r"(\S+)\s*(?:\((.*)\))?", item)
        assert m is not None, item
        depends[m.group(1)] = (m.group(2) or "").strip()
    return depends


def _install_requires() -> dict[str, str]:
    """setup.cfg install_requires: lower-case name -> minimum version."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg", encoding="utf-8")
    requires: dict[str, str] = {}
    for line in cfg["options"]["install_requires"].splitlines():
        line = line.strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)", line)
        assert m is not None, f"unexpected requirement form: {line!r}"
        requires[m.group(1).lower().replace("_", "-")] = m.group(2)
    return requires


class SystemdUnitTests(SynchronousTestCase):
    def setUp(self) -> None:
        _require_source_tree()
        self.text = _read(DEBIAN / "sbg.service")
        self.unit = _unit_section(self.text, "Unit")
        self.service = _unit_section(self.text, "Service")

    def assertDirective(self, key: str, value: str) -> None:
        self.assertEqual(self.service.get(key), [value], key)

    def test_runs_twistd3_plugin_with_the_etc_config(self) -> None:
        self.assertDirective("ExecStart", "/usr/bin/twistd3 -n --pidfile= sbg -c /etc/sbg/sbg.yaml")
        self.assertDirective("User", "sbg")

    def test_notifies_systemd_from_the_main_process_only(self) -> None:
        self.assertDirective("Type", "notify")
        # With workers, the workers are children: only the supervisor speaks.
        self.assertDirective("NotifyAccess", "main")

    def test_config_checked_before_start(self) -> None:
        self.assertDirective("ExecStartPre", "/usr/bin/sbg check-config /etc/sbg/sbg.yaml")

    def test_reload_checks_the_file_then_sends_sighup(self) -> None:
        # The first command failing fails `systemctl reload` and skips SIGHUP.
        self.assertEqual(
            self.service["ExecReload"],
            ["/usr/bin/sbg check-config /etc/sbg/sbg.yaml", "/bin/kill -HUP $MAINPID"],
        )
        self.assertIn("procps", _binary_depends(), "/bin/kill is in procps")

    def test_restarts_are_bounded(self) -> None:
        self.assertDirective("Restart", "on-failure")
        (delay,) = self.service["RestartSec"]
        (interval,) = self.unit["StartLimitIntervalSec"]
        (burst,) = self.unit["StartLimitBurst"]
        # A start that always fails reaches the limit within the interval.
        self.assertLess(int(burst) * _seconds(delay), _seconds(interval))
        self.assertLessEqual(int(burst), 10)

    def test_journal_identifier_and_open_files(self) -> None:
        self.assertDirective("SyslogIdentifier", "sbg")
        self.assertDirective("LimitNOFILE", "65536")

    def test_hardening_directives(self) -> None:
        for key, value in [
            ("AmbientCapabilities", "CAP_NET_BIND_SERVICE"),
            ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ReadWritePaths", "/var/lib/sbg"),
            ("PrivateTmp", "yes"),
            ("ProtectHome", "yes"),
            ("ProtectKernelTunables", "yes"),
            ("ProtectKernelModules", "yes"),
            ("ProtectKernelLogs", "yes"),
            ("ProtectControlGroups", "yes"),
            ("ProtectClock", "yes"),
            ("ProtectHostname", "yes"),
            ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
            ("RestrictNamespaces", "yes"),
            ("LockPersonality", "yes"),
            ("SystemCallArchitectures", "native"),
        ]:
            self.assertDirective(key, value)
        self.assertEqual(
            self.service["SystemCallFilter"], ["@system-service", "~@privileged @resources"]
        )

    def test_write_execute_memory_stays_allowed(self) -> None:
        # pyOpenSSL's TLS callbacks are cffi closures in W+X memory on
        # Debian 12: MemoryDenyWriteExecute=yes breaks every TLS context.
        self.assertDirective("MemoryDenyWriteExecute", "no")

    def test_stop_timeout_exceeds_default_shutdown_grace(self) -> None:
        (timeout,) = self.service["TimeoutStopSec"]
        self.assertGreater(_seconds(timeout), 30)

    def test_exposure_at_most_1_5(self) -> None:
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            self.fail(
                "systemd-analyze is missing: apt-get install systemd (scripts/bootstrap does)"
            )
        result = subprocess.run(
            [analyze, "security", "--offline=true", str(DEBIAN / "sbg.service")],
            capture_output=True,
            text=True,
            check=False,
        )
        m = re.search(r"Overall exposure level for sbg\.service: ([0-9.]+)", result.stdout)
        assert m is not None, result.stdout + result.stderr
        self.assertLessEqual(float(m.group(1)), 1.5, result.stdout)

    # `systemd-analyze verify` of the installed unit, and the unit running
    # under a real systemd, are in scripts/ci-deb-check.


class PluginTests(SynchronousTestCase):
    def setUp(self) -> None:
        _require_source_tree()

    def test_plugin_module_without_package_init(self) -> None:
        plugins = ROOT / "twisted" / "plugins"
        self.assertTrue((plugins / "sbg_plugin.py").is_file())
        # An __init__.py would make this tree shadow Twisted's own package.
        self.assertFalse((plugins / "__init__.py").exists())
        self.assertFalse((ROOT / "twisted" / "__init__.py").exists())

    def test_plugin_names_the_sbg_tap(self) -> None:
        spec = importlib.util.spec_from_file_location(
            "_sbg_plugin_under_test", ROOT / "twisted" / "plugins" / "sbg_plugin.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self.assertEqual(module.sbg.tapname, "sbg")
        self.assertEqual(module.sbg.module, "sbg.tap")

    def test_setup_cfg_ships_plugin_and_console_script(self) -> None:
        cfg = configparser.ConfigParser()
        cfg.read(ROOT / "setup.cfg", encoding="utf-8")
        include = cfg["options.packages.find"]["include"].replace(",", " ").split()
        self.assertIn("twisted.plugins", include)
        self.assertIn("sbg", include)
        scripts = cfg["options.entry_points"]["console_scripts"]
        self.assertIn("sbg = sbg.cli:main", [s.strip() for s in scripts.splitlines()])


class DebianControlTests(SynchronousTestCase):
    def setUp(self) -> None:
        _require_source_tree()

    def test_depends_on_every_runtime_dependency(self) -> None:
        depends = _binary_depends()
        requires = _install_requires()
        self.assertTrue(requires)
        for name, minimum in requires.items():
            self.assertIn(name, DEBIAN_NAMES, f"no Debian package known for {name}")
            package = DEBIAN_NAMES[name]
            self.assertIn(package, depends, f"debian/control does not depend on {package}")
            self.assertEqual(depends[package], f">= {minimum}", package)

    def test_recommends_the_cluster_extra(self) -> None:
        # Optional: only a node with a `cluster` block imports redis, and
        # `sbg check-config` names the package when it is missing.
        (binary,) = [p for p in _control_paragraphs() if p.get("Package") == "sbg"]
        cfg = configparser.ConfigParser()
        cfg.read(ROOT / "setup.cfg", encoding="utf-8")
        extra = cfg["options.extras_require"]["cluster"].split()
        self.assertEqual(extra, ["redis>=4.3.4"])
        self.assertEqual(binary["Recommends"], "python3-redis (>= 4.3.4)")
        self.assertNotIn("python3-redis", _binary_depends())

    def test_depends_on_generated_python_and_adduser(self) -> None:
        depends = _binary_depends()
        for name in ("${python3:Depends}", "${misc:Depends}", "adduser"):
            self.assertIn(name, depends)

    def test_builds_with_pybuild(self) -> None:
        (source,) = [p for p in _control_paragraphs() if "Source" in p]
        build_depends = source["Build-Depends"]
        for name in ("debhelper-compat", "dh-python", "python3-all", "python3-setuptools"):
            self.assertIn(name, build_depends)
        rules = DEBIAN / "rules"
        self.assertTrue(os.access(rules, os.X_OK))
        self.assertIn("--buildsystem=pybuild", _read(rules))
        self.assertEqual(_read(DEBIAN / "source" / "format").strip(), "3.0 (native)")

    def test_changelog_version_is_the_package_version(self) -> None:
        first = _read(DEBIAN / "changelog").splitlines()[0]
        m = re.match(r"sbg \(([^)]+)\) ", first)
        assert m is not None, first
        init = _read(ROOT / "sbg" / "__init__.py")
        self.assertIn(f'__version__ = "{m.group(1)}"', init)


class InstallLayoutTests(SynchronousTestCase):
    def setUp(self) -> None:
        _require_source_tree()

    def test_sample_config_becomes_etc_sbg_yaml(self) -> None:
        lines = _read(DEBIAN / "sbg.install").split("\n")
        self.assertIn("conf/sbg.yaml etc/sbg/", lines)
        self.assertTrue((ROOT / "conf" / "sbg.yaml").is_file())

    def test_ships_docs_man_pages_dashboard_and_alerts(self) -> None:
        install = _read(DEBIAN / "sbg.install").split("\n")
        for source in (
            "conf/sbg.yaml",
            "conf/grafana-dashboard.json",
            "conf/prometheus-alerts.yml",
        ):
            self.assertIn(f"{source} usr/share/sbg/", install)
            self.assertTrue((ROOT / source).is_file(), source)
        self.assertEqual(_read(DEBIAN / "sbg.manpages").split(), ["man/sbg.1", "man/sbg.yaml.5"])
        docs = _read(DEBIAN / "sbg.docs").split()
        self.assertEqual(sorted(docs), ["CHANGELOG.md", "README.md", "docs"])
        for doc in docs:
            self.assertTrue((ROOT / doc).exists(), doc)

    def test_maintainer_address_is_not_local(self) -> None:
        (source,) = [p for p in _control_paragraphs() if "Source" in p]
        self.assertRegex(source["Maintainer"], r"^[^<>]+ <[^@<>\s]+@[a-z0-9-]+(\.[a-z0-9-]+)+>$")
        signatures = re.findall(r"(?m)^ -- (.+?)  ", _read(DEBIAN / "changelog"))
        self.assertTrue(signatures)
        self.assertEqual(set(signatures), {source["Maintainer"]})

    def test_maintainer_scripts_parse(self) -> None:
        for name in ("sbg.postinst", "sbg.prerm", "sbg.postrm"):
            path = DEBIAN / name
            self.assertTrue(_read(path).startswith("#!/bin/sh\n"), name)
            result = subprocess.run(
                ["sh", "-n", str(path)], capture_output=True, text=True, check=False
            )
            self.assertEqual((result.returncode, result.stderr), (0, ""), name)
            self.assertIn("#DEBHELPER#", _read(path))

    def test_postinst_user_and_permissions(self) -> None:
        text = _read(DEBIAN / "sbg.postinst")
        self.assertRegex(text, r"adduser [^\n]*--system")
        self.assertIn("statoverride root sbg 0750 /etc/sbg\n", text)
        self.assertIn("statoverride sbg sbg 0700 /var/lib/sbg\n", text)
        self.assertIn("/usr/bin/python3 -c 'from twisted.plugin import", text)


class MaintainerScriptTests(SynchronousTestCase):
    """debian/sbg.postinst and sbg.prerm run with stand-ins recording the calls.

    The stand-ins replace systemctl, deb-systemd-invoke, setpriv, sbg and
    the account tools; `/run/systemd/system` (present when systemd runs)
    becomes a directory of the test's. scripts/ci-deb-check runs the real
    scripts under a real systemd."""

    def setUp(self) -> None:
        _require_source_tree()

    def run_script(
        self,
        name: str,
        *args: str,
        active: bool = True,
        config_ok: bool = True,
        systemd: bool = True,
    ) -> tuple[int, list[str], str]:
        """Exit status, the calls made (one line each) and stderr."""
        tmp = Path(self.mktemp()).resolve()
        bin_dir = tmp / "bin"
        bin_dir.mkdir(parents=True)
        calls = tmp / "calls"
        systemd_dir = tmp / "run-systemd-system"
        if systemd:
            systemd_dir.mkdir()

        def stub(command: str, body: str = "exit 0") -> None:
            path = bin_dir / command
            path.write_text(
                f'#!/bin/sh\necho "{command} $*" >> "{calls}"\n{body}\n', encoding="utf-8"
            )
            path.chmod(0o755)

        for command in ("deb-systemd-invoke", "deb-systemd-helper", "dpkg-statoverride"):
            stub(command)
        for command in ("getent", "addgroup", "adduser", "python3"):
            stub(command)
        stub(
            "systemctl",
            f'case "$*" in *is-active*) exit {0 if active else 3} ;; esac\nexit 0',
        )
        # setpriv ... -- COMMAND...: run COMMAND.
        stub("setpriv", 'while [ "$1" != -- ]; do shift; done\nshift\nexec "$@"')
        stub(
            "sbg",
            "exit 0" if config_ok else 'echo "no_such_key: unknown key" >&2\nexit 1',
        )
        text = (
            _read(DEBIAN / name)
            .replace("/run/systemd/system", str(systemd_dir))
            .replace("/usr/bin/sbg", str(bin_dir / "sbg"))
            .replace("/usr/bin/python3", str(bin_dir / "python3"))
        )
        script = tmp / name
        script.write_text(text, encoding="utf-8")
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "LANG": "C.UTF-8"}
        result = subprocess.run(
            ["sh", str(script), *args], env=env, capture_output=True, text=True, check=False
        )
        lines = calls.read_text(encoding="utf-8").splitlines() if calls.exists() else []
        service_calls = [
            line.replace(str(bin_dir) + "/", "")
            for line in lines
            if line.split()[0] in ("systemctl", "deb-systemd-invoke", "setpriv", "sbg")
        ]
        return result.returncode, service_calls, result.stderr

    def test_upgrade_restarts_a_running_gateway_once_its_config_passes(self) -> None:
        rc, calls, _ = self.run_script("sbg.postinst", "configure", "0.1.0")
        self.assertEqual(rc, 0)
        self.assertEqual(
            calls,
            [
                "systemctl --system daemon-reload",
                "systemctl --quiet is-active sbg.service",
                "setpriv --reuid=sbg --regid=sbg --init-groups -- sbg check-config /etc/sbg/sbg.yaml",
                "sbg check-config /etc/sbg/sbg.yaml",
                "deb-systemd-invoke try-restart sbg.service",
            ],
        )

    def test_upgrade_keeps_the_running_gateway_when_the_new_code_refuses_its_config(
        self,
    ) -> None:
        rc, calls, err = self.run_script("sbg.postinst", "configure", "0.1.0", config_ok=False)
        self.assertEqual(rc, 0)
        self.assertNotIn("deb-systemd-invoke try-restart sbg.service", calls)
        self.assertIn("sbg check-config /etc/sbg/sbg.yaml", calls)
        self.assertIn("sbg.service was NOT restarted", err)
        self.assertIn("  no_such_key: unknown key", err)
        self.assertIn("systemctl restart sbg", err)

    def test_upgrade_leaves_a_stopped_gateway_stopped(self) -> None:
        rc, calls, _ = self.run_script("sbg.postinst", "configure", "0.1.0", active=False)
        self.assertEqual(rc, 0)
        self.assertEqual(
            calls, ["systemctl --system daemon-reload", "systemctl --quiet is-active sbg.service"]
        )

    def test_installation_starts_nothing(self) -> None:
        rc, calls, _ = self.run_script("sbg.postinst", "configure", "")
        self.assertEqual((rc, calls), (0, []))

    def test_without_systemd_nothing_is_asked_of_it(self) -> None:
        rc, calls, _ = self.run_script("sbg.postinst", "configure", "0.1.0", systemd=False)
        self.assertEqual((rc, calls), (0, []))
        rc, calls, _ = self.run_script("sbg.prerm", "remove", systemd=False)
        self.assertEqual((rc, calls), (0, []))

    def test_remove_stops_the_gateway_upgrade_does_not(self) -> None:
        rc, calls, _ = self.run_script("sbg.prerm", "remove")
        self.assertEqual((rc, calls), (0, ["deb-systemd-invoke stop sbg.service"]))
        rc, calls, _ = self.run_script("sbg.prerm", "upgrade", "0.3.0")
        self.assertEqual((rc, calls), (0, []))

    def test_debhelper_neither_stops_nor_starts_the_unit(self) -> None:
        # Else debhelper's preinst would stop the gateway for every upgrade.
        rules = _read(DEBIAN / "rules")
        self.assertIn("dh_installsystemd --no-enable --no-start --no-stop-on-upgrade\n", rules)

    def test_purge_deletes_the_state_and_keeps_the_user(self) -> None:
        text = _read(DEBIAN / "sbg.postrm")
        purge = text.split("    purge)\n", 1)[1].split(";;", 1)[0]
        self.assertIn("rm -rf /var/lib/sbg\n", purge)
        self.assertNotRegex(text, r"(?m)^[^#]*\b(deluser|delgroup|userdel|groupdel)\b")
