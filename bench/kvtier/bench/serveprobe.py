"""`kvtier bench serve --probe`: in under a minute on the GPU, what the serve benchmark's engine costs.

Decode ms per step at batch 1/4/8/16 and several context lengths (captured step, every request at the
same length) against the HBM read floor (weights + the batch's KV at the GPU's peak bandwidth);
one-shot prefill tokens/s; and a restore through a real agent (DRAM), with the write-behind rate to
NVMe. Each part that fails is reported and the rest still runs.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Any

HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12}  # peak, from NVIDIA's data sheets


def _peak_bandwidth(name: str) -> float:
    return next((v for k, v in HBM_BYTES_PER_S.items() if k in name), 3.35e12)


def _time_steps(decoder, batch, steps: int) -> float:
    import torch

    decoder.step(batch)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        decoder.step([(s, p + 1 + i, t) for s, p, t in batch])
    return (time.perf_counter() - t0) / steps


def probe(args) -> dict[str, Any]:
    import torch

    from kvtier.bench.decode import Decoder
    from kvtier.bench.serve import extend
    from kvtier.bench.shapes import SHAPES
    from kvtier.bench.tpmodel import ShardedLlama, random_weights

    t_start = time.perf_counter()
    if not torch.cuda.is_available():
        raise SystemExit("--probe needs a GPU")
    device = torch.device("cuda")
    shape = SHAPES["qwen2.5-7b"]
    model = ShardedLlama(shape, random_weights(shape, 1, 0, device, torch.bfloat16))
    name = torch.cuda.get_device_name(device)
    bw = _peak_bandwidth(name)
    weight_bytes = sum(t.numel() * t.element_size() for k, t in model.w.items() if k != "embed")
    kv_per_token = shape.kv_bytes_per_token()
    report: dict[str, Any] = {
        "device": name,
        "torch": torch.__version__,
        "model": shape.name,
        "peak_hbm_bytes_per_s": bw,
        "weight_bytes_read_per_step": weight_bytes,
        "kv_bytes_per_token": kv_per_token,
        "decode": [],
    }
    out = Path(args.out)

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))

    # -------------------------------------------------------------------------------- decode
    plans = [(16, 65536, (16384, 32768, 65536), (1, 4, 8, 16)), (8, 131072, (131072,), (1, 4, 8))]
    for slots, capacity, contexts, batches in plans:
        decoder = None
        try:
            decoder = Decoder(model, slots, capacity + 64)
            check = decoder.check_and_pick_attention([contexts[-1]])
            report.setdefault("attention_check", []).append(check)
            decoder.capture_all()
            report.setdefault("graphs", []).append(decoder.graph_note)
            print(f"attention {check.get('chosen')}; {decoder.graph_note}", flush=True)
            for context in contexts:
                for b in batches:
                    batch = [(s, context, 1) for s in range(b)]
                    dt = _time_steps(decoder, batch, 20)
                    floor = (weight_bytes + b * (context + 1) * kv_per_token) / bw
                    row = {
                        "batch": b,
                        "context_tokens": context,
                        "step_ms": round(dt * 1e3, 3),
                        "floor_ms": round(floor * 1e3, 3),
                        "x_floor": round(dt / floor, 2),
                    }
                    if b == batches[-1] and context == contexts[-1]:
                        row["step_ms_eager"] = round(decoder.time_eager(batch, 5) * 1e3, 3)
                    report["decode"].append(row)
                    print(
                        f"decode B={b:>2} T={context:>6}: {row['step_ms']:7.2f} ms/step, floor {row['floor_ms']:6.2f} ms"
                        f" ({row['x_floor']}x)"
                        + (f", eager {row['step_ms_eager']} ms" if "step_ms_eager" in row else ""),
                        flush=True,
                    )
        except Exception as exc:
            report.setdefault("errors", []).append(
                f"decode {slots}x{capacity}: {traceback.format_exc()[-800:]}"
            )
            print(f"decode {slots}x{capacity} failed: {exc}", flush=True)
        finally:
            del decoder
            torch.cuda.empty_cache()
        save()

    # ------------------------------------------------------------------------------- prefill
    # one-shot prefill at a length seen before (warm) and at lengths never seen (a returning context
    # has a new length every turn: a kernel that builds a plan per shape pays it each time), with
    # SDPA's own choice and with the flash backend forced
    from torch.nn.attention import SDPBackend, sdpa_kernel

    report["prefill"] = []
    kv = None
    for tokens in (16384, 65536):
        for backend in ("sdpa-default", "flash"):
            try:
                kv = model.new_kv(tokens + 64)
                ids = torch.randint(0, shape.vocab, (1, tokens + 64), device=device)
                ctx = sdpa_kernel(SDPBackend.FLASH_ATTENTION) if backend == "flash" else nullcontext()
                row: dict[str, Any] = {"tokens": tokens, "attention": backend}
                with torch.inference_mode(), ctx:
                    for label, n in (("first_s", tokens), ("again_s", tokens), ("new_length_s", tokens + 37)):
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        extend(model, kv, ids[:, :n], 0, n)
                        torch.cuda.synchronize()
                        row[label] = round(time.perf_counter() - t0, 3)
                row["tokens_per_s"] = round(tokens / row["again_s"])
                report["prefill"].append(row)
                print(
                    f"prefill one-shot {tokens:>6} {backend:>12}: first {row['first_s']} s, again {row['again_s']} s"
                    f" ({row['tokens_per_s']:,} tok/s), at a new length {row['new_length_s']} s",
                    flush=True,
                )
            except Exception:
                report.setdefault("errors", []).append(f"prefill {tokens}: {traceback.format_exc()[-800:]}")
    save()

    # ------------------------------------------------------------------------------- restore
    try:
        report["restore"] = _probe_restore(model, kv, args)
    except Exception:
        report.setdefault("errors", []).append(f"restore: {traceback.format_exc()[-800:]}")
        print("restore probe failed", flush=True)
    report["probe_s"] = round(time.perf_counter() - t_start, 1)
    save()
    print(f"probe took {report['probe_s']} s; wrote {out}", flush=True)
    return report


def _probe_restore(model, seed_kv, args) -> dict[str, Any]:
    """Save 32k tokens to a real agent (DRAM), time write-behind to NVMe, then a restore from DRAM."""
    import torch

    from kvtier.agent.client import Client
    from kvtier.agent.connectors.hf import HFKVCache
    from kvtier.agent.keys import KVLayout
    from kvtier.bench.serve import GiB, MiB, seed_pool, start_agent, wait_written_behind

    tokens, B = 32768, 256
    sh = model.shape
    layout = KVLayout(sh.name, "bfloat16", sh.layers, model.hk, sh.head_dim, B)
    work = Path(tempfile.mkdtemp(prefix="kvtier-probe-"))
    nvme_dir = Path(args.nvme_path) if args.nvme_path else work
    nvme_dir.mkdir(parents=True, exist_ok=True)
    nbytes = tokens * sh.kv_bytes_per_token()
    agent = start_agent(work / "agent", 8 * GiB, (nbytes * 2) // MiB * MiB, B, nvme_dir)
    try:
        kv = HFKVCache(Client(agent.tenant("bench"), timeout=None), layout, model.device)
        ids = list(range(tokens + 1))
        t0 = time.perf_counter()
        seed_pool(kv, ids, seed_kv)
        save_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        wait_written_behind(agent, tokens // B, patience_s=60)
        behind_s = time.perf_counter() - t0 + save_s
        kv.restore(ids[: B + 1], device=model.device)  # staging buffers
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        cache, n = kv.restore(ids, device=model.device)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        del cache
        out = {
            "tokens": n,
            "bytes": nbytes,
            "save_s": round(save_s, 3),
            "written_behind_by_s": round(behind_s, 3),
            "restore_dram_s": round(dt, 3),
            "restore_dram_gb_per_s": round(nbytes / dt / 1e9, 2),
        }
        print(
            f"restore {n} tokens from DRAM: {dt:.3f} s ({out['restore_dram_gb_per_s']} GB/s); save {save_s:.2f} s,"
            f" on NVMe after {behind_s:.2f} s",
            flush=True,
        )
        kv.conn.close()
        return out
    finally:
        agent.kill()
        for f in nvme_dir.glob("kvtier-serve.cache*"):
            f.unlink()
        shutil.rmtree(work, ignore_errors=True)
