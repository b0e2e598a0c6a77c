"""What the connector tells vLLM besides KV: KV events (blocks stored in / removed from the pool, for
routers that route by cache), the worker's report of finished saves, and transfer stats (vLLM's
periodic log line and its Prometheus endpoint)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

try:  # the worker -> scheduler report (absent in older releases: no KV events there)
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorWorkerMetadata
except ImportError:  # pragma: no cover - depends on the vLLM release
    KVConnectorWorkerMetadata = object  # type: ignore[assignment,misc]

MEDIUM = "CPU"  # the pool's first tier is host memory (vLLM's own name for it)
COUNTERS = ("loaded_blocks", "failed_blocks", "saved_blocks", "skipped_saves", "loaded_bytes", "saved_bytes")


def _external(block_hash: Any) -> Any:
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

    return maybe_convert_block_hash(block_hash)


def stored(request: Any, first_block: int, blocks: int, block_tokens: int, hash_block_size: int) -> Any:
    """A BlockStored event for `blocks` kvtier blocks of a request, in vLLM's hash blocks."""
    from vllm.distributed.kv_events import BlockStored

    per = block_tokens // hash_block_size
    lo, hi = first_block * per, (first_block + blocks) * per
    hashes = list(request.block_hashes[lo:hi])
    lora = getattr(request, "lora_request", None)
    return BlockStored(
        block_hashes=[_external(h) for h in hashes],
        parent_block_hash=_external(request.block_hashes[lo - 1]) if lo else None,
        token_ids=list(request.all_token_ids[lo * hash_block_size : hi * hash_block_size]),
        block_size=hash_block_size,
        lora_id=getattr(lora, "lora_int_id", None),
        medium=MEDIUM,
        lora_name=getattr(lora, "lora_name", None),
    )


def per_block(event: Any, blocks: int) -> list[list[Any]]:
    """The event's hashes, grouped by kvtier block."""
    hashes = event.block_hashes
    per = len(hashes) // max(1, blocks)
    return [hashes[i * per : (i + 1) * per] for i in range(blocks)]


def removed(hashes: list[Any]) -> Any:
    from vllm.distributed.kv_events import BlockRemoved

    return BlockRemoved(block_hashes=hashes, medium=MEDIUM)


@dataclass
class KVTierWorkerMetadata(KVConnectorWorkerMetadata):  # type: ignore[misc,valid-type]
    """Saves the workers finished since the last step (each tensor-parallel rank saves its shard)."""

    stored: list[Any] = field(default_factory=list)

    def aggregate(self, other: KVTierWorkerMetadata) -> KVTierWorkerMetadata:
        seen = {(s.req_id, s.first_block): s for s in self.stored}
        for s in other.stored:  # the first rank to report a save announces it (events are advisory)
            seen.setdefault((s.req_id, s.first_block), s)
        return KVTierWorkerMetadata(list(seen.values()))


def worker_meta(stored_list: list[Any]) -> Any:
    return KVTierWorkerMetadata(list(stored_list)) if KVConnectorWorkerMetadata is not object else None


@dataclass
class KVTierStats(KVConnectorStats):
    """Counters since the last report; summed across workers and intervals."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVTierStats:
        data = dict(self.data)
        for k, v in (other.data or {}).items():
            data[k] = data.get(k, 0) + v
        return KVTierStats(data=data)

    def reduce(self) -> dict[str, int | float]:
        return {f"kvtier_{k}": int(self.data.get(k, 0)) for k in COUNTERS}

    def is_empty(self) -> bool:
        return not any(self.data.get(k) for k in COUNTERS)


def stats(counts: dict[str, int], keep_empty: bool = False) -> KVTierStats | None:
    s = KVTierStats(data={k: int(v) for k, v in counts.items() if k in COUNTERS})
    return s if keep_empty or not s.is_empty() else None


class KVTierPromMetrics(KVConnectorPromMetrics):
    """vllm:kvtier_* counters, one per engine."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self.counters = {}
        for k in COUNTERS:
            counter = self._counter_cls(
                name=f"vllm:kvtier_{k}",
                documentation=f"kvtier connector: {k.replace('_', ' ')}",
                labelnames=labelnames,
            )
            self.counters[k] = {i: counter.labels(*v) for i, v in per_engine_labelvalues.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for k in COUNTERS:
            if transfer_stats_data.get(k):
                self.counters[k][engine_idx].inc(transfer_stats_data[k])


def prom_metrics(vllm_config, metric_types, labelnames, per_engine_labelvalues) -> KVTierPromMetrics:
    return KVTierPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)
