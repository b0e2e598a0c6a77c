"""The agent's metrics follow Prometheus conventions: the unit (or what is counted) ends the name,
counters are exposed with `_total`, and every label comes from a small fixed set of values, checked
over the registry of a store that did real work (DRAM and NVMe tiers on files, hits, misses,
write-behind, promotion, a corrupt block)."""

from __future__ import annotations

import importlib.metadata
import os
import re
import time

import pytest

from kvtier import __version__
from kvtier.agent.api.server import TenantHandler
from kvtier.agent.metrics import LABEL_VALUES, Metrics
from kvtier.agent.store.index import Lease, Store
from kvtier.agent.tiers.dram import DramTier
from kvtier.agent.tiers.nvme import ALIGN, NvmeTier

pytestmark = pytest.mark.unit
MiB = 1 << 20
# What may end a name: a base unit, or the thing counted (plural), or a 0/1 state.
UNITS = {"bytes", "seconds", "blocks"}
COUNTED = {"failures", "errors", "reads", "prefetches", "writes", "connections", "gids"}
STATES = {"available", "draining"}
INFO = {"info"}  # the convention for a constant 1 whose labels say what is in use
FORBIDDEN_LABELS = {"key", "tenant", "namespace", "peer", "address", "pod", "block"}


def _busy_registry(tmp_path) -> Metrics:
    metrics = Metrics()
    store = Store(
        os.urandom(32),
        DramTier("p", 16 * MiB, 8 * MiB),
        NvmeTier(tmp_path / "nvme.img", 64 * MiB),
        metrics=metrics,
    )
    try:
        lease = Lease("team-a")
        keys = [bytes([i]) * 32 for i in range(24)]
        for i in range(0, 24, 4):
            spots = store.allocate(lease, [MiB] * 4, wait=5)
            for seg, ext in spots:
                seg.view(ext, MiB)[:] = os.urandom(MiB)
            store.commit(lease, "fp", keys[i : i + 4], [(s.id, e.offset) for s, e in spots], [MiB] * 4)
        store.flush()
        store.evict_dram()
        got = store.read(lease, "fp", [*keys[:2], b"missing" * 4])  # NVMe hits, promoted, one miss
        store.release(lease, [b.key for _, _, b in got])
        # a corrupt block on NVMe: a miss and a checksum failure, never wrong data
        # one that eviction left on NVMe alone (what stays in DRAM depends on the tenant's share)
        k5 = next(k for k in keys[2:] if store.blocks[store.index_key("team-a", "fp", k)].seg is None)
        victim = store.blocks[store.index_key("team-a", "fp", k5)]
        with open(tmp_path / "nvme.img", "r+b") as f:  # not through the tier's direct-I/O handle
            os.pwrite(f.fileno(), b"\xff" * 4096, ALIGN + victim.nvme.offset)  # type: ignore[union-attr]
        assert store.read(lease, "fp", [k5]) == []
        time.sleep(0.05)
    finally:
        store.close()
    return metrics


def test_agent_metric_names_and_labels_follow_prometheus_conventions(tmp_path):
    metrics = _busy_registry(tmp_path)
    families = list(metrics.registry.collect())
    assert len(families) >= 20
    seen_labels: dict[str, set[str]] = {}
    for family in families:
        name = family.name
        assert re.fullmatch(r"kvtier_[a-z][a-z0-9_]*[a-z]", name), name
        last = name.rsplit("_", 1)[1]
        assert last in UNITS | COUNTED | STATES | INFO, f"{name}: say the unit or what is counted at the end"
        if last in INFO:
            assert family.type == "gauge", name
        if last in STATES:
            assert family.type == "gauge" and family.documentation.startswith("1 "), name
        if family.type == "counter":
            assert not name.endswith("_total"), "the client adds _total once"
            assert {s.name for s in family.samples} <= {f"{name}_total", f"{name}_created"}
        if family.type == "histogram":
            assert last in UNITS, name
        for sample in family.samples:
            for label, value in sample.labels.items():
                if label == "le":
                    continue
                assert label not in FORBIDDEN_LABELS, f"{name}: unbounded label {label}"
                seen_labels.setdefault(label, set()).add(value)
    for label, values in seen_labels.items():
        assert label in LABEL_VALUES, f"label {label} is not declared in metrics.LABEL_VALUES"
        assert values <= LABEL_VALUES[label], f"{label}: {values - LABEL_VALUES[label]} not declared"
    assert seen_labels["tier"] == {"dram", "nvme"} and "miss" in seen_labels["result"]
    assert "nvme" in seen_labels["source"], "the corrupt block was counted"


def test_operation_label_values_are_the_agents_own_operations():
    ops = {name[3:] for name in dir(TenantHandler) if name.startswith("op_")}
    assert ops <= LABEL_VALUES["op"], "every socket operation is a declared label value"


def test_build_info_says_the_version_with_a_constant_one():
    samples = [s for f in Metrics().registry.collect() if f.name == "kvtier_build_info" for s in f.samples]
    assert [(s.labels, s.value) for s in samples] == [({"version": __version__}, 1.0)]
    assert __version__ == importlib.metadata.version("kvtier")
