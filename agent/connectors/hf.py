"""Hugging Face transformers: save a prompt's KV into the pool, restore a DynamicCache from it.

    kv = HFKVCache(Client(), KVLayout.from_hf_config(model.config, block_tokens=256))
    kv.save(token_ids, cache)                       # after a prefill
    cache, n = kv.restore(token_ids, device="cuda") # longest cached prefix, n tokens
    out = model(input_ids=ids[:, n:], past_key_values=cache, use_cache=True, logits_to_keep=1)

A block blob holds every layer's K and V for block_tokens tokens, laid out [layer, k/v, kv head,
token, head dim] (the fingerprint says so), so one block is one contiguous extent in the arena.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from kvtier.agent.client import Client
from kvtier.agent.connectors.gpu import GpuArena, gpu_to_host, host_to_gpu
from kvtier.agent.keys import KVLayout, block_keys

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class RestoreStats:
    lookup_blocks: int = 0
    restored_tokens: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


class HFKVCache:
    def __init__(self, client: Client, layout: KVLayout) -> None:
        self.client = client
        self.layout = layout
        self.dtype = _DTYPES[layout.dtype]
        self.arena = GpuArena(client)

    # ------------------------------------------------------------------------------ shapes

    def _block_view(self, staged: torch.Tensor, n: int) -> torch.Tensor:
        lay = self.layout
        return staged.view(self.dtype).view(
            n, lay.num_layers, 2, lay.num_kv_heads, lay.block_tokens, lay.head_dim
        )

    def _layer_blocks(self, tensor: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """[1, H, T, D] cache tensor -> [n, H, B, D] view of blocks first..last (no copy)."""
        B = self.layout.block_tokens
        part = tensor[0, :, first * B : last * B, :]
        return part.unflatten(1, (last - first, B)).transpose(0, 1)

    # ------------------------------------------------------------------------------- save

    def save(
        self, token_ids: list[int], cache, extra: str | None = None, sync: bool = False, wait: float = 0.0
    ) -> int:
        """Save the full blocks of `token_ids` whose KV is in `cache`. Returns blocks newly stored."""
        lay = self.layout
        keys = block_keys(token_ids, lay.block_tokens, extra)
        layers = cache.layers
        keys = keys[: layers[0].keys.shape[2] // lay.block_tokens]
        have = self.client.lookup(lay.fingerprint, keys)
        todo = keys[have:]
        if not todo:
            return 0
        slots = self.client.allocate([lay.block_bytes] * len(todo), wait=wait)
        self.arena.sync()
        device = layers[0].keys.device

        def gather(start: int, end: int) -> torch.Tensor:
            n = end - start
            staged = torch.empty(n * lay.block_bytes, dtype=torch.uint8, device=device)
            blocks = self._block_view(staged, n)
            for li, layer in enumerate(layers):
                blocks[:, li, 0].copy_(self._layer_blocks(layer.keys, have + start, have + end))
                blocks[:, li, 1].copy_(self._layer_blocks(layer.values, have + start, have + end))
            return staged

        gpu_to_host(self.arena, [(s.segment, s.offset) for s in slots], lay.block_bytes, gather)
        return self.client.commit(lay.fingerprint, todo, slots, [lay.block_bytes] * len(todo), sync=sync)

    # ----------------------------------------------------------------------------- restore

    def restore(
        self,
        token_ids: list[int],
        device: str | torch.device = "cuda",
        extra: str | None = None,
        keep_last: int = 1,
        stats: RestoreStats | None = None,
    ):
        """A DynamicCache holding the longest cached prefix of `token_ids` (leaving at least
        `keep_last` tokens for the model to compute), and its length in tokens. (None, 0) on a miss."""
        from transformers import DynamicCache

        lay = self.layout
        device = torch.device(device)
        usable = max(0, len(token_ids) - keep_last)
        keys = block_keys(token_ids[:usable], lay.block_tokens, extra)
        with self.client.read(lay.fingerprint, keys) as pinned:
            n = len(pinned)
            if stats:
                stats.lookup_blocks = n
            if n == 0:
                return None, 0
            self.arena.sync()
            T = n * lay.block_tokens
            shape = (1, lay.num_kv_heads, T, lay.head_dim)
            k_layers = [torch.empty(shape, dtype=self.dtype, device=device) for _ in range(lay.num_layers)]
            v_layers = [torch.empty(shape, dtype=self.dtype, device=device) for _ in range(lay.num_layers)]

            def scatter(first: int, staged: torch.Tensor) -> None:
                g = staged.numel() // lay.block_bytes
                blocks = self._block_view(staged, g)
                for li in range(lay.num_layers):
                    self._layer_blocks(k_layers[li], first, first + g).copy_(blocks[:, li, 0])
                    self._layer_blocks(v_layers[li], first, first + g).copy_(blocks[:, li, 1])

            host_to_gpu(self.arena, [(b.segment, b.offset) for b in pinned], lay.block_bytes, scatter, device)
            torch.cuda.current_stream(device).synchronize()  # the arena may be reused once released
        cache = DynamicCache()
        for li in range(lay.num_layers):
            cache.update(k_layers[li], v_layers[li], li)
        if stats:
            stats.restored_tokens = T
        return cache, T
