"""The chart's monitoring objects as rendered by helm: the dashboard ConfigMap carries the Grafana
sidecar's label and the very JSON in files/, the PrometheusRule the very rule groups promtool
checks, and the ServiceMonitor labels series by pool and node."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from tests.support import REPO

pytestmark = pytest.mark.integration
CHART = REPO / "charts" / "kvtier"


def _helm(*args: str) -> subprocess.CompletedProcess:
    from kvtier.dev.tools import ensure_tools

    return subprocess.run(
        [str(ensure_tools(quiet=True) / "helm"), *args], capture_output=True, text=True, check=True
    )


def test_monitoring_objects_render_from_the_checked_files():
    enable = ["--set", "metrics.dashboards.enabled=true", "--set", "metrics.prometheusRule.enabled=true",
              "--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.prometheusRule.labels.release=prom"]  # fmt: skip
    lint = _helm("lint", "--strict", str(CHART), *enable)
    assert "0 chart(s) failed" in lint.stdout
    out = _helm(
        "template", "kvtier", str(CHART), "-n", "kvtier-system", "--kube-version", "1.34.4", *enable
    ).stdout
    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out) if d}

    dashboards = docs[("ConfigMap", "kvtier-dashboards")]
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboards["data"]["kvtier.json"]) == json.loads(
        (CHART / "files" / "dashboards" / "kvtier.json").read_text()
    )

    rule = docs[("PrometheusRule", "kvtier")]
    assert rule["metadata"]["labels"]["release"] == "prom"
    assert rule["spec"] == yaml.safe_load((CHART / "files" / "alerts" / "kvtier-rules.yaml").read_text())

    agents = docs[("ServiceMonitor", "kvtier-agents")]
    relabel = {r["targetLabel"] for r in agents["spec"]["endpoints"][0]["relabelings"]}
    assert relabel == {"pool", "node"}
    assert ("PodMonitor", "kvtier-operator") in docs

    plain = _helm("template", "kvtier", str(CHART), "--kube-version", "1.34.4").stdout
    kinds = {d["kind"] for d in yaml.safe_load_all(plain) if d}
    assert not kinds & {"PrometheusRule", "ServiceMonitor", "PodMonitor"}, "all off by default"
