"""KVTierConnector: vLLM's KVConnectorBase_V1, both roles (vLLM makes one instance per role)."""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvtier.agent.client import CONNECTION_LOST
from kvtier.agent.connectors.gpu import ArenaConnection
from kvtier.agent.connectors.paged import UnsupportedLayout
from kvtier.agent.connectors.vllm import events
from kvtier.agent.connectors.vllm.keys import block_keys
from kvtier.agent.connectors.vllm.plan import Planner, Transfer
from kvtier.agent.connectors.vllm.worker import Stored, Worker

log = logging.getLogger("kvtier.vllm")
DEFAULT_BLOCK_TOKENS = 256


@dataclass
class KVTierConnectorMetadata(KVConnectorMetadata):
    loads: list[Transfer] = field(default_factory=list)
    saves: list[Transfer] = field(default_factory=list)
    preempted: bool = False  # a request lost its pages this step: saves in flight finish first


class KVTierConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self.scheduler_role = role == KVConnectorRole.SCHEDULER
        self.page = int(vllm_config.cache_config.block_size)
        self.socket = extra.get("socket") or os.environ.get("KVTIER_SOCKET", "/var/run/kvtier/kvtier.sock")
        self.layerwise = bool(extra.get("layerwise", True))
        self.async_save = bool(extra.get("async_save", True))
        self.lookup_wait = float(extra.get("lookup_wait_s", 0.005))
        # A hung or dead agent must not hold up the engine: lookups give up after lookup_timeout_s,
        # the worker's pin/commit calls after io_timeout_s (a promotion from NVMe moves gigabytes),
        # and after a lost connection every call is a miss for retry_after_s.
        self._conn = ArenaConnection(
            self.socket,
            timeout=float(
                extra.get("lookup_timeout_s", 0.25) if self.scheduler_role else extra.get("io_timeout_s", 60)
            ),
            retry_after=float(extra.get("retry_after_s", 5.0)),
        )
        self.block_tokens = int(extra.get("block_tokens") or self._agent_block_tokens())
        self.hash_block_size = _hash_block_size(vllm_config, kv_cache_config, self.page)
        self.fingerprint = extra.get("fingerprint") or _fingerprint(
            vllm_config, kv_cache_config, self.block_tokens
        )
        self.disabled = _unsupported(
            vllm_config, kv_cache_config, self.page, self.hash_block_size, self.block_tokens
        )
        # scheduler side
        self.planner = Planner(self.page, self.block_tokens, self._keys)
        self._matched: dict[str, int] = {}  # request -> the tokens vLLM held when it asked
        self._lookups: dict[str, tuple[int, Future]] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._events: list[Any] = []
        self._unconfirmed: dict[tuple[str, int], tuple[list[bytes], Any]] = {}
        self._announced: OrderedDict[bytes, list[Any]] = OrderedDict()
        # worker side
        self.worker = Worker(self._conn, self.fingerprint, self.page, self.block_tokens, self.layerwise)
        if self.disabled:
            log.warning("kvtier connector disabled: %s", self.disabled)
        elif self.scheduler_role:
            log.info(
                "kvtier connector: blocks of %d tokens (%d pages of %d), agent at %s, fingerprint %s",
                self.block_tokens, self.block_tokens // self.page, self.page, self.socket, self.fingerprint,
            )  # fmt: skip

    def _agent_block_tokens(self) -> int:
        client = self._conn.get()
        if client is None:
            log.warning(
                "kvtier agent not reachable at start-up: blocks of %d tokens assumed", DEFAULT_BLOCK_TOKENS
            )
            return DEFAULT_BLOCK_TOKENS
        return int(client.block_tokens)

    def _keys(self, request: Any, max_tokens: int) -> list[bytes]:
        return block_keys(request.block_hashes, self.hash_block_size, self.block_tokens, max_tokens)

    # ------------------------------------------------------------------------- scheduler side

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        if self.disabled:
            return 0, False
        # leave at least one token for the model to compute (it produces the next token's logits)
        keys = self._keys(request, _prompt_tokens(request) - 1)
        if len(keys) * self.block_tokens <= num_computed_tokens:
            return 0, False
        hits = self._lookup(request.request_id, keys)
        if hits is None:
            return None, False  # asked again at the next step; the scheduler goes on meanwhile
        self._observe_removed(keys, hits)
        self._matched[request.request_id] = num_computed_tokens
        return max(0, hits * self.block_tokens - num_computed_tokens), False

    def _lookup(self, req_id: str, keys: list[bytes]) -> int | None:
        """The agent's prefix hit, without holding up the scheduler: the lookup runs on a thread;
        a reply within lookup_wait_s is used at once, a later one at the next call."""
        pending = self._lookups.get(req_id)
        if pending is None or pending[0] != len(keys):
            client = self._conn.get()
            if client is None:
                return 0
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="kvtier-lookup")
            pending = (len(keys), self._executor.submit(client.lookup, self.fingerprint, keys))
            self._lookups[req_id] = pending
        if not wait([pending[1]], timeout=self.lookup_wait).done:
            return None
        try:
            hits = pending[1].result()
        except Exception as exc:  # the agent lost or refusing is a miss, never a scheduler error
            log.warning("kvtier lookup failed: %s", exc)
            if isinstance(exc, CONNECTION_LOST):
                self._conn.lost(exc)
            hits = 0
        del self._lookups[req_id]
        # at most the keys asked about: more would have vLLM skip tokens the prompt does not have
        return min(max(0, int(hits)), len(keys))

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        if self.disabled:
            return
        computed = self._matched.pop(request.request_id, None)
        if computed is None:  # nothing offered for this request: nothing to load
            num_external_tokens, computed = 0, 0
        self.planner.allocated(request, computed, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVTierConnectorMetadata:
        step = self.planner.step(scheduler_output) if not self.disabled else None
        self._matched.clear()
        if step is None:
            return KVTierConnectorMetadata()
        for t in step.saves:
            state = self.planner.requests.get(t.req_id)
            if state is not None:
                self._unconfirmed[(t.req_id, t.first_block)] = (
                    t.keys,
                    events.stored(
                        state.request, t.first_block, len(t.keys), self.block_tokens, self.hash_block_size
                    ),
                )
        return KVTierConnectorMetadata(
            step.loads, step.saves, preempted=bool(getattr(scheduler_output, "preempted_req_ids", None))
        )

    def update_connector_output(self, connector_output: Any) -> None:
        invalid = getattr(connector_output, "invalid_block_ids", None)
        if invalid:
            self.planner.load_failed(set(invalid))
        meta = getattr(connector_output, "kv_connector_worker_meta", None)
        for s in getattr(meta, "stored", None) or []:
            self._confirm(s)

    def _confirm(self, s: Stored) -> None:
        keys, event = self._unconfirmed.pop((s.req_id, s.first_block), (None, None))
        if not s.blocks or event is None:
            return
        self._events.append(event)
        for k, hashes in zip(keys, events.per_block(event, len(keys)), strict=False):
            self._announced[k] = hashes
            self._announced.move_to_end(k)
        while len(self._announced) > 100_000:
            self._announced.popitem(last=False)

    def _observe_removed(self, keys: list[bytes], hits: int) -> None:
        """Blocks this engine announced as stored that the agent no longer holds (evicted)."""
        gone = [self._announced.pop(k) for k in keys[hits:] if k in self._announced]
        if gone:
            self._events.append(events.removed([h for hashes in gone for h in hashes]))

    def take_events(self):
        out, self._events = self._events, []
        return out

    def request_finished(self, request: Any, block_ids: Any) -> tuple[bool, dict[str, Any] | None]:
        state = self.planner.finished(request.request_id)
        self._lookups.pop(request.request_id, None)
        # saves run after the step: the pages stay until the worker reports them done (get_finished)
        return bool(self.async_save and state is not None and state.saves), None

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: Any) -> str | None:
        return None  # pages are read through vLLM's logical views: every layout works

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        return bool((extra_config or {}).get("layerwise", True))  # wait_for_layer_load runs Python

    # ---------------------------------------------------------------------------- worker side

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        if self.disabled:
            return
        try:
            paged = self.worker.register(kv_caches, getattr(self._kv_cache_config, "num_blocks", None))
        except UnsupportedLayout as exc:
            self.disabled = f"unsupported KV cache layout: {exc}"
            log.warning("kvtier connector disabled: %s", self.disabled)
            return
        log.info(
            "kvtier connector: %s, kvtier blocks of %d bytes, %s loads, %s saves",
            paged.describe(), paged.block_bytes, "layer-wise" if self.layerwise else "whole",
            "async" if self.async_save else "synchronous",
        )  # fmt: skip

    def _meta(self) -> KVTierConnectorMetadata | None:
        meta = self._connector_metadata
        return meta if isinstance(meta, KVTierConnectorMetadata) and not self.disabled else None

    def handle_preemptions(self, kv_connector_metadata: Any) -> None:
        if isinstance(kv_connector_metadata, KVTierConnectorMetadata) and kv_connector_metadata.preempted:
            self.worker.drain()

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._meta()
        if meta is None or not meta.loads:
            return
        try:
            self.worker.start_loads(meta.loads)
        except Exception as exc:  # never an exception in the forward path: recompute instead
            self._fail_loads(meta, exc)

    def wait_for_layer_load(self, layer_name: str) -> None:
        meta = self._meta()
        if meta is None or not meta.loads:
            return
        try:
            self.worker.wait_layer(layer_name)
        except Exception as exc:
            self._fail_loads(meta, exc)

    def _fail_loads(self, meta: KVTierConnectorMetadata, exc: Exception) -> None:
        log.warning("kvtier load failed, %d requests recompute: %s", len(meta.loads), exc)
        for t in meta.loads:
            self.worker.recompute(t, t.page_ids[t.skip : t.end])
        try:
            self.worker.finish_loads()
        except Exception:
            log.debug("kvtier: releasing pins after a failed load", exc_info=True)

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        return  # saved from the pages after the step: a block is saved once all its tokens are in

    def wait_for_save(self) -> None:
        meta = self._meta()
        if meta is None:
            raw = self._connector_metadata
            if isinstance(raw, KVTierConnectorMetadata) and raw.saves:  # disabled here, not there:
                self.worker.submit_saves(raw.saves, sync=True, dropped=True)  # release the pages
            return
        try:
            self.worker.finish_loads()
        except Exception as exc:
            self._fail_loads(meta, exc)
        if meta.saves:
            self.worker.submit_saves(meta.saves, sync=not self.async_save)
        self.worker.failed_reqs = set()  # this step's failures stop this step's saves only

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        done = self.worker.finished(set(finished_req_ids))
        return (done or None), None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.take_load_errors()

    def build_connector_worker_meta(self):
        stored = self.worker.take_stored()
        return events.worker_meta(stored) if stored else None

    def get_kv_connector_stats(self):
        return events.stats(self.worker.take_counters())

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None):
        return events.stats(data or {}, keep_empty=True)

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return events.prom_metrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self.worker.close()


# ------------------------------------------------------------------------------- configuration


def _prompt_tokens(request: Any) -> int:
    n = getattr(request, "num_prompt_tokens", None)
    return int(n if n is not None else len(request.prompt_token_ids or []))


def _hash_block_size(vllm_config: Any, kv_cache_config: Any, page: int) -> int:
    """The granularity of `request.block_hashes` (vLLM's block size for one KV cache group)."""
    try:
        from vllm.v1.core.kv_cache_utils import resolve_kv_cache_block_sizes
    except ImportError:
        return page
    if kv_cache_config is None:
        return page
    return int(resolve_kv_cache_block_sizes(kv_cache_config, vllm_config)[1])


def _unsupported(
    vllm_config: Any, kv_cache_config: Any, page: int, hash_block_size: int, block_tokens: int
) -> str:
    """Why this engine cannot use kvtier (said once at start-up), or ''."""
    if block_tokens % page or block_tokens % hash_block_size:
        return f"kvtier blocks of {block_tokens} tokens are not whole vLLM blocks of {page} tokens"
    groups = list(getattr(kv_cache_config, "kv_cache_groups", None) or [])
    if len(groups) > 1:
        return (
            f"a hybrid model ({len(groups)} KV cache groups; the connector handles one full-attention group)"
        )
    if groups:
        spec = groups[0].kv_cache_spec
        specs = getattr(spec, "kv_cache_specs", None)  # UniformTypeKVCacheSpecs: one spec per layer
        kinds = {type(s).__name__ for s in (specs.values() if specs else [spec])}
        if kinds - {"FullAttentionSpec", "MLAAttentionSpec"}:
            return f"KV cache of kind {', '.join(sorted(kinds))} (full attention and MLA are supported)"
    algo = getattr(vllm_config.cache_config, "prefix_caching_hash_algo", "sha256")
    if str(algo).startswith("xxhash") and os.environ.get("PYTHONHASHSEED") is None:
        log.warning(
            "kvtier: prefix_caching_hash_algo=%s without PYTHONHASHSEED hashes differently in every process: "
            "this engine only reuses its own blocks (use sha256, or set PYTHONHASHSEED on every replica)",
            algo,
        )
    return ""


def _fingerprint(vllm_config: Any, kv_cache_config: Any, block_tokens: int) -> str:
    """What must match for saved KV to be reusable: model, dtypes, tensor-parallel rank, the page
    geometry, the block hash scheme and vLLM's release (its page contents' logical order)."""
    import vllm

    model = getattr(vllm_config, "model_config", None)
    parallel = getattr(vllm_config, "parallel_config", None)
    cache = vllm_config.cache_config
    tp = getattr(parallel, "tensor_parallel_size", 1)
    rank = getattr(parallel, "rank", 0) % max(1, tp)
    groups = list(getattr(kv_cache_config, "kv_cache_groups", None) or [])
    spec = groups[0].kv_cache_spec if groups else ""
    if hasattr(spec, "kv_cache_specs"):  # workers see one spec per layer, the scheduler the first one
        spec = next(iter(spec.kv_cache_specs.values()))
    spec = repr(spec)
    geometry = hashlib.sha256(f"{spec};{len(groups[0].layer_names) if groups else 0}".encode()).hexdigest()[
        :16
    ]
    name = getattr(model, "model", "unknown-model") if model is not None else "unknown-model"
    dtype = getattr(model, "dtype", "") if model is not None else ""
    return (
        f"vllm{vllm.__version__};{name};{cache.cache_dtype}/{dtype};B{block_tokens};tp{rank}/{tp};"
        f"hash={getattr(cache, 'prefix_caching_hash_algo', 'sha256')};pages={geometry}"
    )
