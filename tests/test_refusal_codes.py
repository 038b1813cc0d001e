"""Refusal codes: one fixed set, used everywhere, documented in the README.

The codes are the `reason` label of `sbg_refusals_total`, so they must be a
fixed set (never free text) and an operator must find each one in the
README's table. The test reads the source of every module under `sbg/`
(the one being imported: the source tree, or the installed package) and
collects every string literal given as the `code` of a refusal: the fourth
argument of `SbgError(...)` (or `code=`), the `code` parameter of every
function or class in `sbg/` that has one (`_forbidden`, `TunnelRefused`,
`own`, ...), and `super().__init__(...)` in `SbgError` subclasses.
"""

from __future__ import annotations

import ast
import os
import re
from dataclasses import dataclass

from twisted.trial.unittest import SynchronousTestCase

import sbg
from sbg.errors import REFUSAL_CODES

SBG_DIR = os.path.dirname(os.path.abspath(sbg.__file__))
README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")

# Codes built at run time rather than written as a literal, by the one class
# that does it: `UpstreamError` (sbg/http/forward.py) makes
# `"upstream_" + metric_reason`. It is caught before every other SbgError and
# counts in `sbg_upstream_errors_total`, never in `sbg_refusals_total`.
BUILT_CODES = {"UpstreamError"}

# Refusals that are not SbgErrors: connection limits (sbg/http/limits.py)
# report their reason through `LimitedFactory._refuse(reason, host)`.
REASON_FUNCTIONS = {("limits.py", "_refuse"): "reason"}


@dataclass(frozen=True)
class Site:
    path: str
    line: int
    callee: str

    def __str__(self) -> str:
        return f"{os.path.relpath(self.path, SBG_DIR)}:{self.line} {self.callee}(...)"


def _modules() -> list[tuple[str, ast.Module]]:
    out = []
    for directory, _dirs, files in os.walk(SBG_DIR):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                with open(path, encoding="utf-8") as f:
                    out.append((path, ast.parse(f.read(), path)))
    return out


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    names = [a.arg for a in fn.args.posonlyargs + fn.args.args]
    if names and names[0] in ("self", "cls"):
        names = names[1:]
    return names + [a.arg for a in fn.args.kwonlyargs]


def _base_names(cls: ast.ClassDef) -> set[str]:
    return {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in cls.bases}


def _definitions(tree: ast.Module) -> dict[str, int | None]:
    """Every function and class defined in one module -> the position of its
    `code` parameter (None without one). A class counts through its
    `__init__`."""
    defs: dict[str, int | None] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name != "__init__":
            params = _params(node)
            defs[node.name] = params.index("code") if "code" in params else None
        elif isinstance(node, ast.ClassDef):
            defs[node.name] = None
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    params = _params(item)
                    defs[node.name] = params.index("code") if "code" in params else None
    return defs


def _callee(call: ast.Call) -> str:
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return ""


def _argument(call: ast.Call, name: str, position: int) -> ast.expr | None:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    if position < len(call.args) and not any(isinstance(a, ast.Starred) for a in call.args):
        return call.args[position]
    return None


class _Collector:
    def __init__(self) -> None:
        self.literals: dict[str, list[Site]] = {}
        self.unchecked: list[Site] = []

    def add(self, path: str, call: ast.Call, value: ast.expr | None, owner: str = "") -> None:
        site = Site(path, call.lineno, _callee(call))
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            self.literals.setdefault(value.value, []).append(site)
        elif isinstance(value, ast.Name) and value.id in ("code", "reason"):
            pass  # passed through from the caller, checked at the caller
        elif isinstance(value, ast.Attribute) and value.attr == "code":
            pass  # re-raised from an SbgError already built elsewhere
        elif owner in BUILT_CODES:
            pass
        else:
            self.unchecked.append(site)


def collect() -> _Collector:
    modules = _modules()
    local = {path: _definitions(tree) for path, tree in modules}
    # Callables with a `code` parameter anywhere in sbg/ (imported by name,
    # or methods called on an object); a module's own definition wins.
    takers: dict[str, int] = {}
    for defs in local.values():
        takers.update((name, pos) for name, pos in defs.items() if pos is not None)
    found = _Collector()
    for path, tree in modules:
        for cls in ast.walk(tree):
            if not (isinstance(cls, ast.ClassDef) and "SbgError" in _base_names(cls)):
                continue
            for node in ast.walk(cls):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "__init__"
                    and isinstance(node.func.value, ast.Call)
                    and _callee(node.func.value) == "super"
                ):
                    found.add(path, node, _argument(node, "code", 3), owner=cls.name)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = _callee(node)
            position = local[path][name] if name in local[path] else takers.get(name)
            if position is not None:
                found.add(path, node, _argument(node, "code", position))
            reason_param = REASON_FUNCTIONS.get((os.path.basename(path), name))
            if reason_param is not None:
                found.add(path, node, _argument(node, reason_param, 0))
    return found


def readme_codes() -> set[str]:
    with open(README, encoding="utf-8") as f:
        text = f.read()
    start = text.index("## Decisions and refusal reasons")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end != -1 else len(text)]
    codes: set[str] = set()
    for line in section.splitlines():
        if not line.startswith("|") or line.startswith("|---"):
            continue
        first_cell = line.split("|")[1]
        codes.update(re.findall(r"`([a-z0-9_]+)`", first_cell))
    return codes


class RefusalCodeTests(SynchronousTestCase):
    def test_the_walk_sees_the_known_refusal_sites(self) -> None:
        # Guards the walker itself: if it stopped recognising a call shape,
        # the other tests would pass on an empty collection.
        found = collect()
        for code, callee in [
            ("unknown_endpoint", "SbgError"),  # SbgError(...) positional
            ("unknown_host", "_not_found"),  # a module helper
            ("unknown_destination", "TunnelRefused"),  # an SbgError subclass
            ("edu_user_mismatch", "own"),  # a method
            ("plain_http", "_Refusal"),  # a non-SbgError refusal
            ("upstream_no_trust", "__init__"),  # super().__init__ in a subclass
            ("max_connections_per_ip", "_refuse"),  # connection limits
        ]:
            self.assertIn(code, found.literals)
            self.assertIn(callee, {s.callee for s in found.literals[code]}, code)

    def test_every_literal_code_is_in_the_set(self) -> None:
        found = collect()
        unknown = {
            code: [str(s) for s in sites]
            for code, sites in found.literals.items()
            if code not in REFUSAL_CODES
        }
        self.assertEqual(unknown, {}, "add these to sbg.errors.REFUSAL_CODES")

    def test_every_code_in_the_set_is_used(self) -> None:
        self.assertEqual(set(REFUSAL_CODES) - set(collect().literals), set())

    def test_no_code_comes_from_an_unchecked_expression(self) -> None:
        self.assertEqual([str(s) for s in collect().unchecked], [])

    def test_codes_are_short_fixed_identifiers(self) -> None:
        for code in REFUSAL_CODES:
            self.assertRegex(code, r"\A[a-z][a-z0-9_]{2,39}\Z")

    def test_readme_table_lists_every_code(self) -> None:
        self.assertEqual(set(REFUSAL_CODES) - readme_codes(), set())

    def test_readme_table_lists_no_other_code(self) -> None:
        self.assertEqual(readme_codes() - set(REFUSAL_CODES), set())
