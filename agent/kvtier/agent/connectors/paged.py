"""Copies between kvtier blocks and an engine's paged KV cache (vLLM's layouts), engine-independent.

A kvtier block covers `block_tokens` tokens = `per` engine pages; its blob is every layer's K and V
for those tokens as [layer, k/v, token, kv head, head dim] ("L2THD"). Paged layouts
(2, pages, page, heads, dim) and (pages, 2, page, heads, dim), NHD or HND, are read through views.
Blocks move with the shared copy engine (`gpu.py`): registered arena, merged runs, double-buffered
staging; here only the gather from pages and the scatter into pages are specific.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from kvtier.agent.connectors.gpu import GpuArena, Staging, gpu_to_host, host_to_gpu


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


@dataclass
class PagedCache:
    """An engine's per-layer paged caches, seen as kvtier blocks of `block_tokens` tokens."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]  # (K, V) views [pages, page, heads, dim]
    page: int
    block_tokens: int

    @classmethod
    def of(cls, caches: list[torch.Tensor], page: int, block_tokens: int) -> PagedCache:
        if block_tokens % page:
            raise ValueError(f"kvtier blocks of {block_tokens} tokens are not whole pages of {page}")
        num_pages = [c.shape[1] if c.shape[0] == 2 else c.shape[0] for c in caches]
        return cls(
            [page_views(c, n, page) for c, n in zip(caches, num_pages, strict=True)], page, block_tokens
        )

    @property
    def per(self) -> int:
        return self.block_tokens // self.page

    @property
    def blob_shape(self) -> tuple[int, ...]:
        k = self.layers[0][0]
        return (len(self.layers), 2, self.block_tokens, k.shape[2], k.shape[3])

    @property
    def block_bytes(self) -> int:
        return int(torch.Size(self.blob_shape).numel()) * self.layers[0][0].element_size()

    @property
    def device(self) -> torch.device:
        return self.layers[0][0].device

    def _pages(self, page_ids: list[int], first: int, count: int) -> torch.Tensor:
        ids = page_ids[first * self.per : (first + count) * self.per]
        return torch.tensor(ids, device=self.device).view(count, self.per)

    def load(
        self, arena: GpuArena, staging: Staging, locations: list[tuple[int, int]], page_ids: list[int]
    ) -> None:
        """Blocks at `locations` in the arena -> pages `page_ids` (per pages a block), every layer."""
        dtype, shape, size = self.layers[0][0].dtype, self.blob_shape, self.block_bytes

        def scatter(first: int, staged: torch.Tensor) -> None:
            g = staged.numel() // size
            blobs = staged.view(dtype).view(g, *shape)
            pages = self._pages(page_ids, first, g)
            for li, (k, v) in enumerate(self.layers):
                k[pages] = blobs[:, li, 0].unflatten(1, (self.per, self.page))
                v[pages] = blobs[:, li, 1].unflatten(1, (self.per, self.page))

        host_to_gpu(arena, locations, size, scatter, staging)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # before the caller's pins end

    def save(self, arena: GpuArena, locations: list[tuple[int, int]], page_ids: list[int]) -> None:
        """Pages `page_ids` -> blocks at `locations` (allocated slots) in the arena, every layer."""
        dtype, shape, size = self.layers[0][0].dtype, self.blob_shape, self.block_bytes

        def gather(start: int, end: int) -> torch.Tensor:
            g = end - start
            staged = torch.empty(g * size, dtype=torch.uint8, device=self.device)
            blobs = staged.view(dtype).view(g, *shape)
            pages = self._pages(page_ids, start, g)
            for li, (k, v) in enumerate(self.layers):
                blobs[:, li, 0] = k[pages].flatten(1, 2)
                blobs[:, li, 1] = v[pages].flatten(1, 2)
            return staged

        gpu_to_host(arena, locations, size, gather)
