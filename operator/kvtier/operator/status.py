"""KVCacheNodes (+ cluster Nodes) -> a pool's status. Pure functions, called by the operator's timer."""

from __future__ import annotations

import datetime as dt
from typing import Any

from kvtier.api import v1alpha1 as api
from kvtier.api.quantity import format_bytes

STALE_AFTER = dt.timedelta(seconds=45)


def _parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _iso(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def node_matches(selector: dict[str, str] | None, node_labels: dict[str, str]) -> bool:
    return all(node_labels.get(k) == v for k, v in (selector or {}).items())


def selected_nodes(pool: api.KVCachePool, nodes: list[dict[str, Any]]) -> list[str]:
    return sorted(
        n["metadata"]["name"]
        for n in nodes
        if node_matches(pool.spec.nodeSelector, n["metadata"].get("labels") or {})
    )


def conflicts(
    pool: api.KVCachePool, others: list[api.KVCachePool], nodes: list[dict[str, Any]]
) -> dict[str, list[str]]:
    """Nodes this pool shares with other pools: {node: [other pools]}."""
    mine = set(selected_nodes(pool, nodes))
    out: dict[str, list[str]] = {}
    for other in others:
        if other.metadata.name == pool.metadata.name:
            continue
        for node in mine & set(selected_nodes(other, nodes)):
            out.setdefault(node, []).append(other.metadata.name)
    return out


def _condition(
    type_: str,
    ok: bool,
    reason: str,
    message: str,
    generation: int | None,
    previous: list[dict[str, Any]],
    now: str,
) -> dict[str, Any]:
    status = "True" if ok else "False"
    old = next((c for c in previous if c.get("type") == type_), None)
    since = old["lastTransitionTime"] if old and old.get("status") == status else now
    return api.Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message,
        observedGeneration=generation,
        lastTransitionTime=since,
    ).model_dump(exclude_none=True)


def aggregate(
    pool: api.KVCachePool,
    generation: int | None,
    kvnodes: list[api.KVCacheNode],
    desired_nodes: list[str],
    shared_nodes: dict[str, list[str]],
    previous_conditions: list[dict[str, Any]],
    now: dt.datetime,
) -> dict[str, Any]:
    """The pool's whole status from what its agents reported."""
    stamp = _iso(now)
    ready, stale, unhealthy = [], [], []
    dram_cap = dram_used = nvme_cap = nvme_used = hits = misses = 0
    has_nvme = pool.spec.tiers.nvme is not None
    for kvn in kvnodes:
        st = kvn.status or api.KVCacheNodeStatus()
        beat = _parse_time(st.heartbeat)
        if beat is None or now - beat > STALE_AFTER:
            stale.append(kvn.spec.node)
            continue
        if st.health != "Healthy":
            unhealthy.append(f"{kvn.spec.node} ({st.reason or st.health})")
            continue
        ready.append(kvn.spec.node)
        dram_cap += st.tiers.dram.capacityBytes
        dram_used += st.tiers.dram.usedBytes
        if st.tiers.nvme:
            nvme_cap += st.tiers.nvme.capacityBytes
            nvme_used += st.tiers.nvme.usedBytes
        hits += st.hits
        misses += st.misses
    # Without Node objects (the local control plane) the agents that report are the desired set.
    desired = len(desired_nodes) if desired_nodes else len(kvnodes)
    hit_ratio = hits / (hits + misses) if hits + misses else None

    problems = []
    if stale:
        problems.append(f"no heartbeat from {', '.join(sorted(stale))}")
    if unhealthy:
        problems.append(f"unhealthy: {', '.join(sorted(unhealthy))}")
    if shared_nodes:
        pairs = "; ".join(
            f"{node} also in {', '.join(sorted(p))}" for node, p in sorted(shared_nodes.items())
        )
        problems.append(f"nodes selected by more than one pool: {pairs}")
    all_ready = desired > 0 and len(ready) >= desired
    conditions = [
        _condition(
            "Ready",
            all_ready and not shared_nodes,
            "AgentsReady" if all_ready else ("NoNodes" if desired == 0 else "AgentsNotReady"),
            f"{len(ready)}/{desired} agents ready"
            if desired
            else "no node matches the pool's nodeSelector yet",
            generation,
            previous_conditions,
            stamp,
        ),
        _condition(
            "Progressing",
            len(ready) < desired and not stale,
            "RollingOut" if len(ready) < desired else "Stable",
            f"waiting for {desired - len(ready)} agent(s)" if len(ready) < desired else "all agents report",
            generation,
            previous_conditions,
            stamp,
        ),
        _condition(
            "Degraded",
            bool(problems),
            "NodeConflict" if shared_nodes else ("AgentsFailing" if problems else "AsExpected"),
            "; ".join(problems) or "no problems",
            generation,
            previous_conditions,
            stamp,
        ),
    ]
    status = api.KVCachePoolStatus(
        observedGeneration=generation,
        conditions=[api.Condition(**c) for c in conditions],
        nodes=api.NodeCounts(desired=desired, ready=len(ready)),
        tiers=api.TierUsages(
            dram=api.TierUsage(capacityBytes=dram_cap, usedBytes=dram_used),
            nvme=api.TierUsage(capacityBytes=nvme_cap, usedBytes=nvme_used) if has_nvme else None,
        ),
        hitRatio=round(hit_ratio, 4) if hit_ratio is not None else None,
        lastUpdated=stamp,
        display=api.PoolDisplay(
            nodes=f"{len(ready)}/{desired}",
            dram=f"{format_bytes(dram_used)}/{format_bytes(dram_cap)}",
            nvme=f"{format_bytes(nvme_used)}/{format_bytes(nvme_cap)}" if has_nvme else "-",
            hit=f"{hit_ratio:.0%}" if hit_ratio is not None else "-",
        ),
    )
    return status.model_dump(mode="json", exclude_none=True)
