"""The operator against the real API server: apply a pool, watch what appears, break it, delete it."""

from __future__ import annotations

import copy
import datetime as dt
import json
import uuid
from pathlib import Path

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kvtier.api import v1alpha1 as api
from kvtier.api.agentconfig import AgentConfig
from tests.support import REPO, eventually, kubectl

pytestmark = pytest.mark.integration
NS = "kvtier-system"
EXAMPLE = yaml.safe_load((REPO / "examples" / "gpu-node-pool.yaml").read_text())


def pool_body(name: str, **spec_overrides) -> dict:
    body = copy.deepcopy(EXAMPLE)
    body["metadata"] = {"name": name}
    body["spec"].update(spec_overrides)
    return body


@pytest.fixture
def pool_name(kube, operator_process):
    name = f"p-{uuid.uuid4().hex[:6]}"
    yield name
    try:
        client.CustomObjectsApi(kube).delete_cluster_custom_object(*POOL_ARGS, name)
    except ApiException:
        pass


POOL_ARGS = (api.GROUP, api.VERSION, "kvcachepools")


def _create(kube, body):
    return client.CustomObjectsApi(kube).create_cluster_custom_object(*POOL_ARGS, body)


def _agent_config(kube, name) -> AgentConfig:
    cm = client.CoreV1Api(kube).read_namespaced_config_map(f"kvtier-agent-{name}", NS)
    return AgentConfig.model_validate(yaml.safe_load(cm.data["agent.yaml"]))


def test_pool_lifecycle_creates_updates_and_removes_children(kube, pool_name, control_plane):
    apps, core, custom = client.AppsV1Api(kube), client.CoreV1Api(kube), client.CustomObjectsApi(kube)
    _create(kube, pool_body(pool_name))
    child = f"kvtier-agent-{pool_name}"

    ds = eventually(lambda: apps.read_namespaced_daemon_set(child, NS), timeout=15, message="DaemonSet")
    svc = core.read_namespaced_service(child, NS)
    assert svc.spec.cluster_ip == "None", "peers find each other through a headless Service"
    policy = client.NetworkingV1Api(kube).read_namespaced_network_policy(child, NS)
    assert policy.spec.pod_selector.match_labels == svc.spec.selector, "only the pool's agents reach them"
    cfg = _agent_config(kube, pool_name)
    assert cfg.pool == pool_name and cfg.dram_bytes == 64 << 30 and cfg.spec.tiers.nvme.mode == "file"
    container = ds.spec.template.spec.containers[0]
    assert container.args == ["agent", "--config", "/etc/kvtier/agent.yaml"]
    assert container.resources.limits["memory"] == str((64 << 30) + (256 << 20)), (
        "the arena is the pod's memory"
    )
    assert not (container.security_context.privileged or False), "file mode needs no privilege"
    assert ds.spec.template.spec.node_selector == {"nvidia.com/gpu.present": "true"}
    first_hash = ds.spec.template.metadata.annotations["kvtier.io/config-hash"]

    # spec change -> configuration and pod template roll
    custom.patch_cluster_custom_object(*POOL_ARGS, pool_name, {"spec": {"tiers": {"dram": {"size": "96Gi"}}}})
    eventually(lambda: _agent_config(kube, pool_name).dram_bytes == 96 << 30, message="ConfigMap update")
    ds = eventually(
        lambda: (
            (d := apps.read_namespaced_daemon_set(child, NS)).spec.template.metadata.annotations[
                "kvtier.io/config-hash"
            ]
            != first_hash
            and d
        ),
        message="DaemonSet rollout",
    )
    assert ds.spec.template.spec.containers[0].resources.limits["memory"] == str((96 << 30) + (256 << 20))

    # drift is repaired: a deleted DaemonSet comes back
    apps.delete_namespaced_daemon_set(child, NS)
    eventually(lambda: apps.read_namespaced_daemon_set(child, NS), timeout=15, message="DaemonSet re-created")

    # deletion removes everything (no garbage collector here: the finalizer does it)
    custom.create_cluster_custom_object(
        api.GROUP, api.VERSION, "kvcachenodes", _kvn(pool_name, "node-a", fresh=True)
    )
    custom.delete_cluster_custom_object(*POOL_ARGS, pool_name)

    def gone() -> bool:
        for read in (
            lambda: apps.read_namespaced_daemon_set(child, NS),
            lambda: core.read_namespaced_config_map(child, NS),
            lambda: core.read_namespaced_service(child, NS),
            lambda: client.NetworkingV1Api(kube).read_namespaced_network_policy(child, NS),
            lambda: core.read_namespaced_secret(f"kvtier-pool-{pool_name}", NS),
            lambda: client.RbacAuthorizationV1Api(kube).read_cluster_role(child),
            lambda: custom.get_cluster_custom_object(
                api.GROUP, api.VERSION, "kvcachenodes", f"{pool_name}.node-a"
            ),
            lambda: custom.get_cluster_custom_object(*POOL_ARGS, pool_name),
        ):
            try:
                read()
                return False
            except ApiException as exc:
                if exc.status != 404:
                    raise
        return True

    eventually(gone, timeout=20, message="everything removed")


INVALID = [
    ({"tiers": {"dram": {"size": 0}}}, "must be a positive quantity"),
    ({"tiers": {"dram": {"size": "-4Gi"}}}, "must be a positive quantity"),
    ({"tiers": {"dram": {"size": "lots"}}}, "must be a positive quantity"),
    ({"blockTokens": 100}, "blockTokens must be a multiple of 16"),
    ({"blockTokens": 8192}, "should be less than or equal to 4096"),
    ({"eviction": {"highWatermark": 0.8, "lowWatermark": 0.9}}, "lowWatermark must be below highWatermark"),
    (
        {"tiers": {"dram": {"size": "1Gi"}, "nvme": {"size": "1Ti", "mode": "tape"}}},
        'supported values: "namespace", "partition", "file"',
    ),
    (
        {"tiers": {"dram": {"size": "1Gi"}, "nvme": {"size": "1Ti", "mode": "file"}}},
        "path is required when mode is file",
    ),
    (
        {"tiers": {"dram": {"size": "1Gi"}, "nvme": {"size": "1Ti", "mode": "namespace", "path": "/x"}}},
        "path is only for mode file",
    ),
    ({"tiers": {"dram": {"size": "1Gi", "numa": "near"}}}, "numa must be auto or a NUMA node index"),
    ({"tiers": {"dram": {"size": "1Gi", "hugepages": "4Ki"}}}, 'supported values: "none", "2Mi", "1Gi"'),
    ({"prefetch": {"deadline": "soon"}}, "spec.prefetch.deadline"),
]


@pytest.mark.parametrize(("spec", "message"), INVALID, ids=[m for _, m in INVALID])
def test_invalid_pools_are_refused_with_a_message(kube, crds_installed, spec, message):
    body = {
        "apiVersion": api.API_VERSION,
        "kind": "KVCachePool",
        "metadata": {"name": f"bad-{uuid.uuid4().hex[:6]}"},
    }
    body["spec"] = {"tiers": {"dram": {"size": "1Gi"}}, **spec}
    with pytest.raises(ApiException) as err:
        _create(kube, body)
    assert err.value.status == 422
    assert message in json.loads(err.value.body)["message"]


def test_nvme_mode_and_path_are_immutable(kube, crds_installed):
    name = f"imm-{uuid.uuid4().hex[:6]}"
    custom = client.CustomObjectsApi(kube)
    _create(kube, pool_body(name))
    try:
        for patch, message in (
            ({"mode": "namespace", "path": None}, "nvme.mode is immutable"),
            ({"path": "/mnt/other/cache"}, "nvme.path is immutable"),
        ):
            with pytest.raises(ApiException) as err:
                custom.patch_cluster_custom_object(*POOL_ARGS, name, {"spec": {"tiers": {"nvme": patch}}})
            assert message in json.loads(err.value.body)["message"]
        custom.patch_cluster_custom_object(*POOL_ARGS, name, {"spec": {"tiers": {"nvme": {"size": "2Ti"}}}})
    finally:
        custom.delete_cluster_custom_object(*POOL_ARGS, name)


def _kvn(
    pool: str, node: str, fresh: bool = True, used: int = 1 << 30, hits: int = 3, misses: int = 1
) -> dict:
    beat = dt.datetime.now(dt.UTC) - (dt.timedelta(0) if fresh else dt.timedelta(minutes=5))
    return {
        "apiVersion": api.API_VERSION,
        "kind": "KVCacheNode",
        "metadata": {"name": api.kvcachenode_name(pool, node), "labels": {"kvtier.io/pool": pool}},
        "spec": {"pool": pool, "node": node},
        "status": {
            "tiers": {
                "dram": {"capacityBytes": 64 << 30, "usedBytes": used, "blocks": 10},
                "nvme": {"capacityBytes": 1 << 40, "usedBytes": 2 * used, "blocks": 20},
            },
            "hits": hits,
            "misses": misses,
            "health": "Healthy",
            "heartbeat": beat.strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
    }


def _write_kvn(kube, body):
    custom = client.CustomObjectsApi(kube)
    args = (api.GROUP, api.VERSION, "kvcachenodes")
    status = body.pop("status")
    try:
        custom.create_cluster_custom_object(*args, body)
    except ApiException as exc:
        if exc.status != 409:
            raise
    custom.patch_cluster_custom_object_status(*args, body["metadata"]["name"], {"status": status})


def _nodes(kube, names, labels):
    core = client.CoreV1Api(kube)
    for name in names:
        try:
            core.create_node({"metadata": {"name": name, "labels": labels}})
        except ApiException as exc:
            if exc.status != 409:
                raise


def _condition(pool: dict, type_: str) -> dict:
    return next(c for c in pool.get("status", {}).get("conditions", []) if c["type"] == type_)


def test_kvcachenodes_aggregate_into_pool_status_and_columns(kube, pool_name, control_plane):
    custom = client.CustomObjectsApi(kube)
    label = f"pool-{pool_name}"
    _nodes(kube, [f"{pool_name}-gpu-0", f"{pool_name}-gpu-1"], {"kvtier.test/group": label})
    _create(kube, pool_body(pool_name, nodeSelector={"kvtier.test/group": label}))
    _write_kvn(kube, _kvn(pool_name, f"{pool_name}-gpu-0"))

    def status():
        return custom.get_cluster_custom_object(*POOL_ARGS, pool_name).get("status", {})

    st = eventually(
        lambda: (s := status()).get("nodes", {}).get("ready") == 1 and s, message="one node ready"
    )
    assert st["nodes"] == {"desired": 2, "ready": 1, "draining": 0}
    assert _condition({"status": st}, "Ready")["status"] == "False"
    assert _condition({"status": st}, "Progressing")["status"] == "True"

    _write_kvn(kube, _kvn(pool_name, f"{pool_name}-gpu-1", hits=1, misses=3))
    st = eventually(
        lambda: (s := status()).get("nodes", {}).get("ready") == 2 and s, message="two nodes ready"
    )
    assert st["tiers"]["dram"] == {"capacityBytes": 128 << 30, "usedBytes": 2 << 30}
    assert st["hitRatio"] == 0.5
    assert _condition({"status": st}, "Ready")["status"] == "True"

    out = kubectl(control_plane, "get", "kvp", pool_name).stdout
    header, row = out.splitlines()[:2]
    assert header.split() == ["NAME", "READY", "NODES", "DRAM", "NVME", "HIT", "AGE"]
    assert row.split()[:6] == [pool_name, "True", "2/2", "2Gi/128Gi", "4Gi/2Ti", "50%"]
    kvn = kubectl(control_plane, "get", "kvn", "-l", f"kvtier.io/pool={pool_name}").stdout
    assert f"{pool_name}.{pool_name}-gpu-0" in kvn and "Healthy" in kvn

    # a stale heartbeat marks the node not ready and the pool Degraded, with the node named
    _write_kvn(kube, _kvn(pool_name, f"{pool_name}-gpu-1", fresh=False))
    st = eventually(lambda: (s := status()).get("nodes", {}).get("ready") == 1 and s, message="stale node")
    degraded = _condition({"status": st}, "Degraded")
    assert degraded["status"] == "True" and f"{pool_name}-gpu-1" in degraded["message"]


def test_two_pools_on_one_node_degrade_with_a_reason(kube, operator_process):
    custom = client.CustomObjectsApi(kube)
    tag = uuid.uuid4().hex[:6]
    _nodes(kube, [f"shared-{tag}"], {"kvtier.test/shared": tag})
    names = [f"a-{tag}", f"b-{tag}"]
    try:
        for name in names:
            _create(kube, pool_body(name, nodeSelector={"kvtier.test/shared": tag}))

        def degraded():
            pool = custom.get_cluster_custom_object(*POOL_ARGS, names[0])
            cond = _condition(pool, "Degraded")
            return cond["status"] == "True" and cond

        cond = eventually(degraded, message="Degraded")
        assert cond["reason"] == "NodeConflict"
        assert names[1] in cond["message"] and f"shared-{tag}" in cond["message"]
    finally:
        for name in names:
            custom.delete_cluster_custom_object(*POOL_ARGS, name)


def test_example_pool_applies_with_kubectl(control_plane, crds_installed):
    path = Path(REPO / "examples" / "gpu-node-pool.yaml")
    out = kubectl(control_plane, "apply", "--dry-run=server", "-f", str(path))
    assert "kvcachepool.kvtier.io/fast" in out.stdout
