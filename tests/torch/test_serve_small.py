"""`kvtier bench serve --small` end to end on the CPU: a tiny model, real agent processes, the sidecar's
HTTP API; every policy serves every turn, kvtier restores returning contexts from the agent, the
prefetch hints are answered, and the report holds what the docs describe. (Times on a CPU say
nothing; the GPU run's numbers are in docs/benchmarks.)"""

from __future__ import annotations

import importlib.util
import json

import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def test_small_serve_run_under_every_policy(tmp_path):
    from kvtier.cli import main

    out = tmp_path / "serve.json"
    plot = tmp_path / "serve.png" if importlib.util.find_spec("matplotlib") else None
    args = ["bench", "serve", "--small", "--users", "3", "--turns", "2", "--contexts", "128,256"]
    args += ["--new-tokens", "16", "--output-tokens", "4", "--hbm-contexts", "1", "--out", str(out)]
    assert main(args + (["--plot", str(plot)] if plot else [])) == 0
    report = json.loads(out.read_text())
    assert report["command"].startswith("kvtier bench serve --small")
    assert set(report["policies"]) == {"recompute", "kvtier", "kvtier+prefetch"}
    for name, s in report["policies"].items():
        assert s["turns_completed"] == 3 * 2, name
        assert s["output_tokens"] == 3 * 2 * 4, name
        split = s["gpu_time_s"]
        assert sum(split.values()) == pytest.approx(s["elapsed_s"], abs=0.01), name
        assert s["ttft_s"]["p50"] > 0 and s["usd_per_m_output_tokens"] > 0
    rec, kvt = report["policies"]["recompute"], report["policies"]["kvtier"]
    assert "restored" not in rec["turn_sources"] and rec["gpu_time_s"]["restore"] == 0
    assert kvt["turn_sources"].get("restored", 0) > 0, "returning contexts come back from the agent"
    assert kvt["notes"]["saves_refused"] == 0
    prefetch = report["policies"]["kvtier+prefetch"]
    hints = prefetch["notes"]["hints"]  # a message that arrives while the GPU is busy goes unhinted
    assert hints["answered"] == prefetch["prefetch_hints"] > 0 and hints["failed"] == 0
    assert set(report["ratios"]) == {"kvtier/recompute", "kvtier+prefetch/recompute"}
    assert report["gpu_hour_usd"] > 0 and "http" in report["gpu_hour_price_source"]
    if plot:
        assert plot.stat().st_size > 0


def test_batched_decode_predicts_what_a_full_prefill_predicts():
    """Each attention path of the batched decode (two requests of different lengths in one step)
    gives the next token a prefill of the whole sequence gives: RoPE positions, the fused QKV and
    where the new K/V land are right."""
    from kvtier.bench.serve import ATTEND, TorchEngine, extend
    from kvtier.bench.shapes import SHAPES
    from kvtier.bench.tpmodel import ShardedLlama, random_weights

    shape = SHAPES["tiny-qwen2"]
    model = ShardedLlama(shape, random_weights(shape, 1, 0, torch.device("cpu"), torch.float32))
    engine = TorchEngine(model, slots=2, capacity=256, one_shot_max=1 << 20, chunk=64)
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randint(0, shape.vocab, (n,), generator=g).tolist() for n in (100, 37))

    def full(tokens):
        with torch.inference_mode():
            return int(extend(model, model.new_kv(len(tokens)), torch.tensor([tokens]), 0, 64).argmax())

    for name in ATTEND:
        engine.attention = name
        first_a, first_b = engine.prefill(0, a, 0), engine.prefill(1, b, 0)
        assert (first_a, first_b) == (full(a), full(b))
        assert engine.decode([(0, len(a), first_a), (1, len(b), first_b)]) == [
            full([*a, first_a]),
            full([*b, first_b]),
        ], name


def test_decode_attention_paths_agree_with_grouped_query_attention():
    """The paths the engine picks from at warm-up compute the same attention (to float error)."""
    import torch.nn.functional as F

    from kvtier.bench.serve import ATTEND

    g, hk, T, d = 7, 4, 300, 32
    q, k, v = torch.randn(1, hk * g, 1, d), torch.randn(1, hk, T, d), torch.randn(1, hk, T, d)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1))
    for name, attend in ATTEND.items():
        assert torch.allclose(attend(q, k, v, g), want, atol=1e-5), name
