"""The shape of the code, as `docs/architecture.md` describes it.

- no import cycle between sbg's packages (and root modules);
- the pure layers (`sbg.policy`, `sbg.matrix`, `sbg.config`, the refusal
  table, the host grammar) import no Twisted and no OpenSSL binding;
- the benchmarks, the demo and the test bed never import the tests, and no
  test module imports another one (shared helpers live in helper modules);
- small rooms: no module of sbg over 500 lines, no function over 60 lines
  (but the declarative tables named below), a docstring on every class
  another module uses.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections import defaultdict

from twisted.trial.unittest import SynchronousTestCase

import sbg

SBG = os.path.dirname(os.path.abspath(sbg.__file__))
ROOT = os.path.dirname(SBG)
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
# Functions longer than that which are declarations, not logic.
DECLARATIVE = {
    ("sbg/metrics.py", "__init__"): "the table of metric families",
}


def _modules(top: str) -> dict[str, ast.Module]:
    out = {}
    base = os.path.join(ROOT, top)
    for directory, _dirs, files in os.walk(base):
        if "/." in directory or "__pycache__" in directory or ".venv" in directory:
            continue
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                with open(path, encoding="utf-8") as f:
                    out[os.path.relpath(path, ROOT)] = ast.parse(f.read(), path)
    return out


def _imports(tree: ast.Module) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def _unit(module: str) -> str | None:
    """The node of the package graph: `sbg.X` for a package, `sbg.mod` for a
    root module; None outside sbg."""
    parts = module.split(".")
    if parts[0] != "sbg" or len(parts) < 2:
        return None
    return ".".join(parts[:2])


def _known_units() -> set[str]:
    units = set()
    for name in os.listdir(SBG):
        if name.endswith(".py") and name != "__init__.py":
            units.add("sbg." + name[:-3])
        elif os.path.isdir(os.path.join(SBG, name)) and not name.startswith("__"):
            units.add("sbg." + name)
    return units


def package_graph() -> dict[str, set[str]]:
    units = _known_units()
    graph: dict[str, set[str]] = defaultdict(set)
    for path, tree in _modules("sbg").items():
        source = _unit(path[:-3].replace("/", ".").removesuffix(".__init__"))
        if source is None:
            continue
        for imported in _imports(tree):
            target = _unit(imported)
            if target in units and target != source:
                graph[source].add(target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


class LayerTests(SynchronousTestCase):
    def test_no_import_cycle_between_packages(self) -> None:
        graph = package_graph()
        self.assertIn("sbg.config", graph["sbg.policy"])  # the walk sees imports
        self.assertIsNone(_cycle(graph))

    def test_the_cycle_finder_finds_cycles(self) -> None:
        self.assertEqual(_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}), ["a", "b", "c", "a"])
        self.assertIsNone(_cycle({"a": {"b"}, "b": {"c"}}))

    def test_the_pure_layers_import_no_twisted(self) -> None:
        code = (
            "import sys\n"
            "import sbg.policy.inbound, sbg.policy.outbound, sbg.policy.decision\n"
            "import sbg.config.load, sbg.matrix.endpoints, sbg.matrix.origin\n"
            "import sbg.reasons, sbg.hosts, sbg.killswitch.state\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('twisted', 'OpenSSL', 'treq'))\n"
            "print(bad)\n"
            "sys.exit(1 if bad else 0)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_policy_does_not_reach_up(self) -> None:
        graph = package_graph()
        for pure in ("sbg.policy", "sbg.matrix", "sbg.config", "sbg.reasons", "sbg.hosts"):
            for higher in (
                "sbg.http",
                "sbg.inbound",
                "sbg.outbound",
                "sbg.service",
                "sbg.runtime",
                "sbg.clients",
                "sbg.tls",
            ):
                self.assertNotIn(higher, graph.get(pure, set()), pure)

    def test_bench_demo_and_testbed_never_import_the_tests(self) -> None:
        for top in ("bench", "demo", "testbed"):
            for path, tree in _modules(top).items():
                bad = sorted(m for m in _imports(tree) if m.split(".")[0] == "tests")
                self.assertEqual(bad, [], path)

    def test_test_modules_do_not_import_each_other(self) -> None:
        for path, tree in _modules("tests").items():
            bad = sorted(
                m for m in _imports(tree) if m.split(".")[-1].startswith("test_") and "tests" in m
            )
            self.assertEqual(bad, [], path)


class SizeTests(SynchronousTestCase):
    def test_modules(self) -> None:
        for path in _modules("sbg"):
            with open(os.path.join(ROOT, path), encoding="utf-8") as f:
                lines = f.read().count("\n")
            self.assertLessEqual(lines, MAX_MODULE_LINES, path)

    def test_functions(self) -> None:
        long = []
        for path, tree in _modules("sbg").items():
            for node in ast.walk(tree):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                    if length > MAX_FUNCTION_LINES and (path, node.name) not in DECLARATIVE:
                        long.append(f"{path}:{node.lineno} {node.name} ({length} lines)")
        self.assertEqual(long, [])

    def test_shared_classes_have_docstrings(self) -> None:
        modules = _modules("sbg")
        defined: dict[tuple[str, str], ast.ClassDef] = {}
        for path, tree in modules.items():
            module = path[:-3].replace("/", ".").removesuffix(".__init__")
            for node in tree.body:
                if isinstance(node, ast.ClassDef):
                    defined[(module, node.name)] = node
        missing = set()
        for tree in modules.values():
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module:
                    for alias in node.names:
                        cls = defined.get((node.module, alias.name))
                        if cls is not None and ast.get_docstring(cls) is None:
                            missing.add(f"{node.module}.{alias.name}")
        self.assertEqual(sorted(missing), [])
