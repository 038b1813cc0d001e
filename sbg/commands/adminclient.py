"""The admin API's client, shared by `sbg kill`, `sbg unkill` and `sbg status`.

The admin listener is found from the configuration file (its first `admin`
listener and `admin_token_file`) unless `--admin http://HOST:PORT` is given.
It is reached directly, never through a proxy named in the environment
(`http_proxy`, `all_proxy`, ...): the bearer token goes to sbg only.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

from sbg.config.load import load_config
from sbg.errors import ConfigErrors
from sbg.hosts import format_authority

TIMEOUT = 10.0


class AdminClientError(Exception):
    """The admin API could not be reached or refused the call (one line)."""


def _read_token(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().rstrip("\r\n")
    except OSError as e:
        raise AdminClientError(f"{path}: cannot read the admin token: {e.strerror or e}") from None


def admin_from_config(config_path: str) -> tuple[str, str | None]:
    """(admin base URL, token) from the configuration's first admin listener.

    The file is read without opening certificate files: an emergency stop
    must not depend on a certificate being readable.
    """
    try:
        config = load_config(config_path, skip_files=True)
    except ConfigErrors as e:
        raise AdminClientError(
            "; ".join(e.lines()) or f"{config_path}: invalid configuration"
        ) from None
    admin = next((lst for lst in config.listeners if lst.type == "admin"), None)
    if admin is None:
        raise AdminClientError(f"{config_path}: no admin listener configured (use --admin)")
    address = admin.bind_addresses[0] if admin.bind_addresses else "127.0.0.1"
    if address in ("0.0.0.0", ""):
        address = "127.0.0.1"
    elif address == "::":
        address = "::1"
    token = _read_token(config.admin_token_file) if config.admin_token_file else None
    return f"http://{format_authority(address, admin.port)}", token


def resolve(config_path: str, admin: str | None, token_file: str | None) -> tuple[str, str | None]:
    """(base URL, token) from `--admin`, `--token-file` and `-c`."""
    if admin is not None:
        base = admin.rstrip("/")
        if token_file:
            return base, _read_token(token_file)
        if os.path.exists(config_path):
            return base, admin_from_config(config_path)[1]
        return base, None
    base, token = admin_from_config(config_path)
    if token_file:
        token = _read_token(token_file)
    return base, token


# Never a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def call(url: str, token: str | None, body: dict[str, Any] | None = None) -> Any:
    """GET (no body) or POST (a JSON body) URL; the decoded JSON answer.

    Raises:
        AdminClientError: unreachable, an error status, or not JSON.
    """
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with _OPENER.open(req, timeout=TIMEOUT) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        try:
            detail = json.loads(e.read()).get("error", "")
        except (ValueError, AttributeError):
            detail = ""
        raise AdminClientError(f"admin API answered {e.code}: {detail or e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise AdminClientError(f"cannot reach the admin listener at {url}: {reason}") from None
    except ValueError:
        raise AdminClientError(f"the admin listener at {url} did not answer JSON") from None
