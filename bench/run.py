"""The benchmark runner: `python -m bench.run [--quick]` (or `make bench`).

Starts on 127.0.0.1 a fast upstream (nginx), the targets (direct, nginx
`proxy_pass`, mitmproxy, sbg) and the load generators (wrk with
`replay.lua`; `loadclient.py` for CONNECT tunnels), runs every workload on
every target interleaved for several repetitions, prints one table per
workload and stops every process it started by PID.
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

from bench import payloads, procs, profile, tools
from bench.nginxconf import nginx_argv, render
from tests.configtools import (
    DELETE,
    INTERNAL_HOST,
    INTERNAL_SERVER,
    PARTNER_HOST,
    PARTNER_SERVER,
    Material,
    make_material,
    write_config,
)

ROOT = os.path.dirname(tools.HERE)
MIB = 1 << 20
DASH = "\N{EN DASH}"
PARTNER_TARGET = f"{PARTNER_HOST}:8448"

TARGETS = ("direct", "nginx", "mitmproxy", "sbg")


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

    def proxy(self, target: str) -> procs.Server | None:
        name = {"nginx": "nginx-proxy", "mitmproxy": "mitm-reverse", "sbg": "sbg"}.get(target)
        return self.servers.get(name) if name else None

    def tunnel_proxy(self, target: str) -> procs.Server | None:
        name = {"mitmproxy": "mitm-regular", "sbg": "sbg"}.get(target)
        return self.servers.get(name) if name else None

    def stop_all(self) -> None:
        for server in reversed(list(self.servers.values())):
            server.stop()


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
        raise RuntimeError(f"{server.name} did not start:\n{server.log_tail()}")


def _start_sbg(env: Env, config: str, attempts: int) -> None:
    twistd = os.path.join(ROOT, ".venv", "bin", "twistd")
    server = procs.Server(
        "sbg",
        [twistd, "-n", "--pidfile=", "sbg", "-c", config],
        os.path.join(env.workdir, "sbg.log"),
        env=dict(os.environ, PYTHONPATH=ROOT),
        cwd=env.workdir,
    )
    for attempt in range(attempts):
        try:
            _start(server, env.ports["sbg-in"])
            procs.wait_port(env.ports["sbg-out"], 10, server.proc)
            env.servers["sbg"] = server
            return
        except RuntimeError as e:
            print(f"bench: sbg failed to start (attempt {attempt + 1}): {e}", file=sys.stderr)
            if attempt + 1 < attempts:
                time.sleep(15)
    print("bench: sbg unavailable; its rows are left out", file=sys.stderr)


def setup(args: argparse.Namespace, workdir: str) -> Env:
    nginx, wrk = tools.ensure_debian_tools()
    bench_bin = tools.ensure_bench_venv()
    material = make_material(os.path.join(workdir, "material"))
    names = [
        "up-http",
        "up-tls",
        "nginx-proxy",
        "mitm-reverse",
        "mitm-regular",
        "sbg-in",
        "sbg-out",
        "sbg-admin",
    ]
    env = Env(workdir, material, wrk, {n: procs.free_port() for n in names})
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

    if "sbg" in args.targets:
        config = write_config(
            os.path.join(workdir, "sbg"),
            {
                "listeners[0].port": p["sbg-in"],
                "listeners[1].port": p["sbg-out"],
                "listeners[2].port": p["sbg-admin"],
                "internal_homeservers[0].upstream": f"http://127.0.0.1:{p['up-http']}",
                "external_homeservers[0].addresses": {PARTNER_TARGET: f"127.0.0.1:{p['up-tls']}"},
                "outbound.proxy_auth": DELETE,
                "log_level": args.sbg_log_level,
                "workers": args.sbg_workers,
            },
            material=material,
        )
        _start_sbg(env, config, attempts=4)
    return env


# -- one run ---------------------------------------------------------------


def _parse_result(out: str) -> dict[str, Any]:
    for line in out.splitlines():
        if line.startswith("BENCH-RESULT "):
            return dict(json.loads(line[len("BENCH-RESULT ") :]))
    raise RuntimeError(f"no result in load generator output:\n{out[-2000:]}")


def _measured(server: procs.Server | None, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """RUN the load while measuring SERVER's CPU time and peak RSS."""
    pids = server.pids() if server else []
    procs.reset_peak_rss(pids)
    cpu0 = procs.cpu_seconds(pids)
    result = run()
    pids = server.pids() if server else []
    result["cpu_s"] = procs.cpu_seconds(pids) - cpu0 if server else None
    result["peak_rss_kb"] = procs.peak_rss_kb(pids) if server else None
    return result


def _wrk(env: Env, workload: Workload, target: str, duration: float) -> dict[str, Any]:
    port = {
        "direct": "up-tls",
        "nginx": "nginx-proxy",
        "mitmproxy": "mitm-reverse",
        "sbg": "sbg-in",
    }[target]
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
        str(env.ports["sbg-out"]),
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
    if workload.kind == "wrk":
        return _measured(env.proxy(target), lambda: _wrk(env, workload, target, duration))
    argv = [
        *_client_argv(env, target, workload.requests_file),
        "tunnel",
        "--connections",
        str(workload.connections),
        "--duration",
        str(duration),
    ]
    return _measured(env.tunnel_proxy(target), lambda: _client(argv, duration + 60))


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
    return {
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


def table(workload: Workload, results: dict[str, list[dict[str, Any]]]) -> str:
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
        s = sums.get(target)
        if s is None:
            lines.append(f"| {target} | not run | | | | | | | | |")
            continue
        digits = 0 if s["rate"] >= 100 else 1
        rate = f"{_fmt(s['rate'], digits)} [{_fmt(s['min'], digits)}{DASH}{_fmt(s['max'], digits)}]"
        x_direct = f"{s['rate'] / direct:.3f}" if direct else DASH
        x_nginx = f"{s['rate'] / nginx:.3f}" if nginx and target != "nginx" else DASH
        added = s["p50_ms"] - base_p50 if base_p50 is not None and target != "direct" else None
        lines.append(
            f"| {target} | {rate} | {x_direct} | {x_nginx} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | "
            f"{_fmt(added, 2)} | {_fmt(s['cpu_us'])} | {_fmt(s['rss_mb'], 1)} | {s['errors']} |"
        )
    return "\n".join(lines)


# -- extra measurements ------------------------------------------------------


def handshakes(env: Env, targets: list[str], count: int, requests: str) -> str:
    lines = [
        "**W3-TLS** — new CONNECT tunnel + TLS handshake (minted certificate cached after the first), sequential",
        "",
        "| target | TLS handshake p50 ms | p99 ms | CONNECT+TLS p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|",
    ]
    for target in targets:
        if not available(env, target):
            continue
        argv = [*_client_argv(env, target, requests), "handshake", "--count", "5"]
        _client(argv, 120)  # warm: mint and cache the certificate
        argv[-1] = str(count)
        r = _client(argv, 300)
        lines.append(
            f"| {target} | {r['tls_p50_us'] / 1000:.2f} | {r['tls_p99_us'] / 1000:.2f} | "
            f"{r['setup_p50_us'] / 1000:.2f} | {r['setup_p99_us'] / 1000:.2f} | {r['errors']} |"
        )
    return "\n".join(lines)


def big_download(env: Env, targets: list[str], requests: str) -> str:
    lines = [
        "**W2-1G** — one 1 GiB media download, 1 connection: proxy RSS before and peak during",
        "",
        "| target | MB/s | RSS before MB | peak RSS during MB | status |",
        "|---|---|---|---|---|",
    ]
    port = {
        "direct": "up-tls",
        "nginx": "nginx-proxy",
        "mitmproxy": "mitm-reverse",
        "sbg": "sbg-in",
    }
    for target in targets:
        if not available(env, target):
            continue
        server = env.proxy(target)
        pids = server.pids() if server else []
        procs.reset_peak_rss(pids)
        before = procs.rss_kb(pids) / 1024
        argv = [
            sys.executable, "-m", "bench.loadclient", "download", "--requests", requests,
            "--port", str(env.ports[port[target]]), "--sni", INTERNAL_HOST,
            "--ca", env.material.internal_ca.certificate if target != "direct" else env.material.partner_ca.certificate,
            "--duration", "120",
        ]  # fmt: skip
        if target == "direct":
            argv[argv.index("--sni") + 1] = PARTNER_HOST
        r = _client(argv, 300)
        peak = procs.peak_rss_kb(server.pids()) / 1024 if server else None
        rate = r["bytes"] / (r["duration_us"] / 1e6) / 1e6
        lines.append(
            f"| {target} | {rate:,.0f} | {_fmt(before if server else None, 1)} | {_fmt(peak, 1)} | {r['status']} |"
        )
    return "\n".join(lines)


# -- main --------------------------------------------------------------------


def workloads(files: dict[str, str], quick: bool) -> list[Workload]:
    return [
        Workload("W1", "inbound `PUT /send` 2 KB, 32 connections", "wrk", 32, files["w1"]),
        Workload(
            "W1-c1", "inbound `PUT /send` 2 KB, 1 connection (latency)", "wrk", 1, files["w1"]
        ),
        Workload(
            "W1b", "inbound `PUT /send` 64 KB (50 PDUs), 32 connections", "wrk", 32, files["w1b"]
        ),
        Workload(
            "W2", "inbound 20 MiB media download, 1 connection", "wrk", 1, files["w2"], unit="MB/s"
        ),
        Workload(
            "W3",
            "outbound CONNECT + TLS interception + kept-alive `PUT /send` 2 KB, 32 tunnels",
            "tunnel",
            32,
            files["w3"],
            targets=("direct", "mitmproxy", "sbg"),
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="1 repetition of 3 s per run (~2 minutes)")
    p.add_argument("--reps", type=int, help="repetitions (default 3; quick 1)")
    p.add_argument("--duration", type=float, help="seconds per run (default 8; quick 3)")
    p.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help="comma-separated subset of " + ",".join(TARGETS),
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
    p.add_argument("--json", metavar="FILE", help="write every raw result to FILE")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    args = p.parse_args(argv)
    args.targets = [t for t in args.targets.split(",") if t]
    if unknown := set(args.targets) - set(TARGETS):
        p.error(f"unknown targets {sorted(unknown)}")
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
            for w in workloads(files, args.quick)
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
                        print(f"bench: {w.name} {target} failed: {e}", file=sys.stderr)
                        continue
                    results[w.name].setdefault(target, []).append(r)
                    print(
                        f"bench: rep {rep + 1}/{reps} {w.name:6} {target:9} {r['requests']:>8} requests",
                        file=sys.stderr,
                    )
        raw["results"] = results
        header = (
            f"sbg benchmarks, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; {machine()}; "
            f"{reps} repetition(s) of {duration:g} s per target, interleaved; sbg log_level {args.sbg_log_level}, workers {args.sbg_workers}"
        )
        out.append(header)
        for w in selected:
            out.append(table(w, results[w.name]))
        if not args.workloads or "W3" in args.workloads.split(","):
            hs_targets = [t for t in ("direct", "mitmproxy", "sbg") if t in args.targets]
            out.append(handshakes(env, hs_targets, count, files["w3"]))
        if args.big:
            out.append(big_download(env, [t for t in TARGETS if t in args.targets], files["w2big"]))
        if args.profile:
            sbg = env.servers.get("sbg")
            if sbg is None or not sbg.alive():
                print("bench: sbg is not running, no profile", file=sys.stderr)
            else:
                # The first selected workload (W1 unless --workloads says).
                w1 = selected[0] if selected else workloads(files, args.quick)[0]
                out.append(
                    profile.profile_sbg(
                        sbg.pid,
                        os.path.join(tools.BENCH_VENV, "bin", "py-spy"),
                        args.profile,
                        args.profile_seconds,
                        lambda: run_once(env, w1, "sbg", args.profile_seconds),  # type: ignore[arg-type]
                    )
                )
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
