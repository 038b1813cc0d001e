"""The sample Grafana dashboard queries only metrics sbg really exports."""

from __future__ import annotations

import json
import os
import re

from twisted.trial.unittest import SynchronousTestCase

from sbg.metrics import Metrics

DASHBOARD = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf", "grafana-dashboard.json"
)


class DashboardTests(SynchronousTestCase):
    def test_every_metric_exists(self) -> None:
        with open(DASHBOARD) as f:
            dash = json.load(f)
        exported = set()
        for family in Metrics().registry.collect():
            exported.add(family.name)
            for sample in family.samples:
                exported.add(sample.name)
        exported |= {f"{n}_bucket" for n in exported} | {f"{n}_total" for n in exported}
        used = set()
        for panel in dash["panels"]:
            for target in panel["targets"]:
                used |= set(re.findall(r"\bsbg_[a-z_]+", target["expr"]))
        self.assertTrue(used)
        self.assertEqual(used - exported, set())
