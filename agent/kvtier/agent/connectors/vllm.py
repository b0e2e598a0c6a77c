"""vLLM V1 KV connector: the prompt's KV is saved to the node's kvtier pool after prefill and loaded
back into the paged KV cache when the same prefix returns.

Enable it (the webhook does this for injected pods):

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVTierConnector",
        "kv_connector_module_path": "kvtier.agent.connectors.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute"}'

Scheduler side: `get_num_new_matched_tokens` asks the agent how many leading kvtier blocks of the
prompt it holds (a prefix lookup; no side effects; an unreachable agent is a miss, never a wait).
Worker side: `start_load_kv` reads the pinned blocks from the arena and scatters them into the
request's pages for every layer before the forward; `wait_for_save` gathers the pages of prompts
whose prefill finished this step and commits them. A load that comes up short (evicted meanwhile,
a corrupt NVMe block) reports its pages through `get_block_ids_with_load_errors`, so vLLM recomputes
them (kv_load_failure_policy: recompute) — wrong KV is never used.

A kvtier block is `blockTokens` tokens (a multiple of vLLM's page size); its blob is every layer's
K and V for those tokens as [layer, k/v, token, kv head, head dim] ("L2THD"). Paged layouts
(2, blocks, page, heads, dim) and (blocks, 2, page, heads, dim), NHD or HND, are read through views.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from kvtier.agent.client import Client
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


def page_views(layer: torch.Tensor, num_pages: int, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, V) of one layer's paged cache as [pages, page tokens, kv heads, head dim] views."""
    if layer.dim() != 5:
        raise ValueError(f"unsupported KV cache layout {tuple(layer.shape)} (MLA is not supported yet)")
    if layer.shape[0] == 2 and layer.shape[1] == num_pages:
        k, v = layer[0], layer[1]  # FlashAttention: (2, pages, ...)
    elif layer.shape[1] == 2 and layer.shape[0] == num_pages:
        k, v = layer[:, 0], layer[:, 1]  # FlashInfer / Triton: (pages, 2, ...)
    else:
        raise ValueError(f"cannot tell K from V in a KV cache of shape {tuple(layer.shape)}")
    if k.shape[1] != page and k.shape[2] == page:
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # HND -> NHD views
    return k, v


class KVTierConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self.page = int(vllm_config.cache_config.block_size)
        self.socket = extra.get("socket") or os.environ.get("KVTIER_SOCKET", "/var/run/kvtier/kvtier.sock")
        self.fingerprint = extra.get("fingerprint") or self._fingerprint(vllm_config)
        self._client: Client | None = None
        self._block_tokens: int | None = extra.get("block_tokens")
        # scheduler state
        self._matched: dict[str, list[bytes]] = {}
        self._loads: dict[str, tuple[list[bytes], int]] = {}
        self._unsaved: dict[str, tuple[list[int], list[int]]] = {}  # req -> (prompt tokens, page ids)
        # worker state
        self.kv_caches: dict[str, torch.Tensor] = {}
        self._failed: set[int] = set()
        self._host: dict[int, torch.Tensor] = {}

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
        if self._client is None:
            try:
                self._client = Client(self.socket, timeout=10)
                self._block_tokens = self._block_tokens or self._client.block_tokens
            except OSError as exc:
                log.warning("kvtier agent not reachable at %s: %s", self.socket, exc)
                return None
        return self._client

    @property
    def block_tokens(self) -> int:
        if self._block_tokens is None:
            self.client()
        return int(self._block_tokens or 256)

    def _drop_client(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = None

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
        except OSError:
            self._drop_client()
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

    def _layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for layer in self.kv_caches.values():
            num_pages = layer.shape[1] if layer.shape[0] == 2 else layer.shape[0]
            out.append(page_views(layer, num_pages, self.page))
        return out

    def _host_view(
        self, client: Client, segment: int, offset: int, size: int, device: torch.device
    ) -> torch.Tensor:
        if segment not in self._host:
            tensor = torch.frombuffer(client.segments[segment], dtype=torch.uint8)
            if device.type == "cuda":
                torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), tensor.numel(), 0)
            self._host[segment] = tensor
        return self._host[segment][offset : offset + size]

    def _blob_shape(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[int, ...]:
        k = layers[0][0]
        return (len(layers), 2, self.block_tokens, k.shape[2], k.shape[3])

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, KVTierConnectorMetadata) or not meta.loads:
            return
        layers = self._layers()
        shape = self._blob_shape(layers)
        dtype, device = layers[0][0].dtype, layers[0][0].device
        per = self.block_tokens // self.page
        for t in meta.loads:
            loaded = 0
            client = self.client()
            try:
                if client is None:
                    raise OSError("agent not reachable")
                with client.read(self.fingerprint, t.keys) as pinned:
                    for bi, blk in enumerate(pinned):
                        host = self._host_view(client, blk.segment, blk.offset, blk.size, device)
                        blob = host.to(device, non_blocking=True).view(dtype).view(shape)
                        page_ids = torch.tensor(t.page_ids[bi * per : (bi + 1) * per], device=device)
                        for li, (k, v) in enumerate(layers):
                            k[page_ids] = blob[li, 0].view(per, self.page, *shape[3:])
                            v[page_ids] = blob[li, 1].view(per, self.page, *shape[3:])
                        loaded += 1
                    if device.type == "cuda":
                        torch.cuda.current_stream(device).synchronize()  # before the pins end
            except Exception as exc:  # a failed load becomes a recompute, never wrong KV
                log.warning("kvtier load for %s stopped after %d blocks: %s", t.req_id, loaded, exc)
                self._drop_client()
            self._failed.update(t.page_ids[loaded * per :])

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
        layers = self._layers()
        shape = self._blob_shape(layers)
        dtype, device = layers[0][0].dtype, layers[0][0].device
        per = self.block_tokens // self.page
        size = int(torch.Size(shape).numel()) * layers[0][0].element_size()
        for t in meta.saves:
            try:
                todo = t.keys[client.lookup(self.fingerprint, t.keys) :]
                if not todo:
                    continue
                first = len(t.keys) - len(todo)
                slots = client.allocate([size] * len(todo))  # wait=0: a full arena skips the save
                for i, slot in enumerate(slots):
                    page_ids = torch.tensor(
                        t.page_ids[(first + i) * per : (first + i + 1) * per], device=device
                    )
                    blob = torch.empty(shape, dtype=dtype, device=device)
                    for li, (k, v) in enumerate(layers):
                        blob[li, 0] = k[page_ids].reshape(shape[2:])
                        blob[li, 1] = v[page_ids].reshape(shape[2:])
                    host = self._host_view(client, slot.segment, slot.offset, size, device)
                    host.copy_(blob.view(-1).view(torch.uint8))
                if device.type == "cuda":
                    torch.cuda.current_stream(device).synchronize()
                client.commit(self.fingerprint, todo, slots, [size] * len(todo))
            except Exception as exc:  # a failed save is a future miss, never an engine error
                log.warning("kvtier save for %s skipped: %s", t.req_id, exc)

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed = self._failed, set()
        return failed

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return None, None
