"""The project's documentation stands alone and keeps up with the code.

- The text of the project (README, CHANGELOG, docs/, man/, debian/, sbg/,
  testbed/, bench/*.py, demo/, conf/) cites only the project's own
  documents: no document outside the repository, no numbered section of an
  outside specification, no "issue N" or "first session" talk.
- Every configuration key the loader accepts (`sbg.config.load.KEY_TABLES`)
  has its entry in docs/configuration.md, and every entry there is a key
  the loader accepts; the example there is a valid configuration.
- Every metric family sbg registers has its entry in docs/metrics.md, with
  its type and exactly its labels, and nothing else has one.
- Every reason code of `sbg.reasons` is in docs/decisions.md; the steps are
  numbered without gaps and every step cited anywhere exists.
- Every relative link between the documents resolves, anchors included.

Each check is a function of text, and each has a test showing that it
finds what it looks for.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase
from twisted.trial.unittest import SynchronousTestCase

import sbg
from sbg.config import load
from sbg.config.load import parse_config_text
from sbg.errors import ConfigErrors
from sbg.metrics import Metrics
from sbg.reasons import REFUSAL_CODES
from sbg.synapse.metrics import room_refusals

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
SBG_DIR = os.path.dirname(os.path.abspath(sbg.__file__))

# -- 1. the text speaks of the project only -----------------------------------

# Where the project's text is (tests/ cites these patterns, so it is not here).
TEXT_PLACES = ("README.md", "CHANGELOG.md", "docs", "man", "debian", "testbed", "demo", "conf")
FORBIDDEN = re.compile(
    r"\.\./shared|shared/docs|federation-notes|room-rules-notes"
    r"|\bcontract(?:s|'s)?\b"
    r"|\bissues?\s*#?\s*\d+"
    r"|\bsession",
    re.IGNORECASE,
)
# "session" in its technical senses: a TLS session, a process session.
ALLOWED = re.compile(
    r"start_new_session|ssl_session_cache|_?session_id|TLS sessions?|sessions can resume"
    r"|session leader|its own session",
    re.IGNORECASE,
)


def forbidden(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every reference to something outside the project."""
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        spans = [m.span() for m in ALLOWED.finditer(line)]
        for m in FORBIDDEN.finditer(line):
            if not any(a <= m.start() < b for a, b in spans):
                found.append((number, line.strip()))
                break
    return found


def _text_files() -> Iterator[str]:
    tops = [os.path.join(ROOT, place) for place in TEXT_PLACES]
    tops += [SBG_DIR, os.path.join(ROOT, "bench")]
    for top in tops:
        if os.path.isfile(top):
            yield top
            continue
        for directory, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
            if os.path.basename(top) == "bench":
                dirs[:] = []  # bench/*.py only: its venv is not the project's text
                files = [f for f in files if f.endswith(".py")]
            for name in sorted(files):
                yield os.path.join(directory, name)


def _read(path: str) -> str:
    """A file's text; "" for a binary file."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    return "" if "\x00" in text else text


class ProjectTextTests(SynchronousTestCase):
    def test_the_text_cites_only_the_project(self) -> None:
        problems = []
        count = 0
        for path in _text_files():
            count += 1
            for number, line in forbidden(_read(path)):
                problems.append(f"{os.path.relpath(path, ROOT)}:{number}: {line}")
        self.assertGreater(count, 50)
        self.assertEqual(problems, [])

    def test_every_place_is_there(self) -> None:
        # The package's test suite (scripts/ci-deb-check) copies these too;
        # sbg is wherever it is imported from.
        for place in (*TEXT_PLACES, "bench"):
            self.assertTrue(os.path.exists(os.path.join(ROOT, place)), place)
        self.assertTrue(os.path.isfile(os.path.join(SBG_DIR, "reasons.py")), SBG_DIR)

    def test_the_check_finds_outside_references(self) -> None:
        for bad in (
            "is specified in `../shared/docs/contract.md`",
            "Beyond the contract's keys, the configuration has:",
            "(contract 5.1 row 8)",
            "## Targets (issue 7)",
            "see issue #12",
            "## Current figures, second session",
            "as the first session left it",
            "(federation-notes 1.1)",
        ):
            self.assertEqual(len(forbidden(bad)), 1, bad)
        for good in (
            "start_new_session=True,",
            "ssl_session_cache shared:px:10m;",
            "ctx.set_session_id(session_id)",
            "so that sessions can resume.",
            "and facts about the TLS session (the peer certificate)",
            "Each process runs in its own session (so its whole process group",
            "pgid = proc.pid  # session leader: its pid is the process group id",
            "a contractor's issue tracker",
        ):
            self.assertEqual(forbidden(good), [], good)


# -- 2. every configuration key ---------------------------------------------

# Each table of accepted keys, and where its keys sit in the file.
PLACES = {
    "_TOP_KEYS": ("",),
    "_LISTENER_KEYS": ("listeners[]",),
    "_INBOUND_KEYS": ("inbound",),
    "_OUTBOUND_KEYS": ("outbound",),
    "_PROXY_AUTH_KEYS": ("outbound.proxy_auth",),
    "_NON_MATRIX_KEYS": ("outbound.allowed_non_matrix_urls[]",),
    "_TLS_KEYS": ("outbound.ca", "internal_homeservers[].tls"),
    "_INTERNAL_KEYS": ("internal_homeservers[]",),
    "_EXTERNAL_KEYS": ("external_homeservers[]",),
    "_TRUST_LEVEL_KEYS": ("trust_levels.<name>",),
    "_RATE_LIMIT_KEYS": ("trust_levels.<name>.rate_limit", "limits.rate_limit_per_ip"),
    "_ROOMS_KEYS": ("trust_levels.<name>.rooms",),
    "_LIMITS_KEYS": ("limits",),
    "_CLUSTER_KEYS": ("cluster",),
}


def accepted_paths(tables: dict[str, tuple[str, ...]]) -> set[str]:
    """The key path of every key the loader accepts (lists as `[]`, names as
    `<name>`); a table without a known place is an error."""
    paths = set()
    for table, keys in tables.items():
        if table not in PLACES:
            raise AssertionError(f"{table}: where do its keys go? Add it to PLACES")
        for parent in PLACES[table]:
            paths.update(f"{parent}.{key}" if parent else key for key in keys)
    return paths


def documented_paths(markdown: str) -> set[str]:
    """The key path of every entry: a heading that is one backquoted path."""
    return set(re.findall(r"(?m)^#{2,6} `([^`\s]+)`$", markdown))


class ConfigurationDocTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.text = _read(os.path.join(DOCS, "configuration.md"))

    def test_every_key_and_only_keys(self) -> None:
        accepted = accepted_paths(dict(load.KEY_TABLES))
        self.assertIn("limits.rate_limit_per_ip.burst", accepted)
        self.assertGreater(len(accepted), 60)
        documented = documented_paths(self.text)
        self.assertEqual(sorted(accepted - documented), [], "keys without an entry")
        self.assertEqual(sorted(documented - accepted), [], "entries for no key")

    def test_the_check_finds_missing_and_stale_entries(self) -> None:
        tables = {"_TOP_KEYS": ("mode",), "_LIMITS_KEYS": ("max_tunnels",)}
        self.assertEqual(accepted_paths(tables), {"mode", "limits.max_tunnels"})
        with self.assertRaises(AssertionError):
            accepted_paths({"_NEW_KEYS": ("x",)})
        doc = "### `mode`\n\n#### `limits.max_tunels`\n"
        self.assertEqual(documented_paths(doc), {"mode", "limits.max_tunels"})

    def test_the_example_is_a_valid_configuration(self) -> None:
        section = self.text.split("## A complete example", 1)[1]
        example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
        try:
            config = parse_config_text(example, base_dir="/etc/sbg", path="x", skip_files=True)
        except ConfigErrors as e:
            self.fail("\n".join(e.lines()))
        self.assertEqual([e.server_name for e in config.external_homeservers], ["partner.example"])

    def test_the_man_page_and_the_package_point_to_it(self) -> None:
        man = _read(os.path.join(ROOT, "man", "sbg.yaml.5")).replace("\\-", "-")
        self.assertIn("/usr/share/doc/sbg/docs/configuration.md", man)
        self.assertIn("docs", _read(os.path.join(ROOT, "debian", "sbg.docs")).split())


# -- 3. every metric family --------------------------------------------------


def registered_families() -> dict[str, tuple[str, frozenset[str]]]:
    """Exposed name -> (type, label names) of every family sbg registers."""
    wrappers: list[Any] = [v for v in vars(Metrics()).values() if isinstance(v, MetricWrapperBase)]
    wrappers.append(room_refusals(CollectorRegistry()))
    out = {}
    for m in wrappers:
        kind = m._type
        name = m._name + ("_total" if kind == "counter" else "")
        out[name] = (kind, frozenset(m._labelnames))
    return out


def documented_families(markdown: str) -> dict[str, tuple[str, frozenset[str]]]:
    """Name -> (type, labels) of every entry: `## \\`name\\`` then its
    "Counter. Labels: `a`, `b`." (or "Gauge. No labels.") line."""
    out = {}
    for section in re.split(r"(?m)^## ", markdown)[1:]:
        heading, _, body = section.partition("\n")
        m = re.fullmatch(r"`([a-z_]+)`", heading.strip())
        if m is None:
            continue
        line = re.search(
            r"(?m)^(Counter|Gauge|Histogram)\. (?:Labels: ([^\n]+?)|No labels)\.$", body
        )
        if line is None:
            out[m.group(1)] = ("?", frozenset())
            continue
        labels = frozenset(re.findall(r"`([a-z_]+)`", line.group(2) or ""))
        out[m.group(1)] = (line.group(1).lower(), labels)
    return out


class MetricsDocTests(SynchronousTestCase):
    def test_every_family_with_its_type_and_labels(self) -> None:
        registered = registered_families()
        self.assertIn("sbg_requests_total", registered)
        self.assertIn("sbg_room_refusals_total", registered)
        documented = documented_families(_read(os.path.join(DOCS, "metrics.md")))
        self.assertEqual(sorted(set(registered) - set(documented)), [], "undocumented")
        self.assertEqual(sorted(set(documented) - set(registered)), [], "no such metric")
        for name, described in registered.items():
            self.assertEqual(documented[name], described, name)

    def test_the_check_finds_wrong_entries(self) -> None:
        doc = (
            "# Metrics\n\n## `sbg_a_total`\n\nCounter. Labels: `direction`, `server`.\n\n"
            "text\n\n## `sbg_b`\n\nGauge. No labels.\n\n## `sbg_c`\n\nno type line\n"
        )
        self.assertEqual(
            documented_families(doc),
            {
                "sbg_a_total": ("counter", frozenset({"direction", "server"})),
                "sbg_b": ("gauge", frozenset()),
                "sbg_c": ("?", frozenset()),
            },
        )


# -- 4. the decision orders ---------------------------------------------------


def step_anchors(markdown: str) -> dict[str, list[int]]:
    """Direction -> the step numbers with an anchor, in document order."""
    out: dict[str, list[int]] = {"inbound": [], "outbound": []}
    for direction, n in re.findall(r'<a id="(inbound|outbound)-(\d+)"></a>', markdown):
        out[direction].append(int(n))
    return out


def cited_steps(text: str) -> set[tuple[str, int]]:
    """Every (direction, step) a text cites as "inbound step 8" or
    "outbound steps 3-9" (both ends of a range)."""
    found = set()
    for direction, first, last in re.findall(
        r"\b(inbound|outbound) steps? (\d+)(?:\s*[-\u2013]\s*(\d+))?", text
    ):
        found.add((direction, int(first)))
        if last:
            found.add((direction, int(last)))
    return found


def summary_codes(markdown: str) -> set[str]:
    """The reason codes named in the rows of the step tables."""
    codes = set()
    for row in re.findall(r"(?m)^\| \[\d+\]\(#(?:in|out)bound-\d+\) \|(.+)$", markdown):
        codes.update(re.findall(r"`([a-z_]+)`", row.split("|")[1]))
    return codes


class DecisionsDocTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.text = _read(os.path.join(DOCS, "decisions.md"))

    def test_every_reason_code(self) -> None:
        missing = [c for c in sorted(REFUSAL_CODES) if f"`{c}`" not in self.text]
        self.assertEqual(missing, [])

    def test_the_step_tables_name_only_reason_codes(self) -> None:
        codes = summary_codes(self.text)
        self.assertIn("unknown_host", codes)
        self.assertEqual(sorted(codes - REFUSAL_CODES), [])

    def test_steps_are_numbered_without_gaps(self) -> None:
        for direction, numbers in step_anchors(self.text).items():
            self.assertEqual(numbers, list(range(1, len(numbers) + 1)), direction)
            self.assertGreater(len(numbers), 10, direction)

    def test_every_cited_step_exists(self) -> None:
        anchors = step_anchors(self.text)
        paths = [p for p in _text_files() if p.endswith((".py", ".md", ".1", ".5"))]
        tests = os.path.dirname(os.path.abspath(__file__))
        paths += [os.path.join(tests, n) for n in os.listdir(tests) if n.endswith(".py")]
        missing = []
        for path in paths:
            for direction, n in sorted(cited_steps(_read(path))):
                if n not in anchors[direction]:
                    missing.append(f"{os.path.relpath(path, ROOT)}: {direction} step {n}")
        self.assertEqual(missing, [])

    def test_the_checks_find_what_they_look_for(self) -> None:
        doc = '<a id="inbound-1"></a>\n<a id="inbound-3"></a>\n<a id="outbound-1"></a>\n'
        self.assertEqual(step_anchors(doc), {"inbound": [1, 3], "outbound": [1]})
        self.assertEqual(
            cited_steps("(docs/decisions.md, inbound step 8) and outbound steps 3-9"),
            {("inbound", 8), ("outbound", 3), ("outbound", 9)},
        )
        row = "| [4](#inbound-4) | the Host | `unknown_host`, `no_such_code` | 404 | `M_X` |\n"
        self.assertEqual(summary_codes(row), {"unknown_host", "no_such_code"})


# -- 5. links between the documents ------------------------------------------


def slug(heading: str) -> str:
    """The anchor a Markdown renderer (GitHub's rules) gives a heading."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors_of(markdown: str) -> set[str]:
    out = set(re.findall(r'<a id="([^"]+)"></a>', markdown))
    seen: dict[str, int] = {}
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = None if in_code else re.match(r"#{1,6} (.+)$", line)
        if m is None:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(path: str, markdown: str) -> list[str]:
    """Relative links of PATH's MARKDOWN to a missing file or anchor."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", markdown):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        if not file:
            if anchor not in anchors_of(markdown):
                broken.append(target)
            continue
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), file))
        exists = os.path.exists(resolved)
        if exists and anchor and resolved.endswith(".md"):
            exists = anchor in anchors_of(_read(resolved))
        if not exists:
            broken.append(target)
    return broken


class LinkTests(SynchronousTestCase):
    def test_links_resolve(self) -> None:
        pages = [os.path.join(ROOT, "README.md")]
        pages += [os.path.join(DOCS, n) for n in sorted(os.listdir(DOCS)) if n.endswith(".md")]
        for name in ("configuration.md", "decisions.md", "metrics.md"):
            self.assertIn(os.path.join(DOCS, name), pages)
        problems = []
        for page in pages:
            for target in broken_links(page, _read(page)):
                problems.append(f"{os.path.relpath(page, ROOT)}: {target}")
        self.assertEqual(problems, [])

    def test_the_check_finds_broken_links(self) -> None:
        page = os.path.join(DOCS, "x.md")
        good = (
            "[a](decisions.md#inbound-4) [b](#here) [c](https://x) [d](configuration.md#outboundca)"
        )
        self.assertEqual(broken_links(page, "## Here\n" + good), [])
        bad = "[a](nothing.md) [b](decisions.md#inbound-99) [c](#nowhere)"
        self.assertEqual(
            broken_links(page, bad), ["nothing.md", "decisions.md#inbound-99", "#nowhere"]
        )
        self.assertEqual(
            slug("3. Pin the external servers' keys: `sbg keys fetch`"),
            "3-pin-the-external-servers-keys-sbg-keys-fetch",
        )
        self.assertEqual(slug("`trust_levels.<name>.mode`"), "trust_levelsnamemode")
