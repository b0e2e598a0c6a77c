"""The chart's alerts and dashboard: every alert has its runbook in docs/operator.md, every metric
they query is one kvtier exports, and promtool (built from its Go module by
hack/build-promtool.sh) accepts the rules and passes their unit tests."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from kvtier.agent.metrics import Metrics
from tests.support import REPO

pytestmark = pytest.mark.unit
RULES = REPO / "charts" / "kvtier" / "files" / "alerts" / "kvtier-rules.yaml"
DASHBOARD = REPO / "charts" / "kvtier" / "files" / "dashboards" / "kvtier.json"
RULE_TESTS = REPO / "tests" / "promtool" / "kvtier-rules-test.yaml"


def _rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def _exported() -> set[str]:
    """Every series name kvtier exports: the agent's registry and the operator's gauges."""
    from kvtier.operator import reconcile

    names = set()
    for family in Metrics().registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        names |= {family.name + s for s in suffixes}
    for metric in (reconcile.POOL_CONDITION, reconcile.POOL_NODES, reconcile.STATUS_WRITES):
        names |= {m.name + ("_total" if m.type == "counter" else "") for m in metric.collect()}
    return names | {"up"}


def _queried(expr: str) -> set[str]:
    names = set(re.findall(r"\b((?:kvtier_|up\b)[a-z0-9_]*)", expr))
    return {n for n in names if not n.startswith("kvtier:")}


def test_every_alert_has_a_runbook_and_queries_exported_metrics():
    doc = (REPO / "docs" / "operator.md").read_text()
    alerts = [r for r in _rules() if "alert" in r]
    assert {a["alert"] for a in alerts} == {
        "KvtierAgentDown", "KvtierHitRateCollapse", "KvtierNvmeErrors", "KvtierChecksumFailures", "KvtierPoolDegraded",
    }  # fmt: skip
    exported = _exported()
    for rule in _rules():
        assert _queried(rule["expr"]) <= exported, (rule.get("alert") or rule.get("record"), exported)
    for alert in alerts:
        anchor = alert["annotations"]["runbook_url"].rsplit("#", 1)[1]
        assert f"### {alert['alert']}" in doc and anchor == alert["alert"].lower(), alert["alert"]


def test_dashboard_queries_exported_metrics_per_pool_and_node():
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    recorded = {r["record"] for r in _rules() if "record" in r}
    exported = _exported()
    for expr in exprs:
        assert _queried(expr) <= exported, expr
        assert set(re.findall(r"kvtier:[a-z0-9_:]+", expr)) <= recorded, expr
    titles = {p["title"] for p in dash["panels"]}
    for wanted in (
        "Restore bandwidth",
        "Tier usage",
        "Evictions and demotions",
        "Checksum failures",
        "Prefetch outcomes",
    ):
        assert wanted in titles
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "pool", "node"}


def _promtool() -> str:
    found = os.environ.get("KVTIER_PROMTOOL") or next(
        (str(p) for p in sorted(Path.home().glob(".cache/kvtier/tools/promtool-*/bin/promtool"))), None
    )
    if not found:
        pytest.skip("promtool not built (bash hack/build-promtool.sh builds it from its Go module)")
    return found


def test_promtool_checks_the_rules_and_their_unit_tests_pass():
    promtool = _promtool()
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 7 rules found" in check.stdout
    tests = subprocess.run(
        [promtool, "test", "rules", RULE_TESTS.name], capture_output=True, text=True, cwd=RULE_TESTS.parent
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "SUCCESS" in tests.stdout
