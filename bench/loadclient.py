"""A small asyncio load client for what wrk cannot do (stdlib only).

Modes (one JSON line `BENCH-RESULT {...}` on stdout):

* `tunnel`: W3. CONNECTIONS tunnels (HTTP CONNECT through --proxy, then TLS
  inside), each sending the replayed requests one after another on its
  kept-alive connection for DURATION seconds. Without --proxy, TLS goes
  straight to --port (the direct baseline).
* `handshake`: COUNT sequential new tunnels, timing the TLS handshake inside
  the tunnel (and the whole setup), each followed by one request.
* `download`: one request whose response body is read and discarded (the
  RSS check with a large body).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import ssl
import statistics
import sys
import time

from bench.payloads import read_requests

_LIMIT = 1 << 20


class Failure(Exception):
    pass


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, int]:
    """Read one response; return (status, body bytes)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length, chunked = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if not chunked:
        remaining = length
        while remaining:
            data = await reader.read(min(remaining, _LIMIT))
            if not data:
                raise Failure("connection closed in body")
            remaining -= len(data)
        return status, length
    total = 0
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return status, total
        await reader.readexactly(size + 2)
        total += size


def _context(ca: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
    if not ca:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def _open(
    args: argparse.Namespace, ctx: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, float]:
    """A TLS connection (through a CONNECT tunnel when --proxy); returns the TLS handshake time."""
    if not args.proxy:
        t0 = time.perf_counter()
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", args.port, ssl=ctx, server_hostname=args.sni, limit=_LIMIT
        )
        return reader, writer, time.perf_counter() - t0
    reader, writer = await asyncio.open_connection("127.0.0.1", args.proxy, limit=_LIMIT)
    writer.write(f"CONNECT {args.connect} HTTP/1.1\r\nHost: {args.connect}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if head.split(b" ", 2)[1] != b"200":
        raise Failure(f"CONNECT refused: {head[:80]!r}")
    t0 = time.perf_counter()
    await writer.start_tls(ctx, server_hostname=args.sni)
    return reader, writer, time.perf_counter() - t0


async def _tunnel_worker(
    args: argparse.Namespace,
    ctx: ssl.SSLContext,
    requests: list[bytes],
    start: int,
    deadline: float,
    out: dict[str, list[float]],
) -> None:
    i = start
    while time.perf_counter() < deadline:
        try:
            reader, writer, _ = await _open(args, ctx)
        except (OSError, Failure, asyncio.IncompleteReadError) as e:
            out["errors"].append(0.0)
            print(f"connect error: {e!r}", file=sys.stderr)
            await asyncio.sleep(0.1)
            continue
        try:
            while time.perf_counter() < deadline:
                raw = requests[i % len(requests)]
                i += 1
                t0 = time.perf_counter()
                writer.write(raw)
                status, size = await _read_response(reader)
                out["latency"].append(time.perf_counter() - t0)
                out["bytes"].append(size)
                if status >= 400:
                    out["errors"].append(float(status))
        except (OSError, Failure, asyncio.IncompleteReadError, ValueError) as e:
            out["errors"].append(0.0)
            print(f"tunnel error: {e!r}", file=sys.stderr)
        finally:
            writer.close()


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def tunnel(args: argparse.Namespace) -> dict[str, object]:
    requests = read_requests(args.requests)
    ctx = _context(args.ca)
    out: dict[str, list[float]] = {"latency": [], "errors": [], "bytes": []}
    t0 = time.perf_counter()
    deadline = t0 + args.duration
    step = max(1, len(requests) // max(1, args.connections))
    await asyncio.gather(
        *(
            _tunnel_worker(args, ctx, requests, n * step, deadline, out)
            for n in range(args.connections)
        )
    )
    elapsed = time.perf_counter() - t0
    lat = out["latency"]
    return {
        "duration_us": int(elapsed * 1e6),
        "requests": len(lat),
        "bytes": int(sum(out["bytes"])),
        "status": sum(1 for e in out["errors"] if e > 0),
        "connect": sum(1 for e in out["errors"] if e == 0),
        "p50_us": int(_pct(lat, 0.5) * 1e6),
        "p99_us": int(_pct(lat, 0.99) * 1e6),
        "mean_us": statistics.fmean(lat) * 1e6 if lat else 0.0,
    }


async def handshake(args: argparse.Namespace) -> dict[str, object]:
    requests = read_requests(args.requests)
    ctx = _context(args.ca)
    tls_times, setup_times, errors = [], [], 0
    for n in range(args.count):
        t0 = time.perf_counter()
        try:
            reader, writer, tls = await _open(args, ctx)
            setup_times.append(time.perf_counter() - t0)
            tls_times.append(tls)
            writer.write(requests[n % len(requests)])
            status, _ = await _read_response(reader)
            errors += status >= 400
            writer.close()
        except (OSError, Failure, asyncio.IncompleteReadError) as e:
            errors += 1
            print(f"handshake error: {e!r}", file=sys.stderr)
    return {
        "count": len(tls_times),
        "errors": errors,
        "tls_p50_us": int(_pct(tls_times, 0.5) * 1e6),
        "tls_p99_us": int(_pct(tls_times, 0.99) * 1e6),
        "setup_p50_us": int(_pct(setup_times, 0.5) * 1e6),
        "setup_p99_us": int(_pct(setup_times, 0.99) * 1e6),
    }


def download(args: argparse.Namespace) -> dict[str, object]:
    """Blocking socket reads into one reused buffer: the client stays out of the way."""
    [raw] = read_requests(args.requests)[:1]
    ctx = _context(args.ca)
    tcp = socket.create_connection(("127.0.0.1", args.port), timeout=60)
    with tcp, ctx.wrap_socket(tcp, server_hostname=args.sni) as tls:
        t0 = time.perf_counter()
        tls.sendall(raw)
        buf = bytearray(_LIMIT)
        view = memoryview(buf)
        data = b""
        while b"\r\n\r\n" not in data:
            n = tls.recv_into(view)
            if not n:
                raise Failure("connection closed in headers")
            data += bytes(view[:n])
        head, _, rest = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")[1:]
            if line.lower().startswith(b"content-length:")
        )
        remaining = length - len(rest)
        while remaining > 0:
            n = tls.recv_into(view)
            if not n:
                raise Failure("connection closed in body")
            remaining -= n
        elapsed = time.perf_counter() - t0
    return {"status": status, "bytes": length, "duration_us": int(elapsed * 1e6)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.loadclient")
    p.add_argument("mode", choices=["tunnel", "handshake", "download"])
    p.add_argument("--requests", required=True, help="request file (bench.payloads format)")
    p.add_argument("--proxy", type=int, default=0, help="CONNECT proxy port on 127.0.0.1")
    p.add_argument("--connect", default="", help="CONNECT target host:port")
    p.add_argument("--port", type=int, default=0, help="direct TLS port on 127.0.0.1")
    p.add_argument("--sni", required=True)
    p.add_argument("--ca", default=None, help="CA file to verify the server with")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--count", type=int, default=100)
    args = p.parse_args(argv)
    if args.mode == "download":
        result = download(args)
    else:
        mode = tunnel if args.mode == "tunnel" else handshake
        result = asyncio.run(asyncio.wait_for(mode(args), args.duration + 120))
    print("BENCH-RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
