"""vLLM V1 KV connector: the prompt's KV is saved to the node's kvtier pool after prefill and loaded
back into the paged KV cache when the same prefix returns.

Enable it (the webhook does this for injected pods):

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVTierConnector",
        "kv_connector_module_path": "kvtier.agent.connectors.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute"}'

Scheduler side: `get_num_new_matched_tokens` asks the agent how many leading kvtier blocks of the
prompt it holds (a prefix lookup; no side effects; an unreachable or hung agent is a miss after at
most `lookup_timeout_s`, and every call is a miss for `retry_after_s` after that).
Worker side: `start_load_kv` reads the pinned blocks from the arena and scatters them into the
request's pages for every layer before the forward; `wait_for_save` gathers the pages of prompts
whose prefill finished this step and commits them. Both move blocks with the same copy engine as the
Hugging Face connector (`connectors/gpu.py`: the arena registered with CUDA, adjacent blocks merged
into one DMA, double-buffered staging), bound to the current connection to the agent. A load that comes up short (evicted meanwhile,
a corrupt NVMe block) reports its pages through `get_block_ids_with_load_errors`, so vLLM recomputes
them (kv_load_failure_policy: recompute) — wrong KV is never used.

A kvtier block is `blockTokens` tokens (a multiple of vLLM's page size); its blob layout and the
copies between blocks and vLLM's paged layouts are in `paged.py`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from kvtier.agent.client import CONNECTION_LOST, Client
from kvtier.agent.connectors.gpu import ArenaConnection, Staging
from kvtier.agent.connectors.paged import PagedCache
from kvtier.agent.connectors.runs import GROUP_BYTES
from kvtier.agent.keys import block_keys
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

log = logging.getLogger("kvtier.vllm")


@dataclass
class Transfer:
    req_id: str
    keys: list[bytes]  # one per kvtier block
    page_ids: list[int]  # the vLLM pages those blocks cover, in order


@dataclass
class KVTierConnectorMetadata(KVConnectorMetadata):
    loads: list[Transfer] = field(default_factory=list)
    saves: list[Transfer] = field(default_factory=list)


class KVTierConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self.page = int(vllm_config.cache_config.block_size)
        self.socket = extra.get("socket") or os.environ.get("KVTIER_SOCKET", "/var/run/kvtier/kvtier.sock")
        self.fingerprint = extra.get("fingerprint") or self._fingerprint(vllm_config)
        self._block_tokens: int | None = extra.get("block_tokens")
        # A hung or dead agent must not hold up the engine: the scheduler's lookups wait at most
        # lookup_timeout_s, the worker's pin/promote/commit calls io_timeout_s (a promotion from NVMe
        # moves gigabytes), and after a lost connection every call is a miss for retry_after_s.
        scheduler = role == KVConnectorRole.SCHEDULER
        self._conn = ArenaConnection(
            self.socket,
            timeout=float(
                extra.get("lookup_timeout_s", 0.25) if scheduler else extra.get("io_timeout_s", 60)
            ),
            retry_after=float(extra.get("retry_after_s", 5.0)),
        )
        # scheduler state
        self._matched: dict[str, list[bytes]] = {}
        self._loads: dict[str, tuple[list[bytes], int]] = {}
        self._unsaved: dict[str, tuple[list[int], list[int]]] = {}  # req -> (prompt tokens, page ids)
        # worker state
        self.kv_caches: dict[str, torch.Tensor] = {}
        self._failed: set[int] = set()
        self._staging: Staging | None = None

    # ------------------------------------------------------------------------------ plumbing

    @staticmethod
    def _fingerprint(vllm_config: Any) -> str:
        model = getattr(vllm_config, "model_config", None)
        parallel = getattr(vllm_config, "parallel_config", None)
        if model is None:
            return "vllm;unknown-model;L2THD"
        tp = getattr(parallel, "tensor_parallel_size", 1)
        rank = getattr(parallel, "rank", 0) % max(1, tp)
        return (
            f"vllm;{model.model};{vllm_config.cache_config.cache_dtype}/{model.dtype};"
            f"L{model.get_num_layers(parallel)};H{model.get_num_kv_heads(parallel)};D{model.get_head_size()};"
            f"tp{rank}/{tp};L2THD"
        )

    def client(self) -> Client | None:
        """The agent, or None when it cannot be reached (kvtier down never blocks the engine)."""
        client = self._conn.get()
        if client is not None and self._block_tokens is None:
            self._block_tokens = client.block_tokens
        return client

    @property
    def block_tokens(self) -> int:
        if self._block_tokens is None:
            self.client()
        return int(self._block_tokens or 256)

    # ------------------------------------------------------------------------- scheduler side

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        tokens = list(request.prompt_token_ids or [])
        B = self.block_tokens
        # leave at least one token for the model to compute (it produces the next token's logits)
        keys = block_keys(tokens[: max(0, len(tokens) - 1)], B, getattr(request, "cache_salt", None))
        client = self.client()
        if client is None or not keys:
            return 0, False
        try:
            hits = client.lookup(self.fingerprint, keys)
        except Exception as exc:  # the agent lost or refusing is a miss, never a scheduler error
            log.warning("kvtier lookup failed: %s", exc)
            if isinstance(exc, CONNECTION_LOST):
                self._conn.lost(exc)
            return 0, False
        self._matched[request.request_id] = keys[:hits]
        return max(0, hits * B - num_computed_tokens), False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        if num_external_tokens > 0:
            keys = self._matched.get(request.request_id, [])
            self._loads[request.request_id] = (keys, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVTierConnectorMetadata:
        meta = KVTierConnectorMetadata()
        per = self.block_tokens // self.page
        for req in scheduler_output.scheduled_new_reqs:
            pages = list(req.block_ids[0])
            if req.req_id in self._loads:
                keys, _ = self._loads.pop(req.req_id)
                meta.loads.append(Transfer(req.req_id, keys, pages[: len(keys) * per]))
            self._unsaved[req.req_id] = (list(req.prompt_token_ids or []), pages)
            self._maybe_save(meta, req.req_id, req.num_computed_tokens, scheduler_output)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            if req_id not in self._unsaved:
                continue
            _, pages = self._unsaved[req_id]
            new = cached.new_block_ids[i]
            if new:
                pages.extend(new[0])
            self._maybe_save(meta, req_id, cached.num_computed_tokens[i], scheduler_output)
        self._matched.clear()
        return meta

    def _maybe_save(self, meta: KVTierConnectorMetadata, req_id: str, computed: int, out: Any) -> None:
        """Once a prompt's prefill completes in this step, save its full kvtier blocks."""
        tokens, pages = self._unsaved[req_id]
        if computed + out.num_scheduled_tokens.get(req_id, 0) < len(tokens):
            return
        del self._unsaved[req_id]
        keys = block_keys(tokens, self.block_tokens)
        per = self.block_tokens // self.page
        keys = keys[: len(pages) // per]
        if keys:
            meta.saves.append(Transfer(req_id, keys, pages[: len(keys) * per]))

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._unsaved.pop(request.request_id, None)
        return False, None  # saves are synchronous in wait_for_save: pages can be freed now

    # ---------------------------------------------------------------------------- worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.kv_caches = dict(kv_caches)
        self._conn.pin = next(iter(kv_caches.values())).device.type == "cuda"

    def _paged(self) -> PagedCache:
        return PagedCache.of(list(self.kv_caches.values()), self.page, self.block_tokens)

    def _staging_for(self, device: torch.device, block_bytes: int) -> Staging:
        if self._staging is None or self._staging.device != device or self._staging.group_bytes < block_bytes:
            self._staging = Staging(device, max(GROUP_BYTES, block_bytes))
        return self._staging

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, KVTierConnectorMetadata) or not meta.loads:
            return
        paged = self._paged()
        for t in meta.loads:
            loaded = 0
            client = self.client()
            if client is None:  # kvtier down: these pages are recomputed
                self._failed.update(t.page_ids)
                continue
            try:
                with client.read(self.fingerprint, t.keys) as pinned:
                    if any(b.size != paged.block_bytes for b in pinned):
                        raise ValueError(
                            f"blocks of another size than this engine's {paged.block_bytes} bytes"
                        )
                    staging = self._staging_for(paged.device, paged.block_bytes)
                    paged.load(
                        self._conn.arena(), staging, [(b.segment, b.offset) for b in pinned], t.page_ids
                    )
                    loaded = len(pinned)
            except Exception as exc:  # a failed load becomes a recompute, never wrong KV
                log.warning(
                    "kvtier load for %s failed (%d of %d blocks): %s", t.req_id, loaded, len(t.keys), exc
                )
                if isinstance(exc, CONNECTION_LOST):
                    self._conn.lost(exc)
            self._failed.update(t.page_ids[loaded * paged.per :])

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv completes every layer before the forward

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return  # saved once per step in wait_for_save, from the paged cache

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata() if self.has_connector_metadata() else None
        if not isinstance(meta, KVTierConnectorMetadata) or not meta.saves:
            return
        client = self.client()
        if client is None:
            return
        paged = self._paged()
        size = paged.block_bytes
        for t in meta.saves:
            try:
                todo = t.keys[client.lookup(self.fingerprint, t.keys) :]
                if not todo:
                    continue
                first = (len(t.keys) - len(todo)) * paged.per
                slots = client.allocate([size] * len(todo))  # wait=0: a full arena skips the save
                paged.save(self._conn.arena(), [(s.segment, s.offset) for s in slots], t.page_ids[first:])
                client.commit(self.fingerprint, todo, slots, [size] * len(todo))
            except Exception as exc:  # a failed save is a future miss, never an engine error
                log.warning("kvtier save for %s skipped: %s", t.req_id, exc)
                if isinstance(exc, CONNECTION_LOST):
                    self._conn.lost(exc)
                    return

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed = self._failed, set()
        return failed

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return None, None
