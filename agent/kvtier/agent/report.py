"""The agent's KVCacheNode: capacity, usage, devices, health and drain of this pool on this node.

Written through the Kubernetes API when the agent runs in a cluster (or KUBECONFIG points at one);
skipped otherwise. The operator aggregates these into the pool's status. At a thousand nodes every
write counts, so the agent writes when something changed that the operator acts on (health,
devices, drain), when usage moved by a noticeable step, and otherwise on a slow heartbeat with
jitter (so restarted fleets do not beat in step); each write is a merge patch of the status
subresource carrying only the fields that changed, plus the heartbeat.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvtier.api import v1alpha1 as api
from kvtier.kubeapi import merge_patch

if TYPE_CHECKING:
    from kvtier.agent.main import Agent

log = logging.getLogger("kvtier.agent.report")

# Moved every request: written on the heartbeat, or when usage moved by `usage_step` of capacity.
USAGE_FIELDS = ("tiers", "hits", "misses", "heartbeat")


def node_status(agent: Agent, now: dt.datetime | None = None) -> dict[str, Any]:
    """The KVCacheNode status for the agent's current state (pure apart from reading stats)."""
    now = now or dt.datetime.now(dt.UTC)
    stats = agent.store.stats()
    dram, nvme = stats["dram"], stats["nvme"]
    drain = agent.drainer
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
        heartbeat=now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        heartbeatSeconds=agent.config.heartbeatSeconds,
        conditions=[api.Condition(**c) for c in drain.conditions(now)],
        drain=drain.progress,
    )
    return status.model_dump(mode="json", exclude_none=True)


def agent_version() -> str:
    from kvtier.agent.main import VERSION

    return VERSION


@dataclass
class ReportPolicy:
    """When a KVCacheNode write is due (pure: the clock and randomness come in)."""

    heartbeat_s: float = 60.0
    jitter: float = 0.1  # each interval is heartbeat_s * (1 +- jitter)
    min_gap_s: float = 1.0  # between any two writes (drain progress, flapping health)
    usage_gap_s: float = 15.0  # between writes caused by usage alone
    usage_step: float = 0.05  # of a tier's capacity

    def next_beat(self, now: float, rng: random.Random) -> float:
        return now + self.heartbeat_s * (1 + rng.uniform(-self.jitter, self.jitter))

    def due(
        self,
        sent: dict[str, Any] | None,
        current: dict[str, Any],
        now: float,
        last_write: float,
        beat_at: float,
    ) -> str | None:
        """Why to write now, or None."""
        if sent is None:
            return "first"
        if now >= beat_at:
            return "heartbeat"
        if now - last_write < self.min_gap_s:
            return None
        if any(sent.get(k) != current.get(k) for k in current.keys() | sent.keys() if k not in USAGE_FIELDS):
            return "changed"
        if now - last_write >= self.usage_gap_s and self._usage_moved(sent, current):
            return "usage"
        return None

    def _usage_moved(self, sent: dict[str, Any], current: dict[str, Any]) -> bool:
        for tier, now_t in (current.get("tiers") or {}).items():
            then_t = (sent.get("tiers") or {}).get(tier) or {}
            step = self.usage_step * max(1, now_t.get("capacityBytes", 0))
            if abs(now_t.get("usedBytes", 0) - then_t.get("usedBytes", 0)) >= step:
                return True
        return False


class NodeReporter:
    POLL_S = 2.0  # how often the agent looks at its own state (no API call unless a write is due)

    def __init__(self, agent: Agent, api_client: Any, policy: ReportPolicy | None = None) -> None:
        from kubernetes import client

        self.agent = agent
        self.api = client.CustomObjectsApi(api_client)
        self.name = api.kvcachenode_name(agent.config.pool, agent.node)
        self.policy = policy or ReportPolicy(heartbeat_s=agent.config.heartbeatSeconds)
        self.rng = random.Random()
        self.poke = threading.Event()  # set when something the operator acts on changed (a drain)
        self.writes = 0

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

    def write(self, sent: dict[str, Any] | None, current: dict[str, Any]) -> None:
        """Create the KVCacheNode if needed (first write) and patch what changed since `sent`."""
        from kubernetes.client.exceptions import ApiException

        args = (api.GROUP, api.VERSION, "kvcachenodes")
        if sent is None:
            try:
                self.api.create_cluster_custom_object(*args, self.body())
            except ApiException as exc:
                if exc.status != 409:
                    raise
            # the whole status: fields a previous run wrote and this one lacks are removed
            delta = {**dict.fromkeys(api.KVCacheNodeStatus.model_fields), **current}
        else:
            delta = merge_patch(sent, current)
        self.api.patch_cluster_custom_object_status(*args, self.name, {"status": delta})
        self.writes += 1

    def report_once(self) -> None:
        """One full write (tests, start-up)."""
        self.write(None, node_status(self.agent))

    def run(self, stop: threading.Event) -> None:
        from kubernetes.client.exceptions import ApiException

        sent: dict[str, Any] | None = None  # what the API holds, as far as this agent knows
        last_write, beat_at = 0.0, 0.0
        while not stop.is_set():
            current = node_status(self.agent)
            now = time.monotonic()
            reason = self.policy.due(sent, current, now, last_write, beat_at)
            if reason:
                try:
                    self.write(sent, current)
                    sent, last_write = current, now
                    beat_at = self.policy.next_beat(now, self.rng)
                except ApiException as exc:
                    if exc.status == 404:
                        sent = None  # deleted (pool re-created): create it again
                    log.warning("could not write KVCacheNode %s: %s", self.name, exc.reason)
                    beat_at = now + 5
                except Exception as exc:  # the API being down must never stop the data path
                    log.warning("could not write KVCacheNode %s: %s", self.name, exc)
                    beat_at = now + 5
            self.poke.wait(self.POLL_S)
            self.poke.clear()
