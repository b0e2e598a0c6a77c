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
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from kvtier.agent.client import Client
from kvtier.agent.keys import KVLayout, block_keys
from kvtier.bench.diskfloor import cold, io_lock, read_extents, sweep_report, tier_extents
from kvtier.bench.shapes import SHAPES
from kvtier.dev.agents import AgentProcess, local_agent_config, spawn_agent

GiB = 1 << 30
IO_THREADS = 32  # the agent's NVMe queue depth


# --------------------------------------------------------------------------------- shared parts


def start_bench_agent(
    work: Path,
    dram_bytes: int,
    nvme_bytes: int,
    block_tokens: int,
    nvme_path: Path,
    io_threads: int = IO_THREADS,
    **spec: Any,
) -> AgentProcess:
    """A fresh local agent for one benchmark: a single tenant owning the whole pool, DRAM and an
    NVMe file tier of the given sizes; `spec` adds pool fields (eviction, ...)."""
    pool = {
        "tiers": {
            "dram": {"size": dram_bytes},
            "nvme": {"size": nvme_bytes, "mode": "file", "path": str(nvme_path)},
        },
        "tenancy": {"dramShare": 1, "nvmeShare": 1},  # one tenant: the whole pool is its share
        "blockTokens": block_tokens,
        **spec,
    }
    cfg = local_agent_config(work, "bench", pool, segment_bytes=min(GiB, dram_bytes), ioThreads=io_threads)
    return spawn_agent(cfg, work / "agent.yaml", log=work / "agent.log")


def start_pool_agent(work: Path, kv_bytes: int, block_tokens: int, nvme_dir: Path) -> AgentProcess:
    """An agent sized for one context: DRAM and NVMe tiers a little larger than its KV."""
    size = ((int(kv_bytes * 1.08) + GiB) // GiB) * GiB
    return start_bench_agent(
        work,
        size,
        size,
        block_tokens,
        nvme_dir / "kvtier-bench.cache",
        eviction={"highWatermark": 1.0, "lowWatermark": 0.95},
    )


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


def write_partial(out: str, report: dict[str, Any]) -> None:
    """What a run has measured so far, next to its output (a run cut short keeps its finished lengths)."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".partial").write_text(json.dumps({**report, "partial": True}, indent=2, default=str))


def print_table(results: list[dict[str, Any]], title: str) -> None:
    """The rows as a table; `KV equal` and `vs decode` are the checks (restored KV bit for bit, and
    next-token logits against the same decode step from the original KV)."""
    print(f"\n{title}")
    print(
        f"{'context':>9} {'tier':>17} {'KV GB':>6} {'recompute':>10} {'cached':>9} {'speedup':>8} "
        f"{'floor':>8} {'x floor':>8} {'KV equal':>8} {'vs decode':>9}"
    )
    for r in results:
        equal = r.get("kv_bitwise_equal_sampled", r.get("kv_bitwise_equal"))
        print(
            f"{r['tokens']:>9,} {r['tier']:>17} {r['kv_bytes'] / 1e9:>6.2f} {r['recompute_s']:>9.2f}s "
            f"{r['restore_s'] * 1e3:>7.0f}ms {r['speedup']:>7.1f}x {r['floor_s'] * 1e3:>6.0f}ms "
            f"{r['vs_floor']:>7.3f}x {equal!s:>8} {r.get('logits_diff_vs_decode_from_original_kv', float('nan')):>9.3g}"
        )


def plot(results: list[dict[str, Any]], path: str, title: str, prefill: dict[str, Any] | None = None) -> None:
    """TTFT against context, log-log: the fastest recompute (from `prefill`, every length timed,
    when given), kvtier's DRAM and NVMe restores with their same-run floors, every file peer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    recompute = {int(k): min(v["modes_s"].values()) for k, v in (prefill or {}).items()}
    for r in results:
        recompute.setdefault(r["tokens"], r["recompute_s"])
    xs = sorted(recompute)
    ax.plot(
        [x / 1000 for x in xs], [recompute[x] for x in xs], "k^-", lw=2, label="recompute (fastest prefill)"
    )
    for tier, style, label in (
        ("dram", "o-", "kvtier, from DRAM"),
        ("nvme", "s-", "kvtier, from NVMe (virtual disk)"),
    ):
        rows = sorted((r for r in results if r["tier"] == tier), key=lambda r: r["tokens"])
        if not rows:
            continue
        line = ax.plot(
            [r["tokens"] / 1000 for r in rows], [r["restore_s"] for r in rows], style, lw=2, label=label
        )
        ax.plot(
            [r["tokens"] / 1000 for r in rows],
            [r["floor_s"] for r in rows],
            ":",
            color=line[0].get_color(),
            label=f"{tier.upper()} floor (same run)",
        )
        if tier == "dram":
            for r in rows:
                ax.annotate(
                    f"{r['speedup']:.0f}x",
                    (r["tokens"] / 1000, r["restore_s"]),
                    textcoords="offset points",
                    xytext=(4, -12),
                )
    peers = sorted({r["tier"] for r in results if ":" in r["tier"]})
    for tier, marker in zip(peers, "vDPX<>", strict=False):
        rows = sorted((r for r in results if r["tier"] == tier), key=lambda r: r["tokens"])
        ax.plot(
            [r["tokens"] / 1000 for r in rows],
            [r["restore_s"] for r in rows],
            marker + "--",
            alpha=0.7,
            label=tier.replace(":", " from "),
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("context (thousand tokens)")
    ax.set_ylabel("time to first token (s)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------- GPU run


def run_hf(args: argparse.Namespace, lengths: list[int]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from kvtier.agent.connectors.gpu import measure_h2d
    from kvtier.agent.connectors.hf import HFKVCache, Timings
    from kvtier.bench import peers
    from kvtier.bench import prefill as pf

    device = torch.device("cuda" if torch.cuda.is_available() and not args.small else "cpu")
    on_gpu = device.type == "cuda"
    shape = SHAPES["qwen2.5-7b" if on_gpu else "tiny-qwen2"]
    dtype = torch.bfloat16
    config = Qwen2Config(**shape.hf_config(), max_position_embeddings=1 << 21, torch_dtype="bfloat16")
    config._name_or_path = shape.name
    torch.manual_seed(0)
    attn = pf.register_hf_attention()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn).eval()
    chunked_attention = pf.pick_chunked_attention(shape.heads, shape.kv_heads, shape.head_dim, device, dtype)
    B = args.block_tokens
    layout = KVLayout.from_hf_config(config, block_tokens=B)
    work = Path(tempfile.mkdtemp(prefix="kvtier-ttft-"))
    nvme_dir = Path(args.nvme_path) if args.nvme_path else work / "nvme"
    nvme_dir.mkdir(parents=True, exist_ok=True)
    nvme_file = nvme_dir / "kvtier-bench.cache"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)

    results, ceilings, prefill_report, peer_errors = [], {}, {}, []
    with torch.inference_mode():
        warm = torch.randint(0, config.vocab_size, (1, 2048), device=device)
        pf.hf_prefill(model, warm)  # warm-up: kernels, cuBLAS handles
        pf.hf_prefill(model, warm, 512)
        for L in lengths:
            P = L + 1  # L tokens of context come back; the model computes the one after them
            ids = torch.randint(0, config.vocab_size, (1, P), device=device)
            tokens = ids[0].tolist()
            kv_bytes = (L // B) * layout.block_bytes
            free = pf.free_gpu_bytes(device) if on_gpu else 1 << 40
            planned = pf.plan_prefill(shape, P, P * shape.kv_bytes_per_token(), free)
            times: dict[str, float] = {}
            cache = ref_logits = None
            kernels: dict[str, list[str]] = {}
            for chunk in pf.modes_to_time(args.prefill, args.chunk, args.chunked_upto, L, planned):
                cache = ref_logits = None  # free the previous mode's KV first
                pf.warm_attention(shape.heads, shape.kv_heads, shape.head_dim, P, chunk, device, dtype)
                t0 = time.perf_counter()
                ref_logits, cache = pf.hf_prefill(model, ids, chunk)
                times[pf.mode_name(chunk)] = round(time.perf_counter() - t0, 4)
                if on_gpu:
                    kernels[pf.mode_name(chunk)] = pf.probe_kernels(
                        shape.heads, shape.kv_heads, shape.head_dim, P, chunk, device, dtype
                    )
            fastest = min(times, key=times.get)
            recompute_s = times[fastest]
            prefill_report[L] = {"modes_s": times, "fastest": fastest, "attention_kernels": kernels}
            print(f"{L:,} tokens: prefill {times} -> {fastest}", flush=True)
            # reference samples of the KV (256 token positions per layer) to check restores bit for bit
            probe = torch.randint(0, L, (256,), device=device)
            ref_kv = [(la.keys[:, :, probe].clone(), la.values[:, :, probe].clone()) for la in cache.layers]
            common = dict(prefill_s=times, prefill_mode=fastest, attention_kernels=kernels)

            def check(rc, out, ref_decode=None) -> dict[str, Any]:
                return {
                    "diff": (out.logits[0, -1].float() - ref_logits).abs().max().item(),
                    "decode_diff": (out.logits[0, -1].float() - ref_decode).abs().max().item(),
                    "kv_equal": all(
                        torch.equal(la.keys[:, :, probe], k) and torch.equal(la.values[:, :, probe], v)
                        for la, (k, v) in zip(rc.layers, ref_kv, strict=True)
                    ),
                }

            with io_lock(args.io_lock):
                agent_dir = work / f"agent-{L}"
                agent = start_pool_agent(agent_dir, kv_bytes, B, nvme_dir)
                try:
                    client = Client(agent.tenant("bench"), timeout=None)  # an NVMe restore takes a while
                    kv = HFKVCache(client, layout, device)
                    save_t = Timings()
                    t0 = time.perf_counter()
                    saved = kv.save(tokens, cache, wait=30, timings=save_t)
                    save_s = time.perf_counter() - t0
                    # The exact reference for a restore: the same decode step from the original KV.
                    cache.crop(-1)  # drop the prompt's last token: the cache holds the L restored tokens
                    ref_decode = model(
                        input_ids=ids[:, L:], past_key_values=cache, use_cache=True, logits_to_keep=1
                    )
                    ref_decode = ref_decode.logits[0, -1].float()
                    cache.crop(-1)  # the decode appended one position; back to the L context tokens
                    stored = (
                        peers.save_all(cache, work, nvme_dir, L, lmcache=args.lmcache)
                        if args.peers and args.peers_upto >= L
                        else []
                    )
                    del cache  # the engine evicted this context from HBM; its memory stays in torch's pool
                    h2d = measure_h2d(kv.arena, min(GiB, kv_bytes), device) if on_gpu else None

                    def restore() -> dict[str, Any]:
                        timings = Timings()
                        t0 = time.perf_counter()
                        rc, n = kv.restore(tokens, device=device, timings=timings)
                        t1 = time.perf_counter()
                        out = model(
                            input_ids=ids[:, n:], past_key_values=rc, use_cache=True, logits_to_keep=1
                        )
                        sync()
                        t2 = time.perf_counter()
                        checked = check(rc, out, ref_decode)
                        del rc, out
                        phases = {**timings.seconds, "decode": round(t2 - t1, 6)}
                        return {
                            "restore_s": t2 - t0,
                            "decode_s": t2 - t1,
                            "tokens": n,
                            "phases": phases,
                            **checked,
                        }

                    # the first return of a context pays for staging buffers and kernels for its shape
                    first = restore()
                    dram = restore()  # steady state: what a long-running engine sees
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
                            **common,
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
                    write_partial(
                        args.out,
                        {"model": config._name_or_path, "prefill": prefill_report, "results": results},
                    )
                    nvme_row = nvme_restore(agent, nvme_file, set(), kv_bytes, restore)
                    results.append(
                        row(
                            L,
                            "nvme",
                            kv_bytes,
                            recompute_s,
                            nvme_row["restore_s"],
                            kv_bytes / nvme_row["raw"] + nvme_row["decode_s"],
                            nvme_row["diff"],
                            **common,
                            **nvme_row["report"],
                            phases=nvme_row["phases"],
                            kv_bitwise_equal_sampled=nvme_row["kv_equal"],
                            logits_diff_vs_decode_from_original_kv=nvme_row["decode_diff"],
                            nvme_direct=agent.stats()["nvme"]["direct"],
                        )
                    )
                    kvtier = {"tmpfs": results[-2], "disk": results[-1]}  # the tier each peer competes with
                    floors = {where: r["floor_s"] for where, r in kvtier.items()}
                    for peer in stored:
                        try:
                            got = peers.restore(
                                peer, model, ids, L, device, lambda rc, out: check(rc, out, ref_decode)
                            )
                        except Exception as exc:  # a peer that fails is a finding, not the run's end
                            print(f"peer {peer['tier']}: restore failed: {type(exc).__name__}: {exc}")
                            peer_errors.append({"tokens": L, "tier": peer["tier"], "error": repr(exc)})
                            continue
                        results.append(
                            row(
                                L,
                                peer["tier"],
                                kv_bytes,
                                recompute_s,
                                got["restore_s"],
                                floors[peer["where"]],
                                got["diff"],
                                **common,
                                peer=peer["peer"],
                                file_bytes=peer["file_bytes"],
                                peer_save_s=peer["save_s"],
                                phases=got["phases"],
                                page_cache=got.get("page_cache"),
                                kv_bitwise_equal_sampled=got["kv_equal"],
                                logits_diff_vs_decode_from_original_kv=got["decode_diff"],
                                vs_kvtier=round(got["restore_s"] / kvtier[peer["where"]]["restore_s"], 2),
                                **peer.get("row", {}),
                                **got.get("row", {}),
                            )
                        )
                    ceilings = {
                        "h2d_gbps": round(h2d / 1e9, 2) if h2d else None,
                        "raw_read_gbps": round(nvme_row["raw"] / 1e9, 2),
                    }
                    print_table([r for r in results if r["tokens"] == L], f"{L:,} tokens")
                    write_partial(
                        args.out,
                        {"model": config._name_or_path, "prefill": prefill_report, "results": results},
                    )
                    kv.conn.close()  # unregisters the arena, then unmaps it
                finally:
                    agent.kill()
                    peers.remove_all(work, nvme_dir, L)
                    shutil.rmtree(agent_dir, ignore_errors=True)
                    nvme_file.unlink(missing_ok=True)
                    (nvme_dir / "kvtier-bench.cache.manifest").unlink(missing_ok=True)
    gpu = torch.cuda.get_device_name() if on_gpu else platform.processor()
    return {
        "model": config._name_or_path,
        "device": gpu,
        "torch": torch.__version__,
        "block_tokens": B,
        "prefill": prefill_report,
        "chunked_attention": chunked_attention,
        "lmcache": peers.lmcache_peer.describe() if args.peers and args.lmcache else None,
        "peer_errors": peer_errors,
        "ceilings": ceilings,
        "results": results,
    }


def nvme_restore(agent, nvme_file: Path, before: set[bytes], kv_bytes: int, restore) -> dict[str, Any]:
    """Evict the context from DRAM (blocks live on the NVMe tier only) and restore it cold, between
    two cold raw reads of exactly its blocks' extents; the faster raw read sets the floor."""
    agent.admin("evict_dram", timeout=None)  # waits for write-behind
    manifest = nvme_file.with_name(nvme_file.name + ".manifest")
    extents = tier_extents(manifest, before)
    assert sum(n for _, n in extents) >= kv_bytes, "the NVMe tier holds fewer bytes than the context"
    cold_before = cold(nvme_file, extents)
    raw_before = read_extents(nvme_file, extents)
    cold_restore = cold(nvme_file, extents)
    got = restore()
    cold_after = cold(nvme_file, extents)
    raw_after = read_extents(nvme_file, extents)
    raw = max(raw_before, raw_after)
    got["raw"] = raw
    got["report"] = {
        "raw_read_gbps": round(raw / 1e9, 2),
        "raw_read_before_after_gbps": [round(raw_before / 1e9, 2), round(raw_after / 1e9, 2)],
        "raw_read_bytes": sum(n for _, n in extents),
        "raw_read_extents": len(extents),
        "raw_read_sweep": sweep_report(),
        "page_cache_dropped": all(c["page_cache_dropped"] for c in (cold_before, cold_restore, cold_after)),
        "page_cache_resident_bytes_before_reads": [
            c["resident_bytes"] for c in (cold_before, cold_restore, cold_after)
        ],
    }
    return got


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
                nvme_file = work / "nvme" / "kvtier-bench.cache"
                extents = tier_extents(nvme_file.with_name(nvme_file.name + ".manifest"))
                cold(nvme_file, extents)
                raw = read_extents(nvme_file, extents)
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
        plot(report["results"], args.plot, f"{report['model']}: restore vs recompute", report.get("prefill"))
    print(f"\nwrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    return 0


def report(args: argparse.Namespace) -> int:
    """Merge the JSON of several `bench ttft` runs (one per call on a lent GPU) into one, with a plot."""
    parts = [json.loads(Path(p).read_text()) for p in args.inputs]
    if any("tp" in p for p in parts):
        from kvtier.bench.tp import report_tp

        report_tp(parts, args.out, args.plot)
        return 0
    merged = {k: v for k, v in parts[0].items() if k not in ("results", "command", "date", "prefill")}
    merged["runs"] = [
        {"command": p.get("command"), "date": p.get("date"), "ceilings": p.get("ceilings")} for p in parts
    ]
    # a row (tier, length) or a prefill length that several files hold comes from the first of them:
    # a later run adds what the earlier ones lack (a peer, a length), it does not replace their rows
    merged["prefill"] = {}
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for p in parts:
        for k, v in (p.get("prefill") or {}).items():
            merged["prefill"].setdefault(k, v)
        for r in p["results"]:
            rows.setdefault((r["tier"], r["tokens"]), r)
    merged["results"] = sorted(rows.values(), key=lambda r: (r["tier"], r["tokens"]))
    Path(args.out).write_text(json.dumps(merged, indent=2))
    print_table(
        sorted(merged["results"], key=lambda r: (r["tokens"], r["tier"])),
        f"{merged['model']} on {merged['device']}",
    )
    if args.plot:
        plot(merged["results"], args.plot, f"{merged['model']} on {merged['device']}", merged["prefill"])
    print(f"\nwrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    return 0
