"""The benchmark runner: `python -m bench.run [--quick]` (or `make bench`).

Starts on 127.0.0.1 a fast upstream (nginx), the targets (direct, nginx
`proxy_pass`, mitmproxy, sbg and, with `--base REV`, the sbg of another git
revision) and the load generators (wrk with `replay.lua`; `loadclient.py` for
CONNECT tunnels), runs every workload on every target interleaved for several
repetitions, prints one table per workload and stops every process it started
by PID.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from signedjson.key import generate_signing_key

from bench import baseline, instructions, payloads, procs, profile, tools
from bench.externals import extra_externals
from bench.nginxconf import nginx_argv, render
from testbed.configtools import (
    DELETE,
    INTERNAL_HOST,
    INTERNAL_SERVER,
    PARTNER_HOST,
    PARTNER_SERVER,
    Material,
    config_dict,
    make_material,
    write_config,
)
from testbed.redisserver import RedisServer

ROOT = os.path.dirname(tools.HERE)
MIB = 1 << 20
DASH = "\N{EN DASH}"
PARTNER_TARGET = f"{PARTNER_HOST}:8448"

TARGETS = ("direct", "nginx", "mitmproxy", "sbg")
BASE = "sbg-base"  # the sbg of the --base revision
SBG_TARGETS = ("sbg", BASE)
# The port each target serves inbound (wrk) requests on.
INBOUND_PORT = {
    "direct": "up-tls",
    "nginx": "nginx-proxy",
    "mitmproxy": "mitm-reverse",
    "sbg": "sbg-in",
    BASE: f"{BASE}-in",
}


@dataclass
class Workload:
    name: str
    title: str
    kind: str  # "wrk" | "tunnel"
    connections: int
    requests_file: str = ""
    unit: str = "req/s"  # or "MB/s"
    targets: tuple[str, ...] = TARGETS


@dataclass
class Env:
    """Everything started: ports, servers, files."""

    workdir: str
    material: Material
    wrk: str
    ports: dict[str, int]
    servers: dict[str, procs.Server] = field(default_factory=dict)
    mitm_ca: str = ""
    base_label: str = ""  # "sbg@<short id>" with --base
    redis: RedisServer | None = None  # with --cluster: the nodes' Redis
    # --callgrind: the callgrind output file of each sbg target.
    callgrind: dict[str, str] = field(default_factory=dict)

    def label(self, target: str) -> str:
        return self.base_label if target == BASE else target

    def proxy(self, target: str) -> procs.Server | None:
        name = {"nginx": "nginx-proxy", "mitmproxy": "mitm-reverse", "sbg": "sbg", BASE: BASE}.get(
            target
        )
        return self.servers.get(name) if name else None

    def tunnel_proxy(self, target: str) -> procs.Server | None:
        name = {"mitmproxy": "mitm-regular", "sbg": "sbg", BASE: BASE}.get(target)
        return self.servers.get(name) if name else None

    def stop_all(self) -> None:
        for server in reversed(list(self.servers.values())):
            server.stop()
        if self.redis is not None:
            self.redis.stop()


# -- setup -------------------------------------------------------------------


def _write_media(directory: str, big: bool) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "bench20m"), "wb") as f:
        block = os.urandom(MIB)
        for _ in range(20):
            f.write(block)
    if big:
        with open(os.path.join(directory, "bench1g"), "wb") as f:
            f.truncate(1 << 30)  # sparse: nginx sends zeros via sendfile


def _requests(env: Env, quick: bool) -> dict[str, str]:
    m = env.material
    key = m.partner_signing_key
    d = env.workdir
    n = 64 if quick else 256
    files = {
        "w1": payloads.send_requests(
            key, PARTNER_SERVER, INTERNAL_SERVER, INTERNAL_HOST, 2048, 1, n, "a"
        ),
        "w1b": payloads.send_requests(
            key, PARTNER_SERVER, INTERNAL_SERVER, INTERNAL_HOST, 65536, 50, n // 4, "b"
        ),
        "w2": [
            payloads.media_request(key, PARTNER_SERVER, INTERNAL_SERVER, INTERNAL_HOST, "bench20m")
        ],
        "w2big": [
            payloads.media_request(key, PARTNER_SERVER, INTERNAL_SERVER, INTERNAL_HOST, "bench1g")
        ],
        # Outbound: any key signs for the internal server; sbg checks origin and destination.
        "w3": payloads.send_requests(
            generate_signing_key("bench"),
            INTERNAL_SERVER,
            PARTNER_SERVER,
            PARTNER_TARGET,
            2048,
            1,
            n,
            "c",
        ),
    }
    return {
        name: payloads.write_requests(os.path.join(d, f"{name}.req"), reqs)
        for name, reqs in files.items()
    }


def _start(server: procs.Server, port: int, timeout: float = 30.0) -> None:
    server.start()
    assert server.proc is not None
    try:
        procs.wait_port(port, timeout, server.proc)
    except (RuntimeError, TimeoutError):
        server.stop()
        raise RuntimeError(f"{server.name} did not start:\n{server.log_tail()}") from None


def _start_sbg(env: Env, target: str, config: str, source: str, attempts: int) -> None:
    """Start TARGET (sbg or sbg-base) with the code of the tree SOURCE.

    The process is checked to run SOURCE's `sbg` and twistd plugin (else
    BaseError). The current sbg may be mid-change: if it does not start, its
    rows are left out. The base revision's code is fixed: if it does not
    start (e.g. it rejects the configuration), BaseError.
    """
    python = os.path.join(ROOT, ".venv", "bin", "python")
    log = os.path.join(env.workdir, f"{target}.log")
    argv = baseline.launcher_argv(python, source, ["-n", "--pidfile=", "sbg", "-c", config])
    if target in env.callgrind:
        argv = instructions.valgrind_argv(env.callgrind[target]) + argv
    server = procs.Server(
        target,
        argv,
        log,
        env=dict(os.environ, PYTHONPATH=source),
        cwd=env.workdir,
    )
    label = env.label(target)
    for attempt in range(attempts):
        try:
            slow = 10.0 if target in env.callgrind else 1.0
            _start(server, env.ports[f"{target}-in"], 30 * slow)
            procs.wait_port(env.ports[f"{target}-out"], 10 * slow, server.proc)
        except RuntimeError as e:
            tail = server.log_tail(60)
            if baseline.REFUSAL in tail:
                raise baseline.BaseError(f"{label}: {e}") from None
            if target == BASE and "invalid configuration" in tail:
                raise baseline.BaseError(
                    f"{label} rejects the benchmark configuration ({config}):\n{tail}"
                ) from None
            print(f"bench: {label} failed to start (attempt {attempt + 1}): {e}", file=sys.stderr)
            if attempt + 1 < attempts:
                time.sleep(15)
            continue
        try:
            with open(log, errors="replace") as f:
                origin = baseline.code_origin(f.read(), source)
        except baseline.BaseError:
            server.stop()
            raise
        print(f"bench: {label} runs {origin}", file=sys.stderr)
        env.servers[target] = server
        return
    if target == BASE:
        raise baseline.BaseError(f"{label} did not start; see above")
    print(f"bench: {label} unavailable; its rows are left out", file=sys.stderr)


def _sbg_configs(
    args: argparse.Namespace, env: Env, extras: list[dict[str, Any]]
) -> dict[str, str]:
    """One configuration file per sbg target: the same settings, own ports and state."""
    p = env.ports
    configs = {}
    for target in SBG_TARGETS:
        if target not in args.targets:
            continue
        directory = os.path.join(env.workdir, f"conf-{target}")
        overrides: dict[str, Any] = {
            "listeners[0].port": p[f"{target}-in"],
            "listeners[1].port": p[f"{target}-out"],
            "listeners[2].port": p[f"{target}-admin"],
            "state_dir": os.path.join(directory, "state"),
            "internal_homeservers[0].upstream": f"http://127.0.0.1:{p['up-http']}",
            "external_homeservers[0].addresses": {PARTNER_TARGET: f"127.0.0.1:{p['up-tls']}"},
            "outbound.proxy_auth": DELETE,
            "log_level": args.sbg_log_level,
            "workers": args.sbg_workers,
        }
        if target in args.cluster:
            assert env.redis is not None
            overrides["cluster"] = {"redis": env.redis.url, "node_name": f"bench-{target}"}
        for n, extra in enumerate(extras, 1):
            overrides[f"external_homeservers[{n}]"] = extra
        configs[target] = write_config(directory, overrides, material=env.material)
    return configs


def _free_ports(names: list[str]) -> dict[str, int]:
    """A distinct free port on 127.0.0.1 for each of NAMES."""
    ports: dict[str, int] = {}
    while len(ports) < len(names):
        port = procs.free_port()
        if port not in ports.values():
            ports[names[len(ports)]] = port
    return ports


def setup(args: argparse.Namespace, workdir: str) -> Env:
    nginx, wrk = tools.ensure_debian_tools()
    bench_bin = tools.ensure_bench_venv()
    material = make_material(os.path.join(workdir, "material"))
    names = ["up-http", "up-tls", "nginx-proxy", "mitm-reverse", "mitm-regular"]
    names += [f"{t}-{kind}" for t in SBG_TARGETS for kind in ("in", "out", "admin")]
    env = Env(workdir, material, wrk, _free_ports(names))
    if args.callgrind:
        env.callgrind = {t: os.path.join(workdir, f"callgrind-{t}.out") for t in SBG_TARGETS}
    if args.base:
        env.base_label = f"sbg@{args.base_short}"
    try:
        _start_servers(args, env, nginx, bench_bin)
    except BaseException:
        env.stop_all()  # what started before the failure
        raise
    return env


def _start_servers(args: argparse.Namespace, env: Env, nginx: str, bench_bin: str) -> None:
    workdir, material = env.workdir, env.material
    p = env.ports
    media = os.path.join(workdir, "media")
    _write_media(media, big=args.big)

    up_conf = render(
        "upstream.nginx.conf",
        os.path.join(workdir, "upstream.conf"),
        prefix=workdir,
        http_port=p["up-http"],
        tls_port=p["up-tls"],
        tls_cert=material.partner_tls.certificate,
        tls_key=material.partner_tls.private_key,
        media_dir=media,
    )
    proxy_conf = render(
        "proxy.nginx.conf",
        os.path.join(workdir, "proxy.conf"),
        prefix=workdir,
        port=p["nginx-proxy"],
        upstream_port=p["up-http"],
        tls_cert=material.internal_tls.certificate,
        tls_key=material.internal_tls.private_key,
    )
    servers = [
        (
            procs.Server(
                "upstream",
                nginx_argv(nginx, workdir, up_conf),
                os.path.join(workdir, "upstream.log"),
            ),
            "up-tls",
        ),
        (
            procs.Server(
                "nginx-proxy",
                nginx_argv(nginx, workdir, proxy_conf),
                os.path.join(workdir, "proxy.log"),
            ),
            "nginx-proxy",
        ),
    ]
    if "mitmproxy" in args.targets:
        pem = os.path.join(workdir, "internal-cert-key.pem")
        with open(pem, "w") as out:
            for part in (material.internal_tls.private_key, material.internal_tls.certificate):
                with open(part) as f:
                    out.write(f.read())
        mitmdump = os.path.join(bench_bin, "mitmdump")
        common = ["-q", "--listen-host", "127.0.0.1", "--set", "stream_large_bodies=1m"]
        rev_dir, reg_dir = (
            os.path.join(workdir, "mitm-reverse"),
            os.path.join(workdir, "mitm-regular"),
        )
        servers.append(
            (
                procs.Server(
                    "mitm-reverse",
                    [
                        mitmdump,
                        *common,
                        "--mode",
                        f"reverse:http://127.0.0.1:{p['up-http']}",
                        "--listen-port",
                        str(p["mitm-reverse"]),
                        "--certs",
                        f"*={pem}",
                        "--set",
                        "keep_host_header=true",
                        "--set",
                        f"confdir={rev_dir}",
                    ],
                    os.path.join(workdir, "mitm-reverse.log"),
                ),
                "mitm-reverse",
            )
        )
        servers.append(
            (
                procs.Server(
                    "mitm-regular",
                    [
                        mitmdump,
                        *common,
                        "--mode",
                        "regular",
                        "--listen-port",
                        str(p["mitm-regular"]),
                        "--set",
                        f"confdir={reg_dir}",
                        "--set",
                        f"ssl_verify_upstream_trusted_ca={material.partner_ca.certificate}",
                    ],
                    os.path.join(workdir, "mitm-regular.log"),
                ),
                "mitm-regular",
            )
        )
        env.mitm_ca = os.path.join(reg_dir, "mitmproxy-ca-cert.pem")
    for server, port in servers:
        _start(server, p[port])
        env.servers[server.name] = server

    partner = config_dict(material)["external_homeservers"][0]
    extras = extra_externals(
        args.externals - 1, material.partner_ca.certificate, partner["trust_level"]
    )
    if args.cluster:
        env.redis = RedisServer(os.path.join(workdir, "redis"))
        env.redis.start()
    configs = _sbg_configs(args, env, extras)
    if BASE in configs:
        source = baseline.extract(ROOT, args.base_commit, os.path.join(workdir, "base-src"))
        _start_sbg(env, BASE, configs[BASE], source, attempts=2)
    if "sbg" in configs:
        _start_sbg(env, "sbg", configs["sbg"], ROOT, attempts=4)


# -- one run ---------------------------------------------------------------


def _parse_result(out: str) -> dict[str, Any]:
    for line in out.splitlines():
        if line.startswith("BENCH-RESULT "):
            return dict(json.loads(line[len("BENCH-RESULT ") :]))
    raise RuntimeError(f"no result in load generator output:\n{out[-2000:]}")


def _measured(
    server: procs.Server | None, run: Callable[[], dict[str, Any]], callgrind: str = ""
) -> dict[str, Any]:
    """RUN the load while measuring SERVER's CPU time and peak RSS (and, with
    CALLGRIND, the output file of the callgrind it runs under, its instructions)."""
    if callgrind and server is not None:
        inner = run
        pid = server.pid
        run = lambda: instructions.counted(pid, callgrind, inner)  # noqa: E731
    pids = server.pids() if server else []
    procs.reset_peak_rss(pids)
    cpu0 = procs.cpu_seconds(pids)
    result = run()
    pids = server.pids() if server else []
    result["cpu_s"] = procs.cpu_seconds(pids) - cpu0 if server else None
    result["peak_rss_kb"] = procs.peak_rss_kb(pids) if server else None
    return result


def _wrk(env: Env, workload: Workload, target: str, duration: float) -> dict[str, Any]:
    port = INBOUND_PORT[target]
    argv = [
        env.wrk, "-t1", f"-c{workload.connections}", f"-d{max(1, round(duration))}s", "--timeout", "10s",
        "-s", os.path.join(tools.HERE, "replay.lua"),
        f"https://{INTERNAL_HOST}:{env.ports[port]}/", "--", workload.requests_file,
    ]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    return _parse_result(out.stdout + out.stderr)


def _client_argv(env: Env, target: str, requests: str) -> list[str]:
    argv = [sys.executable, "-m", "bench.loadclient", "--requests", requests, "--sni", PARTNER_HOST]
    if target == "direct":
        return [
            *argv,
            "--port",
            str(env.ports["up-tls"]),
            "--ca",
            env.material.partner_ca.certificate,
        ]
    if target == "mitmproxy":
        return [
            *argv,
            "--proxy",
            str(env.ports["mitm-regular"]),
            "--connect",
            f"127.0.0.1:{env.ports['up-tls']}",
            "--ca",
            env.mitm_ca,
        ]
    return [
        *argv,
        "--proxy",
        str(env.ports[f"{target}-out"]),
        "--connect",
        PARTNER_TARGET,
        "--ca",
        env.material.outbound_ca.certificate,
    ]


def _client(argv: list[str], timeout: float) -> dict[str, Any]:
    out = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, PYTHONPATH=ROOT)
    )
    return _parse_result(out.stdout + out.stderr[-3000:])


def run_once(env: Env, workload: Workload, target: str, duration: float) -> dict[str, Any]:
    callgrind = env.callgrind.get(target, "")
    if workload.kind == "wrk":
        return _measured(
            env.proxy(target), lambda: _wrk(env, workload, target, duration), callgrind
        )
    argv = [
        *_client_argv(env, target, workload.requests_file),
        "tunnel",
        "--connections",
        str(workload.connections),
        "--duration",
        str(duration),
    ]
    return _measured(env.tunnel_proxy(target), lambda: _client(argv, duration + 60), callgrind)


def available(env: Env, target: str) -> bool:
    if target == "direct":
        return True
    server = env.proxy(target)
    return server is not None and server.alive()


# -- tables ----------------------------------------------------------------


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _summary(runs: list[dict[str, Any]], unit: str) -> dict[str, Any]:
    rates = []
    for r in runs:
        seconds = r["duration_us"] / 1e6
        rates.append(r["bytes"] / seconds / 1e6 if unit == "MB/s" else r["requests"] / seconds)
    per = [r["bytes"] / 1e6 if unit == "MB/s" else r["requests"] for r in runs]
    cpu = [
        r["cpu_s"] / n * 1e6
        for r, n in zip(runs, per, strict=True)
        if r.get("cpu_s") is not None and n
    ]
    rss = [r["peak_rss_kb"] / 1024 for r in runs if r.get("peak_rss_kb")]
    instr = [
        r["instructions"] / n for r, n in zip(runs, per, strict=True) if "instructions" in r and n
    ]
    return {
        "instr": _median(instr) if instr else None,
        "rate": _median(rates),
        "min": min(rates),
        "max": max(rates),
        "p50_ms": _median([r["p50_us"] / 1000 for r in runs]),
        "p99_ms": _median([r["p99_us"] / 1000 for r in runs]),
        "cpu_us": _median(cpu) if cpu else None,
        "rss_mb": max(rss) if rss else None,
        "errors": sum(
            r.get("status", 0)
            + r.get("connect", 0)
            + r.get("read", 0)
            + r.get("write", 0)
            + r.get("timeout", 0)
            for r in runs
        ),
        "requests": sum(r["requests"] for r in runs),
        "runs": len(runs),
    }


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None or value != value:
        return DASH
    return f"{value:,.{digits}f}"


def vs_base(
    base_label: str,
    current: dict[str, Any] | None,
    base: dict[str, Any] | None,
    fields: list[tuple[str, str]],
) -> str:
    """A line giving the current sbg's FIELDS (title, key) as ratios to the base's.

    Empty without a base label; a dash where either figure is missing.
    """
    if not base_label:
        return ""
    parts = []
    for title, key in fields:
        a = current.get(key) if current else None
        b = base.get(key) if base else None
        ratio = f"{a / b:.3f}" if a is not None and b and a == a and b == b else DASH
        parts.append(f"{title} {ratio}")
    return f"sbg / {base_label}: " + ", ".join(parts)


def _with_line(lines: list[str], line: str) -> str:
    # A blank line first: a text line right under a Markdown table is a row.
    return "\n".join([*lines, "", line] if line else lines)


def table(
    workload: Workload, results: dict[str, list[dict[str, Any]]], base_label: str = ""
) -> str:
    sums = {t: _summary(runs, workload.unit) for t, runs in results.items() if runs}
    direct = sums.get("direct", {}).get("rate")
    nginx = sums.get("nginx", {}).get("rate")
    lines = [
        f"**{workload.name}** {DASH} {workload.title}",
        "",
        f"| target | {workload.unit} median [min{DASH}max] | vs direct | vs nginx | p50 ms | p99 ms | added p50 ms | "
        f"CPU µs/{'MB' if workload.unit == 'MB/s' else 'req'} | peak RSS MB | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base_p50 = sums.get("direct", {}).get("p50_ms")
    for target in workload.targets:
        name = base_label if target == BASE else target
        s = sums.get(target)
        if s is None:
            lines.append(f"| {name} | not run | | | | | | | | |")
            continue
        digits = 0 if s["rate"] >= 100 else 1
        rate = f"{_fmt(s['rate'], digits)} [{_fmt(s['min'], digits)}{DASH}{_fmt(s['max'], digits)}]"
        x_direct = f"{s['rate'] / direct:.3f}" if direct else DASH
        x_nginx = f"{s['rate'] / nginx:.3f}" if nginx and target != "nginx" else DASH
        added = s["p50_ms"] - base_p50 if base_p50 is not None and target != "direct" else None
        lines.append(
            f"| {name} | {rate} | {x_direct} | {x_nginx} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | "
            f"{_fmt(added, 2)} | {_fmt(s['cpu_us'])} | {_fmt(s['rss_mb'], 1)} | {s['errors']} |"
        )
    per = "MB" if workload.unit == "MB/s" else "req"
    fields = [(workload.unit, "rate"), (f"CPU µs/{per}", "cpu_us"), ("p50", "p50_ms")]
    counted = [(name, s["instr"]) for name, s in sums.items() if s.get("instr") is not None]
    if counted:
        fields.append((f"instructions/{per}", "instr"))
        lines += ["", "Instructions per request (callgrind): " + ", ".join(
            f"{base_label if name == BASE else name} {value:,.0f}" for name, value in counted
        )]  # fmt: skip
    return _with_line(lines, vs_base(base_label, sums.get("sbg"), sums.get(BASE), fields))


# -- extra measurements ------------------------------------------------------


def handshakes(env: Env, targets: list[str], count: int, requests: str) -> str:
    lines = [
        "**W3-TLS** — new CONNECT tunnel + TLS handshake (minted certificate cached after the first), sequential",
        "",
        "| target | TLS handshake p50 ms | p99 ms | CONNECT+TLS p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|",
    ]
    done: dict[str, dict[str, Any]] = {}
    for target in targets:
        if not available(env, target):
            continue
        argv = [*_client_argv(env, target, requests), "handshake", "--count", "5"]
        _client(argv, 120)  # warm: mint and cache the certificate
        argv[-1] = str(count)
        r = done[target] = _client(argv, 300)
        lines.append(
            f"| {env.label(target)} | {r['tls_p50_us'] / 1000:.2f} | {r['tls_p99_us'] / 1000:.2f} | "
            f"{r['setup_p50_us'] / 1000:.2f} | {r['setup_p99_us'] / 1000:.2f} | {r['errors']} |"
        )
    fields = [("TLS handshake p50", "tls_p50_us"), ("CONNECT+TLS p50", "setup_p50_us")]
    return _with_line(lines, vs_base(env.base_label, done.get("sbg"), done.get(BASE), fields))


def big_download(env: Env, targets: list[str], requests: str) -> str:
    lines = [
        "**W2-1G** — one 1 GiB media download, 1 connection: proxy RSS before and peak during",
        "",
        "| target | MB/s | RSS before MB | peak RSS during MB | status |",
        "|---|---|---|---|---|",
    ]
    done: dict[str, dict[str, Any]] = {}
    for target in targets:
        if not available(env, target):
            continue
        server = env.proxy(target)
        pids = server.pids() if server else []
        procs.reset_peak_rss(pids)
        before = procs.rss_kb(pids) / 1024
        argv = [
            sys.executable, "-m", "bench.loadclient", "download", "--requests", requests,
            "--port", str(env.ports[INBOUND_PORT[target]]), "--sni", INTERNAL_HOST,
            "--ca", env.material.internal_ca.certificate if target != "direct" else env.material.partner_ca.certificate,
            "--duration", "120",
        ]  # fmt: skip
        if target == "direct":
            argv[argv.index("--sni") + 1] = PARTNER_HOST
        r = _client(argv, 300)
        peak = procs.peak_rss_kb(server.pids()) / 1024 if server else None
        rate = r["bytes"] / (r["duration_us"] / 1e6) / 1e6
        done[target] = {"rate": rate, "peak": peak}
        lines.append(
            f"| {env.label(target)} | {rate:,.0f} | {_fmt(before if server else None, 1)} | {_fmt(peak, 1)} | {r['status']} |"
        )
    fields = [("MB/s", "rate"), ("peak RSS", "peak")]
    return _with_line(lines, vs_base(env.base_label, done.get("sbg"), done.get(BASE), fields))


# -- main --------------------------------------------------------------------


def workloads(files: dict[str, str], quick: bool, base: bool = False) -> list[Workload]:
    """The workloads; with BASE, sbg-base is a target wherever sbg is."""
    extra = (BASE,) if base else ()
    return [
        Workload(
            "W1",
            "inbound `PUT /send` 2 KB, 32 connections",
            "wrk",
            32,
            files["w1"],
            targets=TARGETS + extra,
        ),
        Workload(
            "W1-c1",
            "inbound `PUT /send` 2 KB, 1 connection (latency)",
            "wrk",
            1,
            files["w1"],
            targets=TARGETS + extra,
        ),
        Workload(
            "W1b",
            "inbound `PUT /send` 64 KB (50 PDUs), 32 connections",
            "wrk",
            32,
            files["w1b"],
            targets=TARGETS + extra,
        ),
        Workload(
            "W2",
            "inbound 20 MiB media download, 1 connection",
            "wrk",
            1,
            files["w2"],
            unit="MB/s",
            targets=TARGETS + extra,
        ),
        Workload(
            "W3",
            "outbound CONNECT + TLS interception + kept-alive `PUT /send` 2 KB, 32 tunnels",
            "tunnel",
            32,
            files["w3"],
            targets=("direct", "mitmproxy", "sbg", *extra),
        ),
    ]


def machine() -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores ({cpu}), Linux {platform.release()}, Python {platform.python_version()}"


def _profile(
    args: argparse.Namespace, env: Env, selected: list[Workload], files: dict[str, str]
) -> list[str]:
    """Profile the current sbg (never sbg-base) under the first selected workload."""
    sbg = env.servers.get("sbg")
    if sbg is None or not sbg.alive():
        print("bench: sbg is not running, no profile", file=sys.stderr)
        return []
    # The first selected workload (W1 unless --workloads says).
    w1 = selected[0] if selected else workloads(files, args.quick)[0]
    return [
        profile.profile_sbg(
            sbg.pid,
            os.path.join(tools.BENCH_VENV, "bin", "py-spy"),
            args.profile,
            args.profile_seconds,
            lambda: run_once(env, w1, "sbg", args.profile_seconds),
        )
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="1 repetition of 3 s per run (~2 minutes)")
    p.add_argument("--reps", type=int, help="repetitions (default 3; quick 1)")
    p.add_argument("--duration", type=float, help="seconds per run (default 8; quick 3)")
    p.add_argument(
        "--targets",
        help=f"comma-separated subset of {','.join(TARGETS)},{BASE} (default: all; {BASE} only with --base)",
    )
    p.add_argument(
        "--base",
        metavar="REV",
        help=f"also run the sbg of git revision REV of this repository (target {BASE}, shown as sbg@ID)",
    )
    p.add_argument(
        "--externals",
        type=int,
        default=1,
        metavar="N",
        help="external homeservers in sbg's configuration: the partner and N-1 extra ones (default 1)",
    )
    p.add_argument(
        "--workloads", default="", help="comma-separated subset, e.g. W1,W3 (default: all)"
    )
    p.add_argument(
        "--big",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also the 1 GiB download (default: not in quick mode)",
    )
    p.add_argument(
        "--handshakes", type=int, help="TLS handshakes timed per target (default 200; quick 50)"
    )
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="then profile sbg with py-spy under the first selected workload (W1 by default), writing DIR/",
    )
    p.add_argument("--profile-seconds", type=float, default=20.0)
    p.add_argument(
        "--sbg-log-level",
        default="warning",
        help="sbg's log_level (info writes one audit line per request)",
    )
    p.add_argument(
        "--sbg-workers", type=int, default=1, help="sbg's workers (processes); default 1"
    )
    p.add_argument(
        "--cluster",
        default="",
        metavar="TARGETS",
        help=f"sbg targets ({','.join(SBG_TARGETS)}) given a cluster block, with a redis-server "
        "started for them (e.g. --base HEAD --targets sbg,sbg-base --cluster sbg: the cost of "
        "the cluster, interleaved)",
    )
    p.add_argument(
        "--callgrind",
        action="store_true",
        help="run the sbg targets under valgrind's callgrind and report instructions per "
        "request of each run (deterministic; ~50x slower, so few requests per run)",
    )
    p.add_argument("--json", metavar="FILE", help="write every raw result to FILE")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    args = p.parse_args(argv)
    default_targets = TARGETS + ((BASE,) if args.base else ())
    args.targets = [t for t in (args.targets or ",".join(default_targets)).split(",") if t]
    if unknown := set(args.targets) - {*TARGETS, BASE}:
        p.error(f"unknown targets {sorted(unknown)}")
    if BASE in args.targets and not args.base:
        p.error(f"target {BASE} needs --base REV")
    if args.base and BASE not in args.targets:
        p.error(f"--base given but {BASE} is not in --targets")
    if args.externals < 1:
        p.error("--externals must be at least 1 (the partner)")
    args.cluster = [t for t in args.cluster.split(",") if t]
    if unknown := set(args.cluster) - (set(args.targets) & set(SBG_TARGETS)):
        p.error(f"--cluster: not sbg targets of this run: {sorted(unknown)}")
    if args.callgrind and not instructions.available():
        p.error("--callgrind needs valgrind (apt install valgrind)")
    if args.callgrind and args.sbg_workers != 1:
        p.error("--callgrind counts one process: --sbg-workers 1")
    if args.base:
        try:
            args.base_commit, args.base_short = baseline.resolve(ROOT, args.base)
        except baseline.BaseError as e:
            p.error(f"--base {args.base}: {e}")
    reps = args.reps or (1 if args.quick else 3)
    duration = args.duration or (3.0 if args.quick else 8.0)
    warmup = 1.0 if args.quick else 2.0
    if args.big is None:
        args.big = not args.quick
    count = args.handshakes or (50 if args.quick else 200)

    workdir = tempfile.mkdtemp(prefix="sbg-bench-")
    started = time.monotonic()
    env: Env | None = None
    raw: dict[str, Any] = {}
    out: list[str] = []
    try:
        env = setup(args, workdir)
        files = _requests(env, args.quick)
        selected = [
            w
            for w in workloads(files, args.quick, bool(args.base))
            if not args.workloads or w.name in args.workloads.split(",")
        ]
        results: dict[str, dict[str, list[dict[str, Any]]]] = {w.name: {} for w in selected}
        for rep in range(reps):
            for w in selected:
                order = [t for t in w.targets if t in args.targets]
                order = order[rep % len(order) :] + order[: rep % len(order)] if order else order
                for target in order:
                    if not available(env, target):
                        continue
                    try:
                        if rep == 0:
                            run_once(env, w, target, warmup)
                        r = run_once(env, w, target, duration)
                    except (RuntimeError, subprocess.TimeoutExpired, KeyError, ValueError) as e:
                        print(f"bench: {w.name} {env.label(target)} failed: {e}", file=sys.stderr)
                        continue
                    results[w.name].setdefault(target, []).append(r)
                    print(
                        f"bench: rep {rep + 1}/{reps} {w.name:6} {env.label(target):11} {r['requests']:>8} requests",
                        file=sys.stderr,
                    )
        raw["results"] = results
        raw["externals"] = args.externals
        if args.base:
            raw["base"] = {"rev": args.base, "commit": args.base_commit, "label": env.base_label}
        base_note = (
            f"; {env.base_label} = {args.base} ({args.base_commit}), same configuration"
            if args.base
            else ""
        )
        header = (
            f"sbg benchmarks, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; {machine()}; "
            f"{reps} repetition(s) of {duration:g} s per target, interleaved; sbg log_level {args.sbg_log_level}, "
            f"workers {args.sbg_workers}, {args.externals} external server(s) configured{base_note}"
        )
        if args.cluster:
            header += f"; with a cluster block (Redis on loopback): {', '.join(args.cluster)}"
        out.append(header)
        for w in selected:
            out.append(table(w, results[w.name], env.base_label))
        if not args.workloads or "W3" in args.workloads.split(","):
            hs_targets = [t for t in ("direct", "mitmproxy", *SBG_TARGETS) if t in args.targets]
            out.append(handshakes(env, hs_targets, count, files["w3"]))
        if args.big:
            big_targets = [t for t in (*TARGETS, BASE) if t in args.targets]
            out.append(big_download(env, big_targets, files["w2big"]))
        if args.profile:
            out.extend(_profile(args, env, selected, files))
    except baseline.BaseError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 1
    finally:
        if env is not None:
            env.stop_all()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(raw, f, indent=1)
        if args.keep:
            print(f"bench: work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\n\n".join(out))
    print(f"\n(total {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
