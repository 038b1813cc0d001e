"""A model of how Synapse reads a request: its router and its X-Matrix parser."""

from __future__ import annotations

import re
from urllib.parse import unquote

from sbg.matrix.endpoints import ENDPOINTS, ENDPOINTS_BY_NAME, Endpoint

QUERY_LITERALS = {"profile": "query_profile", "directory": "query_directory"}


def _route_regex(template: str) -> re.Pattern[str]:
    parts = []
    for seg in template.split("/"):
        if seg.startswith("{"):
            parts.append(f"(?P<{seg[1:-1]}>[^/]*)")
        else:
            parts.append(re.escape(seg))
    return re.compile("^" + "/".join(parts) + "$")


def _build_routes() -> list[tuple[re.Pattern[str], dict[str, Endpoint]]]:
    by_template: dict[str, dict[str, Endpoint]] = {}
    for ep in ENDPOINTS:
        if ep.name in QUERY_LITERALS.values():
            continue  # Synapse has one /query/{type} route
        by_template.setdefault(ep.template, {})[ep.method] = ep
    return [(_route_regex(t), methods) for t, methods in by_template.items()]


ROUTES = _build_routes()


def synapse_route(method: bytes, target: bytes) -> tuple[Endpoint, dict[str, str]] | int:
    """What twisted.web + Synapse make of a request: (endpoint, params) or a status.

    twisted.web cuts `request.path` at the first `?`; Synapse ASCII-decodes
    it (400 otherwise), matches each route's anchored regex, answers 405 if
    the path matches with another method, and `unquote`s the captured
    parameters. `/query/{queryType}` dispatches on the decoded type.
    """
    try:
        path = target.split(b"?", 1)[0].decode("ascii")
    except UnicodeDecodeError:
        return 400
    wanted = "GET" if method == b"HEAD" else method.decode("latin-1")
    for regex, methods in ROUTES:
        m = regex.match(path)
        if m is None:
            continue
        ep = methods.get(wanted)
        if ep is None:
            return 405
        params = {k: unquote(v) for k, v in m.groupdict().items()}
        if ep.name == "query" and params["queryType"] in QUERY_LITERALS:
            return ENDPOINTS_BY_NAME[QUERY_LITERALS[params["queryType"]]], {}
        return ep, params
    return 404


def synapse_auth(header: bytes) -> tuple[str, str, str, str | None] | None:
    """Synapse's `_parse_auth_header`: (origin, key, sig, destination) or None.

    Split on the scheme, then on commas with optional SP/HTAB around them
    (before any unquoting), names lower-cased, last duplicate wins, a value
    starting with `"` loses its first and last character and `\\x` becomes
    `x`. Synapse only looks at headers starting with `X-Matrix`.
    """
    try:
        text = header.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not header.startswith(b"X-Matrix"):
        return None
    pieces = re.split(r"^X-Matrix +", text, maxsplit=1)
    if len(pieces) != 2:
        return None
    params: dict[str, str] = {}
    for param in re.split(r"[ \t]*,[ \t]*", pieces[1]):
        name, sep, value = param.partition("=")
        if not sep:
            return None
        params[name.lower()] = value

    def strip(value: str) -> str:
        if value.startswith('"'):
            return re.sub(r"\\(.)", lambda m: m.group(1), value[1:-1])
        return value

    try:
        origin, key, sig = (strip(params[n]) for n in ("origin", "key", "sig"))
    except KeyError:
        return None
    dest = params.get("destination")
    return origin, key, sig, strip(dest) if dest is not None else None
