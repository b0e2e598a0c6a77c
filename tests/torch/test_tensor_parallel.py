"""Tensor-parallel save and restore on the CPU (gloo): each rank saves and restores its own KV shard
(its KV heads) through the agent under its own layout fingerprint; gathered, the shards are the
whole cache. Needs torch and transformers (the vLLM tier's environment, or the GPU machine)."""

from __future__ import annotations

import os

import pytest

from kvtier.dev.ports import free_port
from tests.support import agent_config

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

LAYERS, KV_HEADS, T, D, B = 2, 4, 512, 16, 128


def full_kv(layer: int):
    g = torch.Generator().manual_seed(1000 + layer)
    k = torch.randn(1, KV_HEADS, T, D, generator=g).to(torch.bfloat16)
    v = torch.randn(1, KV_HEADS, T, D, generator=g).to(torch.bfloat16)
    return k, v


def rank_main(rank: int, world: int, port: int, sock: str, results) -> None:
    import torch.distributed as dist
    from transformers import DynamicCache

    from kvtier.agent.client import Client
    from kvtier.agent.connectors.hf import HFKVCache
    from kvtier.agent.keys import KVLayout

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    heads = KV_HEADS // world
    shard = slice(rank * heads, (rank + 1) * heads)
    cache = DynamicCache()
    for layer in range(LAYERS):
        k, v = full_kv(layer)
        cache.update(k[:, shard].contiguous(), v[:, shard].contiguous(), layer)
    layout = KVLayout("tiny-tp", "bfloat16", LAYERS, heads, D, B, tp_rank=rank, tp_size=world)
    tokens = list(range(T + 1))
    kv = HFKVCache(Client(sock), layout, device="cpu")
    saved = kv.save(tokens, cache)
    restored, n = kv.restore(tokens, device="cpu")
    other_rank = KVLayout(
        "tiny-tp", "bfloat16", LAYERS, heads, D, B, tp_rank=(rank + 1) % world, tp_size=world
    )
    shard_k = torch.stack([restored.layers[i].keys for i in range(LAYERS)])
    gathered = [torch.empty_like(shard_k) for _ in range(world)]
    dist.all_gather(gathered, shard_k)
    if rank == 0:
        whole = torch.cat(gathered, dim=2)  # [layers, 1, heads, T, D]
        results.put(
            {
                "saved": saved,
                "tokens": n,
                "equal": all(torch.equal(whole[i], full_kv(i)[0][:, :, :n]) for i in range(LAYERS)),
                "fingerprints_differ": layout.fingerprint != other_rank.fingerprint,
            }
        )
    dist.destroy_process_group()


def test_each_rank_saves_and_restores_its_own_shard(agent, tmp_path):
    import torch.multiprocessing as mp

    a = agent(agent_config(tmp_path, nvme=None))
    sock = a.tenant("team-a")
    port = free_port()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.start_processes(rank_main, args=(2, port, sock, results), nprocs=2, join=True, start_method="spawn")
    got = results.get(timeout=30)
    assert got == {"saved": T // B, "tokens": T, "equal": True, "fingerprints_differ": True}
    assert a.stats()["blocks"] == 2 * (T // B), "one set of blocks per rank"


# ------------------------------------------------- the sharded model and `kvtier bench ttft --tp`


def sharded_rank_main(rank: int, world: int, port: int, results) -> None:
    import torch.distributed as dist

    from kvtier.bench.shapes import SHAPES
    from kvtier.bench.tpmodel import ShardedLlama, as_cache, past_of, random_weights, shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    shape = SHAPES["tiny"]
    full = random_weights(shape, 1, 0, torch.device("cpu"), torch.float32, seed=7)
    ids = torch.randint(0, shape.vocab, (1, 300), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        whole_logits, whole_kv = ShardedLlama(shape, full).prefill(ids, chunk=128)
        model = ShardedLlama(shape, shard(full, world, rank), tp=world, group=dist.group.WORLD)
        logits, kv = model.prefill(ids, chunk=128)
        decoded = model.decode(ids[:, 299:], past_of(as_cache(kv, 299)))
    heads = shape.kv_heads // world
    results.put(
        {
            "rank": rank,
            "logits_close": torch.allclose(logits, whole_logits, atol=1e-4, rtol=1e-4),
            "kv_is_my_heads": torch.allclose(
                kv, whole_kv[:, :, :, rank * heads : (rank + 1) * heads], atol=1e-5
            ),
            "decode_close": torch.allclose(decoded, whole_logits, atol=1e-3, rtol=1e-3),
        }
    )
    dist.destroy_process_group()


def test_sharded_model_computes_what_the_whole_model_does():
    """TP=2 over gloo: same next-token logits as TP=1, and each rank's KV is its own KV heads of the
    whole model's cache (what it saves is exactly its shard). The decode step over a past cache (the
    restore path) agrees with the chunked prefill."""
    import torch.multiprocessing as mp

    port = free_port()
    results = mp.get_context("spawn").Queue()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.start_processes(sharded_rank_main, args=(2, port, results), nprocs=2, join=True, start_method="spawn")
    got = sorted((results.get(timeout=30) for _ in range(2)), key=lambda r: r["rank"])
    for r in got:
        assert r["logits_close"] and r["kv_is_my_heads"] and r["decode_close"], r


def test_bench_ttft_tp2_saves_and_restores_every_shard(tmp_path):
    """`kvtier bench ttft --small --tp 2`: two gloo ranks, one real agent; every shard comes back from
    DRAM and from the NVMe tier bit for bit, and the restored decode equals the one from the original KV."""
    import json

    from kvtier.cli import main

    out = tmp_path / "tp.json"
    assert (
        main(
            [
                "bench",
                "ttft",
                "--small",
                "--tp",
                "2",
                "--tokens",
                "1024",
                "--block-tokens",
                "128",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert report["tp"] == 2 and report["ranks"] == [0, 1]
    dram, nvme = report["results"]
    assert (dram["tier"], nvme["tier"]) == ("dram", "nvme")
    assert dram["blocks"] == 2 * (1024 // 128), "each rank stored its own shard"
    for r in (dram, nvme):
        assert r["kv_bitwise_equal"] is True
        assert r["logits_diff_vs_decode_from_original_kv"] == 0.0
        assert r["logits_max_abs_diff"] < 1e-3
        assert len(r["per_rank_restore_s"]) == 2
    assert report["command"].startswith("kvtier bench ttft --small --tp 2")


def test_kv_digest_sees_a_flipped_bit_and_a_misplaced_block():
    """The bench's KV check covers every byte and every position, not a sample."""
    from kvtier.bench.tpmodel import kv_digest

    g = torch.Generator().manual_seed(5)
    past = [
        (
            torch.randn(1, 2, 512, 16, generator=g).bfloat16(),
            torch.randn(1, 2, 512, 16, generator=g).bfloat16(),
        )
    ]
    same = [(k.clone(), v.clone()) for k, v in past]
    assert kv_digest(same) == kv_digest(past)
    flipped = [(k.clone(), v.clone()) for k, v in past]
    flipped[0][1].view(torch.int16)[0, 1, 300, 7] ^= 1
    swapped = [(k.clone(), v.clone()) for k, v in past]
    swapped[0][0][:, :, :128], swapped[0][0][:, :, 128:256] = (
        past[0][0][:, :, 128:256],
        past[0][0][:, :, :128],
    )
    assert kv_digest(flipped) != kv_digest(past)
    assert kv_digest(swapped) != kv_digest(past)
