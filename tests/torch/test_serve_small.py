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
    """The decoder's batched step (three requests of different lengths, out of slot order, in a padded
    bucket) gives each request the next token a prefill of its whole sequence gives, with logits
    equal to float error: RoPE positions, the fused weights, where the new K/V land in the arena and
    which rows each request's attention reads are right."""
    from kvtier.bench.decode import Decoder
    from kvtier.bench.serve import TorchEngine, extend
    from kvtier.bench.shapes import SHAPES
    from kvtier.bench.tpmodel import ShardedLlama, random_weights

    shape = SHAPES["tiny-qwen2"]
    model = ShardedLlama(shape, random_weights(shape, 1, 0, torch.device("cpu"), torch.float32))
    decoder = Decoder(model, slots=4, capacity=256)
    assert decoder.buckets == [1, 2, 4]
    engine = TorchEngine(decoder, capacity=256, one_shot_max=1 << 20, chunk=64)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, shape.vocab, (n,), generator=g).tolist() for n in (100, 37, 201)]

    def full(tokens):
        with torch.inference_mode():
            return extend(model, model.new_kv(len(tokens)), torch.tensor([tokens]), 0, 64)

    slots = (2, 0, 3)  # out of order: the decoder sorts by slot and gives tokens back in batch order
    firsts = [engine.prefill(s, seq, 0) for s, seq in zip(slots, seqs, strict=True)]
    assert firsts == [int(full(seq).argmax()) for seq in seqs]
    batch = [(s, len(seq), t) for s, seq, t in zip(slots, seqs, firsts, strict=True)]
    got = engine.decode(batch)
    for seq, first, token in zip(seqs, firsts, got, strict=True):
        assert token == int(full([*seq, first]).argmax())
    # a second step reads the K/V the first one wrote
    got2 = engine.decode([(s, p + 1, t) for (s, p, _), t in zip(batch, got, strict=True)])
    for seq, first, token, token2 in zip(seqs, firsts, got, got2, strict=True):
        assert token2 == int(full([*seq, first, token]).argmax())


def test_decoder_logits_equal_the_reference_forward():
    """The decoder's step, stopped before argmax, gives the logits of tpmodel's reference decode (the
    past as a cache, DynamicCache-style) to float error."""
    from kvtier.bench.decode import Decoder
    from kvtier.bench.shapes import SHAPES
    from kvtier.bench.tpmodel import ShardedLlama, random_weights

    shape = SHAPES["tiny-qwen2"]
    model = ShardedLlama(shape, random_weights(shape, 1, 0, torch.device("cpu"), torch.float32))
    decoder = Decoder(model, slots=2, capacity=128)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, shape.vocab, (1, 90), generator=g)
    with torch.inference_mode():
        _, kv = model.prefill(ids[:, :89], None)
        want = model.decode(ids[:, 89:], [(kv[n, 0], kv[n, 1]) for n in range(shape.layers)])
        decoder.slot_view(1)[..., :89, :].copy_(kv)
        got = decoder.logits([(1, 89, int(ids[0, 89]))])[0]
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_split_attention_merge_equals_one_pass():
    """Splitting a request's live rows into ranges and merging by log-sum-exp (flash decoding by
    hand) equals attention over all of them; empty ranges (a context shorter than the splits) drop
    out. Checked with the reference kernel standing in for flash's."""
    from kvtier.bench import decode

    hq, hk, d, cap = 8, 2, 32, 64
    q = torch.randn(3, hq, d)
    k, v = torch.randn(4 * cap, hk, d), torch.randn(4 * cap, hk, d)
    kstart = torch.tensor([0, cap, 3 * cap], dtype=torch.int32)
    used = torch.tensor([50, 3, 64], dtype=torch.int32)
    want = decode.reference_attention(q, k, v, kstart, used, cap)
    for splits in (1, 2, 4, 8):
        got = decode.split_attention(q, k, v, kstart, used, cap, splits, decode.reference_varlen)
        assert torch.allclose(got, want, atol=1e-5), splits


def test_decode_step_through_the_split_kernel_path(monkeypatch):
    """The GPU path of a decode step (varlen kernel rows, splits per bucket, the merge) with the
    float reference standing in for flash's kernel gives the same logits as the reference path."""
    from kvtier.bench import decode
    from kvtier.bench.shapes import SHAPES
    from kvtier.bench.tpmodel import ShardedLlama, random_weights

    shape = SHAPES["tiny-qwen2"]
    model = ShardedLlama(shape, random_weights(shape, 1, 0, torch.device("cpu"), torch.float32))
    decoder = decode.Decoder(model, slots=4, capacity=300)
    decoder.arena.normal_()
    batch = [(3, 290, 5), (0, 7, 9), (2, 150, 11)]  # a bucket of 4 with one padding row
    want = decoder.logits(batch)
    monkeypatch.setattr(decode, "_flash_varlen", decode.reference_varlen)
    decoder.attention = "flash"
    for splits in (1, 4, 16):
        decoder.splits_by_bucket = {4: splits}
        assert torch.allclose(decoder.logits(batch), want, atol=1e-4, rtol=1e-4), splits
