"""The Hugging Face connector on the CPU with a real agent: a DynamicCache saved and restored bit for
bit; the agent killed is a miss for both save and restore (no exception reaches the model code); the
agent restarted, the connector reconnects to the new agent's arena and works again."""

from __future__ import annotations

import pytest

from tests.support import agent_config

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

LAYERS, HEADS, T, D, B = 2, 2, 256, 16, 64


def kv_cache(seed: int):
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(seed)
    cache = DynamicCache()
    for layer in range(LAYERS):
        k = torch.randn(1, HEADS, T, D, generator=g).bfloat16()
        v = torch.randn(1, HEADS, T, D, generator=g).bfloat16()
        cache.update(k, v, layer)
    return cache


def same(a, b, tokens: int) -> bool:
    return all(
        torch.equal(x.keys[:, :, :tokens], y.keys[:, :, :tokens])
        and torch.equal(x.values[:, :, :tokens], y.values[:, :, :tokens])
        for x, y in zip(a.layers, b.layers, strict=True)
    )


def test_save_restore_and_an_agent_restart(agent, tmp_path):
    from kvtier.agent.client import Client
    from kvtier.agent.connectors.hf import HFKVCache
    from kvtier.agent.keys import KVLayout

    cfg = agent_config(tmp_path, nvme=None)
    a = agent(cfg)
    layout = KVLayout("tiny-hf", "bfloat16", LAYERS, HEADS, D, B)
    kv = HFKVCache(Client(a.tenant("team-a")), layout, device="cpu")
    tokens = list(range(T + 1))
    first = kv_cache(1)
    assert kv.save(tokens, first) == T // B
    restored, n = kv.restore(tokens, device="cpu")
    assert n == T and same(restored, first, T)

    a.kill()
    assert kv.restore(tokens, device="cpu") == (None, 0), "agent down: a miss"
    assert kv.save(tokens, first) == 0, "agent down: nothing stored, nothing raised"
    assert kv.restore(tokens, device="cpu") == (None, 0), "still down"

    b = agent(cfg, name="agent-restarted")
    assert b.tenant("team-a") == a.tenant("team-a")
    assert kv.restore(tokens, device="cpu") == (None, 0), "the new agent holds nothing yet"
    second = kv_cache(2)
    assert kv.save(tokens, second) == T // B
    restored, n = kv.restore(tokens, device="cpu")
    assert n == T and same(restored, second, T), "the new agent's KV"


def test_a_long_restore_pins_chunk_by_chunk_and_ends_where_the_pool_does(agent, tmp_path):
    """A restore of many blocks pins and copies them in chunks: bit for bit, nothing left pinned
    after it (every block can be dropped at once), and blocks dropped mid-restore end the prefix
    there: the restore returns the blocks it copied, in a cache of that length, never a hole."""
    from kvtier.agent.client import Client
    from kvtier.agent.connectors.hf import HFKVCache, dynamic_cache
    from kvtier.agent.connectors.runs import READ_FIRST
    from kvtier.agent.keys import KVLayout

    a = agent(agent_config(tmp_path, nvme=None))
    blocks, b = 128, 16  # two chunks: READ_FIRST blocks, then the rest
    layout = KVLayout("tiny-hf-long", "bfloat16", LAYERS, HEADS, D, b)
    kv = HFKVCache(Client(a.tenant("team-a")), layout, device="cpu")
    g = torch.Generator().manual_seed(3)
    layers = [
        tuple(torch.randn(1, HEADS, blocks * b, D, generator=g).bfloat16() for _ in "kv")
        for _ in range(LAYERS)
    ]
    original = dynamic_cache(layers)
    tokens = list(range(blocks * b + 1))
    assert kv.save(tokens, original) == blocks

    restored, n = kv.restore(tokens, device="cpu")
    assert n == blocks * b and same(restored, original, n)
    assert a.admin("evict_dram")["dropped"] == blocks  # no NVMe tier: dropped, unless still pinned
    assert kv.restore(tokens, device="cpu") == (None, 0), "nothing stayed pinned: every block was dropped"

    assert kv.save(tokens, original) == blocks
    reads = []
    real_read = kv.client.read

    def read_then_drop(fingerprint, keys):
        reads.append(len(keys))
        if len(reads) == 2:  # the pool loses its blocks after the first chunk was copied
            a.admin("evict_dram")
        return real_read(fingerprint, keys)

    kv.client.read = read_then_drop
    restored, n = kv.restore(tokens, device="cpu")
    assert reads == [READ_FIRST, blocks - READ_FIRST]
    assert n == READ_FIRST * b and same(restored, original, n)
    assert restored.layers[0].keys.shape[2] == n and restored.layers[0].keys.is_contiguous()
