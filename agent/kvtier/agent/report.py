"""The agent's KVCacheNode: capacity, usage, devices and health of this pool on this node.

Written through the Kubernetes API every heartbeat when the agent runs in a cluster (or KUBECONFIG
points at one); skipped otherwise. The operator aggregates these into the pool's status.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from typing import TYPE_CHECKING, Any

from kvtier.api import v1alpha1 as api

if TYPE_CHECKING:
    from kvtier.agent.main import Agent

log = logging.getLogger("kvtier.agent.report")


def node_status(agent: Agent) -> dict[str, Any]:
    """The KVCacheNode status for the agent's current state (pure apart from reading stats)."""
    stats = agent.store.stats()
    dram, nvme = stats["dram"], stats["nvme"]
    status = api.KVCacheNodeStatus(
        tiers=api.TierUsages(
            dram=api.TierUsage(**{k: dram[k] for k in ("capacityBytes", "usedBytes", "blocks")}),
            nvme=api.TierUsage(**{k: nvme[k] for k in ("capacityBytes", "usedBytes", "blocks")})
            if agent.nvme
            else None,
        ),
        devices=api.NodeDevices(
            gpus=agent.gpus,
            gpuReason=agent.gpu_reason,
            nvme=agent.nvme_devices,
        ),
        hits=stats["hits"],
        misses=stats["misses"],
        health="Degraded" if agent.health_reason else "Healthy",
        reason=agent.health_reason,
        agentVersion=agent_version(),
        numaNode=agent.numa,
        peerAddress=agent.peer_address,
        transport=agent.transport_status,
        heartbeat=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    return status.model_dump(mode="json", exclude_none=True)


def agent_version() -> str:
    from kvtier.agent.main import VERSION

    return VERSION


class NodeReporter:
    def __init__(self, agent: Agent, api_client: Any) -> None:
        from kubernetes import client

        self.agent = agent
        self.api = client.CustomObjectsApi(api_client)
        self.name = api.kvcachenode_name(agent.config.pool, agent.node)

    def body(self) -> dict[str, Any]:
        cfg = self.agent.config
        meta: dict[str, Any] = {"name": self.name, "labels": {"kvtier.io/pool": cfg.pool}}
        if cfg.poolUid:
            meta["ownerReferences"] = [
                {"apiVersion": api.API_VERSION, "kind": "KVCachePool", "name": cfg.pool, "uid": cfg.poolUid}
            ]
        return {
            "apiVersion": api.API_VERSION,
            "kind": "KVCacheNode",
            "metadata": meta,
            "spec": {"pool": cfg.pool, "node": self.agent.node},
        }

    def report_once(self) -> None:
        from kubernetes.client.exceptions import ApiException

        args = (api.GROUP, api.VERSION, "kvcachenodes")
        try:
            self.api.get_cluster_custom_object(*args, self.name)
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.api.create_cluster_custom_object(*args, self.body())
        self.api.patch_cluster_custom_object_status(*args, self.name, {"status": node_status(self.agent)})

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.report_once()
            except Exception as exc:  # the API being down must never stop the data path
                log.warning("could not write KVCacheNode %s: %s", self.name, exc)
            stop.wait(self.agent.config.heartbeatSeconds)
