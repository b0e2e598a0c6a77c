"""`kvtier bench ttft`: time to first token on a returning context, restored through kvtier vs recomputed.

For each context length: prefill the prompt (chunked) and time it (recompute TTFT); save its KV into a
real agent process; drop the KV from the GPU; restore it from the DRAM tier (lookup, pin, DMA from
the registered arena, scatter, one decode step) and time that; drop the arena copies so the blocks
live on the NVMe tier only and restore again. Each restore is judged against floors measured in the
same run: KV bytes / host->GPU bandwidth + the decode step (DRAM), and KV bytes / raw direct-I/O read
bandwidth of the same file (NVMe). Next-token logits are compared with the recompute.

GPU (default): a Qwen2.5-7B-shaped model with random bf16 weights (prefill cost does not depend on
weight values). --small: a small numpy model on the CPU, for the demo and CI.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from kvtier.agent.client import Client
from kvtier.agent.keys import KVLayout, block_keys
from kvtier.agent.tiers.nvme import DiskIO, open_direct, parallel_io
from kvtier.bench.shapes import SHAPES

from kvtier.dev.agents import AgentProcess, local_agent_config, spawn_agent

GiB = 1 << 30
IO_THREADS = 32  # the agent's NVMe queue depth, and the raw reader's


# --------------------------------------------------------------------------------- shared parts


def start_pool_agent(work: Path, kv_bytes: int, block_tokens: int, nvme_dir: Path) -> AgentProcess:
    """A fresh agent sized for one context: DRAM and NVMe tiers a little larger than its KV."""
    size = ((int(kv_bytes * 1.08) + GiB) // GiB) * GiB
    spec = {
        "tiers": {
            "dram": {"size": size},
            "nvme": {"size": size, "mode": "file", "path": str(nvme_dir / "kvtier-bench.cache")},
        },
        "blockTokens": block_tokens,
        "eviction": {"highWatermark": 1.0, "lowWatermark": 0.95},
    }
    cfg = local_agent_config(work, "bench", spec, segment_bytes=min(GiB, size), ioThreads=IO_THREADS)
    return spawn_agent(cfg, work / "agent.yaml", log=work / "agent.log")


def raw_direct_read(path: Path, nbytes: int, threads: int = IO_THREADS) -> float:
    """Bytes/s reading `nbytes` of a file with O_DIRECT, 4 MiB requests in parallel: the disk's ceiling."""
    from concurrent.futures import ThreadPoolExecutor

    fd, _ = open_direct(path)
    buf = mmap.mmap(-1, min(nbytes, 1 << 30))
    try:
        with ThreadPoolExecutor(threads) as pool:
            t0 = time.perf_counter()
            done = 0
            while done < nbytes:
                n = min(len(buf), nbytes - done)
                parallel_io(pool, DiskIO().read, fd, memoryview(buf)[:n], done)
                done += n
            return nbytes / (time.perf_counter() - t0)
    finally:
        buf.close()
        os.close(fd)


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def memcpy_bandwidth(nbytes: int = 256 << 20) -> float:
    import numpy as np

    src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = max(best, nbytes / (time.perf_counter() - t0))
    return best


def row(tokens, tier, kv_bytes, recompute_s, restore_s, floor_s, diff, **extra) -> dict[str, Any]:
    return {
        "tokens": tokens,
        "tier": tier,
        "kv_bytes": kv_bytes,
        "recompute_s": round(recompute_s, 4),
        "restore_s": round(restore_s, 4),
        "floor_s": round(floor_s, 4),
        "speedup": round(recompute_s / restore_s, 1),
        "vs_floor": round(restore_s / floor_s, 3),
        "logits_max_abs_diff": diff,
        **extra,
    }


def print_table(results: list[dict[str, Any]], title: str) -> None:
    print(f"\n{title}")
    print(
        f"{'context':>9} {'tier':>5} {'KV GB':>7} {'recompute':>10} {'cached':>9} {'speedup':>8} {'floor':>8} {'x floor':>8} {'logit diff':>10}"
    )
    for r in results:
        print(
            f"{r['tokens']:>9,} {r['tier']:>5} {r['kv_bytes'] / 1e9:>7.2f} {r['recompute_s']:>9.2f}s "
            f"{r['restore_s'] * 1e3:>7.0f}ms {r['speedup']:>7.1f}x {r['floor_s'] * 1e3:>6.0f}ms "
            f"{r['vs_floor']:>7.3f}x {r['logits_max_abs_diff']:>10.3g}"
        )


def plot(results: list[dict[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for tier, style in (("dram", "o-"), ("nvme", "s-")):
        rows = [r for r in results if r["tier"] == tier]
        if not rows:
            continue
        xs = [r["tokens"] / 1000 for r in rows]
        ax.plot(xs, [r["restore_s"] for r in rows], style, label=f"restore from {tier.upper()} (kvtier)")
        ax.plot(xs, [r["floor_s"] for r in rows], ":", label=f"{tier.upper()} floor (same run)")
    base = [r for r in results if r["tier"] == results[0]["tier"]]
    ax.plot(
        [r["tokens"] / 1000 for r in base],
        [r["recompute_s"] for r in base],
        "k^-",
        label="recompute (prefill)",
    )
    for r in base:
        ax.annotate(
            f"{r['speedup']:.0f}x",
            (r["tokens"] / 1000, r["restore_s"]),
            textcoords="offset points",
            xytext=(4, -12),
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("context (thousand tokens)")
    ax.set_ylabel("time to first token (s)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------- GPU run


def run_hf(args: argparse.Namespace, lengths: list[int]) -> dict[str, Any]:
    import torch
    from kvtier.agent.connectors.gpu import measure_h2d
    from kvtier.agent.connectors.hf import HFKVCache, Timings
    from transformers import AutoModelForCausalLM, DynamicCache, Qwen2Config

    device = torch.device("cuda" if torch.cuda.is_available() and not args.small else "cpu")
    shape = SHAPES["qwen2.5-7b" if device.type == "cuda" else "tiny-qwen2"]
    config = Qwen2Config(**shape.hf_config(), max_position_embeddings=1 << 21, torch_dtype="bfloat16")
    config._name_or_path = shape.name
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa"
        ).eval()
    B = args.block_tokens
    layout = KVLayout.from_hf_config(config, block_tokens=B)
    chunk = args.chunk
    work = Path(tempfile.mkdtemp(prefix="kvtier-ttft-"))
    nvme_dir = Path(args.nvme_path) if args.nvme_path else work / "nvme"
    nvme_dir.mkdir(parents=True, exist_ok=True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def prefill(ids: torch.Tensor):
        cache = DynamicCache()
        out = None
        for s in range(0, ids.shape[1], chunk):
            out = model(
                input_ids=ids[:, s : s + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1
            )
        sync()
        return out.logits[0, -1].float(), cache

    results, ceilings = [], {}
    with torch.inference_mode():
        prefill(torch.randint(0, config.vocab_size, (1, 2048), device=device))  # warm-up
        for L in lengths:
            P = L + 1  # L tokens of context come back; the model computes the one after them
            ids = torch.randint(0, config.vocab_size, (1, P), device=device, generator=None)
            tokens = ids[0].tolist()
            kv_bytes = (L // B) * layout.block_bytes
            t0 = time.perf_counter()
            ref_logits, cache = prefill(ids)
            recompute_s = time.perf_counter() - t0
            # reference samples of the KV (256 token positions per layer) to check restores bit for bit
            probe = torch.randint(0, L, (256,), device=device)
            ref_kv = [(la.keys[:, :, probe].clone(), la.values[:, :, probe].clone()) for la in cache.layers]

            agent_dir = work / f"agent-{L}"
            agent = start_pool_agent(agent_dir, kv_bytes, B, nvme_dir)
            try:
                client = Client(agent.tenant("bench"), timeout=None)  # an NVMe restore of 24 GB takes a while
                kv = HFKVCache(client, layout, device)
                save_t = Timings()
                t0 = time.perf_counter()
                saved = kv.save(tokens, cache, wait=30, timings=save_t)
                save_s = time.perf_counter() - t0
                # The exact reference for a restore: the same decode step from the original KV (the
                # prefill computed the last token in a chunk, with other kernels and another sum order).
                cache.crop(-1)  # drop the prompt's last token: the cache holds the L restored tokens
                ref_decode = model(
                    input_ids=ids[:, L:], past_key_values=cache, use_cache=True, logits_to_keep=1
                )
                ref_decode = ref_decode.logits[0, -1].float()
                del cache  # the engine evicted this context from HBM; its memory stays in torch's pool
                h2d = measure_h2d(kv.arena, min(GiB, kv_bytes), device) if device.type == "cuda" else None

                def restore(tier: str) -> dict[str, Any]:
                    timings = Timings()
                    t0 = time.perf_counter()
                    rc, n = kv.restore(tokens, device=device, timings=timings)
                    t1 = time.perf_counter()
                    out = model(input_ids=ids[:, n:], past_key_values=rc, use_cache=True, logits_to_keep=1)
                    sync()
                    t2 = time.perf_counter()
                    diff = (out.logits[0, -1].float() - ref_logits).abs().max().item()
                    decode_diff = (out.logits[0, -1].float() - ref_decode).abs().max().item()
                    kv_equal = all(
                        torch.equal(la.keys[:, :, probe], k) and torch.equal(la.values[:, :, probe], v)
                        for la, (k, v) in zip(rc.layers, ref_kv, strict=False)
                    )
                    del rc, out
                    phases = {**timings.seconds, "decode": round(t2 - t1, 6)}
                    return {
                        "restore_s": t2 - t0,
                        "decode_s": t2 - t1,
                        "tokens": n,
                        "diff": diff,
                        "kv_equal": kv_equal,
                        "decode_diff": decode_diff,
                        "phases": phases,
                    }

                # the first return of a context pays for staging buffers and kernels for its shape
                first = restore("dram")
                dram = restore("dram")  # steady state: what a long-running engine sees
                assert dram["tokens"] == L, f"restored {dram['tokens']} of {L} tokens"
                floor = kv_bytes / h2d + dram["decode_s"] if h2d else dram["decode_s"]
                results.append(
                    row(
                        L,
                        "dram",
                        kv_bytes,
                        recompute_s,
                        dram["restore_s"],
                        floor,
                        dram["diff"],
                        save_s=round(save_s, 3),
                        save_phases=save_t.seconds,
                        blocks=saved,
                        decode_s=round(dram["decode_s"], 4),
                        phases=dram["phases"],
                        kv_bitwise_equal_sampled=dram["kv_equal"] and first["kv_equal"],
                        logits_diff_vs_decode_from_original_kv=dram["decode_diff"],
                        first_restore_s=round(first["restore_s"], 4),
                        h2d_gbps=round(h2d / 1e9, 2) if h2d else None,
                    )
                )
                agent.admin(
                    "evict_dram", timeout=None
                )  # waits for write-behind; then blocks live on NVMe only
                # The raw read of the same bytes runs before and after the restore (a virtual disk's
                # host may cache what was just read); the faster of the two sets the floor.
                cold = drop_page_cache()
                raw_before = raw_direct_read(nvme_dir / "kvtier-bench.cache", kv_bytes)
                drop_page_cache()
                nvme = restore("nvme")
                drop_page_cache()
                raw_after = raw_direct_read(nvme_dir / "kvtier-bench.cache", kv_bytes)
                raw = max(raw_before, raw_after)
                results.append(
                    row(
                        L,
                        "nvme",
                        kv_bytes,
                        recompute_s,
                        nvme["restore_s"],
                        kv_bytes / raw,
                        nvme["diff"],
                        raw_read_gbps=round(raw / 1e9, 2),
                        raw_read_before_after_gbps=[round(raw_before / 1e9, 2), round(raw_after / 1e9, 2)],
                        page_cache_dropped=cold,
                        phases=nvme["phases"],
                        kv_bitwise_equal_sampled=nvme["kv_equal"],
                        logits_diff_vs_decode_from_original_kv=nvme["decode_diff"],
                        nvme_direct=agent.stats()["nvme"]["direct"],
                    )
                )
                ceilings = {
                    "h2d_gbps": round(h2d / 1e9, 2) if h2d else None,
                    "raw_read_gbps": round(raw / 1e9, 2),
                }
                print_table(results[-2:], f"{L:,} tokens")
                kv.conn.close()  # unregisters the arena, then unmaps it
            finally:
                agent.kill()
                shutil.rmtree(agent_dir, ignore_errors=True)
                (nvme_dir / "kvtier-bench.cache").unlink(missing_ok=True)
                (nvme_dir / "kvtier-bench.cache.manifest").unlink(missing_ok=True)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
    return {
        "model": config._name_or_path,
        "device": gpu,
        "torch": torch.__version__,
        "block_tokens": B,
        "prefill_chunk": chunk,
        "ceilings": ceilings,
        "results": results,
    }


# ------------------------------------------------------------------------------ CPU (numpy) run


def run_numpy(args: argparse.Namespace, lengths: list[int]) -> dict[str, Any]:
    import numpy as np
    from kvtier.bench.tinymodel import TinyConfig, TinyModel, blocks_to_cache, cache_to_blocks

    cfg = TinyConfig()
    model = TinyModel(cfg)
    B = args.block_tokens
    layout = KVLayout(cfg.name, "float32", cfg.layers, cfg.kv_heads, cfg.head_dim, B)
    work = Path(tempfile.mkdtemp(prefix="kvtier-ttft-"))
    memcpy = memcpy_bandwidth()
    results = []
    rng = np.random.default_rng(0)
    for L in lengths:
        tokens = rng.integers(0, cfg.vocab, L + 1)
        kv_bytes = (L // B) * layout.block_bytes
        t0 = time.perf_counter()
        ref, cache = model.prefill(tokens)
        recompute_s = time.perf_counter() - t0
        agent = start_pool_agent(work / f"agent-{L}", kv_bytes, B, work / "nvme")
        try:
            with Client(agent.tenant("bench")) as client:
                keys = block_keys(tokens.tolist(), B)[: L // B]
                client.put(layout.fingerprint, keys, cache_to_blocks(cache, B, len(keys)), wait=30)

                def restore() -> tuple[float, float, float]:
                    t0 = time.perf_counter()
                    with client.read(layout.fingerprint, block_keys(tokens[:-1].tolist(), B)) as pinned:
                        restored = blocks_to_cache([b.view for b in pinned], cfg, B)
                    t1 = time.perf_counter()
                    logits = model.forward(tokens[L:], restored)
                    t2 = time.perf_counter()
                    return t2 - t0, t2 - t1, float(np.abs(logits - ref).max())

                restore()  # warm-up (page faults on fresh mappings)
                dram_s, decode_s, diff = restore()
                results.append(
                    row(L, "dram", kv_bytes, recompute_s, dram_s, kv_bytes / memcpy + decode_s, diff)
                )
                agent.admin("evict_dram", timeout=None)
                nvme_s, _, diff = restore()
                raw = raw_direct_read(work / "nvme" / "kvtier-bench.cache", kv_bytes)
                results.append(row(L, "nvme", kv_bytes, recompute_s, nvme_s, kv_bytes / raw + decode_s, diff))
        finally:
            agent.kill()
            shutil.rmtree(work / f"agent-{L}", ignore_errors=True)
            shutil.rmtree(work / "nvme", ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    return {
        "model": cfg.name,
        "device": f"CPU ({platform.processor() or platform.machine()}, numpy)",
        "block_tokens": B,
        "ceilings": {"memcpy_gbps": round(memcpy / 1e9, 2)},
        "results": results,
    }


def main(args: argparse.Namespace) -> int:
    if args.tp:
        default = "1024,2048" if args.small else "131072"
    else:
        default = "1024,2048,4096" if args.small else "16384,65536,131072,262144,419840"
    lengths = [int(x) for x in (args.tokens or default).split(",")]
    if args.tp:
        from kvtier.bench.tp import run_tp

        report = run_tp(args, lengths)
    elif args.small and args.engine != "hf":
        report = run_numpy(args, lengths)
    else:
        report = run_hf(args, lengths)
    report["command"] = "kvtier bench ttft " + " ".join(args.argv_echo)
    report["date"] = time.strftime("%Y-%m-%d")
    print_table(report["results"], f"{report['model']} on {report['device']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    if args.plot:
        plot(report["results"], args.plot, f"{report['model']}: restore vs recompute")
    print(f"\nwrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    return 0


def report(args: argparse.Namespace) -> int:
    """Merge the JSON of several `bench ttft` runs (one per call on a lent GPU) into one, with a plot."""
    parts = [json.loads(Path(p).read_text()) for p in args.inputs]
    if any("tp" in p for p in parts):
        from kvtier.bench.tp import report_tp

        report_tp(parts, args.out, args.plot)
        return 0
    merged = {k: v for k, v in parts[0].items() if k not in ("results", "command", "date")}
    merged["runs"] = [
        {"command": p.get("command"), "date": p.get("date"), "ceilings": p.get("ceilings")} for p in parts
    ]
    merged["results"] = sorted(
        (r for p in parts for r in p["results"]), key=lambda r: (r["tier"], r["tokens"])
    )
    Path(args.out).write_text(json.dumps(merged, indent=2))
    print_table(
        sorted(merged["results"], key=lambda r: (r["tokens"], r["tier"])),
        f"{merged['model']} on {merged['device']}",
    )
    if args.plot:
        plot(merged["results"], args.plot, f"{merged['model']} on {merged['device']}")
    print(f"\nwrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    return 0
