"""Drain on cordon, end to end: a real agent process learns through the API (a watch on its own
Node) that its node was cordoned, stops taking new blocks and writes its hottest DRAM-only blocks to
NVMe within the pool's drain.maxBytes; its KVCacheNode shows Draining with progress; the operator
counts it in the pool's status; after a SIGKILL and a restart the hot blocks are still there."""

from __future__ import annotations

import signal
import time
import uuid

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kvtier.agent.api.protocol import AgentError
from kvtier.agent.client import Client
from kvtier.api import v1alpha1 as api
from kvtier.dev.agents import local_agent_config, spawn_agent
from tests.integration.test_agent import FP, blobs, chain
from tests.support import eventually

pytestmark = pytest.mark.integration
MiB = 1 << 20
KVN = (api.GROUP, api.VERSION, "kvcachenodes")


def _condition(status: dict, type_: str) -> dict:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def _stable_stats(agent, seconds: float = 1.5) -> dict:
    """Stats once write-behind has settled (the NVMe block count stops moving)."""
    last, since = None, time.monotonic()
    while time.monotonic() - since < seconds:
        now = agent.stats()
        if last is None or now["nvme"]["blocks"] != last["nvme"]["blocks"]:
            last, since = now, time.monotonic()
        time.sleep(0.2)
    return last


def test_cordon_drains_hot_blocks_to_nvme_and_they_survive_a_restart(
    control_plane, kube, operator_process, tmp_path
):
    core, custom = client.CoreV1Api(kube), client.CustomObjectsApi(kube)
    tag = uuid.uuid4().hex[:6]
    pool, node = f"drain-{tag}", f"gpu-{tag}"
    selector = {"kvtier.test/drain": tag}
    core.create_node({"metadata": {"name": node, "labels": selector}})
    spec = {
        "nodeSelector": selector,
        # NVMe smaller than what DRAM holds: write-behind keeps only the newest blocks there, so
        # the drain has DRAM-only blocks to choose from
        "tiers": {
            "dram": {"size": "64Mi"},
            "nvme": {"size": "16Mi", "mode": "file", "path": str(tmp_path / "nvme.img")},
        },
        "eviction": {"policy": "lru"},
        "tenancy": {"dramShare": 1, "nvmeShare": 1},  # one tenant: the whole arena is its share
        "drain": {"maxBytes": "8Mi"},
    }
    custom.create_cluster_custom_object(
        api.GROUP, api.VERSION, "kvcachepools",
        {"apiVersion": api.API_VERSION, "kind": "KVCachePool", "metadata": {"name": pool}, "spec": spec},
    )  # fmt: skip
    config = local_agent_config(
        tmp_path, pool, spec, segment_bytes=8 * MiB, nodeName=node, heartbeatSeconds=30
    )
    env = {"KUBECONFIG": str(control_plane.kubeconfig)}
    agent = spawn_agent(config, tmp_path / "agent.yaml", env=env)
    name = api.kvcachenode_name(pool, node)

    def kvn_status() -> dict:
        return custom.get_cluster_custom_object(*KVN, name).get("status", {})

    try:
        st = eventually(lambda: (s := kvn_status()).get("health") == "Healthy" and s, message="KVCacheNode")
        assert _condition(st, "Draining")["status"] == "False" and st["heartbeatSeconds"] == 30

        keys, data = chain(40), blobs(40)
        with Client(agent.tenant("team-a")) as c:
            for i in range(0, 40, 4):
                c.put(FP, keys[i : i + 4], data[i : i + 4], wait=5)
            before = _stable_stats(agent)
            dram_only = before["dram"]["blocks"] - before["nvme"]["blocks"]
            assert before["dram"]["blocks"] == 40 and dram_only >= 16, before
            hot = keys[:8]  # the oldest blocks (DRAM-only by now) become the hottest
            assert c.get(FP, hot) == data[:8]

            core.patch_node(node, {"spec": {"unschedulable": True}})
            st = eventually(
                lambda: (s := kvn_status()).get("drain", {}).get("state") == "Flushed" and s,
                timeout=30,
                message="drain flushed",
            )
            draining = _condition(st, "Draining")
            assert draining["status"] == "True" and draining["reason"] == "Cordoned"
            assert st["drain"]["plannedBytes"] == 8 * MiB, "the hottest, up to drain.maxBytes"
            assert st["drain"]["movedBytes"] == 8 * MiB and st["drain"]["progress"] == "100%"
            assert st["drain"]["skippedBytes"] == (dram_only - 8) * MiB
            with pytest.raises(AgentError, match="draining"):
                c.put(FP, chain(1, "new"), blobs(1, seed=9))

        pool_nodes = eventually(
            lambda: (
                (n := custom.get_cluster_custom_object(api.GROUP, api.VERSION, "kvcachepools", pool)
                 .get("status", {}).get("nodes", {})).get("draining") == 1 and n
            ),
            message="the pool counts the draining node",
        )  # fmt: skip
        assert pool_nodes["desired"] == 1

        # the node goes down hard; what the drain wrote is what comes back
        agent.kill(signal.SIGKILL)
        agent = spawn_agent(config, tmp_path / "agent.yaml", env=env)
        with Client(agent.tenant("team-a")) as c:
            assert c.lookup(FP, hot) == 8, "the hot blocks survived on NVMe"
            assert c.get(FP, hot) == data[:8]
            assert c.lookup(FP, keys[8:9]) == 0, "blocks over the bound were not moved"

        core.patch_node(node, {"spec": {"unschedulable": False}})
        st = eventually(
            lambda: (s := kvn_status()) and _condition(s, "Draining").get("status") == "False" and s,
            message="drain ended on uncordon",
        )
        assert "drain" not in st
        with Client(agent.tenant("team-a")) as c:
            assert c.put(FP, chain(1, "new"), blobs(1, seed=9)) == 1, "new blocks are taken again"

        core.patch_node(node, {"metadata": {"labels": {"kvtier.test/drain": "elsewhere"}}})
        st = eventually(
            lambda: (s := kvn_status()) and _condition(s, "Draining").get("status") == "True" and s,
            message="drain when the node leaves the pool's selector",
        )
        assert _condition(st, "Draining")["reason"] == "LeftSelector"
    finally:
        agent.kill(signal.SIGTERM)
        for delete in (
            lambda: custom.delete_cluster_custom_object(api.GROUP, api.VERSION, "kvcachepools", pool),
            lambda: core.delete_node(node),
        ):
            try:
                delete()
            except ApiException:
                pass
