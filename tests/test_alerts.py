"""The Prometheus alert rules query only what sbg really exports.

Every `sbg_*` name in conf/prometheus-alerts.yml is a metric of
`sbg.metrics.Metrics` (with the suffix Prometheus gives it), every label a
selector or an aggregation names is one of that metric's labels, and every
label value it matches for a fixed set (refusal codes, groups, decisions,
directions, reload results, certificate kinds) is a value sbg uses.
"""

from __future__ import annotations

import os
import re
from typing import Any

import yaml
from prometheus_client.metrics import MetricWrapperBase
from twisted.trial.unittest import SynchronousTestCase

from sbg.matrix.groups import GROUPS
from sbg.metrics import Metrics
from sbg.reasons import REFUSAL_CODES
from sbg.tls.failures import LISTENERS as TLS_LISTENERS
from sbg.tls.failures import REASONS as TLS_REASONS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES = os.path.join(ROOT, "conf", "prometheus-alerts.yml")

# Label -> the values sbg gives it, for the labels with a fixed set.
FIXED_VALUES: dict[str, frozenset[str]] = {
    "reason": REFUSAL_CODES
    | frozenset({"connect", "dns", "tls", "timeout", "protocol"})
    | frozenset(TLS_REASONS),
    "listener": frozenset(TLS_LISTENERS),
    "group": frozenset(GROUPS) | {"unknown"},
    "decision": frozenset({"allow", "deny", "would_deny"}),
    "direction": frozenset({"inbound", "outbound", "both"}),
    "result": frozenset({"success", "failure"}),
    "kind": frozenset({"inbound_tls", "upstream_ca", "tls_ca", "outbound_ca"}),
}
# Metrics that are Prometheus's own, not sbg's.
PROMETHEUS_OWN = {"up": ("job", "instance")}

# A string literal (skipped), or a name with its optional label selector.
_SELECTOR = re.compile(r'"[^"]*"|\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{(?:[^}"]|"[^"]*")*\})?')
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_PROMQL_WORDS = {
    "sum",
    "max",
    "min",
    "count",
    "avg",
    "by",
    "without",
    "increase",
    "rate",
    "time",
    "and",
    "or",
    "unless",
    "on",
}


def exported() -> dict[str, tuple[str, ...]]:
    """Every series name sbg exports -> that metric's label names."""
    names: dict[str, tuple[str, ...]] = {}
    for value in vars(Metrics()).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        name = value._name
        labels = tuple(value._labelnames)
        kind = value._type
        if kind == "counter":
            names[f"{name}_total"] = labels
        elif kind == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                names[name + suffix] = labels + (("le",) if suffix == "_bucket" else ())
        else:
            names[name] = labels
    return names


def load_rules() -> list[dict[str, Any]]:
    with open(RULES, encoding="utf-8") as f:
        document = yaml.safe_load(f)
    rules: list[dict[str, Any]] = []
    for group in document["groups"]:
        rules.extend(group["rules"])
    return rules


def metrics_in(expr: str) -> list[tuple[str, str]]:
    """(metric name, its `{...}` selector or "") for every metric in EXPR."""
    out = []
    for m in _SELECTOR.finditer(expr):
        name = m.group(1)
        if name is None or name in _PROMQL_WORDS:
            continue  # a string, or a PromQL function or keyword
        # Grouping labels and range durations are not metrics.
        before = expr[: m.start()]
        if re.search(r"\b(?:by|without)\s*\([^)]*$", before) or before.endswith("["):
            continue
        out.append((name, m.group(2) or ""))
    return out


class AlertRulesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.rules = load_rules()
        self.exported = exported()

    def test_the_alerts_operators_need(self) -> None:
        names = {r["alert"] for r in self.rules}
        self.assertEqual(len(names), len(self.rules), "alert names are unique")
        metrics_used = {name for r in self.rules for name, _ in metrics_in(r["expr"])}
        # Certificate expiry, kill switch engaged, refusals per partner,
        # upstream errors and refused reloads.
        for needed in (
            "sbg_certificate_expiry_timestamp_seconds",
            "sbg_killswitch_engaged",
            "sbg_refusals_total",
            "sbg_upstream_errors_total",
            "sbg_config_reloads_total",
            "sbg_tls_handshake_failures_total",
        ):
            self.assertIn(needed, metrics_used)
        per_partner = [r for r in self.rules if "sbg_refusals_total" in r["expr"]]
        self.assertTrue(any("server" in _grouping(r["expr"]) for r in per_partner))

    def test_every_rule_is_complete(self) -> None:
        for rule in self.rules:
            name = rule["alert"]
            self.assertRegex(name, r"^Sbg[A-Za-z]+$")
            self.assertEqual(
                set(rule) - {"alert", "expr", "for", "labels", "annotations"}, set(), name
            )
            self.assertIn(rule["labels"]["severity"], {"info", "warning", "critical"}, name)
            self.assertTrue(rule["annotations"]["summary"], name)
            self.assertTrue(rule["annotations"]["description"], name)
            if "for" in rule:
                self.assertRegex(rule["for"], r"^\d+[smh]$", name)

    def test_every_metric_exists(self) -> None:
        for rule in self.rules:
            for name, _ in metrics_in(rule["expr"]):
                self.assertTrue(
                    name in self.exported or name in PROMETHEUS_OWN,
                    f"{rule['alert']}: {name} is not a metric sbg exports",
                )

    def test_every_label_exists_and_fixed_values_are_real(self) -> None:
        for rule in self.rules:
            expr = rule["expr"]
            known: set[str] = set()
            for name, selector in metrics_in(expr):
                # A metric without labels exports an empty tuple.
                labels = set(self.exported[name] if name in self.exported else PROMETHEUS_OWN[name])
                known |= labels
                for label, op, value in _MATCHER.findall(selector):
                    self.assertIn(label, labels, f"{rule['alert']}: {name} has no label {label}")
                    if label in FIXED_VALUES:
                        values = value.split("|") if op in ("=~", "!~") else [value]
                        for v in values:
                            self.assertIn(v, FIXED_VALUES[label], f"{rule['alert']}: {label}={v!r}")
            for label in _grouping(expr):
                self.assertIn(label, known, f"{rule['alert']}: groups by unknown label {label}")
            # Labels the annotations use survive the aggregation.
            grouping = _grouping(expr)
            text = " ".join(rule["annotations"].values())
            for label in re.findall(r"\$labels\.(\w+)", text):
                if grouping:
                    self.assertIn(label, grouping, f"{rule['alert']}: $labels.{label}")
                else:
                    self.assertIn(label, known | {"instance", "job"}, rule["alert"])

    def test_the_checks_catch_a_wrong_name(self) -> None:
        # The helpers really see metric names and labels.
        found = metrics_in('sum by (server) (rate(sbg_nope_total{reason="x"}[5m])) > 0')
        self.assertEqual(found, [("sbg_nope_total", '{reason="x"}')])
        self.assertNotIn("sbg_nope_total", self.exported)
        self.assertEqual(_grouping("sum by (a, b) (x)"), {"a", "b"})


def _grouping(expr: str) -> set[str]:
    labels: set[str] = set()
    for group in _GROUPING.findall(expr):
        labels |= {label.strip() for label in group.split(",") if label.strip()}
    return labels
