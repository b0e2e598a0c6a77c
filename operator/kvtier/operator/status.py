"""KVCacheNodes (+ cluster Nodes) -> a pool's status. Pure functions, called by the operator when
something a pool depends on changed (reconcile.py) or a heartbeat is due to expire."""

from __future__ import annotations

import datetime as dt
from typing import Any

from kvtier.api import v1alpha1 as api
from kvtier.api.quantity import format_bytes
from kvtier.kubeapi import condition, merge_patch

STALE_AFTER = dt.timedelta(seconds=45)  # the least: an agent is stale after this or 2.5 heartbeats
MISSED_BEATS = 2.5
# Fields that move with every heartbeat (usage, hit counts): written at most every so often.
USAGE_FIELDS = frozenset({"tiers", "hitRatio", "lastUpdated"})
USAGE_DISPLAY = frozenset({"dram", "nvme", "hit"})


def _parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _iso(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def stale_after(st: api.KVCacheNodeStatus) -> dt.timedelta:
    """How old a KVCacheNode's heartbeat may be: a few of the agent's own intervals."""
    return max(STALE_AFTER, dt.timedelta(seconds=MISSED_BEATS * (st.heartbeatSeconds or 0)))


def is_draining(st: api.KVCacheNodeStatus) -> bool:
    return any(c.type == "Draining" and c.status == "True" for c in st.conditions or [])


def next_expiry(kvnodes: list[api.KVCacheNode], now: dt.datetime) -> dt.datetime | None:
    """When the next fresh heartbeat goes stale: the pool's status must be recomputed then even if
    no event arrives (a dead agent writes nothing)."""
    times = []
    for kvn in kvnodes:
        st = kvn.status or api.KVCacheNodeStatus()
        beat = _parse_time(st.heartbeat)
        if beat is not None and beat + stale_after(st) >= now:
            times.append(beat + stale_after(st) + dt.timedelta(seconds=1))
    return min(times, default=None)


def status_delta(written: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The merge patch from the last written status to `new`, carrying only what changed;
    lastUpdated goes along only when something else changed."""
    delta = merge_patch(written, new)
    delta.pop("lastUpdated", None)
    if delta and "lastUpdated" in new:
        delta["lastUpdated"] = new["lastUpdated"]
    return delta


def usage_only(delta: dict[str, Any]) -> bool:
    """True when a delta only moves usage numbers (written at most every so often), not node
    counts or conditions (written at once)."""
    return (
        bool(delta)
        and set(delta) <= USAGE_FIELDS | {"display"}
        and set(delta.get("display") or {}) <= USAGE_DISPLAY
    )


def node_matches(selector: dict[str, str] | None, node_labels: dict[str, str]) -> bool:
    return all(node_labels.get(k) == v for k, v in (selector or {}).items())


def _condition(
    type_: str,
    ok: bool,
    reason: str,
    message: str,
    generation: int | None,
    previous: list[dict[str, Any]],
    now: str,
) -> dict[str, Any]:
    return api.Condition(**condition(type_, ok, reason, message, previous, now, generation)).model_dump(
        exclude_none=True
    )


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
    dram_cap = dram_used = nvme_cap = nvme_used = hits = misses = draining = 0
    has_nvme = pool.spec.tiers.nvme is not None
    wanted = set(desired_nodes)
    for kvn in kvnodes:
        st = kvn.status or api.KVCacheNodeStatus()
        beat = _parse_time(st.heartbeat)
        fresh = beat is not None and now - beat <= stale_after(st)
        draining += fresh and is_draining(st)
        if wanted and kvn.spec.node not in wanted:
            continue  # the node left the pool: its agent drains and goes; it is not missing
        if not fresh:
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
    # Agents count hits and misses per block, so this is blocks served over blocks asked.
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
        nodes=api.NodeCounts(desired=desired, ready=len(ready), draining=draining),
        tiers=api.TierUsages(
            dram=api.TierUsage(capacityBytes=dram_cap, usedBytes=dram_used),
            nvme=api.TierUsage(capacityBytes=nvme_cap, usedBytes=nvme_used) if has_nvme else None,
        ),
        hitRatio=round(hit_ratio, 4) if hit_ratio is not None else None,
        lastUpdated=stamp,
        display=api.PoolDisplay(
            nodes=f"{len(ready)}/{desired}" + (f" ({draining} draining)" if draining else ""),
            dram=f"{format_bytes(dram_used)}/{format_bytes(dram_cap)}",
            nvme=f"{format_bytes(nvme_used)}/{format_bytes(nvme_cap)}" if has_nvme else "-",
            hit=f"{hit_ratio:.0%}" if hit_ratio is not None else "-",
        ),
    )
    return status.model_dump(mode="json", exclude_none=True)
