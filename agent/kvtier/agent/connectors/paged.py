"""Copies between kvtier blocks and an engine's paged KV cache (vLLM's layouts), engine-independent.

Every paged KV cache vLLM hands to a connector is, per layer, one or two tensors whose first dimension
is the page (vLLM's block) and whose other dimensions are that page's content:
- vLLM >= 0.33: one logical `[pages, heads, tokens, K|V]` view per layer (`allocate_kv_cache`), whatever
  the physical layout behind it (LBNHC, LBHNC, block-outermost cross-layer layouts such as BLNHC:
  the strides differ, the logical view does not); MLA: `[pages, 1, tokens, latent]`.
- older releases: `(2, pages, ...)` (FlashAttention: K and V are two page tensors),
  `(pages, 2, ...)` (FlashInfer / Triton), `(pages, tokens, latent)` (MLA), NHD or HND.
Pages split into kernel blocks (`pages * r` rows) are grouped back into pages.

A kvtier block covers `per` consecutive pages of a request. Its blob is, for each layer, for each of
that layer's page tensors, the `per` pages' content in logical order: `[layer][tensor][page][content]`.
So a layer's part of a block is one contiguous extent (what a layer-wise load copies), and the
blob does not depend on the physical layout (a block saved from one layout loads into another one
with the same logical shape). Blocks move with the shared copy engine (`gpu.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtier.agent.connectors.gpu import GpuArena, Staging, gpu_to_host, host_rows_to_gpu, host_to_gpu
from kvtier.agent.connectors.runs import runs


class UnsupportedLayout(ValueError):
    """A KV cache this module cannot read as pages (said once, at start-up)."""


def page_tensors(layer: torch.Tensor, num_pages: int) -> list[torch.Tensor]:
    """One layer's cache as tensors whose first dimension is the page, or UnsupportedLayout."""
    if not isinstance(layer, torch.Tensor) or layer.dim() < 2:
        raise UnsupportedLayout(f"not a paged KV cache: {getattr(layer, 'shape', type(layer))}")
    if layer.dim() == 5 and layer.shape[0] == 2 and layer.shape[1] == num_pages != 2:
        return [layer[0], layer[1]]  # (2, pages, ...): K and V pages apart
    rows = layer.shape[0]
    if rows == num_pages:
        return [layer]  # (pages, ...): [pages, heads, tokens, K|V], (pages, 2, ...), MLA
    if rows % num_pages == 0 and layer.dim() >= 3:
        return [layer.unflatten(0, (num_pages, rows // num_pages))]  # kernel blocks -> pages
    raise UnsupportedLayout(f"KV cache of shape {tuple(layer.shape)} does not have {num_pages} pages")


def infer_num_pages(layer: torch.Tensor) -> int:
    """Pages of a cache when the engine did not say (tests of older layouts)."""
    return int(layer.shape[1] if layer.dim() == 5 and layer.shape[0] == 2 else layer.shape[0])


@dataclass
class PagedCache:
    """An engine's per-layer paged caches, seen as kvtier blocks of `block_tokens` tokens."""

    layers: list[list[torch.Tensor]]  # per layer: its page tensors, page first
    page: int
    block_tokens: int

    @classmethod
    def of(
        cls, caches: list[torch.Tensor], page: int, block_tokens: int, num_pages: int | None = None
    ) -> PagedCache:
        if block_tokens % page:
            raise UnsupportedLayout(f"kvtier blocks of {block_tokens} tokens are not whole pages of {page}")
        if not caches:
            raise UnsupportedLayout("no KV cache tensors")
        layers = [page_tensors(c, num_pages or infer_num_pages(c)) for c in caches]
        first = layers[0]
        for lt in layers:
            if [(t.shape[1:], t.dtype) for t in lt] != [(t.shape[1:], t.dtype) for t in first]:
                raise UnsupportedLayout("layers with different page shapes (a hybrid model)")
            if len({t.device for t in lt}) != 1 or lt[0].device != first[0].device:
                raise UnsupportedLayout("KV cache layers on several devices")
        return cls(layers, page, block_tokens)

    @property
    def num_pages(self) -> int:
        return int(self.layers[0][0].shape[0])

    @property
    def per(self) -> int:
        return self.block_tokens // self.page

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0][0].dtype

    @property
    def page_elems(self) -> list[int]:
        return [int(torch.Size(t.shape[1:]).numel()) for t in self.layers[0]]

    @property
    def layer_bytes(self) -> int:
        """Bytes of one layer's part of a block."""
        return self.per * sum(self.page_elems) * self.layers[0][0].element_size()

    @property
    def block_bytes(self) -> int:
        return len(self.layers) * self.layer_bytes

    @property
    def device(self) -> torch.device:
        return self.layers[0][0].device

    def describe(self) -> str:
        """The page geometry, for the log line at start-up."""
        shapes = "+".join("x".join(map(str, t.shape[1:])) for t in self.layers[0])
        return f"{len(self.layers)} layers of {shapes} {str(self.dtype).removeprefix('torch.')} pages"

    def targets(self, page_ids: list[int], keep: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
        """The pages blocks go to, and which of them to write."""
        pages = torch.tensor(page_ids, device=self.device, dtype=torch.long)
        return pages, torch.tensor(keep, device=self.device, dtype=torch.bool)

    def scatter_layer(self, li: int, blobs: torch.Tensor, pages: torch.Tensor, keep: torch.Tensor) -> None:
        """Layer `li`'s parts of `g` blocks (uint8 [g, layer_bytes]) -> pages[keep]."""
        g, at = blobs.shape[0], 0
        for t, n in zip(self.layers[li], self.page_elems, strict=True):
            size = self.per * n * t.element_size()
            part = blobs[:, at : at + size].contiguous().view(t.dtype).view(g * self.per, *t.shape[1:])
            t[pages[keep]] = part[keep]
            at += size

    def scatter(self, staged: torch.Tensor, pages: torch.Tensor, keep: torch.Tensor) -> None:
        """Whole blocks (uint8 [g * block_bytes]) -> their pages, every layer."""
        blobs = staged.view(-1, len(self.layers), self.layer_bytes)
        for li in range(len(self.layers)):
            self.scatter_layer(li, blobs[:, li], pages, keep)

    def load(
        self,
        arena: GpuArena,
        staging: Staging,
        locations: list[tuple[int, int]],
        page_ids: list[int],
        keep: list[bool],
    ) -> None:
        """Blocks at `locations` in the arena -> pages `page_ids` (`per` pages a block) where `keep`,
        every layer: whole blocks, adjacent ones in one DMA (`gpu.py`)."""
        pages, keep = self.targets(page_ids, keep)
        per = self.per

        def scatter(first: int, staged: torch.Tensor) -> None:
            g = staged.numel() // self.block_bytes
            self.scatter(
                staged, pages[first * per : (first + g) * per], keep[first * per : (first + g) * per]
            )

        host_to_gpu(arena, locations, self.block_bytes, scatter, staging)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # before the caller's pins end

    def gather(self, start: int, end: int, page_ids: list[int]) -> torch.Tensor:
        """Pages of blocks `start..end` -> blobs (uint8 [(end-start) * block_bytes])."""
        g = end - start
        staged = torch.empty(g * self.block_bytes, dtype=torch.uint8, device=self.device)
        blobs = staged.view(g, len(self.layers), self.layer_bytes)
        pages = torch.tensor(
            page_ids[start * self.per : end * self.per], device=self.device, dtype=torch.long
        )
        for li, tensors in enumerate(self.layers):
            at = 0
            for t, n in zip(tensors, self.page_elems, strict=True):
                size = self.per * n * t.element_size()
                blobs[:, li, at : at + size] = t[pages].contiguous().view(g, -1).view(torch.uint8)
                at += size
        return staged

    def save(self, arena: GpuArena, locations: list[tuple[int, int]], page_ids: list[int]) -> None:
        """Pages `page_ids` -> blocks at `locations` (allocated slots) in the arena, every layer."""
        gpu_to_host(arena, locations, self.block_bytes, lambda s, e: self.gather(s, e, page_ids))


class LayerLoad:
    """A load that lands layer by layer: layer i's parts of every block are copied to the device on a
    copy stream while layer i-1 computes, and scattered into the pages when the model reaches layer
    i (`wait(i)`). Two layer buffers; on the CPU the parts are scattered straight from the arena.
    Blocks that sit back to back in the arena move as one 2-D DMA per layer (their layer parts are
    rows `block_bytes` apart), not one copy per block: a 128k-token context is 512 blocks."""

    strided = True  # 2-D copies of adjacent blocks' layer parts (False: one copy per block)

    def __init__(self, paged: PagedCache, blocks: list[torch.Tensor], page_ids: list[int], keep: list[bool]):
        self.paged = paged
        self.blocks = blocks  # host views of whole blocks, in page order
        # adjacent blocks of one arena segment (a view's storage is its whole segment)
        self.runs = runs([(b.untyped_storage().data_ptr(), b.data_ptr()) for b in blocks], paged.block_bytes)
        self.pages, self.keep = paged.targets(page_ids, keep)
        self.done: set[int] = set()
        self.cuda = paged.device.type == "cuda"
        self.issued: dict[int, tuple[torch.Tensor, object]] = {}
        if self.cuda:
            self.stream = torch.cuda.Stream(paged.device)
            lb = paged.layer_bytes
            self.buffers = [
                torch.empty(len(blocks), lb, dtype=torch.uint8, device=paged.device) for _ in range(2)
            ]
            self.free = [torch.cuda.Event(), torch.cuda.Event()]
            for e in self.free:
                e.record(torch.cuda.current_stream(paged.device))
            self._issue(0)

    def _host_parts(self, li: int) -> list[torch.Tensor]:
        lb = self.paged.layer_bytes
        return [b[li * lb : (li + 1) * lb] for b in self.blocks]

    def _issue(self, li: int) -> None:
        if li >= len(self.paged.layers) or li in self.issued or li in self.done:
            return
        buf = self.buffers[li % 2]
        self.stream.wait_event(self.free[li % 2])
        with torch.cuda.stream(self.stream):
            if not (self.strided and self._issue_rows(li, buf)):
                for bi, part in enumerate(self._host_parts(li)):
                    buf[bi].copy_(part, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        self.issued[li] = (buf, ready)

    def _issue_rows(self, li: int, buf: torch.Tensor) -> bool:
        """Layer `li`'s parts of each run of adjacent blocks: one 2-D DMA a run (False: unavailable)."""
        lb, bb = self.paged.layer_bytes, self.paged.block_bytes
        for run in self.runs:
            dst = buf[run.first : run.first + run.count]
            if not host_rows_to_gpu(dst, run.offset + li * lb, bb, lb, run.count, self.stream):
                return False
        return True

    def wait(self, li: int) -> None:
        """Layer `li` (and every layer before it) is in its pages once this returns (in stream order
        on a GPU): layers land in order, so the two buffers are always the next two layers'."""
        if li in self.done or not 0 <= li < len(self.paged.layers):
            return
        for earlier in range(li):
            self.wait(earlier)
        if self.cuda:
            self._issue(li)
            buf, ready = self.issued.pop(li)
            compute = torch.cuda.current_stream(self.paged.device)
            compute.wait_event(ready)
            self.paged.scatter_layer(li, buf, self.pages, self.keep)
            self.free[li % 2].record(compute)
            self.done.add(li)
            self._issue(li + 1)
        else:
            blobs = (
                torch.stack(self._host_parts(li))
                if self.blocks
                else torch.empty(0, self.paged.layer_bytes, dtype=torch.uint8)
            )
            self.paged.scatter_layer(li, blobs, self.pages, self.keep)
            self.done.add(li)

    def finish(self) -> None:
        """Every layer not reached by the model, then wait for the copies (before the pins go)."""
        for li in range(len(self.paged.layers)):
            self.wait(li)
        if self.cuda:
            torch.cuda.current_stream(self.paged.device).synchronize()
