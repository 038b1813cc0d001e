"""What a forged request costs sbg: `python -m bench.forged` (or `make bench-forged`).

An attacker who knows only public names sends `PUT /_matrix/federation/v1/send`
with a valid-looking `X-Matrix` header (a trusted origin, the internal
destination, a pinned key id, a garbage signature) and a body of tiny JSON
objects. For each run a fresh gateway (`twistd -n sbg`) starts, settles,
and then receives one such request, or `--concurrency` of them at once;
the benchmark prints the growth of the gateway's peak RSS (VmHWM minus the
RSS before) and the CPU it spent (utime + stime), and checks every answer
was 401. The upstream behind the gateway is a closed port: nothing may
reach it.

Figures, not assertions: the bounds sbg aims at are printed next to them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from bench import procs, tools
from testbed.configtools import (
    INTERNAL_HOST,
    INTERNAL_SERVER,
    PARTNER_SERVER,
    make_material,
    write_config,
)

MIB = 1 << 20
ROOT = os.path.dirname(tools.HERE)
TXN = b"/_matrix/federation/v1/send/forged"


def forged_request(key_id: str, size: int) -> bytes:
    """A PUT /send with a garbage signature and SIZE bytes of tiny objects."""
    unit = b'{"a":1},'
    count = (size - len(b'{"pdus":[]}')) // len(unit)
    body = b'{"pdus":[' + unit * (count - 1) + unit[:-1] + b"]}"
    body += b" " * (size - len(body))
    auth = (
        f'X-Matrix origin="{PARTNER_SERVER}",destination="{INTERNAL_SERVER}",'
        f'key="{key_id}",sig="{"A" * 86}"'
    ).encode()
    head = (
        b"PUT " + TXN + b" HTTP/1.1\r\nHost: " + INTERNAL_HOST.encode() + b"\r\n"
        b"Authorization: " + auth + b"\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    return head + body


def _send(port: int, ca: str, request: bytes, out: list[int]) -> None:
    raw = socket.create_connection(("127.0.0.1", port), timeout=60)
    ctx = ssl.create_default_context(cafile=ca)
    with ctx.wrap_socket(raw, server_hostname=INTERNAL_HOST) as sock:
        sock.sendall(request)
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
        out.append(int(head.split(b" ", 2)[1]) if head else 0)


def run_once(workdir: str, size: int, concurrency: int, source: str = ROOT) -> dict[str, Any]:
    """A fresh gateway, `concurrency` forged requests at once, its cost."""
    directory = tempfile.mkdtemp(dir=workdir)
    material = make_material(directory)
    port = procs.free_port()
    closed_upstream = procs.free_port()  # nothing listens: nothing may get there
    path = write_config(
        directory,
        {
            "listeners[0].port": port,
            "listeners[1].port": procs.free_port(),
            "listeners[2].port": procs.free_port(),
            "internal_homeservers[0].upstream": f"http://127.0.0.1:{closed_upstream}",
            "log_level": "warning",
        },
        material=material,
    )
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    env = dict(os.environ, PYTHONPATH=source)
    with open(os.path.join(directory, "sbg.log"), "wb") as log:
        proc = subprocess.Popen(
            [twistd, "-n", "--pidfile=", "sbg", "-c", path],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=directory,
            env=env,
        )
    try:
        procs.wait_port(port, 30, proc)
        request = forged_request(material.partner_key_id, size)
        # A first small forged request warms the code paths up, then settle.
        _send(
            port,
            material.internal_ca.certificate,
            forged_request(material.partner_key_id, 1024),
            [],
        )
        time.sleep(1.0)
        procs.reset_peak_rss([proc.pid])
        rss_before = procs.rss_kb([proc.pid])
        cpu_before = procs.cpu_seconds([proc.pid])
        statuses: list[int] = []
        threads = [
            threading.Thread(
                target=_send, args=(port, material.internal_ca.certificate, request, statuses)
            )
            for _ in range(concurrency)
        ]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        time.sleep(0.2)
        cpu = procs.cpu_seconds([proc.pid]) - cpu_before
        peak = procs.peak_rss_kb([proc.pid])
        return {
            "statuses": statuses,
            "rss_growth_mib": (peak - rss_before) / 1024,
            "rss_before_mib": rss_before / 1024,
            "cpu_s": cpu,
            "wall_s": elapsed,
        }
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.forged", description=__doc__)
    p.add_argument("--size", type=float, default=16.0, help="body size in MiB (default 16)")
    p.add_argument("--concurrency", type=int, nargs="*", default=[1, 8])
    p.add_argument("--reps", type=int, default=3, help="fresh gateways per scenario")
    p.add_argument(
        "--source",
        default=ROOT,
        help="the sbg source tree to run (default: this one), e.g. a checkout of another revision",
    )
    args = p.parse_args(argv)
    size = int(args.size * MIB)
    workdir = tempfile.mkdtemp(prefix="sbg-forged-")
    bounds = {1: (40, 0.3), 8: (210, None)}
    try:
        print(f"forged PUT /send, {args.size:g} MiB of tiny JSON objects, garbage signature")
        print("concurrency  rss growth MiB (median [min-max])  cpu s (median [min-max])  answers")
        for n in args.concurrency:
            runs = [run_once(workdir, size, n, args.source) for _ in range(args.reps)]
            rss = [r["rss_growth_mib"] for r in runs]
            cpu = [r["cpu_s"] for r in runs]
            answers = sorted({s for r in runs for s in r["statuses"]})
            line = (
                f"{n:>11}  {statistics.median(rss):8.1f} [{min(rss):.1f}-{max(rss):.1f}]"
                f"            {statistics.median(cpu):6.2f} [{min(cpu):.2f}-{max(cpu):.2f}]"
                f"          {answers}"
            )
            mem, seconds = bounds.get(n, (None, None))
            aims = []
            if mem is not None:
                aims.append(f"rss <= {mem} MiB")
            if seconds is not None:
                aims.append(f"cpu <= {seconds} s")
            if aims:
                line += "   (aim: " + ", ".join(aims) + ")"
            print(line, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
