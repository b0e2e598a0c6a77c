"""`kvtier bench vllm-worker`: the vLLM connector's worker side restoring a context into vLLM's paged
KV cache, against the host->GPU floor and the HF path's restore of the same bytes. No vLLM needed.

The worker side (`connectors/vllm/worker.py`: pin the blocks in the agent, copy them into the pages
whole or layer by layer as the model reaches each layer, save pages as blocks) imports neither vLLM
nor its types, so it runs here as the connector runs it, on KV caches allocated the way vLLM 0.33's
GPU worker allocates them for a Qwen2.5-7B-shaped model (`vllm_kv_caches`, below).

Per context length, with a real agent process holding the blocks in DRAM:
- `save`: the worker saves the context's pages as kvtier blocks (`Worker.submit_saves`), against a
  GPU->host floor measured in the same run;
- `floor`: the same blocks' bytes copied host->GPU in their largest contiguous runs, from the same
  CUDA-registered arena (the link's floor; `measure_h2d`'s 1 GiB copy is reported beside it);
- `hf`: the HF path's restore (`HFKVCache.restore`) of the same KV, saved in its own block layout;
- `whole`: the worker loading every layer before the forward (`layerwise: false`);
- `layerwise`: the worker loading layer by layer (`wait_for_layer_load`'s path), no forward between
  (`layerwise-per-block`: the same with one copy per block and layer instead of one 2-D DMA per run
  of adjacent blocks);
- per --new-tokens N, a simulated forward over N new tokens (per layer: a GEMM over the layer's
  weights, and attention of the N tokens over the whole context), timed alone (`forward`), after a
  whole load (`whole+fwd`), and interleaved with the layer-wise load (`layerwise+fwd`: each layer's
  copy overlaps the previous layer's compute), with each layer's landing time on the GPU clock.
Every restore is checked byte for byte against the source pages (or the source DynamicCache).
Caches in several of vLLM's layouts (--layouts) are filled from the same blocks: a block's bytes
do not depend on the layout it was saved from.

GPU (default): Qwen2.5-7B shape, bf16, 16k/64k/128k tokens. --small: a tiny shape on the CPU (tests).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvtier.agent.client import Client
from kvtier.agent.connectors.gpu import ArenaConnection, GpuArena, host_rows_available, measure_h2d
from kvtier.agent.connectors.paged import LayerLoad
from kvtier.agent.connectors.runs import runs
from kvtier.agent.connectors.vllm.plan import Transfer
from kvtier.agent.connectors.vllm.worker import Worker
from kvtier.bench.prefill import sync
from kvtier.bench.shapes import SHAPES, Shape
from kvtier.dev.agents import AgentProcess, local_agent_config, spawn_agent

GiB = 1 << 30
PAGE = 16  # vLLM's default block size (tokens per page)
FINGERPRINT = "bench-vllm-worker"

# ------------------------------------------------------------------------ vLLM 0.33's KV caches

# vLLM 0.33 (`vllm/v1/kv_cache_layout.py`, `KVCacheLayout`): the physical order of the logical axes
# [L(ayer), B(lock), H(ead), N (token), C (K|V content, bytes)], outermost first.
LAYOUTS = {
    "LBHNC": (0, 1, 2, 3, 4),
    "LBNHC": (0, 1, 3, 2, 4),  # FlashAttention on CUDA: no layout declared, vLLM's first preference
    "LHBNC": (0, 2, 1, 3, 4),
    "BLHNC": (1, 0, 2, 3, 4),
    "BLNHC": (1, 0, 3, 2, 4),  # block-outermost (cross-layer): a block holds every layer's page
    "BHLNC": (1, 2, 0, 3, 4),
}


def layout_strides(shape: tuple[int, ...], order: tuple[int, ...], fixed: dict[int, int]) -> list[int]:
    """Byte strides of the logical axes, the innermost physical axis dense; `fixed` sets some axes'
    strides (vLLM 0.33 `kv_cache_interface.compute_layout_strides`)."""
    strides = [0] * len(shape)
    step = 1
    for axis in reversed(order):
        strides[axis] = fixed.get(axis, step)
        step = strides[axis] * shape[axis]
    return strides


def vllm_kv_caches(
    shape: Shape, num_blocks: int, layout: str, device: torch.device, dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """The per-layer KV caches vLLM 0.33's GPU worker hands to `register_kv_caches` for a model of
    `shape` (one full-attention group, FlashAttention, block size 16, no kernel-block split):
    - the layer spec (`FullAttentionSpec`): a page is [H kv heads, N=16 tokens, C=(K+V) bytes];
    - the plan (`kv_cache_planning.get_kv_cache_config_from_groups`): one `KVCacheTensor` for all
      layers; layer-outermost layouts: block stride = page, layer stride = page x blocks;
      block-outermost: layer stride = page, block stride = the layers' pages;
    - the allocation (`worker/utils.allocate_kv_cache` -> `kv_cache_interface.create_kv_cache_views`):
      one `torch.zeros(size, int8)` buffer, an `as_strided` 5-D [L, B, H, N, C] byte view with those
      strides, and per layer `view[l].view(dtype)`: a 4-D [blocks, heads, 16, 2 x head_dim] tensor."""
    order = LAYOUTS[layout]
    elem = torch.empty(0, dtype=dtype).element_size()
    page_shape = (shape.kv_heads, PAGE, 2 * shape.head_dim * elem)
    page_bytes = page_shape[0] * page_shape[1] * page_shape[2]
    L = shape.layers
    size = L * page_bytes * num_blocks  # bytes per block (all layers' pages) x blocks
    # block-outermost: a block's stride is every layer's page (vLLM's bytes_per_block), fixed by the
    # plan; the other strides follow from the order
    fixed = {1: L * page_bytes} if order[0] == 1 else {}
    logical = (L, num_blocks, *page_shape)
    strides = layout_strides(logical, order, fixed)
    raw = torch.zeros(size, dtype=torch.int8, device=device)
    view = torch.as_strided(raw, size=logical, stride=strides, storage_offset=raw.storage_offset())
    return {f"model.layers.{i}.self_attn.attn": view[i].view(dtype) for i in range(L)}


# ------------------------------------------------------------------------------- measurements


def best_of(fn: Callable[[], Any], repeats: int, device: torch.device) -> tuple[float, Any]:
    """Fastest wall time of `fn` (ending with the device idle), and its last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


class Clock:
    """Stamps on the device's clock (CUDA events on the compute stream) or the host's."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []
        self.start = self._now()

    def _now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def mark(self) -> None:
        self.marks.append(self._now())

    def seconds(self) -> list[float]:
        if not self.cuda:
            return [m - self.start for m in self.marks]
        torch.cuda.synchronize()
        return [self.start.elapsed_time(m) / 1e3 for m in self.marks]


class SimForward:
    """A forward over `new` tokens on top of a `context`-token KV, layer by layer, costing about what
    a real layer does: a GEMM with the layer's parameter count (q, k, v, o, MLP) and the new tokens'
    attention over the whole context (fused kernels; the math fallback is not allowed on a GPU)."""

    def __init__(self, shape: Shape, context: int, new: int, device: torch.device) -> None:
        g = torch.Generator(device=device).manual_seed(0)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        h, kvd = shape.hidden, shape.kv_heads * shape.head_dim
        params = 2 * h * h + 2 * h * kvd + 3 * h * shape.intermediate
        self.x = torch.randn(new, h, device=device, dtype=dtype, generator=g)
        self.w = torch.randn(h, params // h, device=device, dtype=dtype, generator=g) * 0.01
        self.q = torch.randn(1, shape.heads, new, shape.head_dim, device=device, dtype=dtype, generator=g)
        kv_shape = (1, shape.kv_heads, context, shape.head_dim)
        self.k = torch.randn(kv_shape, device=device, dtype=dtype, generator=g)
        self.v = torch.randn(kv_shape, device=device, dtype=dtype, generator=g)
        self.cuda = device.type == "cuda"
        self.attention = "sdpa-gqa"
        try:
            self._attend()
        except RuntimeError:  # no fused kernel takes GQA here: every query head gets its own copy
            rep = shape.heads // shape.kv_heads
            self.k = self.k.repeat_interleave(rep, 1)
            self.v = self.v.repeat_interleave(rep, 1)
            self.attention = "sdpa-expanded"
            self._attend()

    def _attend(self) -> torch.Tensor:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        gqa = self.k.shape[1] != self.q.shape[1]
        fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
        with sdpa_kernel(fused if self.cuda else [SDPBackend.MATH]):
            return torch.nn.functional.scaled_dot_product_attention(self.q, self.k, self.v, enable_gqa=gqa)

    def layer(self, li: int) -> None:
        torch.matmul(self.x, self.w)
        self._attend()


# ---------------------------------------------------------------------------------- one length


@dataclass
class Context:
    """One context length's setup: the agent, the source pages, the worker, the HF path."""

    shape: Shape
    tokens: int
    block_tokens: int
    device: torch.device
    agent: AgentProcess
    socket: str

    @property
    def per(self) -> int:
        return self.block_tokens // PAGE

    @property
    def blocks(self) -> int:
        return self.tokens // self.block_tokens

    @property
    def pages(self) -> int:
        return self.blocks * self.per

    @property
    def kv_bytes(self) -> int:
        return self.tokens * self.shape.kv_bytes_per_token()


def start_agent(work: Path, kv_bytes: int, block_tokens: int) -> AgentProcess:
    """A DRAM-only agent, one tenant owning it all, room for the context twice (worker and HF blocks)."""
    dram = ((int(2.2 * kv_bytes) + 2 * GiB) // GiB) * GiB  # whole blocks per 1 GiB segment: slack
    pool = {
        "tiers": {"dram": {"size": dram}},
        "tenancy": {"dramShare": 1},
        "blockTokens": block_tokens,
        "eviction": {"highWatermark": 1.0, "lowWatermark": 0.95},
    }
    cfg = local_agent_config(work, "bench", pool, segment_bytes=min(GiB, dram))
    return spawn_agent(cfg, work / "agent.yaml", log=work / "agent.log")


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as integers of its element size (random bytes hold NaNs: NaN != NaN)."""
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def equal_pages(
    dst: dict[str, torch.Tensor], dst_pages: list[int], src: dict[str, torch.Tensor], src_pages: list[int]
) -> bool:
    """Every layer's destination pages hold the source pages' bytes (logical views: any layouts)."""
    d_idx = torch.tensor(dst_pages, device=next(iter(dst.values())).device)
    s_idx = torch.tensor(src_pages, device=next(iter(src.values())).device)
    return all(
        torch.equal(bits(dst[name]).index_select(0, d_idx), bits(src[name]).index_select(0, s_idx))
        for name in src
    )


def zero_pages(caches: dict[str, torch.Tensor], pages: list[int]) -> None:
    idx = torch.tensor(pages, device=next(iter(caches.values())).device)
    for t in caches.values():
        t.index_fill_(0, idx, 0)


@contextmanager
def timed_registration() -> Iterator[list[float]]:
    """Seconds spent registering arena segments with CUDA (`GpuArena.sync`) inside the block."""
    spent = [0.0]
    sync_segments = GpuArena.sync

    def timed(arena: GpuArena) -> None:
        t0 = time.perf_counter()
        try:
            sync_segments(arena)
        finally:
            spent[0] += time.perf_counter() - t0

    GpuArena.sync = timed
    try:
        yield spent
    finally:
        GpuArena.sync = sync_segments


def floor_h2d(client: Client, conn: ArenaConnection, keys: list[bytes], block_bytes: int, device, repeats):
    """The link's floor for these blocks: their bytes host->device in the largest contiguous runs
    the arena holds them in, one copy each, from the same registered memory (and the pin's cost)."""
    t0 = time.perf_counter()
    pinned = client.read(FINGERPRINT, keys)
    pin_s = time.perf_counter() - t0
    try:
        arena = conn.arena()
        all_runs = runs([(b.segment, b.offset) for b in pinned], block_bytes)
        dst = torch.empty(len(pinned) * block_bytes, dtype=torch.uint8, device=device)

        def copy() -> None:
            for run in all_runs:
                at = run.first * block_bytes
                dst[at : at + run.count * block_bytes].copy_(arena.view(run, block_bytes), non_blocking=True)

        seconds, _ = best_of(copy, repeats, device)
    finally:
        t0 = time.perf_counter()
        pinned.release()
        pin_s += time.perf_counter() - t0
    return seconds, pin_s, len(all_runs)


def d2h_bandwidth(device: torch.device, nbytes: int, repeats: int) -> float:
    """Device->host bandwidth into pinned memory (the save's floor), bytes/s."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    seconds, _ = best_of(lambda: dst.copy_(src, non_blocking=True), repeats, device)
    return nbytes / seconds


def hf_source(caches: dict[str, torch.Tensor], pages: list[int], head_dim: int):
    """The context's KV as the HF path holds it (a DynamicCache, [1, heads, tokens, head_dim] per
    layer), from the same source pages: the HF restore moves the same bytes."""
    from kvtier.agent.connectors.hf import dynamic_cache

    idx = torch.tensor(pages, device=next(iter(caches.values())).device)
    layers = []
    for t in caches.values():
        kv = t.index_select(0, idx).transpose(0, 1).flatten(1, 2)  # [heads, tokens, 2 x head_dim]
        layers.append(
            (kv[..., :head_dim].unsqueeze(0).contiguous(), kv[..., head_dim:].unsqueeze(0).contiguous())
        )
    return dynamic_cache(layers)


def run_length(ctx: Context, args: argparse.Namespace, report: dict[str, Any]) -> list[dict[str, Any]]:
    shape, device, repeats = ctx.shape, ctx.device, args.repeats
    rows: list[dict[str, Any]] = []
    base = {"tokens": ctx.tokens, "kv_bytes": ctx.kv_bytes, "blocks": ctx.blocks, "pages": ctx.pages}

    def add(mode: str, seconds: float, **extra: Any) -> dict[str, Any]:
        row = {**base, "mode": mode, "seconds": round(seconds, 6), **extra}
        rows.append(row)
        print(f"  {ctx.tokens:>7} {row.get('layout', ''):>6} {mode:>14} {seconds * 1e3:9.1f} ms", flush=True)
        return row

    rng = random.Random(ctx.tokens)
    layouts = args.layouts.split(",")
    # the source: pages 1..2P of the first layout's cache (page 0 is vLLM's null block), scattered
    # as a long-running engine's free list hands them out; half hold the context, half take loads
    source = vllm_kv_caches(shape, 2 * ctx.pages + 1, layouts[0], device)
    perm = rng.sample(range(1, 2 * ctx.pages + 1), 2 * ctx.pages)
    src_pages, dst_pages = perm[: ctx.pages], perm[ctx.pages :]
    raw = next(iter(source.values())).untyped_storage()
    g = torch.Generator(device=device).manual_seed(ctx.tokens)
    filler = torch.randint(-128, 128, (raw.nbytes(),), dtype=torch.int8, device=device, generator=g)
    torch.tensor([], dtype=torch.int8, device=device).set_(raw).copy_(filler)
    del filler
    keys = [rng.randbytes(32) for _ in range(ctx.blocks)]

    conn = ArenaConnection(ctx.socket, timeout=120)
    worker = Worker(conn, FINGERPRINT, PAGE, ctx.block_tokens, layerwise=False)
    paged = worker.register(source, 2 * ctx.pages + 1)
    names = list(source)
    assert paged.block_bytes * ctx.blocks == ctx.kv_bytes, (paged.block_bytes, ctx.kv_bytes)

    # the arena's first registration with CUDA (first touch of its pages) happens once per engine
    # start, not per request: done before the timings, and reported
    t0 = time.perf_counter()
    if conn.get() is None:
        raise RuntimeError(f"no agent at {ctx.socket}")
    registered = len(conn.arena().host)
    register_s = time.perf_counter() - t0

    def save() -> None:
        worker.submit_saves([Transfer("ctx", keys, src_pages)], sync=True)

    with timed_registration() as registering:
        save_s, _ = best_of(save, 1, device)
    saved = worker.take_counters()["saved_blocks"]
    if saved != ctx.blocks:
        raise RuntimeError(f"the worker saved {saved} of {ctx.blocks} blocks: {worker.take_stored()}")
    d2h = d2h_bandwidth(device, min(GiB, ctx.kv_bytes), 3) if device.type == "cuda" else None
    floor_save = ctx.kv_bytes / d2h if d2h else None
    # the agent hands segments over with the slots it allocates: the save registers them with CUDA
    # (first touch of their pages, once per engine and agent start); `seconds` leaves that out
    row = add(
        "save",
        save_s - registering[0],
        layout=layouts[0],
        register_s=round(register_s + registering[0], 3),
        segments_registered=len(conn.arena().host),
        segments_registered_in_save=len(conn.arena().host) - registered,
    )
    if floor_save:
        row.update(floor_s=round(floor_save, 6), x_floor=round(row["seconds"] / floor_save, 3))

    client = conn.get()
    assert client is not None
    floor_s, pin_s, nruns = floor_h2d(client, conn, keys, paged.block_bytes, device, 5)
    h2d_1gib = measure_h2d(conn.arena(), GiB, device) if device.type == "cuda" else None
    report.setdefault("h2d_gbps_1gib", {})[ctx.tokens] = round(h2d_1gib / 1e9, 2) if h2d_1gib else None
    add("floor", floor_s, runs=nruns, pin_s=round(pin_s, 6), gbps=round(ctx.kv_bytes / floor_s / 1e9, 2))

    def judged(row: dict[str, Any], hf_s: float | None = None) -> None:
        row["x_floor"] = round(row["seconds"] / floor_s, 3)
        if hf_s:
            row["x_hf"] = round(row["seconds"] / hf_s, 3)

    # the HF path's restore of the same KV (its own block layout, its own keys, the same bytes)
    hf_s = None
    try:
        hf_s = run_hf(ctx, source, src_pages, add, judged, repeats)
    except Exception as exc:  # the worker's rows stand without the reference
        traceback.print_exc()
        report.setdefault("errors", []).append(f"{ctx.tokens} hf: {exc!r}")

    forwards = {n: SimForward(shape, ctx.tokens, n, device) for n in args.new_tokens}
    for layout in layouts:
        if layout == layouts[0]:
            target, pages = source, dst_pages
        else:
            target = vllm_kv_caches(shape, ctx.pages + 1, layout, device)
            pages = rng.sample(range(1, ctx.pages + 1), ctx.pages)
            worker.register(target, ctx.pages + 1)
        transfer = Transfer("ctx", keys, pages)

        def restore(
            layerwise: bool,
            forward: SimForward | None = None,
            clock: Clock | None = None,
            t: Transfer = transfer,
        ) -> None:
            worker.layerwise = layerwise
            worker.start_loads([t])
            if clock:
                clock.mark()
            for li, name in enumerate(names):
                worker.wait_layer(name)  # no-op for whole loads (every layer already landed)
                if clock:
                    clock.mark()
                if forward is not None:
                    forward.layer(li)
            worker.finish_loads()
            if worker.take_load_errors():
                raise RuntimeError("the worker reported failed loads")

        # layer-wise loads move each run of adjacent blocks' layer parts as one 2-D DMA; the
        # per-block variant (one copy per block and layer) shows what that is worth
        for layerwise, strided, mode in (
            (False, True, "whole"),
            (True, True, "layerwise"),
            (True, False, "layerwise-per-block"),
        ):
            best, landed = float("inf"), []
            LayerLoad.strided = strided
            try:
                for _ in range(repeats):
                    zero_pages(target, pages)
                    clock = Clock(device)
                    s, _ = best_of(lambda lw=layerwise, c=clock: restore(lw, None, c), 1, device)
                    if s < best:
                        best, landed = s, clock.seconds()
            finally:
                LayerLoad.strided = True
            row = add(
                mode,
                best,
                layout=layout,
                layers_landed_s=[round(x, 5) for x in landed],
                equal=equal_pages(target, pages, source, src_pages),
            )
            judged(row, hf_s)
        for n, fwd in forwards.items():
            fwd_s, _ = best_of(lambda f=fwd: [f.layer(li) for li in range(shape.layers)], repeats, device)
            add("forward", fwd_s, layout=layout, new_tokens=n, attention=fwd.attention)
            for layerwise, mode in ((False, "whole+fwd"), (True, "layerwise+fwd")):
                best, landed = float("inf"), []
                for _ in range(repeats):
                    zero_pages(target, pages)
                    clock = Clock(device)
                    s, _ = best_of(lambda lw=layerwise, f=fwd, c=clock: restore(lw, f, c), 1, device)
                    if s < best:
                        best, landed = s, clock.seconds()
                row = add(
                    mode,
                    best,
                    layout=layout,
                    new_tokens=n,
                    forward_s=round(fwd_s, 6),
                    # the start of the load's copies, then each layer in its pages (device clock)
                    layers_landed_s=[round(x, 5) for x in landed],
                    # what overlap can reach: the longer of the copy and the forward
                    x_max_floor_forward=round(best / max(floor_s, fwd_s), 3),
                    equal=equal_pages(target, pages, source, src_pages),
                )
                judged(row)
        if target is not source:
            del target
    worker.close()
    return rows


def run_hf(ctx: Context, source, src_pages, add, judged, repeats: int) -> float:
    from kvtier.agent.connectors.hf import HFKVCache, Timings
    from kvtier.agent.keys import KVLayout

    shape = ctx.shape
    layout = KVLayout("bench-hf", "bfloat16", shape.layers, shape.kv_heads, shape.head_dim, ctx.block_tokens)
    hf = HFKVCache(Client(ctx.socket, timeout=120), layout, device=ctx.device)
    original = hf_source(source, src_pages, shape.head_dim)
    token_ids = random.Random(-ctx.tokens).choices(range(1, 50000), k=ctx.tokens + 1)  # +1: all blocks
    stored = hf.save(token_ids, original)
    if stored != ctx.blocks:
        raise RuntimeError(f"the HF path stored {stored} of {ctx.blocks} blocks")
    best, phases, equal = float("inf"), {}, None
    for _ in range(repeats):
        t = Timings()
        sync(ctx.device)
        t0 = time.perf_counter()
        cache, n = hf.restore(token_ids, device=ctx.device, timings=t)
        sync(ctx.device)
        s = time.perf_counter() - t0
        if n != ctx.tokens:
            raise RuntimeError(f"the HF path restored {n} of {ctx.tokens} tokens")
        if equal is None:
            equal = all(
                torch.equal(bits(a.keys), bits(b.keys)) and torch.equal(bits(a.values), bits(b.values))
                for a, b in zip(cache.layers, original.layers, strict=True)
            )
        del cache
        if s < best:
            best, phases = s, dict(t.seconds)
    judged(add("hf", best, phases=phases, equal=equal))
    hf.conn.close()
    return best


# ---------------------------------------------------------------------------------------- main


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        f"\n{'tokens':>8} {'layout':>6} {'mode':>14} {'new':>5} {'GB':>6} {'ms':>9} {'x floor':>8} "
        f"{'x hf':>6} {'fwd ms':>8} {'x max(floor,fwd)':>16} {'equal':>6}"
    )
    for r in rows:
        print(
            f"{r['tokens']:>8} {r.get('layout', ''):>6} {r['mode']:>14} {_cell(r, 'new_tokens', 'd'):>5} "
            f"{r['kv_bytes'] / 1e9:>6.2f} {r['seconds'] * 1e3:>9.1f} {_cell(r, 'x_floor', '.3f'):>8} "
            f"{_cell(r, 'x_hf', '.3f'):>6} {_cell(r, 'forward_s', '.4f'):>8} "
            f"{_cell(r, 'x_max_floor_forward', '.3f'):>16} {_cell(r, 'equal', ''):>6}"
        )


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    v = row.get(key)
    return "" if v is None else format(v, fmt)


def main(args: argparse.Namespace) -> int:
    small = args.small
    shape = SHAPES["tiny-qwen2" if small else "qwen2.5-7b"]
    # a CUDA device with its index: set_device and the copy engine's streams need one
    on_gpu = not small and torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    args.new_tokens = [int(x) for x in (args.new_tokens or ("1,16" if small else "1,512,4096")).split(",")]
    lengths = [int(x) for x in (args.tokens or ("1024,4096" if small else "16384,65536,131072")).split(",")]
    block_tokens = args.block_tokens or (64 if small else 256)
    args.layouts = args.layouts or "LBNHC,BLNHC"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "command": "kvtier bench vllm-worker " + " ".join(getattr(args, "argv_echo", [])),
        "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.machine()})",
        "torch": torch.__version__,
        "shape": shape.name,
        "page_tokens": PAGE,
        "block_tokens": block_tokens,
        "layouts": args.layouts.split(","),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "vllm_allocation": "vLLM 0.33 allocate_kv_cache / create_kv_cache_views, reproduced (see the module)",
        "rows": [],
    }
    started = time.perf_counter()
    for tokens in lengths:
        tokens -= tokens % block_tokens
        work = Path(tempfile.mkdtemp(prefix="kvtier-vw-"))
        kv_bytes = tokens * shape.kv_bytes_per_token()
        print(
            f"[{time.perf_counter() - started:6.1f}s] {tokens} tokens, {kv_bytes / 1e9:.2f} GB of KV",
            flush=True,
        )
        agent = None
        try:
            agent = start_agent(work, kv_bytes, block_tokens)
            ctx = Context(shape, tokens, block_tokens, device, agent, agent.tenant("bench"))
            report["rows"] += run_length(ctx, args, report)
        except Exception as exc:  # the other lengths still run; the JSON says what failed
            traceback.print_exc()
            report.setdefault("errors", []).append(f"{tokens}: {exc!r}")
            if agent is not None:
                print("".join(list(agent.output)[-20:]))
        finally:
            if agent is not None:
                agent.kill()
            shutil.rmtree(work, ignore_errors=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        report["seconds"] = round(time.perf_counter() - started, 1)
        # layer-wise loads moved runs of blocks as 2-D DMAs (false: the runtime refused, or a CPU)
        report["layerwise_2d_dma"] = device.type == "cuda" and host_rows_available()
        (out / "vllm-worker.json").write_text(json.dumps(report, indent=2, default=str))
    print_table(report["rows"])
    bad = [r for r in report["rows"] if r.get("equal") is False]
    print(f"\nwrote {out / 'vllm-worker.json'} in {report['seconds']} s; rows not byte-exact: {len(bad)}")
    return 1 if bad or report.get("errors") else 0
