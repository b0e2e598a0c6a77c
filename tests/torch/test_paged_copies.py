"""Blocks <-> an engine's paged KV cache (`connectors/paged.py`, what the vLLM connector's worker runs),
through a real agent: pages saved as kvtier blocks come back into other pages bit for bit, whole or
layer by layer, in every paged layout vLLM has used. On the CPU here; on CUDA where a GPU is present.
(tests/vllm runs the same copies on the caches vLLM itself allocates.)"""

from __future__ import annotations

import pytest

from tests.support import agent_config

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")

PAGE, B, PAGES, H, D, LAYERS = 16, 64, 40, 2, 32, 3
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]
SHAPES = {
    "pages-heads-tokens-kv": (PAGES, H, PAGE, 2 * D),  # vLLM >= 0.32: [B, H, N, K|V] per layer
    "flash": (2, PAGES, PAGE, H, D),  # FlashAttention, NHD (older releases)
    "flashinfer": (PAGES, 2, PAGE, H, D),  # FlashInfer / Triton, NHD
    "flash-hnd": (2, PAGES, H, PAGE, D),  # HND
    "mla": (PAGES, PAGE, 576),  # MLA latent
    "kernel-blocks": (2 * PAGES, H, PAGE // 2, 2 * D),  # pages split into kernel blocks of 8 tokens
}


def caches(layout: str, device: str, fill: bool) -> list[torch.Tensor]:
    shape = SHAPES[layout]
    g = torch.Generator().manual_seed(11)
    make = (lambda: torch.randn(shape, generator=g)) if fill else (lambda: torch.zeros(shape))
    return [make().to(torch.bfloat16).to(device) for _ in range(LAYERS)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layerwise", [False, True], ids=["whole", "layer-wise"])
@pytest.mark.parametrize("layout", list(SHAPES))
def test_pages_saved_as_blocks_come_back_into_other_pages(agent, tmp_path, layout, device, layerwise):
    from kvtier.agent.client import Client
    from kvtier.agent.connectors.gpu import GpuArena, Staging
    from kvtier.agent.connectors.paged import LayerLoad, PagedCache

    a = agent(agent_config(tmp_path, nvme=None))
    client = Client(a.tenant("team-a"))
    source = PagedCache.of(caches(layout, device, fill=True), PAGE, B, PAGES)
    target = PagedCache.of(caches(layout, device, fill=False), PAGE, B, PAGES)
    arena = GpuArena(client, pin=device == "cuda")
    staging = Staging(torch.device(device), 2 * source.block_bytes)  # small: several groups, two buffers
    blocks, skip = 5, 2  # the first 2 pages of the first block are the engine's own: left alone
    src_pages = [7, 3, 30, 31, 12, 0, 5, 9, 21, 22, 23, 24, 1, 2, 38, 39, 17, 18, 19, 20]  # scattered
    dst_pages = list(range(PAGES - 1, PAGES - 1 - blocks * (B // PAGE), -1))
    keys = [bytes([i]) * 32 for i in range(blocks)]

    slots = client.allocate([source.block_bytes] * blocks)
    arena.sync()
    source.save(arena, [(s.segment, s.offset) for s in slots], src_pages)
    client.commit("paged-test", keys, slots, [source.block_bytes] * blocks)
    with client.read("paged-test", keys) as pinned:
        arena.sync()
        if layerwise:
            views = [arena.host[b.segment][b.offset : b.offset + b.size] for b in pinned]
            load = LayerLoad(target, views, dst_pages, [i >= skip for i in range(len(dst_pages))])
            # blocks allocated together sit back to back: one 2-D DMA per layer on a GPU
            assert [(r.first, r.count) for r in load.runs] == [(0, blocks)]
            for li in reversed(range(LAYERS)):  # any order; each layer once
                load.wait(li)
            load.finish()
        else:
            keep = [i >= skip for i in range(len(dst_pages))]
            target.load(arena, staging, [(b.segment, b.offset) for b in pinned], dst_pages, keep)

    written = dst_pages[skip:]
    for src_layer, dst_layer in zip(source.layers, target.layers, strict=True):
        for s, t in zip(src_layer, dst_layer, strict=True):
            assert torch.equal(t[written].cpu(), s[src_pages[skip:]].cpu())
            untouched = sorted(set(range(PAGES)) - set(written))
            assert not t[untouched].any(), "no other page written"
    arena.close()
    client.close()


def test_layouts_that_are_not_pages_are_refused():
    from kvtier.agent.connectors.paged import PagedCache, UnsupportedLayout

    with pytest.raises(UnsupportedLayout, match="not whole pages"):
        PagedCache.of(caches("flash", "cpu", fill=False), 24, B)
    with pytest.raises(UnsupportedLayout, match="not a paged KV cache"):
        PagedCache.of([torch.zeros(4096, dtype=torch.int8)], PAGE, B, PAGES)  # raw storage (Mamba state)
    with pytest.raises(UnsupportedLayout, match="does not have"):
        PagedCache.of([torch.zeros(PAGES + 3, H, PAGE, 2 * D)], PAGE, B, PAGES)
    with pytest.raises(UnsupportedLayout, match="different page shapes"):
        PagedCache.of(
            [torch.zeros(PAGES, H, PAGE, 2 * D), torch.zeros(PAGES, 1, PAGE, 2 * D)], PAGE, B, PAGES
        )


def test_layer_wise_2d_copies_address_each_blocks_layer_part(agent, tmp_path, monkeypatch):
    """The 2-D DMA a layer-wise load issues per run of adjacent blocks (rows `block_bytes` apart, one
    layer part wide) reads exactly the layer parts a block-by-block copy reads: the runtime's copy is
    emulated row by row on the CPU, so the addresses are checked where there is no GPU."""
    import ctypes

    from kvtier.agent.client import Client
    from kvtier.agent.connectors import paged as paged_module
    from kvtier.agent.connectors.gpu import GpuArena
    from kvtier.agent.connectors.paged import LayerLoad, PagedCache

    def rows_by_memmove(dst, src_address, src_pitch, width, rows, stream) -> bool:
        for r in range(rows):
            ctypes.memmove(dst.data_ptr() + r * width, src_address + r * src_pitch, width)
        return True

    monkeypatch.setattr(paged_module, "host_rows_to_gpu", rows_by_memmove)
    a = agent(agent_config(tmp_path, nvme=None))
    client = Client(a.tenant("team-a"))
    source = PagedCache.of(caches("pages-heads-tokens-kv", "cpu", fill=True), PAGE, B, PAGES)
    arena = GpuArena(client, pin=False)
    first, second = client.allocate([source.block_bytes] * 3), client.allocate([source.block_bytes] * 2)
    arena.sync()
    slots = [first[0], second[0], first[1], first[2], second[1]]  # two runs, interleaved
    g = torch.Generator().manual_seed(5)
    for s in slots:  # random bytes: a row read from the wrong block or layer differs
        block = torch.randint(0, 256, (source.block_bytes,), dtype=torch.uint8, generator=g)
        arena.host[s.segment][s.offset : s.offset + source.block_bytes] = block
    views = [arena.host[s.segment][s.offset : s.offset + source.block_bytes] for s in slots]
    load = LayerLoad(source, views, list(range(5 * (B // PAGE))), [True] * (5 * (B // PAGE)))
    assert [(r.first, r.count) for r in load.runs] == [(0, 1), (1, 1), (2, 2), (4, 1)]
    load.stream = None  # a CPU load has no copy stream; the emulated copy needs none
    for li in range(LAYERS):
        buf = torch.zeros(len(views), source.layer_bytes, dtype=torch.uint8)
        assert load._issue_rows(li, buf)
        assert torch.equal(buf, torch.stack(load._host_parts(li)))
    arena.close()
    client.close()
