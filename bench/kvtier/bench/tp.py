"""`kvtier bench ttft --tp N`: tensor-parallel restore vs recompute, one process and one GPU per rank.

The node's agent runs once; every rank connects to it, saves its own KV shard (its KV heads) under its
own layout fingerprint (tp rank/size) and restores it over its own host->GPU link, so the restore's
aggregate bandwidth is judged against N x the per-GPU host->GPU bandwidth measured in the same run
(each GPU alone, then all at once). Recompute is the sharded prefill with its all-reduces.

--only-rank R runs rank R of a TP=N group alone: its shard of the weights and of the KV, the
all-reduces skipped. On a machine with one GPU that is what one GPU of the N does and copies (its
recompute time is a lower bound: the group's all-reduces are not in it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from kvtier.agent.keys import KVLayout
from kvtier.bench.diskfloor import cold, io_lock, read_extents, sweep_report, tier_extents, tier_keys
from kvtier.bench.ttft import GiB, print_table, row, start_pool_agent, write_partial
from kvtier.dev.ports import free_port

NVME_FILE = "kvtier-bench.cache"


def run_tp(args: argparse.Namespace, lengths: list[int]) -> dict[str, Any]:
    import torch
    import torch.multiprocessing as mp

    from kvtier.bench.shapes import SHAPES

    shape = SHAPES["tiny" if args.small else args.shape]
    shape.check_tp(args.tp)
    if args.only_rank is not None and not 0 <= args.only_rank < args.tp:
        raise SystemExit(f"--only-rank {args.only_rank}: a rank of TP={args.tp} is 0..{args.tp - 1}")
    on_gpu = torch.cuda.is_available() and not args.small
    if not on_gpu and not args.small:
        raise SystemExit("no GPU here: run the model shapes on GPUs, or --small for the CPU (gloo) run")
    ranks = [args.only_rank] if args.only_rank is not None else list(range(args.tp))
    if on_gpu and len(ranks) > torch.cuda.device_count() and not args.share_gpus:
        raise SystemExit(
            f"--tp {args.tp} needs {len(ranks)} GPUs, this machine has {torch.cuda.device_count()}; "
            "--only-rank R runs one rank's share on one GPU (--share-gpus: a correctness run)"
        )
    work = Path(tempfile.mkdtemp(prefix="kvtier-ttft-tp-"))
    nvme_dir = Path(args.nvme_path) if args.nvme_path else work / "nvme"
    nvme_dir.mkdir(parents=True, exist_ok=True)
    kv_node_bytes = max(lengths) * shape.kv_bytes_per_token(args.tp, 2 if on_gpu else 4) * len(ranks)
    agent = start_pool_agent(work / "agent", kv_node_bytes, args.block_tokens, nvme_dir)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # NVLink multicast (NVLS) buys nothing for these small all-reduces and can wedge shared GPU hosts
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    try:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        plan = {
            "shape": shape,
            "tp": args.tp,
            "ranks": ranks,
            "lengths": lengths,
            "block_tokens": args.block_tokens,
            "chunk": args.chunk,
            "prefill": args.prefill,
            "chunked_upto": args.chunked_upto,
            "nvme_tokens": [int(x) for x in args.nvme_tokens.split(",")] if args.nvme_tokens else lengths,
            "io_lock": args.io_lock,
            "out": args.out,
            "small": args.small,
            "share_gpus": bool(args.share_gpus),
            "tenant": agent.tenant("bench"),
            "admin_dir": str(agent.socket_dir),
            "nvme_file": str(nvme_dir / NVME_FILE),
            "port": free_port(),
        }
        mp.start_processes(rank_main, args=(plan, queue), nprocs=len(ranks), join=True, start_method="spawn")
        report = queue.get(timeout=60)
    finally:
        agent.kill()
        shutil.rmtree(work, ignore_errors=True)
        (nvme_dir / NVME_FILE).unlink(missing_ok=True)
        (nvme_dir / (NVME_FILE + ".manifest")).unlink(missing_ok=True)
    return report


# ------------------------------------------------------------------------------- one rank


def rank_main(index: int, plan: dict[str, Any], queue) -> None:
    import torch
    import torch.distributed as dist

    from kvtier.agent.client import Client, admin_call
    from kvtier.agent.connectors.gpu import measure_h2d
    from kvtier.agent.connectors.hf import HFKVCache, Timings
    from kvtier.bench import prefill as pf
    from kvtier.bench.tpmodel import ShardedLlama, as_cache, kv_digest, past_of, random_weights

    shape, tp, ranks = plan["shape"], plan["tp"], plan["ranks"]
    world, rank = len(ranks), ranks[index]  # rank: this process's shard; index: its place in the group
    on_gpu = torch.cuda.is_available() and not plan["small"]
    shared = plan["share_gpus"]  # ranks take the GPUs round-robin: NCCL needs one GPU a rank, gloo not
    device = torch.device("cuda", index % torch.cuda.device_count()) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    nccl = on_gpu and not shared
    dist.init_process_group(
        "nccl" if nccl else "gloo",
        init_method=f"tcp://127.0.0.1:{plan['port']}",
        rank=index,
        world_size=world,
        device_id=device if nccl else None,
    )
    group = dist.group.WORLD if world > 1 else None
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)

    def gather(value: Any) -> list[Any]:
        out: list[Any] = [None] * world
        dist.all_gather_object(out, value)
        return out

    dtype = torch.bfloat16 if on_gpu else torch.float32
    torch.manual_seed(0)
    model = ShardedLlama(shape, random_weights(shape, tp, rank, device, dtype), tp=tp, group=group)
    B = plan["block_tokens"]
    layout = KVLayout(
        shape.name, str(dtype).removeprefix("torch."), shape.layers, model.hk, shape.head_dim, B, rank, tp
    )
    client = Client(plan["tenant"], timeout=None)
    kv = HFKVCache(client, layout, device)
    results: list[dict[str, Any]] = []
    ceilings: dict[str, Any] = {}

    chunked_attention = pf.pick_chunked_attention(model.hq, model.hk, shape.head_dim, device, dtype)
    prefill_report: dict[int, Any] = {}
    manifest = Path(plan["nvme_file"] + ".manifest")

    with torch.inference_mode():
        warm = torch.randint(0, shape.vocab, (1, 2048), device=device)
        model.prefill(warm, None)  # warm-up
        model.prefill(warm, 512)
        for L in plan["lengths"]:
            P = L + 1
            gen = torch.Generator(device).manual_seed(L)  # every rank sees the same prompt
            ids = torch.randint(0, shape.vocab, (1, P), device=device, generator=gen)
            tokens = ids[0].tolist()
            shard_bytes = (L // B) * layout.block_bytes
            # one-shot if every rank's activations fit, else the largest chunk that fits everywhere
            free = pf.free_gpu_bytes(device) if on_gpu else 1 << 40
            kv_rank = P * shape.kv_bytes_per_token(tp, 2 if on_gpu else 4)
            plans = gather(pf.plan_prefill(shape, P, kv_rank, free, tp))
            chunked = [c for c in plans if c is not None]
            planned = min(chunked) if chunked else None
            chunks = pf.modes_to_time(plan["prefill"], plan["chunk"], plan["chunked_upto"], L, planned)
            times: dict[str, float] = {}
            buf = ref_logits = None
            before = tier_keys(manifest) if index == 0 else set()  # blocks of earlier contexts
            kernels: dict[str, list[str]] = {}
            for chunk in chunks:
                buf = ref_logits = None
                pf.warm_attention(model.hq, model.hk, shape.head_dim, P, chunk, device, dtype)
                dist.barrier()
                t0 = time.perf_counter()
                ref_logits, buf = model.prefill(ids, chunk)
                sync()
                times[pf.mode_name(chunk)] = round(time.perf_counter() - t0, 4)
                if on_gpu and index == 0:
                    kernels[pf.mode_name(chunk)] = pf.probe_kernels(
                        model.hq, model.hk, shape.head_dim, P, chunk, device, dtype
                    )
            fastest = min(times, key=times.get)
            recompute_s = times[fastest]
            prefill_report[L] = {"modes_s": times, "fastest": fastest, "attention_kernels": kernels}
            lock = io_lock(plan["io_lock"] if index == 0 else None)
            lock.__enter__()  # rank 0 holds the lock for the group; the others wait at the barrier
            dist.barrier()
            save_t = Timings()
            t0 = time.perf_counter()
            saved = kv.save(tokens, as_cache(buf, P), wait=30, timings=save_t)
            save_s = time.perf_counter() - t0
            original = past_of(as_cache(buf, L))
            ref_digest = kv_digest(original)
            ref_decode = model.decode(ids[:, L:], original)  # the same step from the original KV
            # kernels need not repeat bit for bit: restores are judged against this, not against zero
            decode_repeat_diff = (model.decode(ids[:, L:], original) - ref_decode).abs().max().item()
            del original
            del buf  # the engine evicted this context from HBM
            # per-GPU host->GPU bandwidth: each GPU alone, then all at once
            h2d_alone = 0.0
            for i in range(world):
                dist.barrier()
                if i == index and on_gpu:
                    h2d_alone = measure_h2d(kv.arena, min(GiB, shard_bytes), device)
            dist.barrier()
            h2d_together = measure_h2d(kv.arena, min(GiB, shard_bytes), device) if on_gpu else 0.0
            dist.barrier()
            try:  # a diagnostic: never the reason a run is lost
                placement = arena_placement(kv.arena, device) if on_gpu else {}
            except Exception as exc:
                placement = {"error": f"{type(exc).__name__}: {exc}"}

            def restore() -> dict[str, Any]:
                timings = Timings()
                dist.barrier()
                t0 = time.perf_counter()
                cache, n = kv.restore(tokens, device=device, timings=timings)
                t1 = time.perf_counter()
                logits = model.decode(ids[:, n:], past_of(cache))
                sync()
                t2 = time.perf_counter()
                kv_equal = kv_digest(past_of(cache)) == ref_digest
                del cache
                return {
                    "restore_s": t2 - t0,
                    "copy_s": timings.seconds.get("copy", 0.0),
                    "decode_s": t2 - t1,
                    "tokens": n,
                    "diff": (logits - ref_logits).abs().max().item(),
                    "decode_diff": (logits - ref_decode).abs().max().item(),
                    "kv_equal": kv_equal,
                    "phases": {**timings.seconds, "decode": round(t2 - t1, 6)},
                }

            first = restore()  # pays for this process's first restore (staging buffers, kernels)
            steady = sorted((restore() for _ in range(3)), key=lambda r: r["restore_s"])
            dram = steady[1]  # the median of three: what a long-running engine sees
            dram["kv_equal"] = all(r["kv_equal"] for r in steady)
            per_rank = gather(
                {
                    "rank": rank,
                    "device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
                    "recompute_s": recompute_s,
                    "prefill_s": times,
                    "save_s": save_s,
                    "saved": saved,
                    "h2d_alone": h2d_alone,
                    "h2d_together": h2d_together,
                    "arena_placement": placement,
                    "first": {k: first[k] for k in ("restore_s", "kv_equal", "phases")},
                    "steady_restore_s": [round(r["restore_s"], 4) for r in steady],
                    "steady_phases": [r["phases"] for r in steady],
                    "decode_repeat_diff": decode_repeat_diff,
                    "dram": dram,
                }
            )
            nvme = disk = None
            if L in plan["nvme_tokens"]:
                if index == 0:
                    admin_call(Path(plan["admin_dir"]), "evict_dram", timeout=None)  # NVMe only now
                    extents = tier_extents(manifest, before)
                    nvme_file = Path(plan["nvme_file"])
                    checks = [cold(nvme_file, extents)]
                    raw_before = read_extents(nvme_file, extents)
                    checks.append(cold(nvme_file, extents))
                    stats_before = admin_call(Path(plan["admin_dir"]), "stats")["stats"]
                dist.barrier()
                nvme = gather(restore())
                if index == 0:
                    stats_after = admin_call(Path(plan["admin_dir"]), "stats")["stats"]
                    checks.append(cold(nvme_file, extents))
                    raw_after = read_extents(nvme_file, extents)
                    disk = {
                        "raw": (raw_before, raw_after),
                        "bytes": sum(n for _, n in extents),
                        "extents": len(extents),
                        "sweep": sweep_report(),
                        # what the restore read from each tier: a row faster than its floor shows why
                        "agent_stats_before_after": [stats_before, stats_after],
                        "page_cache_dropped": all(c["page_cache_dropped"] for c in checks),
                        "resident": [c["resident_bytes"] for c in checks],
                    }
            if index == 0:
                rows = summarize(L, shard_bytes, world, tp, per_rank, nvme, disk, shared)
                for r in rows:
                    r.update(prefill_s=times, prefill_mode=fastest, attention_kernels=kernels)
                results += rows
                ceilings = {k: results[-len(rows)][k] for k in ("h2d_alone_gbps", "h2d_together_gbps")}
                if disk:
                    ceilings["raw_read_gbps"] = results[-1]["raw_read_gbps"]
                print_table(results[-len(rows) :], f"{L:,} tokens, TP={tp}, ranks {ranks}")
                write_partial(
                    plan["out"], {"model": shape.name, "tp": tp, "ranks": ranks, "results": results}
                )
            dist.barrier()
            lock.__exit__(None, None, None)
    if index == 0:
        only = f", rank {ranks[0]} of TP={tp} alone (all-reduces skipped)" if world < tp else ""
        only += ", ranks sharing GPUs (gloo; a correctness run, not a timing)" if plan["share_gpus"] else ""
        queue.put(
            {
                "model": shape.name + only,
                "tp": tp,
                "ranks": ranks,
                "device": f"{world} x {per_rank[0]['device'] if on_gpu else platform.processor() or 'CPU'}",
                "torch": torch.__version__,
                "block_tokens": B,
                "prefill": prefill_report,
                "chunked_attention": chunked_attention,
                "ceilings": ceilings,
                "results": results,
            }
        )
    kv.conn.close()  # unregisters the arena, then unmaps it
    dist.destroy_process_group()


def arena_placement(arena, device) -> dict[str, Any]:
    """Where the arena's pages sit and what each segment gives this GPU: a copy slower than the link
    probe shows up here as slow segments (memory on the far NUMA node, say) or as none (then the
    cost is in the copy's issue, not in the link)."""
    import statistics

    from kvtier.agent.connectors.gpu import measure_h2d_from

    pages: dict[str, int] = {}
    try:
        with open("/proc/self/numa_maps") as maps:  # pages of the shared memfd mappings, per node
            for line in maps:
                if "memfd:" not in line:
                    continue
                for field in line.split():
                    if field.startswith("N") and "=" in field:
                        node, count = field[1:].split("=")
                        pages[node] = pages.get(node, 0) + int(count)
    except OSError:
        pass
    gbps = [
        round(measure_h2d_from(seg, 256 << 20, device, repeats=2) / 1e9, 1) for seg in arena.host.values()
    ]
    return {
        "gpu_numa_node": _gpu_numa_node(device),
        "memfd_pages_per_node": pages,
        "segment_h2d_gbps": {
            "min": min(gbps, default=0.0),
            "median": statistics.median(gbps) if gbps else 0.0,
            "max": max(gbps, default=0.0),
            "slow_segments": sum(1 for g in gbps if gbps and g < 0.85 * max(gbps)),
            "segments": len(gbps),
        },
    }


def _gpu_numa_node(device) -> int | None:
    import torch

    from kvtier.agent.devices.gpu import pci_numa_node

    props = torch.cuda.get_device_properties(device)
    return pci_numa_node(f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0")


def summarize(L, shard_bytes, world, tp, per_rank, nvme, disk, shared=False) -> list[dict[str, Any]]:
    """Rows (DRAM, and NVMe when measured) for one context length from every rank's measurements.

    TTFT is the slowest rank's (the next token needs every rank). DRAM floor: the slowest rank's shard
    over its own host->GPU link alone plus the decode step (`floor_together_s`: over the bandwidth
    each link gave with all copying at once). Aggregate restore bandwidth: all shards over the
    slowest rank's copy time, against N x the per-GPU bandwidth alone."""
    total = shard_bytes * world
    recompute = max(r["recompute_s"] for r in per_rank)
    dram = [r["dram"] for r in per_rank]
    ttft = max(d["restore_s"] for d in dram)
    on_gpu = all(r["h2d_alone"] for r in per_rank) and not shared  # shared GPUs: no per-GPU link to judge

    def floor(key: str) -> float:
        return max(
            shard_bytes / r[key] + r["dram"]["decode_s"] if on_gpu else r["dram"]["decode_s"]
            for r in per_rank
        )

    copy = max(d["copy_s"] for d in dram)
    aggregate = total / copy
    n_h2d = sum(r["h2d_alone"] for r in per_rank)
    common = dict(tp=tp, ranks=[r["rank"] for r in per_rank], shared_gpus=shared)
    dram_row = row(
        L,
        "dram",
        total,
        recompute,
        ttft,
        floor("h2d_alone"),
        max(d["diff"] for d in dram),
        **common,
        floor_together_s=round(floor("h2d_together"), 4) if on_gpu else None,
        save_s=round(max(r["save_s"] for r in per_rank), 3),
        blocks=sum(r["saved"] for r in per_rank),
        decode_s=round(max(d["decode_s"] for d in dram), 4),
        kv_bitwise_equal=all(
            d["kv_equal"] and r["first"]["kv_equal"] for d, r in zip(dram, per_rank, strict=True)
        ),
        logits_diff_vs_decode_from_original_kv=max(d["decode_diff"] for d in dram),
        decode_repeat_diff=max(r["decode_repeat_diff"] for r in per_rank),
        steady_restore_s=[r["steady_restore_s"] for r in per_rank],
        steady_phases=[r["steady_phases"] for r in per_rank],
        first_restore_s=round(max(r["first"]["restore_s"] for r in per_rank), 4),
        first_restore_phases=[r["first"]["phases"] for r in per_rank],
        per_rank_restore_s=[round(d["restore_s"], 4) for d in dram],
        per_rank_phases=[d["phases"] for d in dram],
        per_rank_prefill_s=[r["prefill_s"] for r in per_rank],
        h2d_alone_gbps=[round(r["h2d_alone"] / 1e9, 2) for r in per_rank],
        h2d_together_gbps=[round(r["h2d_together"] / 1e9, 2) for r in per_rank],
        aggregate_restore_gbps=round(aggregate / 1e9, 2),
        n_x_h2d_over_aggregate=round(n_h2d / aggregate, 3) if on_gpu else None,
        arena_placement=[r["arena_placement"] for r in per_rank],
    )
    if not nvme:
        return [dram_row]
    raw_read = max(disk["raw"])
    nvme_row = row(
        L,
        "nvme",
        total,
        recompute,
        max(d["restore_s"] for d in nvme),
        # the decode step as measured after the DRAM restore: after an NVMe restore a rank's "decode"
        # also holds its wait in the all-reduce for the slower rank's read, which is restore time
        total / raw_read + max(d["decode_s"] for d in dram),
        max(d["diff"] for d in nvme),
        **common,
        raw_read_gbps=round(raw_read / 1e9, 2),
        raw_read_before_after_gbps=[round(x / 1e9, 2) for x in disk["raw"]],
        raw_read_bytes=disk["bytes"],
        raw_read_extents=disk["extents"],
        raw_read_sweep=disk["sweep"],
        agent_stats_before_after=disk["agent_stats_before_after"],
        page_cache_dropped=disk["page_cache_dropped"],
        page_cache_resident_bytes_before_reads=disk["resident"],
        per_rank_restore_s=[round(d["restore_s"], 4) for d in nvme],
        per_rank_phases=[d["phases"] for d in nvme],
        kv_bitwise_equal=all(d["kv_equal"] for d in nvme),
        logits_diff_vs_decode_from_original_kv=max(d["decode_diff"] for d in nvme),
    )
    return [dram_row, nvme_row]


# ---------------------------------------------------------------------------------- report


def summary_rows(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per run and context length: recompute, DRAM and NVMe restore, their floors, scaling."""
    out = []
    for p in parts:  # a single-GPU `bench ttft` run (no "tp") is the TP=1 group of the same shape
        ranks = p.get("ranks", [0])
        by_tier = {(r["tokens"], r["tier"]): r for r in p["results"]}
        for (tokens, tier), dram in sorted(by_tier.items()):
            if tier != "dram":
                continue
            nvme = by_tier.get((tokens, "nvme"), {})
            out.append(
                {
                    "model": p["model"],
                    "tp": p.get("tp", 1),
                    "ranks": ranks,
                    "tokens": tokens,
                    "kv_gb_per_rank": round(dram["kv_bytes"] / len(ranks) / 1e9, 2),
                    "recompute_s": dram["recompute_s"],
                    "dram_restore_s": dram["restore_s"],
                    "dram_vs_floor": dram["vs_floor"],
                    "speedup": dram["speedup"],
                    "nvme_restore_s": nvme.get("restore_s"),
                    "nvme_vs_floor": nvme.get("vs_floor"),
                    "n_x_h2d_over_aggregate": dram.get("n_x_h2d_over_aggregate"),
                    "kv_bitwise_equal": _equal(dram) and _equal(nvme),
                    "command": p.get("command"),
                }
            )
    return out


def _equal(row: dict[str, Any]) -> bool:
    """A row's KV check (whole groups compare every rank's sample; single-GPU runs name it _sampled)."""
    return bool(row.get("kv_bitwise_equal", row.get("kv_bitwise_equal_sampled", True)))


def report_tp(parts: list[dict[str, Any]], out: str, plot_path: str | None) -> None:
    rows = summary_rows(parts)
    merged = {"device": parts[0]["device"], "torch": parts[0].get("torch"), "summary": rows, "runs": parts}
    Path(out).write_text(json.dumps(merged, indent=2))
    print(
        f"{'model':<38} {'TP':>3} {'ranks':>6} {'context':>8} {'KV GB/rank':>10} {'recompute':>10} "
        f"{'DRAM':>8} {'x floor':>7} {'speedup':>8} {'NVMe':>8} {'Nxh2d/agg':>9}"
    )
    for r in rows:
        print(
            f"{r['model'].split('(')[0]:<38} {r['tp']:>3} {','.join(map(str, r['ranks'])):>6} {r['tokens']:>8,} "
            f"{r['kv_gb_per_rank']:>10.2f} {r['recompute_s']:>9.2f}s {r['dram_restore_s'] * 1e3:>6.0f}ms "
            f"{r['dram_vs_floor']:>6.3f}x {r['speedup']:>7.1f}x {r['nvme_restore_s'] or 0:>7.2f}s "
            f"{r['n_x_h2d_over_aggregate'] or 0:>9.3f}"
        )
    if plot_path:
        plot_tp(rows, plot_path, parts[0]["device"])
    print(f"\nwrote {out}" + (f" and {plot_path}" if plot_path else ""))


def plot_tp(rows: list[dict[str, Any]], path: str, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [
        f"{r['model'].split('-shaped')[0].replace('DeepSeek-R1-Distill-', '')}\nTP={r['tp']}"
        + (f" rank {r['ranks'][0]}" if len(r["ranks"]) < r["tp"] else "")
        + f"\n{r['tokens'] // 1024}k"
        for r in rows
    ]
    xs = range(len(rows))
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(rows)), 5.5))
    series = (
        ("recompute (prefill)", "recompute_s", "0.3"),
        ("restore from DRAM", "dram_restore_s", "tab:blue"),
        ("restore from NVMe", "nvme_restore_s", "tab:orange"),
    )
    for i, (name, key, color) in enumerate(series):
        vals = [r[key] or 0 for r in rows]
        bars = ax.bar([x + (i - 1) * width for x in xs], vals, width, label=name, color=color)
        if key == "dram_restore_s":
            for bar, r in zip(bars, rows, strict=True):
                ax.annotate(
                    f"{r['speedup']:.0f}x",
                    (bar.get_x() + width / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                )
    ax.set_yscale("log")
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("time to first token (s)")
    ax.set_title(f"Tensor-parallel shards, restore vs recompute ({device})")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
