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
