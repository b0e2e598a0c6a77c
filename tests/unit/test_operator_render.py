"""The operator's pure core: pool -> manifests, agent reports -> pool status."""

from __future__ import annotations

import datetime as dt

import pytest
import yaml

from kvtier.api import v1alpha1 as api
from kvtier.api.agentconfig import AgentConfig
from kvtier.operator.render import render_pool
from kvtier.operator.status import aggregate
from tests.support import REPO

pytestmark = pytest.mark.unit


def _pool(**spec) -> api.KVCachePool:
    body = yaml.safe_load((REPO / "examples" / "gpu-node-pool.yaml").read_text())
    body["spec"].update(spec)
    return api.KVCachePool.model_validate(body)


def _by_kind(manifests):
    return {m["kind"]: m for m in manifests}


def test_render_is_complete_and_owned():
    out = _by_kind(render_pool(_pool(), "uid-1", "kvtier-system"))
    assert set(out) == {
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "Service",
        "NetworkPolicy",
        "DaemonSet",
    }
    for m in out.values():
        assert m["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
        assert m["metadata"]["labels"]["kvtier.io/pool"] == "fast"
    cfg = AgentConfig.model_validate(yaml.safe_load(out["ConfigMap"]["data"]["agent.yaml"]))
    assert cfg.socketDir == "/var/run/kvtier/fast" and cfg.secretFile == "/etc/kvtier/secret/secret"
    pod = out["DaemonSet"]["spec"]["template"]["spec"]
    hostpaths = {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert hostpaths == {"/var/run/kvtier/fast", "/var/lib/kvtier/fast", "/mnt/nvme0/kvtier"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_render_hugepages_and_device_modes():
    pool = _pool(
        tiers={"dram": {"size": "8Gi", "hugepages": "1Gi"}, "nvme": {"size": "1Ti", "mode": "namespace"}}
    )
    ds = _by_kind(render_pool(pool, "u", "ns"))["DaemonSet"]
    c = ds["spec"]["template"]["spec"]["containers"][0]
    assert (
        c["resources"]["requests"]["hugepages-1Gi"]
        == c["resources"]["limits"]["hugepages-1Gi"]
        == str(8 << 30)
    )
    assert c["securityContext"] == {"privileged": True}, "only device modes need privilege"


def test_config_change_changes_the_pod_template_hash():
    a = _by_kind(render_pool(_pool(), "u", "ns"))["DaemonSet"]
    b = _by_kind(render_pool(_pool(blockTokens=512), "u", "ns"))["DaemonSet"]
    key = "kvtier.io/config-hash"
    assert (
        a["spec"]["template"]["metadata"]["annotations"][key]
        != b["spec"]["template"]["metadata"]["annotations"][key]
    )
    assert render_pool(_pool(), "u", "ns") == render_pool(_pool(), "u", "ns"), "rendering is deterministic"


def _kvn(node: str, beat: dt.datetime, health="Healthy") -> api.KVCacheNode:
    return api.KVCacheNode.model_validate(
        {
            "metadata": {"name": f"fast.{node}"},
            "spec": {"pool": "fast", "node": node},
            "status": {
                "tiers": {"dram": {"capacityBytes": 100, "usedBytes": 40}},
                "hits": 9,
                "misses": 1,
                "health": health,
                "heartbeat": beat.strftime("%Y-%m-%dT%H:%M:%SZ"),
            },
        }
    )


def test_aggregate_counts_ready_nodes_and_flags_stale_ones():
    now = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)
    nodes = [_kvn("a", now), _kvn("b", now - dt.timedelta(minutes=2))]
    st = aggregate(_pool(), 3, nodes, ["a", "b"], {}, [], now)
    assert st["nodes"] == {"desired": 2, "ready": 1, "draining": 0}
    assert st["display"]["nodes"] == "1/2" and st["display"]["hit"] == "90%"
    cond = {c["type"]: c for c in st["conditions"]}
    assert cond["Ready"]["status"] == "False" and cond["Degraded"]["status"] == "True"
    assert "no heartbeat from b" in cond["Degraded"]["message"]
    assert all(c["observedGeneration"] == 3 for c in st["conditions"])


def test_condition_transition_time_only_moves_on_change():
    t0 = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)
    first = aggregate(_pool(), 1, [_kvn("a", t0)], ["a"], {}, [], t0)
    later = t0 + dt.timedelta(seconds=30)
    second = aggregate(_pool(), 1, [_kvn("a", later)], ["a"], {}, first["conditions"], later)
    ready = lambda st: next(c for c in st["conditions"] if c["type"] == "Ready")  # noqa: E731
    assert ready(first)["status"] == "True"
    assert ready(second)["lastTransitionTime"] == ready(first)["lastTransitionTime"]


def test_only_the_pools_own_agents_reach_its_agents():
    """The NetworkPolicy selects exactly the pods the Service does; they admit their pool's agents on
    every port and anyone on the metrics port, and nothing else (the peer port included)."""
    out = _by_kind(render_pool(_pool(), "u", "ns"))
    policy, service, ds = out["NetworkPolicy"], out["Service"], out["DaemonSet"]
    agents = policy["spec"]["podSelector"]["matchLabels"]
    assert agents == service["spec"]["selector"]
    assert agents.items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    from_agents, metrics = policy["spec"]["ingress"]
    assert from_agents == {"from": [{"podSelector": {"matchLabels": agents}}]}
    assert metrics == {"ports": [{"protocol": "TCP", "port": "metrics"}]}
    ports = {p["name"] for c in ds["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
    assert "metrics" in ports and "peer" in ports
