"""Tensor-parallel save and restore on the CPU (gloo): each rank saves and restores its own KV shard
(its KV heads) through the agent under its own layout fingerprint; gathered, the shards are the
whole cache. Needs torch and transformers (the vLLM tier's environment, or the GPU machine)."""

from __future__ import annotations

import os
import socket

import pytest

from tests.conftest import agent_config

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
    from kvtier.agent.client import Client
    from kvtier.agent.connectors.hf import HFKVCache
    from kvtier.agent.keys import KVLayout
    from transformers import DynamicCache

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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.start_processes(rank_main, args=(2, port, sock, results), nprocs=2, join=True, start_method="spawn")
    got = results.get(timeout=30)
    assert got == {"saved": T // B, "tokens": T, "equal": True, "fingerprints_differ": True}
    assert a.stats()["blocks"] == 2 * (T // B), "one set of blocks per rank"
