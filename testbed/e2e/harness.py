"""Real Synapse homeservers (and sbg) on loopback for the end-to-end tests.

Topology (server names carry an explicit port, so Synapse skips well-known
and SRV lookups and resolves the bare host through its own hosts file):

- ``hs-int.test:8448``: internal. Client API http://127.0.0.2:8008. Behind sbg
  its federation listener is plain HTTP on 127.0.0.2:8009 (sbg serves its TLS
  on 127.0.0.10:8448) and its outbound federation goes through sbg's proxy
  127.0.0.10:3128; without sbg it serves TLS itself on 127.0.0.2:8448.
- ``hs-ext.test:8448``: trusted external, client 127.0.0.3:8008, TLS 127.0.0.3:8448.
- ``hs-evil.test:8448``: not configured in sbg, client 127.0.0.4:8008, TLS 127.0.0.4:8448.
- ``hs-partner.test:8448``: a second trusted external server, at the V2 trust
  level ``partner``; client 127.0.0.5:8008, TLS 127.0.0.5:8448.

Behind sbg, hs-int runs the room rules module (``sbg.synapse.RoomRules``,
reading sbg's own sbg.yaml) unless the cluster is made with
``room_rules=False``; its metrics listener is 127.0.0.2:9101.

Each Synapse runs in its own mount namespace with its own /etc/hosts and
/etc/resolv.conf (``unshare -m``; the machine's files are never touched), with
no proxy variables in its environment. Every process is stopped by
``Cluster.stop`` (SIGTERM, then SIGKILL of its process group), which
``start_cluster`` registers as a test cleanup before anything starts.
"""

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from twisted.trial.unittest import SkipTest, TestCase

from testbed.configtools import EXTERNAL_GROUPS
from testbed.e2e.matrix_client import MatrixClient
from testbed.e2e.processes import ManagedProcess, ProcessError, clean_environment
from testbed.pki import (
    CertFiles,
    SigningKeyFiles,
    issue_server_cert,
    make_ca,
    make_signing_key,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SYNAPSE_VENV = os.environ.get("SBG_E2E_SYNAPSE_VENV", os.path.join(REPO, ".venv-synapse"))
SBG_VENV = os.path.join(REPO, ".venv")

SYNAPSE_START_TIMEOUT = 120.0
SBG_START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0

# The /24 of loopback the suite uses: SBG_E2E_NET=127.0.1 lets a second
# checkout run its end-to-end suite at the same time without a clash.
E2E_NET = os.environ.get("SBG_E2E_NET", "127.0.0")
SBG_ADDRESS = f"{E2E_NET}.10"
SBG_INBOUND_PORT = 8448
SBG_OUTBOUND_PORT = 3128
SBG_ADMIN_PORT = 9000

# Every endpoint group the scenarios exercise: the V1 trust level's.
SCENARIO_GROUPS = list(EXTERNAL_GROUPS)


@dataclass(frozen=True)
class HomeserverSpec:
    """Where one test homeserver lives."""

    key: str  # short name: "hs-int"
    host: str  # "hs-int.test"
    address: str  # its own loopback address
    ca: str  # which test CA signs its TLS certificate
    client_port: int = 8008
    federation_port: int = 8448  # TLS federation (when it serves TLS itself)
    plain_federation_port: int = 8009  # plain HTTP federation (behind sbg)

    @property
    def server_name(self) -> str:
        return f"{self.host}:{self.federation_port}"

    @property
    def client_url(self) -> str:
        return f"http://{self.address}:{self.client_port}"


HS_INT = HomeserverSpec(key="hs-int", host="hs-int.test", address=f"{E2E_NET}.2", ca="internal")
HS_EXT = HomeserverSpec(key="hs-ext", host="hs-ext.test", address=f"{E2E_NET}.3", ca="external")
HS_EVIL = HomeserverSpec(key="hs-evil", host="hs-evil.test", address=f"{E2E_NET}.4", ca="evil")
HS_PARTNER = HomeserverSpec(
    key="hs-partner", host="hs-partner.test", address=f"{E2E_NET}.5", ca="external"
)
ALL_HOMESERVERS = (HS_INT, HS_EXT, HS_EVIL, HS_PARTNER)
# The external servers sbg trusts, with their trust level.
TRUSTED_EXTERNALS = {HS_EXT.key: "external", HS_PARTNER.key: "partner"}
METRICS_PORT = 9101
# The room settings of the partner level (V2); "external" keeps the defaults (V1).
PARTNER_ROOMS = {"invite": "private_rooms", "join_public": True, "max_power_level": 50}
# Groups only the partner level has (room discovery and knocking), and the
# knocks hs-ext may send so that the room rules, not the groups, refuse them.
PARTNER_GROUPS = ["public_rooms", "queries_directory", "hierarchy", "knocks"]
TEST_CAS = ("internal", "external", "evil")


def synapse_available() -> str | None:
    """None if the Synapse venv and unshare are usable, else why not."""
    python = os.path.join(SYNAPSE_VENV, "bin", "python")
    if not os.path.exists(python):
        return f"no Synapse venv at {SYNAPSE_VENV} (run scripts/install-synapse)"
    if shutil.which("unshare") is None:
        return "unshare(1) not found"
    if os.geteuid() != 0:
        return "private /etc/hosts per homeserver needs root (unshare -m + bind mounts)"
    return None


def require_synapse() -> None:
    """Skip the calling test when Synapse cannot run, unless SBG_E2E_REQUIRED=1."""
    why = synapse_available()
    if why is None:
        return
    if os.environ.get("SBG_E2E_REQUIRED") == "1":
        raise AssertionError(f"end-to-end tests required but {why}")
    raise SkipTest(why)


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True when URL answers 200 (plain HTTP, no proxy)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


# ---------------------------------------------------------------- Synapse


def hosts_file_text(mapping: Mapping[str, str]) -> str:
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines += [f"{address}\t{host}" for host, address in sorted(mapping.items())]
    return "\n".join(lines) + "\n"


RESOLV_CONF = "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"


def room_rules_config(sbg_yaml: str | None) -> dict[str, Any]:
    """homeserver.yaml keys loading the room rules module (none without SBG_YAML)."""
    if sbg_yaml is None:
        return {}
    return {"modules": [{"module": "sbg.synapse.RoomRules", "config": {"sbg_config": sbg_yaml}}]}


def synapse_environment(room_rules: bool) -> dict[str, str]:
    """A test homeserver's environment; with the room rules, sbg is importable
    (this checkout first on PYTHONPATH; sbg's own dependencies are Synapse's)."""
    env = {"PYTHONDONTWRITEBYTECODE": "1"}
    if room_rules:
        env["PYTHONPATH"] = REPO
    return env


def homeserver_config(
    spec: HomeserverSpec,
    directory: str,
    *,
    signing_key: SigningKeyFiles,
    tls: CertFiles | None,
    custom_ca_files: list[str],
    shared_secret: str,
    https_proxy: str | None,
    serve_tls_federation: bool,
    serve_plain_federation: bool,
    extra: Mapping[str, Any] | None = None,
    metrics_port: int | None = None,
) -> dict[str, Any]:
    """The homeserver.yaml contents for SPEC (a dict, dumped by the caller)."""
    listeners: list[dict[str, Any]] = [
        {
            "port": spec.client_port,
            "bind_addresses": [spec.address],
            "type": "http",
            "tls": False,
            "x_forwarded": False,
            "resources": [{"names": ["client"], "compress": False}],
        }
    ]
    if serve_tls_federation:
        listeners.append(
            {
                "port": spec.federation_port,
                "bind_addresses": [spec.address],
                "type": "http",
                "tls": True,
                "resources": [{"names": ["federation"], "compress": False}],
            }
        )
    if serve_plain_federation:
        listeners.append(
            {
                "port": spec.plain_federation_port,
                "bind_addresses": [spec.address],
                "type": "http",
                "tls": False,
                "x_forwarded": False,
                "resources": [{"names": ["federation"], "compress": False}],
            }
        )
    if metrics_port is not None:
        listeners.append(
            {"port": metrics_port, "bind_addresses": [spec.address], "type": "metrics"}
        )
    relaxed = {"per_second": 1000, "burst_count": 1000}
    config: dict[str, Any] = {
        "server_name": spec.server_name,
        "public_baseurl": spec.client_url + "/",
        "listeners": listeners,
        "database": {
            "name": "sqlite3",
            "args": {"database": os.path.join(directory, "homeserver.db")},
        },
        "media_store_path": os.path.join(directory, "media_store"),
        "signing_key_path": signing_key.path,
        "trusted_key_servers": [],
        "suppress_key_server_warning": True,
        "ip_range_whitelist": ["127.0.0.0/8"],
        "federation_verify_certificates": True,
        "federation_custom_ca_list": custom_ca_files,
        "registration_shared_secret": shared_secret,
        "macaroon_secret_key": secrets.token_hex(16),
        "form_secret": secrets.token_hex(16),
        "report_stats": False,
        "enable_metrics": metrics_port is not None,
        "allow_public_rooms_over_federation": True,
        "room_list_publication_rules": [{"action": "allow"}],
        "presence": {"enabled": False},
        "url_preview_enabled": False,
        "federation": {
            "destination_min_retry_interval": "2s",
            "destination_max_retry_interval": "10s",
        },
        "rc_message": relaxed,
        "rc_registration": relaxed,
        "rc_login": {"address": relaxed, "account": relaxed, "failed_attempts": relaxed},
        "rc_joins": {"local": relaxed, "remote": relaxed},
        "rc_joins_per_room": relaxed,
        "rc_invites": {"per_room": relaxed, "per_user": relaxed, "per_issuer": relaxed},
        "rc_key_requests": relaxed,
        "rc_media_create": relaxed,
        "rc_profile": relaxed,
        "rc_room_creation": relaxed,
        "rc_admin_redaction": relaxed,
        "rc_3pid_validation": relaxed,
        "rc_federation": {
            "window_size": 1000,
            "sleep_limit": 1000,
            "sleep_delay": 1,
            "reject_limit": 1000,
            "concurrent": 100,
        },
    }
    if tls is not None:
        config["tls_certificate_path"] = tls.certificate
        config["tls_private_key_path"] = tls.private_key
    if https_proxy is not None:
        config["https_proxy"] = https_proxy
    config.update(extra or {})
    return config


class Homeserver:
    """One Synapse process in its own mount namespace."""

    def __init__(
        self,
        spec: HomeserverSpec,
        run_dir: str,
        *,
        tls: CertFiles,
        custom_ca_files: list[str],
        hosts: Mapping[str, str],
        behind_sbg: bool = False,
        https_proxy: str | None = None,
        extra_config: Mapping[str, Any] | None = None,
        room_rules: str | None = None,
    ) -> None:
        """ROOM_RULES: the sbg.yaml the room rules module reads (None: no module)."""
        self.spec = spec
        self.room_rules = room_rules
        self.behind_sbg = behind_sbg
        self.directory = os.path.join(run_dir, spec.key)
        os.makedirs(self.directory, exist_ok=True)
        self.tls = tls
        self.signing_key = make_signing_key(os.path.join(self.directory, "signing.key"))
        self.shared_secret = secrets.token_hex(16)
        self.hosts_path = os.path.join(self.directory, "hosts")
        self.resolv_path = os.path.join(self.directory, "resolv.conf")
        self.config_path = os.path.join(self.directory, "homeserver.yaml")
        self.log_path = os.path.join(self.directory, "synapse.log")
        self.write_hosts(hosts)
        with open(self.resolv_path, "w") as f:
            f.write(RESOLV_CONF)
        config = homeserver_config(
            spec,
            self.directory,
            signing_key=self.signing_key,
            tls=None if behind_sbg else tls,
            custom_ca_files=custom_ca_files,
            shared_secret=self.shared_secret,
            https_proxy=https_proxy,
            serve_tls_federation=not behind_sbg,
            serve_plain_federation=behind_sbg,
            extra={**room_rules_config(room_rules), **(extra_config or {})},
            metrics_port=METRICS_PORT if room_rules else None,
        )
        with open(self.config_path, "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        python = os.path.join(SYNAPSE_VENV, "bin", "python")
        script = (
            'mount --bind "$1" /etc/hosts && mount --bind "$2" /etc/resolv.conf '
            '&& shift 2 && exec "$@"'
        )
        argv = ["unshare", "-m", "sh", "-c", script, "sh", self.hosts_path, self.resolv_path]
        argv += [python, "-m", "synapse.app.homeserver", "-c", self.config_path]
        self.process = ManagedProcess(
            spec.key,
            argv,
            stdout_path=self.log_path,
            env=clean_environment(synapse_environment(room_rules is not None)),
            cwd=self.directory,
        )

    # -- facts the tests and the sbg config need

    @property
    def server_name(self) -> str:
        return self.spec.server_name

    @property
    def verify_key_id(self) -> str:
        return self.signing_key.key_id

    @property
    def verify_key_base64(self) -> str:
        return self.signing_key.verify_key_base64

    @property
    def client_url(self) -> str:
        return self.spec.client_url

    @property
    def metrics_url(self) -> str:
        return f"http://{self.spec.address}:{METRICS_PORT}/_synapse/metrics"

    def user_id(self, localpart: str) -> str:
        return f"@{localpart}:{self.server_name}"

    # -- process control

    def write_hosts(self, mapping: Mapping[str, str]) -> None:
        """Rewrite this homeserver's hosts file in place.

        The file keeps its inode, so the running namespace's bind mount sees
        the change; Synapse resolves with getaddrinfo, so new connections use
        it (connections already kept alive do not).
        """
        with open(self.hosts_path, "w") as f:
            f.write(hosts_file_text(mapping))

    def start(self) -> None:
        self.process.start()

    def wait_ready(self, timeout: float = SYNAPSE_START_TIMEOUT) -> float:
        return self.process.wait_ready(
            lambda: http_ok(self.client_url + "/_matrix/client/versions"), timeout
        )

    def stop(self) -> int | None:
        return self.process.stop(STOP_TIMEOUT)

    def register(
        self, localpart: str, password: str | None = None, admin: bool = False
    ) -> MatrixClient:
        """Create a user through the shared-secret admin API; return a logged-in client."""
        return MatrixClient.register(
            self.client_url,
            self.shared_secret,
            localpart,
            password or secrets.token_hex(8),
            admin=admin,
        )


# ---------------------------------------------------------------- sbg


@dataclass(frozen=True)
class ExternalServer:
    """One external homeserver as sbg's config lists it."""

    server_name: str
    host: str
    address: str  # "ip:port" its federation host resolves to (``addresses``)
    verify_keys: Mapping[str, str]
    ca: str  # the CA file its TLS is pinned to (``tls_ca``)
    trust_level: str = "external"


def sbg_config(
    sbg_dir: str,
    *,
    internal_server_name: str,
    internal_host: str,
    internal_upstream: str,
    internal_tls: CertFiles,
    externals: Iterable[ExternalServer],
    ca: CertFiles,
    groups: Iterable[str] = SCENARIO_GROUPS,
    admin_token_file: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The sbg.yaml (docs/configuration.md) for the phase-2 topology, as a dict.

    Two trust levels: ``external`` (GROUPS, plus knocks, and the V1 room
    profile: the defaults) and ``partner`` (GROUPS plus room discovery and
    knocks, and the V2 room profile PARTNER_ROOMS). Paths are written
    relative to SBG_DIR where they lie inside it, absolute otherwise.
    """

    def rel(path: str) -> str:
        r = os.path.relpath(path, sbg_dir)
        return path if r.startswith("..") else r

    def external(ext: ExternalServer) -> dict[str, Any]:
        port = ext.server_name.rsplit(":", 1)[1] if ":" in ext.server_name else "8448"
        return {
            "server_name": ext.server_name,
            "federation_hosts": [ext.host],
            "verify_keys": dict(ext.verify_keys),
            "key_fetch": "pinned",
            "tls_ca": rel(ext.ca),
            "addresses": {f"{ext.host}:{port}": ext.address},
            "trust_level": ext.trust_level,
        }

    group_list = list(groups)
    v1_groups = [*group_list, *(["knocks"] if "knocks" not in group_list else [])]
    v2_groups = group_list + [g for g in PARTNER_GROUPS if g not in group_list]
    config: dict[str, Any] = {
        "listeners": [
            {
                "type": "inbound",
                "port": SBG_INBOUND_PORT,
                "bind_addresses": [SBG_ADDRESS],
                "tls": True,
            },
            {"type": "outbound", "port": SBG_OUTBOUND_PORT, "bind_addresses": [SBG_ADDRESS]},
            {"type": "admin", "port": SBG_ADMIN_PORT, "bind_addresses": [SBG_ADDRESS]},
        ],
        "log_level": "info",
        "log_format": "json",
        "state_dir": "state",
        "admin_token_file": None if admin_token_file is None else rel(admin_token_file),
        "shutdown_grace": "5s",
        "outbound": {
            "ca": {"certificate": rel(ca.certificate), "private_key": rel(ca.private_key)},
        },
        "internal_homeservers": [
            {
                "server_name": internal_server_name,
                "federation_hosts": [internal_host],
                "upstream": internal_upstream,
                "tls": {
                    "certificate": rel(internal_tls.certificate),
                    "private_key": rel(internal_tls.private_key),
                },
            }
        ],
        "external_homeservers": [external(ext) for ext in externals],
        "trust_levels": {
            "external": {"inbound": v1_groups, "outbound": list(v1_groups)},
            "partner": {
                "inbound": v2_groups,
                "outbound": list(v2_groups),
                "rooms": dict(PARTNER_ROOMS),
            },
        },
    }
    config.update(extra or {})
    return config


@dataclass
class AuditLog:
    """Reads sbg's JSON log lines (its stdout file) and picks the audit records."""

    path: str

    def mark(self) -> int:
        """The current end of the log: pass it to ``records(since=…)``."""
        try:
            return os.path.getsize(self.path)
        except OSError:
            return 0

    def lines(self, since: int = 0, until: int | None = None) -> list[dict[str, Any]]:
        """Every JSON object written between byte offsets SINCE and UNTIL (non-JSON skipped)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(since)
                data = f.read() if until is None else f.read(max(0, until - since))
        except OSError:
            return []
        out = []
        for raw in data.splitlines():
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            if isinstance(obj, dict):
                out.append(obj)
        return out

    def records(self, since: int = 0, until: int | None = None) -> list[dict[str, Any]]:
        """The audit records (logger sbg.audit) between byte offsets SINCE and UNTIL."""
        return [r for r in self.lines(since, until) if r.get("logger") == "sbg.audit"]

    def wait_for(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float = 30.0,
        since: int = 0,
    ) -> dict[str, Any]:
        """The first audit record matching PREDICATE, polling until TIMEOUT."""
        deadline = time.monotonic() + timeout
        while True:
            for r in self.records(since):
                if predicate(r):
                    return r
            if time.monotonic() >= deadline:
                raise AssertionError(f"no matching audit record within {timeout}s in {self.path}")
            time.sleep(0.2)


class Sbg:
    """An sbg process (``twistd -n sbg -c FILE``) with its config dir in the run dir."""

    def __init__(self, sbg_dir: str, config: Mapping[str, Any], name: str = "sbg") -> None:
        """NAME names its files in SBG_DIR (several gateway nodes share one)."""
        self.directory = sbg_dir
        self.config_path = os.path.join(sbg_dir, f"{name}.yaml")
        self.stdout_path = os.path.join(sbg_dir, f"{name}.stdout.log")
        self.stderr_path = os.path.join(sbg_dir, f"{name}.stderr.log")
        admin = next(li for li in config["listeners"] if li["type"] == "admin")
        self.admin_url = f"http://{admin['bind_addresses'][0]}:{admin['port']}"
        self.audit = AuditLog(self.stdout_path)
        token_file = config.get("admin_token_file")
        self.admin_token: str | None = None
        if token_file:
            with open(os.path.join(sbg_dir, token_file)) as f:
                self.admin_token = f.read().strip()
        self.write_config(config)
        argv = [
            os.path.join(SBG_VENV, "bin", "twistd"),
            "-n",
            "--pidfile=",
            "sbg",
            "-c",
            self.config_path,
        ]
        self.process = ManagedProcess(
            name,
            argv,
            stdout_path=self.stdout_path,
            stderr_path=self.stderr_path,
            env=clean_environment({"PYTHONPATH": REPO}),
            cwd=sbg_dir,
        )

    def write_config(self, config: Mapping[str, Any]) -> None:
        with open(self.config_path, "w") as f:
            yaml.safe_dump(dict(config), f, sort_keys=False)

    def start(self, timeout: float = SBG_START_TIMEOUT) -> float:
        self.process.start()
        return self.process.wait_ready(lambda: http_ok(self.admin_url + "/health"), timeout)

    def stop(self) -> int | None:
        """SIGTERM (sbg drains for ``shutdown_grace``); return the exit code."""
        return self.process.stop(STOP_TIMEOUT)

    def restart(self) -> tuple[int | None, float]:
        """SIGTERM, then start again; return (exit code, seconds until healthy again)."""
        started = time.monotonic()
        code = self.stop()
        self.start()
        return code, time.monotonic() - started

    def cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run ``python -m sbg.cli ARGS`` (the ``sbg`` command) with this sbg's environment."""
        return subprocess.run(
            [os.path.join(SBG_VENV, "bin", "python"), "-m", "sbg.cli", *args],
            env=clean_environment({"PYTHONPATH": REPO}),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def kill_cli(self, server: str | None = None, direction: str = "both") -> str:
        """``sbg kill -c CONFIG [--server NAME]``; return its output, raise if it failed."""
        return self._switch_cli("kill", server, direction)

    def unkill_cli(self, server: str | None = None, direction: str = "both") -> str:
        """``sbg unkill -c CONFIG [--server NAME]``; return its output, raise if it failed."""
        return self._switch_cli("unkill", server, direction)

    def _switch_cli(self, command: str, server: str | None, direction: str) -> str:
        args = [command, "-c", self.config_path, "--direction", direction]
        if server is not None:
            args += ["--server", server]
        done = self.cli(*args)
        if done.returncode != 0:
            raise AssertionError(
                f"sbg {' '.join(args)} exited {done.returncode}: {done.stdout}{done.stderr}"
            )
        return done.stdout

    def reload(self) -> None:
        """SIGHUP: sbg re-reads its config file."""
        self.process.signal(signal.SIGHUP)

    def _admin(
        self, method: str, path: str, body: Mapping[str, Any] | None = None
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.admin_url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.admin_token is not None:
            req.add_header("Authorization", "Bearer " + self.admin_token)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, raw.decode("utf-8", "replace")

    def kill(self, server: str | None = None, direction: str = "both") -> Any:
        status, body = self._admin("POST", "/_sbg/kill", {"server": server, "direction": direction})
        if status != 200:
            raise AssertionError(f"POST /_sbg/kill -> {status} {body}")
        return body

    def unkill(self, server: str | None = None, direction: str = "both") -> Any:
        status, body = self._admin(
            "POST", "/_sbg/unkill", {"server": server, "direction": direction}
        )
        if status != 200:
            raise AssertionError(f"POST /_sbg/unkill -> {status} {body}")
        return body

    def kill_state(self) -> Any:
        status, body = self._admin("GET", "/_sbg/kill")
        if status != 200:
            raise AssertionError(f"GET /_sbg/kill -> {status} {body}")
        return body

    def describe_logs(self) -> str:
        return self.process.describe_logs()


# ---------------------------------------------------------------- the whole cluster


@dataclass
class Timings:
    """Seconds spent in each phase (printed by the tests)."""

    prepare: float = 0.0
    startup: float = 0.0
    ready: dict[str, float] = field(default_factory=dict)


class Cluster:
    """The test CAs, the homeservers and (behind_sbg) the sbg gateway of one run."""

    def __init__(
        self,
        run_dir: str,
        *,
        behind_sbg: bool = False,
        homeservers: Iterable[HomeserverSpec] = (HS_INT, HS_EXT),
        hosts_overrides: Mapping[str, Mapping[str, str]] | None = None,
        extra_config: Mapping[str, Mapping[str, Any]] | None = None,
        trust: Mapping[str, Iterable[str]] | None = None,
        room_rules: bool | None = None,
    ) -> None:
        """Write every file of the run (nothing starts yet).

        Args:
            run_dir: an empty directory for this run's files and logs.
            behind_sbg: phase 2: hs-int serves plain federation on :8009, sends
                through sbg's proxy and trusts only sbg's interception CA; the
                other homeservers reach ``hs-int.test`` at sbg's inbound address.
            homeservers: which of HS_INT, HS_EXT, HS_EVIL to run.
            hosts_overrides: per homeserver key, host name -> address entries
                that replace the defaults in its hosts file.
            extra_config: per homeserver key, homeserver.yaml keys to add/replace.
            trust: per homeserver key, the test CAs (names from TEST_CAS) its
                ``federation_custom_ca_list`` holds; default all of them (the
                internal homeserver behind sbg: only sbg's interception CA).
            room_rules: hs-int runs the room rules module, reading sbg.yaml
                (default: behind sbg; sbg.yaml must then be written, by
                ``write_sbg``, before hs-int starts).
        """
        started = time.monotonic()
        self.run_dir = os.path.abspath(run_dir)
        os.makedirs(self.run_dir, exist_ok=True)
        self.behind_sbg = behind_sbg
        self.timings = Timings()
        specs = list(homeservers)
        pki_dir = os.path.join(self.run_dir, "pki")
        self.cas: dict[str, CertFiles] = {
            name: make_ca(pki_dir, f"sbg e2e {name} test CA", f"{name}-ca") for name in TEST_CAS
        }
        self.sbg_dir = os.path.join(self.run_dir, "sbg")
        self.sbg_config_path = os.path.join(self.sbg_dir, "sbg.yaml")
        self.sbg_ca: CertFiles | None = None
        if behind_sbg:
            # The interception CA sbg will use (outbound.ca); hs-int trusts only it.
            self.sbg_ca = make_ca(os.path.join(self.sbg_dir, "ca"), "sbg e2e interception CA", "ca")
        self.homeservers: dict[str, Homeserver] = {}
        for spec in specs:
            tls = issue_server_cert(
                self.cas[spec.ca],
                os.path.join(pki_dir, spec.key),
                spec.key,
                [spec.host],
                [spec.address],
            )
            internal_behind = behind_sbg and spec is HS_INT
            if internal_behind:
                assert self.sbg_ca is not None
                ca_files = [self.sbg_ca.certificate]
                proxy: str | None = f"http://{SBG_ADDRESS}:{SBG_OUTBOUND_PORT}"
            else:
                ca_files = [self.cas[name].certificate for name in TEST_CAS]
                proxy = None
            if trust is not None and spec.key in trust:
                ca_files = [self.cas[name].certificate for name in trust[spec.key]]
            hosts = self.default_hosts(spec, specs)
            hosts.update((hosts_overrides or {}).get(spec.key, {}))
            with_rules = (behind_sbg if room_rules is None else room_rules) and spec is HS_INT
            self.homeservers[spec.key] = Homeserver(
                spec,
                self.run_dir,
                tls=tls,
                custom_ca_files=ca_files,
                hosts=hosts,
                behind_sbg=internal_behind,
                https_proxy=proxy,
                extra_config=(extra_config or {}).get(spec.key),
                room_rules=self.sbg_config_path if with_rules else None,
            )
        self.sbg: Sbg | None = None
        self.timings.prepare = time.monotonic() - started

    def default_hosts(self, spec: HomeserverSpec, specs: list[HomeserverSpec]) -> dict[str, str]:
        """Hosts entries for SPEC's namespace.

        Without sbg every name maps to its homeserver. Behind sbg the internal
        homeserver knows only its own name (everything else must go through
        the proxy: a bypass fails loudly), and the others reach hs-int.test at
        sbg's inbound address.
        """
        if not self.behind_sbg:
            return {s.host: s.address for s in specs}
        if spec is HS_INT:
            return {spec.host: spec.address}
        hosts = {s.host: s.address for s in specs if s is not HS_INT}
        hosts[HS_INT.host] = SBG_ADDRESS
        return hosts

    def __getitem__(self, key: str) -> Homeserver:
        return self.homeservers[key]

    # -- lifecycle

    def start(self, timeout: float = SYNAPSE_START_TIMEOUT) -> float:
        """Start every homeserver at once and wait until all answer; return seconds."""
        started = time.monotonic()
        for hs in self.homeservers.values():
            hs.start()
        deadline = started + timeout
        for key, hs in self.homeservers.items():
            remaining = max(1.0, deadline - time.monotonic())
            hs.wait_ready(remaining)
            self.timings.ready[key] = time.monotonic() - started
        self.timings.startup = time.monotonic() - started
        return self.timings.startup

    def stop(self) -> dict[str, int | None]:
        """Stop everything (sbg first); safe to call more than once."""
        codes: dict[str, int | None] = {}
        if self.sbg is not None:
            codes["sbg"] = self.sbg.stop()
        for key, hs in self.homeservers.items():
            codes[key] = hs.stop()
        return codes

    @contextlib.contextmanager
    def logs_on_failure(self) -> Iterator[None]:
        """Re-raise any exception in the block as an AssertionError carrying the log tails."""
        try:
            yield
        except Exception as e:
            raise AssertionError(f"{e}\n{self.describe_logs()}") from e

    def describe_logs(self) -> str:
        parts = [hs.process.describe_logs() for hs in self.homeservers.values()]
        if self.sbg is not None:
            parts.append(self.sbg.describe_logs())
        return "\n".join(parts)

    # -- sbg (phase 2)

    def write_sbg(
        self,
        groups: Iterable[str] = SCENARIO_GROUPS,
        extra: Mapping[str, Any] | None = None,
    ) -> Sbg:
        """Write sbg.yaml for this topology (hs-int internal; hs-ext, and
        hs-partner when it runs, external).

        Copies hs-int's TLS pair to ``tls/`` and the external test CA to
        ``pins/`` inside the sbg directory and writes a fresh admin bearer
        token to ``admin.token`` (``admin_token_file``; the admin calls and
        the ``sbg kill`` CLI use it). Does not start it.
        """
        if not self.behind_sbg or self.sbg_ca is None:
            raise ValueError("write_sbg needs a Cluster(behind_sbg=True)")
        internal = self.homeservers[HS_INT.key]
        tls_dir = os.path.join(self.sbg_dir, "tls")
        pins_dir = os.path.join(self.sbg_dir, "pins")
        os.makedirs(tls_dir, exist_ok=True)
        os.makedirs(pins_dir, exist_ok=True)
        tls = CertFiles(
            certificate=shutil.copy(internal.tls.certificate, os.path.join(tls_dir, "hs-int.crt")),
            private_key=shutil.copy(internal.tls.private_key, os.path.join(tls_dir, "hs-int.key")),
        )
        os.chmod(tls.private_key, 0o600)
        external_ca = shutil.copy(
            self.cas[HS_EXT.ca].certificate, os.path.join(pins_dir, "external-ca.crt")
        )
        token_file = os.path.join(self.sbg_dir, "admin.token")
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(16) + "\n")
        externals = [
            ExternalServer(
                server_name=hs.server_name,
                host=hs.spec.host,
                address=f"{hs.spec.address}:{hs.spec.federation_port}",
                verify_keys={hs.verify_key_id: hs.verify_key_base64},
                ca=external_ca,
                trust_level=TRUSTED_EXTERNALS[key],
            )
            for key, hs in self.homeservers.items()
            if key in TRUSTED_EXTERNALS
        ]
        config = sbg_config(
            self.sbg_dir,
            internal_server_name=internal.server_name,
            internal_host=internal.spec.host,
            internal_upstream=(
                f"http://{internal.spec.address}:{internal.spec.plain_federation_port}"
            ),
            internal_tls=tls,
            externals=externals,
            ca=self.sbg_ca,
            groups=groups,
            admin_token_file=token_file,
            extra=extra,
        )
        self.sbg = Sbg(self.sbg_dir, config)
        return self.sbg


def start_cluster(
    test: TestCase,
    *,
    behind_sbg: bool = False,
    start_sbg: bool | None = None,
    sbg_groups: Iterable[str] = SCENARIO_GROUPS,
    sbg_extra: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Cluster:
    """Make and start a Cluster for TEST, stopped by a cleanup in every case.

    With BEHIND_SBG the cluster has the phase-2 layout, and sbg (config from
    SBG_GROUPS and SBG_EXTRA) is written and started before the homeservers,
    unless START_SBG is False. Other keyword arguments go to Cluster. Prints
    the timings; on a start failure the logs' tails are part of the error.
    """
    require_synapse()
    run_dir = os.path.abspath(test.mktemp())
    cluster = Cluster(run_dir, behind_sbg=behind_sbg, **kwargs)
    test.addCleanup(_stop_and_report, cluster)
    try:
        if behind_sbg:
            sbg = cluster.write_sbg(sbg_groups, sbg_extra)
            if start_sbg is not False:
                sbg.start()
        cluster.start()
    except ProcessError:
        raise
    except Exception as e:
        raise AssertionError(f"cluster start failed: {e!r}\n{cluster.describe_logs()}") from e
    ready = ", ".join(f"{k} {v:.1f}s" for k, v in cluster.timings.ready.items())
    print(
        f"\n[e2e] run dir {run_dir}; files {cluster.timings.prepare:.2f}s; "
        f"homeservers ready in {cluster.timings.startup:.1f}s ({ready})"
    )
    return cluster


def _stop_and_report(cluster: Cluster) -> None:
    started = time.monotonic()
    codes = cluster.stop()
    print(f"[e2e] stopped in {time.monotonic() - started:.1f}s, exit codes {codes}")
