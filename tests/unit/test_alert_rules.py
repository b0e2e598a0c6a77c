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


def _label_names() -> dict[str, set[str]]:
    """Series name -> the label names it carries once scraped (the ServiceMonitor adds pool and
    node to agent series; Prometheus adds job and instance)."""
    from prometheus_client.metrics import MetricWrapperBase

    from kvtier.operator import reconcile

    scraped = {"pool", "node", "job", "instance"}
    out: dict[str, set[str]] = {"up": scraped}
    agent = [m for m in vars(Metrics()).values() if isinstance(m, MetricWrapperBase)]
    for metric in (*agent, reconcile.POOL_CONDITION, reconcile.POOL_NODES, reconcile.STATUS_WRITES):
        names = set(metric._labelnames) | scraped
        kind = metric._type
        for suffix in {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(kind, [""]):
            out[metric._name + suffix] = names | ({"le"} if suffix == "_bucket" else set())
    return out


def test_dashboard_is_well_formed_for_grafana():
    """What Grafana needs to load the dashboard as the sidecar hands it over (it was never rendered
    here: no Grafana server can be installed from the registries this project reaches): unique
    panel ids on a 24-column grid without overlaps, every panel and query on the `datasource`
    variable, pool and node variables chained, every selector naming labels the series carries
    and fixed values kvtier exports, and legends drawing on labels the query keeps."""
    from kvtier.agent.metrics import LABEL_VALUES

    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    assert "$pool" in variables["node"]["query"]["query"], "node choices follow the pool chosen"
    on_variable = {"type": "prometheus", "uid": "${datasource}"}
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    labels_of = _label_names()
    for panel in panels:
        g = panel["gridPos"]
        assert panel["type"] in {"stat", "timeseries"} and g["x"] + g["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        assert panel["datasource"] == on_variable, panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            assert target["datasource"] == on_variable and 'pool=~"$pool"' in expr, (panel["title"], expr)
            for name, body in re.findall(r"\b((?:kvtier_|up\b)[a-z0-9_]*)\{([^}]*)\}", expr):
                for label, value in re.findall(r'(\w+)\s*(?:=~|!~|!=|=)\s*"([^"]*)"', body):
                    assert label in labels_of[name], (panel["title"], name, label)
                    if label in LABEL_VALUES and "$" not in value:
                        assert set(value.split("|")) <= LABEL_VALUES[label], (panel["title"], label, value)
            grouped = re.findall(r"by \(([^)]*)\)", expr)
            kept = {label.strip() for by in grouped for label in by.split(",")}
            for label in re.findall(r"\{\{(\w+)\}\}", target.get("legendFormat", "")):
                assert not grouped or label in kept, (panel["title"], label, kept)
