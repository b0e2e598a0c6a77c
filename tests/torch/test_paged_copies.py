"""Blocks <-> an engine's paged KV cache (`connectors/paged.py`, what the vLLM connector's worker runs),
through a real agent: pages saved as kvtier blocks come back into other pages bit for bit, in every
paged layout vLLM uses. On the CPU here; on CUDA where a GPU is present (the GPU machine)."""

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


def caches(layout: str, device: str, fill: bool) -> list[torch.Tensor]:
    shape = {
        "flash": (2, PAGES, PAGE, H, D),  # FlashAttention, NHD
        "flashinfer": (PAGES, 2, PAGE, H, D),  # FlashInfer / Triton, NHD
        "flash-hnd": (2, PAGES, H, PAGE, D),  # HND
    }[layout]
    g = torch.Generator().manual_seed(11)
    make = (lambda: torch.randn(shape, generator=g)) if fill else (lambda: torch.zeros(shape))
    return [make().to(torch.bfloat16).to(device) for _ in range(LAYERS)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["flash", "flashinfer", "flash-hnd"])
def test_pages_saved_as_blocks_come_back_into_other_pages(agent, tmp_path, layout, device):
    from kvtier.agent.client import Client
    from kvtier.agent.connectors.gpu import GpuArena, Staging
    from kvtier.agent.connectors.paged import PagedCache

    a = agent(agent_config(tmp_path, nvme=None))
    client = Client(a.tenant("team-a"))
    source = PagedCache.of(caches(layout, device, fill=True), PAGE, B)
    target = PagedCache.of(caches(layout, device, fill=False), PAGE, B)
    arena = GpuArena(client, pin=device == "cuda")
    staging = Staging(torch.device(device), 2 * source.block_bytes)  # small: several groups, two buffers
    blocks = 5
    src_pages = [7, 3, 30, 31, 12, 0, 5, 9, 21, 22, 23, 24, 1, 2, 38, 39, 17, 18, 19, 20]  # scattered
    dst_pages = list(range(PAGES - 1, PAGES - 1 - blocks * (B // PAGE), -1))
    keys = [bytes([i]) * 32 for i in range(blocks)]

    slots = client.allocate([source.block_bytes] * blocks)
    arena.sync()
    source.save(arena, [(s.segment, s.offset) for s in slots], src_pages)
    client.commit("paged-test", keys, slots, [source.block_bytes] * blocks)
    with client.read("paged-test", keys) as pinned:
        arena.sync()
        target.load(arena, staging, [(b.segment, b.offset) for b in pinned], dst_pages)

    for (sk, sv), (tk, tv) in zip(source.layers, target.layers, strict=True):
        assert torch.equal(tk[dst_pages].cpu(), sk[src_pages].cpu())
        assert torch.equal(tv[dst_pages].cpu(), sv[src_pages].cpu())
        untouched = sorted(set(range(PAGES)) - set(dst_pages))
        assert not tk[untouched].any() and not tv[untouched].any(), "no other page written"
    arena.close()
    client.close()


def test_pages_and_blocks_must_line_up():
    from kvtier.agent.connectors.paged import PagedCache, page_views

    with pytest.raises(ValueError, match="not whole pages"):
        PagedCache.of(caches("flash", "cpu", fill=False), 24, B)
    with pytest.raises(ValueError, match="MLA"):
        page_views(torch.zeros(PAGES, PAGE, 576), PAGES, PAGE)
