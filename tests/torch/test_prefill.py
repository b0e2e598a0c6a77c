"""The recompute baseline's building blocks on the CPU: chunked attention with the causal offset
(both ways) equals full causal attention; a transformers model prefilled in one forward or in
chunks through `kvtier_causal` gives the same next-token logits and KV; the file peers round-trip a
DynamicCache; the planner picks one-shot where activations fit."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def test_chunked_attention_equals_full_causal_attention():
    from kvtier.bench import prefill as pf

    g = torch.Generator().manual_seed(0)
    q_all = torch.randn(1, 8, 96, 32, generator=g)
    k = torch.randn(1, 2, 96, 32, generator=g)
    v = torch.randn(1, 2, 96, 32, generator=g)
    full = torch.nn.functional.scaled_dot_product_attention(q_all, k, v, is_causal=True, enable_gqa=True)
    q = q_all[:, :, 64:]  # the last chunk's queries over every key before and in it
    assert torch.allclose(pf.lower_right_attention(q, k, v), full[:, :, 64:], atol=1e-5)
    assert torch.allclose(pf.split_attention(q, k, v), full[:, :, 64:], atol=1e-5)
    assert pf.chunk_shapes(100, 40) == [(40, 40), (40, 80), (20, 100)]
    assert pf.chunk_shapes(100, None) == [(100, 100)]


@pytest.mark.parametrize("impl", ["lower-right", "split"])
def test_hf_prefill_one_shot_and_chunked_agree(impl, tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2Config

    from kvtier.bench import peers
    from kvtier.bench import prefill as pf
    from kvtier.bench.shapes import SHAPES

    config = Qwen2Config(**SHAPES["tiny-qwen2"].hf_config())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, attn_implementation=pf.register_hf_attention()
    ).eval()
    ids = torch.randint(0, config.vocab_size, (1, 600))
    pf.CHUNKED["impl"] = impl
    try:
        with torch.inference_mode():
            one, cache = pf.hf_prefill(model, ids)
            chunked, cache_c = pf.hf_prefill(model, ids, 256)
    finally:
        pf.CHUNKED["impl"] = "lower-right"
    assert torch.allclose(one, chunked, atol=1e-4)
    for a, b in zip(cache.layers, cache_c.layers, strict=True):
        assert a.keys.shape == (1, 2, 600, 32) and torch.allclose(a.keys, b.keys, atol=1e-5)
    # the file peers give the same cache back
    (tmp_path / "disk").mkdir()
    stored = peers.save_all(cache, tmp_path, tmp_path / "disk", 600)
    assert {s["tier"] for s in stored} >= {"torch.save:disk", "safetensors:disk"}
    for s in stored:
        back = peers.load(s["peer"], s["path"], torch.device("cpu"))
        assert all(
            torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
            for a, b in zip(back.layers, cache.layers, strict=True)
        )
    peers.remove_all(tmp_path, tmp_path / "disk", 600)
    assert not any(s["path"].exists() for s in stored)


def test_planner_takes_one_shot_where_it_fits():
    from kvtier.bench import prefill as pf
    from kvtier.bench.shapes import SHAPES

    qwen, llama = SHAPES["qwen2.5-7b"], SHAPES["llama3-70b"]
    # an H200 less the Qwen2.5-7B weights: one-shot at 410k (measured peak 99 GB), chunked at 1.01M
    assert pf.plan_prefill(qwen, 419840, 419840 * 57344, 124e9) is None
    assert pf.plan_prefill(qwen, 1015808, 1015808 * 57344, 124e9) == 131072
    # one rank of the 70B at TP=2 (about 66 GB free after its weights) fits 131k at once
    assert pf.plan_prefill(llama, 131072, 131072 * llama.kv_bytes_per_token(2), 66e9, tp=2) is None
