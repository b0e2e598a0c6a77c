"""The committed GPU results say what the docs claim: `kvtier bench report` over them reproduces the
summary, every restore was bit-exact, and every restore sits within 1.15x of its same-run floor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvtier.cli import main

pytestmark = pytest.mark.unit
RESULTS = Path(__file__).resolve().parents[2] / "docs" / "benchmarks"
TABLE = RESULTS / "ttft-h200-16k-410k.json"  # single GPU: also the TP=1 group of the Qwen2.5-7B shape
MILLION = RESULTS / "ttft-h200-1m.json"
TP_RUNS = [
    TABLE,
    RESULTS / "ttft-h200-tp2-qwen7b.json",
    RESULTS / "ttft-h200-tp2-70b-131k.json",
    RESULTS / "ttft-h200-tp4rank0-70b-131k.json",  # one rank alone: no four-GPU machine was lent
    RESULTS / "ttft-h200-tp8rank0-70b-131k.json",
]


def test_tensor_parallel_results_reproduce_their_summary(tmp_path):
    out = tmp_path / "tp.json"
    assert main(["bench", "report", *map(str, TP_RUNS), "--out", str(out)]) == 0
    summary = json.loads(out.read_text())["summary"]
    committed = json.loads((RESULTS / "ttft-h200-tp.json").read_text())["summary"]
    key = lambda r: (r["model"], r["tp"], r["tokens"])  # noqa: E731
    assert sorted(summary, key=key) == sorted(committed, key=key)
    groups = {(r["model"].split("-shaped")[0], r["tp"], len(r["ranks"])) for r in summary}
    assert {("DeepSeek-R1-Distill-Llama-70B", 2, 2), ("Qwen2.5-7B", 2, 2), ("Qwen2.5-7B", 1, 1)} <= groups
    for r in summary:
        assert r["kv_bitwise_equal"], r
    # the docs' claims: every whole TP=2 group (Qwen at 131k-410k, the 70B at 131k) within 1.15x of
    # the per-GPU floor
    qwen2 = [r for r in summary if r["tp"] == 2 and r["model"].startswith("Qwen")]
    assert [r["tokens"] for r in qwen2] == [131072, 262144, 419840]
    whole_groups = [r for r in summary if r["tp"] == 2 and len(r["ranks"]) == 2]
    assert len(whole_groups) == 4 and all(r["dram_vs_floor"] <= 1.15 for r in whole_groups), whole_groups
    tp1 = {r["tokens"]: r for r in summary if r["tp"] == 1}
    for r in qwen2:  # the same context restores faster on two links than on one
        assert r["dram_restore_s"] < tp1[r["tokens"]]["dram_restore_s"], r


def test_two_ranks_restore_their_shards_at_once_on_a_gpu():
    """The multi-rank GPU path (two processes, one agent, both restoring at once; ranks shared one GPU
    over gloo): every shard came back with an equal digest and the decode equals the original's."""
    run = json.loads((RESULTS / "ttft-h200-tp2-shared-qwen7b-32k.json").read_text())
    assert run["ranks"] == [0, 1] and "H200" in run["device"]
    for r in run["results"]:
        assert r["shared_gpus"] and r["kv_bitwise_equal"], r
        assert r["logits_diff_vs_decode_from_original_kv"] == 0.0, r
        assert len(r["per_rank_restore_s"]) == 2


def test_chaos_run_lost_and_corrupted_nothing():
    """The committed `kvtier bench chaos` run: what docs/agent.md claims about it."""
    run = json.loads((RESULTS / "chaos.json").read_text())
    assert run["frames"] >= 9000 and all(n >= 3000 for n in run["frames_per_socket"].values())
    assert run["agent_alive_after_fuzzing"] and run["frames_with_fds"] > 1000
    assert run["leaks_after_fuzzing"]["fds"] <= 8 and run["leaks_after_fuzzing"]["rss_kib"] < 64 * 1024
    assert run["kills"] >= 30 and run["blocks_acknowledged"] > 1000
    assert run["blocks_verified"] == run["blocks_acknowledged"] and run["blocks_missing"] == 0
    assert run["wrong_bytes"] == 0


def test_single_gpu_rows_divide_by_the_fastest_recompute_measured(tmp_path):
    """The README's table: `kvtier bench report` over the committed runs reproduces the merged file;
    each length's recompute is the fastest prefill mode timed, every restore is bit-exact and every
    DRAM restore sits within 1.15x of its same-run floor; every file peer is slower than kvtier's
    restore from the same place."""
    out = tmp_path / "ttft.json"
    assert main(["bench", "report", str(TABLE), str(MILLION), "--out", str(out)]) == 0
    merged = json.loads(out.read_text())
    committed = json.loads((RESULTS / "ttft-h200.json").read_text())
    assert merged["results"] == committed["results"] and merged["prefill"] == committed["prefill"]
    for r in merged["results"]:
        modes = merged["prefill"][str(r["tokens"])]["modes_s"]
        assert r["recompute_s"] == pytest.approx(min(modes.values()), abs=0.01), r
        assert r["prefill_mode"] == min(modes, key=modes.get), r
        assert r["kv_bitwise_equal_sampled"] and r["logits_diff_vs_decode_from_original_kv"] < 0.1, r
    run = merged
    assert "H200" in run["device"]
    dram = [r for r in run["results"] if r["tier"] == "dram"]
    assert [r["tokens"] for r in dram] == [16384, 65536, 131072, 262144, 419840, 1015808]
    for r in dram:
        assert r["vs_floor"] <= 1.15, r
    kvtier = {(r["tokens"], r["tier"]): r["restore_s"] for r in run["results"]}
    peers = [r for r in run["results"] if ":" in r["tier"]]
    assert {r["tier"] for r in peers} == {
        f"{p}:{w}" for p in ("torch.save", "safetensors") for w in ("tmpfs", "disk")
    }
    for r in peers:
        same_place = "dram" if r["tier"].endswith(":tmpfs") else "nvme"
        assert r["restore_s"] > kvtier[(r["tokens"], same_place)], r
    # both modes timed up to 410k (chunks won from 128k on); at 1.01M only chunks fit
    for tokens in ("16384", "65536", "131072", "262144", "419840"):
        assert (
            set(run["prefill"][tokens]["modes_s"]) >= {"one-shot"}
            and len(run["prefill"][tokens]["modes_s"]) == 2
        )
    assert run["prefill"]["419840"]["fastest"].startswith("chunked")
    assert run["prefill"]["1015808"]["fastest"].startswith("chunked")
    # the NVMe floors: cold reads, the page cache dropped and checked empty before each read
    for source in (TABLE, MILLION):
        for r in json.loads(source.read_text())["results"]:
            if r["tier"] == "nvme":
                assert r["page_cache_dropped"] and r["page_cache_resident_bytes_before_reads"] == [0, 0, 0], r


def test_lmcache_peer_ran_with_its_cuda_ops_and_kvtier_restored_faster():
    """docs/benchmarks: LMCache built against the GPU machine's torch (its CUDA ops loaded), the same
    KV bit for bit from every backend, and kvtier's restore (before the decode step) faster than
    LMCache's retrieve from host memory and from the disk, at each length measured."""
    run = json.loads((RESULTS / "ttft-h200-lmcache.json").read_text())
    assert run["lmcache"] == {"version": "0.5.6", "unavailable": None}
    rows = {(r["tier"], r["tokens"]): r for r in run["results"]}
    for tokens in (16384, 131072):
        for ours, theirs in (("dram", "lmcache:cpu"), ("nvme", "lmcache:disk")):
            kvtier, lmcache = rows[(ours, tokens)], rows[(theirs, tokens)]
            assert kvtier["kv_bitwise_equal_sampled"] and lmcache["kv_bitwise_equal_sampled"]
            assert lmcache["kv_bitwise_equal_all"]
            restore = kvtier["phases"]["read"] + kvtier["phases"]["copy"]
            assert restore < lmcache["phases"]["retrieve"], (tokens, ours, restore, lmcache["phases"])
    # why the 1.5x goal cannot be met at 131k: LMCache's retrieve from host memory is within 1.5x of
    # the link's floor (KV / host->GPU bandwidth), so 1.5x faster would beat the link
    link = rows[("dram", 131072)]["kv_bytes"] / (run["ceilings"]["h2d_gbps"] * 1e9)
    assert rows[("lmcache:cpu", 131072)]["phases"]["retrieve"] / 1.5 < link
    kvtier = rows[("dram", 131072)]["phases"]
    assert kvtier["read"] + kvtier["copy"] < 1.05 * link


def test_many_users_on_one_gpu_say_what_the_docs_claim():
    """docs/benchmarks (`kvtier bench serve` on an H200) and the README: kvtier against recompute at
    the same HBM budget, 12x+ the turns per GPU-hour, $/M output tokens 90%+ lower, median TTFT 10x
    lower; recompute spent 90%+ of the GPU on prefill; every kvtier turn restored."""
    run = json.loads((RESULTS / "serve-h200.json").read_text())
    assert "H200" in run["device"] and run["workload"]["users"] == 12 and run["workload"]["hbm_contexts"] == 4
    ratios = run["ratios"]["kvtier/recompute"]
    assert ratios["turns_per_gpu_hour"] >= 12 and ratios["usd_per_m_output_tokens_lower_by"] >= 0.9
    assert ratios["ttft_p50_lower_by_x"] >= 10
    policies = run["policies"]
    assert policies["recompute"]["gpu_time_share"]["prefill"] >= 0.9
    kvtier = policies["kvtier"]
    assert kvtier["turn_sources"] == {"restored": kvtier["turns_started"]}
    assert policies["kvtier+prefetch"]["notes"]["hints"]["blocks_promoted"] == 0  # all in DRAM already


def test_vllm_worker_loads_and_nixl_copies_on_the_gpu_say_what_the_docs_claim():
    """docs/engines.md and docs/transport.md: every vLLM worker load byte-exact, the layer-wise
    loads within 1.25x of the link's floor from 64k on, the HF path within 1.15x at every length;
    NIXL into the GPU bytes-exact and far slower than the connectors' copy."""
    worker = json.loads((RESULTS / "vllm-worker-h200.json").read_text())
    rows = worker["rows"]
    assert all(r["equal"] for r in rows if "equal" in r)
    for r in rows:
        if r["mode"] == "layerwise" and r["tokens"] >= 65536:
            assert r["x_floor"] <= 1.25, r
        if r["mode"] == "hf":
            assert r["x_floor"] <= 1.15, r
    nixl = json.loads((RESULTS / "nixl-gpu-h200.json").read_text())
    for size in nixl["sizes"]:
        assert all(r["bytes_ok"] for r in size["rows"])
        best = {r["path"]: r["gbps"] for r in size["rows"] if r["layout"] == "adjacent"}
        assert best["nixl_read"] < 0.05 * best["connector"]
        assert best["connector"] > 0.9 * best["torch_one_copy"]
