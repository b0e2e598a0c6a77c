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


def test_a_drained_node_hands_its_hottest_blocks_to_a_peer_and_engines_there_hit_them(
    control_plane, kube, crds_installed, tmp_path
):
    """Two real agents of one pool on two Nodes, peers over NIXL (UCX tcp on loopback), finding
    each other through their KVCacheNodes. Node A is cordoned: it offers its hottest 8 MiB
    (drain.offerBytes); B pulls the blocks of the tenant it serves, and team-a's engine client on B
    hits the hot head of its chain there, byte for byte, and nothing past the bound."""
    import os

    from kvtier.agent.transports.control import ControlClient

    core, custom = client.CoreV1Api(kube), client.CustomObjectsApi(kube)
    tag = uuid.uuid4().hex[:6]
    pool, selector = f"offer-{tag}", {"kvtier.test/offer": tag}
    node_a, node_b = f"gpu-a-{tag}", f"gpu-b-{tag}"
    for node in (node_a, node_b):
        core.create_node({"metadata": {"name": node, "labels": selector}})
    secret = tmp_path / "pool-secret"
    secret.write_bytes(os.urandom(32))
    spec = {
        "nodeSelector": selector,
        "tiers": {"dram": {"size": "64Mi"}},
        "prefetch": {"transport": "tcp"},
        "drain": {"offerBytes": "8Mi"},
    }
    env = {"KUBECONFIG": str(control_plane.kubeconfig)}
    agents = {}

    def start(node: str):
        config = local_agent_config(
            tmp_path / node, pool, spec, segment_bytes=8 * MiB, nodeName=node,
            secretFile=str(secret), heartbeatSeconds=30,
        )  # fmt: skip
        agents[node] = spawn_agent(config, tmp_path / node / "agent.yaml", env=env)
        return agents[node]

    def kvn_status(node: str) -> dict:
        return custom.get_cluster_custom_object(*KVN, api.kvcachenode_name(pool, node)).get("status", {})

    try:
        a, b = start(node_a), start(node_b)
        for node in (node_a, node_b):
            eventually(lambda n=node: kvn_status(n).get("peerAddress"), message=f"{node}'s KVCacheNode")
        keys, data = chain(12), blobs(12)
        b_keys, b_data = chain(4, "team-b"), blobs(4, seed=5)
        with Client(a.tenant("team-a")) as on_a:
            assert on_a.put(FP, keys, data) == 12
        with Client(a.tenant("team-b")) as on_a:
            assert on_a.put(FP, b_keys, b_data) == 4
        time.sleep(1.2)  # what the engines read next is hotter than what was only saved
        with Client(a.tenant("team-a")) as on_a:
            assert on_a.get(FP, keys[:6]) == data[:6]
        with Client(a.tenant("team-b")) as on_a:
            assert on_a.get(FP, b_keys[:2]) == b_data[:2]
        on_b = Client(b.tenant("team-a"))  # B serves team-a (its socket exists there), not team-b

        # a pool member's hostile offers are refused whole, and cost B nothing
        used = b.stats()["dram"]["usedBytes"]
        with ControlClient(b.peer, secret.read_bytes(), timeout=5) as control:
            for bad, why in (
                ({"tenant": "team-b", "keys": ["ab" * 24], "sizes": [MiB]}, "not a tenant this agent serves"),
                ({"keys": ["ab" * 24], "sizes": [-1]}, "sizes must be"),
                ({"keys": [k.hex()[:48] for k in chain(9, "x")], "sizes": [MiB] * 9}, "drain.offerBytes is"),
                ({"from": "127.0.0.1:1", "keys": ["ab" * 24], "sizes": [MiB]}, "not a known peer"),
            ):
                offer = {"op": "offer", "from": a.peer, "tenant": "team-a", **bad}
                reply = control.call(offer, 5)
                assert reply["ok"] is False and why in reply["error"], (bad, reply)
        assert b.stats()["dram"]["usedBytes"] == used

        core.patch_node(node_a, {"spec": {"unschedulable": True}})
        st = eventually(
            lambda: (
                (s := kvn_status(node_a)).get("drain", {}).get("offer", {}).get("state") == "Offered" and s
            ),
            timeout=60,
            message="node A's offer done",
        )
        offer = st["drain"]["offer"]
        assert offer["plannedBytes"] == 8 * MiB, "the hottest blocks, up to drain.offerBytes"
        assert offer["takenBytes"] == 6 * MiB and offer["peers"] == 1, "team-a's six hot blocks"
        assert offer["declinedBytes"] == 2 * MiB, "team-b's two: B does not serve team-b"
        assert offer["progress"] == "100%" and "offered to peers" in _condition(st, "Draining")["message"]

        with on_b:
            assert on_b.lookup(FP, keys) == 6, "the engine on B hits the chain's hot head"
            assert on_b.get(FP, keys[:6]) == data[:6], "byte for byte what A held"
        with Client(b.tenant("team-b")) as c:
            assert c.lookup(FP, b_keys) == 0, "blocks of a tenant B did not serve stayed on A"
        assert b.stats()["pinned"] == 0 and a.stats()["pinned"] == 0
    finally:
        for proc in agents.values():
            proc.kill(signal.SIGTERM)
        for node in (node_a, node_b):
            try:
                core.delete_node(node)
            except ApiException:
                pass
