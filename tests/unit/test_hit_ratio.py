"""The Hit column counts blocks: blocks served over blocks asked, on the agent and in the pool."""

from __future__ import annotations

import datetime as dt
import os

import pytest

from kvtier.agent.metrics import Metrics
from kvtier.agent.store.index import Lease, Store
from kvtier.agent.tiers.dram import DramTier
from kvtier.api import v1alpha1 as api
from kvtier.operator.status import aggregate

pytestmark = pytest.mark.unit
MiB = 1 << 20


def _pool() -> api.KVCachePool:
    return api.KVCachePool.model_validate(
        {"metadata": {"name": "fast"}, "spec": {"tiers": {"dram": {"size": "1Gi"}}}}
    )


def test_hits_and_misses_count_blocks_from_agent_to_pool_status():
    metrics = Metrics()
    store = Store(os.urandom(32), DramTier("p", 16 * MiB, 8 * MiB), None, metrics=metrics)
    try:
        lease = Lease("team-a")
        cached = [bytes([i]) * 32 for i in range(4)]
        absent = [bytes([100 + i]) * 32 for i in range(4)]
        spots = store.allocate(lease, [MiB] * 4, wait=5)
        store.commit(lease, "fp", cached, [(s.id, e.offset) for s, e in spots], [MiB] * 4)
        for keys in (
            cached,  # 4 served
            [*cached[:2], *absent[:2]],  # 2 served, 2 missed (the engine recomputes both)
            absent[2:],  # 2 missed
        ):
            got = store.read(lease, "fp", keys)
            store.release(lease, [b.key for _, _, b in got])
        stats = store.stats()
    finally:
        store.close()
    assert (stats["hits"], stats["misses"]) == (6, 4), "both per block, not misses per request"
    reads = {
        s.labels["result"]: s.value
        for f in metrics.registry.collect()
        if f.name == "kvtier_block_reads"
        for s in f.samples
        if s.name.endswith("_total")
    }
    assert reads == {"dram": 6, "miss": 4}

    now = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)
    kvn = api.KVCacheNode.model_validate(
        {
            "metadata": {"name": "fast.a"},
            "spec": {"pool": "fast", "node": "a"},
            "status": {
                "tiers": {"dram": {"capacityBytes": 16 * MiB, "usedBytes": 4 * MiB}},
                "hits": stats["hits"],
                "misses": stats["misses"],
                "health": "Healthy",
                "heartbeat": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            },
        }
    )
    status = aggregate(_pool(), 1, [kvn], ["a"], {}, [], now)
    assert status["hitRatio"] == 0.6 and status["display"]["hit"] == "60%"
