"""`sbg keys fetch SERVER_NAME [--host HOST[:PORT]] [--ca FILE]`.

Fetches `/_matrix/key/v2/server` over TLS from `--host` (default:
SERVER_NAME; port 8448 unless the host names one), with SNI, `Host` and the
certificate check all for SERVER_NAME's host name, trusting only `--ca` if
given (else the system roots). The response must name SERVER_NAME, be
self-signed by every key it lists and be unexpired; the keys are printed as
a `verify_keys:` block to paste into the configuration, `old_verify_keys`
as a comment. A blocking command: no reactor.
"""

from __future__ import annotations

import datetime
import http.client
import json
import socket
import ssl
import time
from typing import TextIO

from signedjson.key import encode_verify_key_base64

from sbg.clients.keyfetch import DEFAULT_KEY_PORT, FETCH_TIMEOUT, KEY_PATH, MAX_RESPONSE_SIZE
from sbg.hosts import HostParseError, format_authority, parse_authority, server_name_authority
from sbg.matrix.jsonbody import parse_json_object
from sbg.matrix.keys import KeyResponseError, validate_key_response
from sbg.reasons import Refusal

_PREFIX = "sbg keys fetch: "


class _Failed(Exception):
    """A one-line error for the operator."""


def _iso(ms: int) -> str:
    try:
        when = datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return f"{ms} ms"
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _context(ca: str | None) -> ssl.SSLContext:
    try:
        # With a CA file, only that file is trusted (no system roots).
        ctx = ssl.create_default_context(cafile=ca)
    except FileNotFoundError:
        raise _Failed(f"--ca {ca}: no such file") from None
    except (ssl.SSLError, OSError) as e:
        raise _Failed(f"--ca {ca}: not a readable PEM CA file ({_reason(e)})") from None
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _reason(e: BaseException) -> str:
    if isinstance(e, ssl.SSLCertVerificationError) and e.verify_message:
        return f"certificate verify failed: {e.verify_message}"
    if isinstance(e, ssl.SSLError) and e.reason:
        return str(e.reason).replace("_", " ").lower()
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _get(connect: tuple[str, int], tls_name: str, host_header: str, ctx: ssl.SSLContext) -> bytes:
    """GET the key path over TLS; the body (at most the size cap)."""
    where = format_authority(*connect)
    deadline = time.monotonic() + FETCH_TIMEOUT
    try:
        raw = socket.create_connection(connect, timeout=FETCH_TIMEOUT)
    except OSError as e:
        raise _Failed(f"cannot connect to {where}: {_reason(e)}") from None
    with raw:
        try:
            tls = ctx.wrap_socket(raw, server_hostname=tls_name)
        except ssl.SSLCertVerificationError as e:
            raise _Failed(f"TLS to {where} as {tls_name} refused: {_reason(e)}") from None
        except (ssl.SSLError, OSError) as e:
            raise _Failed(f"TLS handshake with {where} failed: {_reason(e)}") from None
        with tls:
            request = (
                f"GET {KEY_PATH.decode()} HTTP/1.1\r\n"
                f"Host: {host_header}\r\n"
                "Accept: application/json\r\n"
                "User-Agent: sbg\r\n"
                "Connection: close\r\n\r\n"
            ).encode("ascii")
            try:
                tls.settimeout(max(0.1, deadline - time.monotonic()))
                tls.sendall(request)
                response = http.client.HTTPResponse(tls, method="GET")
                response.begin()
                if response.status != 200:
                    raise _Failed(f"{where} answered HTTP {response.status} {response.reason}")
                length = response.getheader("Content-Length")
                if length is not None and length.isdigit() and int(length) > MAX_RESPONSE_SIZE:
                    raise _Failed(f"{where}: response larger than {MAX_RESPONSE_SIZE} bytes")
                body = response.read(MAX_RESPONSE_SIZE + 1)
            except (OSError, http.client.HTTPException) as e:
                raise _Failed(f"reading from {where} failed: {_reason(e)}") from None
    if len(body) > MAX_RESPONSE_SIZE:
        raise _Failed(f"{where}: response larger than {MAX_RESPONSE_SIZE} bytes")
    return body


def _yaml_block(server_name: str, where: str, body: dict[str, object], now_ms: int) -> str:
    keys = validate_key_response(body, server_name, now_ms)
    listed = body.get("verify_keys")
    current = sorted(k for k in keys if isinstance(listed, dict) and k in listed)
    old = sorted(k for k in keys if k not in current)
    valid_until = body.get("valid_until_ts")
    lines = [
        f"# signing keys of {server_name}, fetched from {where}",
        f"# response valid until {_iso(valid_until) if isinstance(valid_until, int) else '?'}",
        "verify_keys:",
    ]
    for key_id in current:
        b64 = encode_verify_key_base64(keys[key_id][0])
        lines.append(f"  {json.dumps(key_id)}: {json.dumps(b64)}")
    if old:
        lines.append("# old_verify_keys (no longer used to sign; not for verify_keys):")
        for key_id in old:
            key, expired = keys[key_id]
            b64 = encode_verify_key_base64(key)
            lines.append(f"#   {json.dumps(key_id)}: {json.dumps(b64)}  # expired {_iso(expired)}")
    return "\n".join(lines) + "\n"


def _fetch(server_name: str, host: str | None, ca: str | None) -> str:
    try:
        name_host, name_port = server_name_authority(server_name)
    except HostParseError as e:
        raise _Failed(f"{server_name!r} is not a server name: {e}") from None
    if host is None:
        connect_host, connect_port = name_host, name_port
    else:
        try:
            connect_host, connect_port = parse_authority(host)
        except HostParseError as e:
            raise _Failed(f"--host {host!r}: {e}") from None
    connect = (connect_host, connect_port if connect_port is not None else DEFAULT_KEY_PORT)
    where = format_authority(*connect)
    ctx = _context(ca)
    body = _get(connect, name_host, format_authority(name_host, name_port), ctx)
    try:
        parsed = parse_json_object(body)
    except Refusal as e:
        raise _Failed(f"{where}: {e.reason.replace('body', 'response')}") from None
    try:
        return _yaml_block(server_name, where, parsed, int(time.time() * 1000))
    except KeyResponseError as e:
        raise _Failed(f"{where}: response refused: {e}") from None


def run(server_name: str, host: str | None, ca: str | None, out: TextIO, err: TextIO) -> int:
    """Fetch, check and print SERVER_NAME's keys; 0, or 1 with one error line."""
    try:
        text = _fetch(server_name, host, ca)
    except _Failed as e:
        err.write(f"{_PREFIX}{e}\n")
        return 1
    except Exception as e:  # never a traceback for an operator command
        err.write(f"{_PREFIX}{type(e).__name__}: {_reason(e)}\n")
        return 1
    out.write(text)
    return 0
