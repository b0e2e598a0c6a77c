"""`kvtier bench serve`: many users on one GPU, kvtier against recompute, in turns per GPU-hour and $/M tokens.

One command runs the closed-loop multi-user, multi-turn chat workload of `serveloop` under each policy
(recompute, kvtier, kvtier+prefetch) with the same users, messages and think times. The GPU work is
real: a Qwen2.5-7B-shaped model with random bf16 weights (prefill and decode cost do not depend on
weight values), prefill with the fastest attention path (one-shot SDPA `is_causal`, the flash kernel,
up to --one-shot-max tokens; chunks with a `causal_lower_right` bias beyond, and after a cached
prefix), decode batched over the active requests, KV saved to and restored from a real agent
process through the HF connector, and prefetch hints through the sidecar's HTTP API.

--small: a tiny model shape in float32 on the CPU, for tests (times mean nothing there).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from kvtier.agent.keys import KVLayout
from kvtier.bench.serveloop import POLICIES, Scheduler, Workload, ratios, scripts, summarize, workload_dict
from kvtier.bench.shapes import SHAPES
from kvtier.bench.ttft import start_bench_agent
from kvtier.dev.agents import AgentProcess

GiB, MiB = 1 << 30, 1 << 20
# A public on-demand list price for one H200 (SXM, 141 GB), per GPU-hour; --gpu-hour-usd overrides it.
GPU_HOUR_USD = 4.54
GPU_HOUR_SOURCE = (
    "Spheron on-demand H200 price as of 17 March 2026, "
    "https://www.spheron.network/blog/nvidia-h200-vs-b200-vs-gb200"
)

# knob: (GPU default, --small default)
DEFAULTS: dict[str, tuple[Any, Any]] = {
    "users": (12, 4),
    "contexts": ("16384,32768,65536,131072", "256,512,1024"),
    "turns": (20, 3),  # more than a user can have in the window: nobody runs out of turns
    "new_tokens": (256, 32),
    "output_tokens": (128, 8),
    "think_s": (2.0, 0.05),
    "hbm_contexts": (4, 2),
    "duration_s": (90.0, 60.0),
    "prefetch_lead_s": (1.0, 0.05),
    # GPU: 48 GiB holds the 40.4 GB of the 12 users' histories and what their turns add (a DRAM
    # tier smaller than contexts returning round-robin misses on nearly every return: LRU);
    # --small: the smallest arena a pool may have
    "dram_gib": (48.0, 16 / 1024),
    "block_tokens": (256, 64),
}


def workload_of(args: argparse.Namespace, vocab: int) -> Workload:
    pick = {
        k: getattr(args, k) if getattr(args, k) is not None else v[1 if args.small else 0]
        for k, v in DEFAULTS.items()
    }
    for k, v in pick.items():
        setattr(args, k, v)
    return Workload(
        users=int(pick["users"]),
        contexts=tuple(int(x) for x in str(pick["contexts"]).split(",")),
        turns=int(pick["turns"]),
        new_tokens=int(pick["new_tokens"]),
        output_tokens=int(pick["output_tokens"]),
        think_s=float(pick["think_s"]),
        hbm_contexts=int(pick["hbm_contexts"]),
        duration_s=float(pick["duration_s"]),
        prefetch_lead_s=float(pick["prefetch_lead_s"]),
        returning=not args.no_returns,
        vocab=vocab,
        seed=args.seed,
    )


# ------------------------------------------------------------------------------------ the model


def extend(model, kv, ids, start: int, chunk: int):
    """Prefill ids [1, s] at positions start.. into the KV buffer `kv` [layer, k/v, 1, heads, cap, dim]
    that holds `start` tokens already; next-token logits after the last. A chunk that starts at 0
    attends with `is_causal` (flash), a later one with a `causal_lower_right` bias (tpmodel's path)."""
    import torch.nn.functional as F

    from kvtier.bench.tpmodel import causal_attention

    s = ids.shape[1]
    x = None
    for c0 in range(0, s, chunk):
        a, b = start + c0, start + min(s, c0 + chunk)
        x = F.embedding(ids[:, c0 : c0 + (b - a)], model.w["embed"])
        for n in range(model.shape.layers):
            q, k, v = model._qkv(n, x, a)
            kv[n, 0, :, :, a:b] = k
            kv[n, 1, :, :, a:b] = v
            x = model._finish_layer(n, x, causal_attention(q, kv[n, 0, :, :, :b], kv[n, 1, :, :, :b]))
    return model._logits(x)


def prefill_kernels(name: str):
    """SDPA's own choice of attention kernel, or flash attention's forced."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION) if name == "flash" else nullcontext()


def pick_prefill_attention(model, chunked: dict[str, Any], tokens: int = 16384) -> dict[str, Any]:
    """The faster prefill kernels for contexts whose length changes every turn, each timed at two
    lengths it has not seen after one warm call (a kernel that builds a plan per shape, as cuDNN's
    does, pays it on every turn here):
    - one-shot (a whole context: recompute): SDPA's default (cuDNN on Hopper) or flash forced;
    - after a prefix (a turn's new tokens on a context in HBM, a restored context's tail): the
      chunked implementations `pick_chunked_attention` found correct (`chunked`), lower-right
      (flash) or split (cuDNN); sets the one to use.
    Every policy prefills with the winners; the times go into the report."""
    import torch

    from kvtier.bench.prefill import CHUNKED

    if model.device.type != "cuda":
        return {"one_shot": {"chosen": "sdpa-default", "note": "CPU: not timed"}}
    kv = model.new_kv(tokens + 1024)
    ids = torch.randint(0, model.shape.vocab, (1, tokens + 1024), device=model.device)

    def timed(run, lengths) -> dict[str, Any]:
        try:
            with torch.inference_mode():
                run(lengths[0])  # warm, at a length of its own
                times = []
                for n in lengths[1:]:
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    run(n)
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
            return {"new_length_s": [round(t, 4) for t in times]}
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {exc}"[:300]}

    def one_shot(name):
        def run(n):
            with prefill_kernels(name):
                extend(model, kv, ids[:, :n], 0, n)

        return run

    def after_prefix(n):
        extend(model, kv, ids[:, tokens : tokens + n], tokens, n)

    def fastest(part: dict[str, Any], default: str) -> str:
        t = {
            n: sum(r["new_length_s"]) for n, r in part.items() if isinstance(r, dict) and "new_length_s" in r
        }
        part["chosen"] = min(t, key=t.get) if t else default
        return part["chosen"]

    report: dict[str, Any] = {"one_shot": {"tokens": tokens}, "after_prefix": {"prefix_tokens": tokens}}
    for i, name in enumerate(("sdpa-default", "flash")):
        report["one_shot"][name] = timed(one_shot(name), [tokens, tokens + 101 + i, tokens + 203 + i])
    with torch.inference_mode():
        one_shot(fastest(report["one_shot"], "sdpa-default"))(tokens)  # the prefix the tails follow
    impls = ["lower-right"] + (["split"] if "ms" in chunked.get("candidates", {}).get("split", {}) else [])
    found = CHUNKED["impl"]
    for i, impl in enumerate(impls):
        CHUNKED["impl"] = impl
        report["after_prefix"][impl] = timed(after_prefix, [512, 301 + i, 419 + i])
    CHUNKED["impl"] = fastest(report["after_prefix"], found)
    kv = ids = None
    torch.cuda.empty_cache()
    return report


class TorchEngine:
    """The serveloop Engine on a real model: the decoder's KV arena (HBM slots of `capacity` tokens), the
    HF connector to the agent (kvtier policies), the sidecar's URL for hints (kvtier+prefetch)."""

    def __init__(
        self,
        decoder,  # kvtier.bench.decode.Decoder: the model, its KV arena, captured decode steps
        capacity: int,
        one_shot_max: int,
        chunk: int,
        kv=None,  # HFKVCache
        hint_url: str | None = None,
        save_wait_s: float = 10.0,
    ) -> None:
        import torch

        self.torch = torch
        self.decoder, self.model, self.capacity = decoder, decoder.model, capacity
        self.one_shot_max, self.chunk = one_shot_max, chunk
        self.kv, self.hint_url, self.save_wait_s = kv, hint_url, save_wait_s
        self.device = decoder.device
        self.on_gpu = self.device.type == "cuda"
        self.prefill_attention = "sdpa-default"  # or "flash": pick_prefill_attention's choice
        self.saves_refused = 0
        self.hint_results: list[dict[str, Any]] = []
        self._hints = ThreadPoolExecutor(4) if hint_url else None
        self._hint_lock = threading.Lock()

    def sync(self) -> None:
        if self.on_gpu:
            self.torch.cuda.synchronize(self.device)

    def close(self) -> None:
        """Wait for hints in flight (the decoder and its arena are the caller's)."""
        if self._hints:
            self._hints.shutdown(wait=True)
            self._hints = None

    # ---------------------------------------------------------------------- Engine protocol

    def prefill(self, slot: int, tokens: list[int], start: int) -> int:
        torch = self.torch
        if len(tokens) > self.capacity:
            raise RuntimeError(f"a context of {len(tokens)} tokens outgrew the slot ({self.capacity})")
        ids = torch.tensor(tokens[start:], device=self.device)[None]
        one_shot = start == 0 and ids.shape[1] <= self.one_shot_max
        with torch.inference_mode(), prefill_kernels(self.prefill_attention):
            logits = extend(
                self.model, self.decoder.slot_view(slot), ids, start, ids.shape[1] if one_shot else self.chunk
            )
            return int(logits.argmax())  # waits for the GPU

    def restore(self, slot: int, tokens: list[int]) -> int:
        cache, n = self.kv.restore(tokens, device=self.device)
        if not n:
            return 0
        kv = self.decoder.slot_view(slot)
        with self.torch.inference_mode():
            for li, layer in enumerate(cache.layers):
                kv[li, 0, :, :, :n].copy_(layer.keys)
                kv[li, 1, :, :, :n].copy_(layer.values)
        del cache
        self.sync()
        return n

    def save(self, slot: int, tokens: list[int], kv_tokens: int) -> None:
        from kvtier.agent.client import AgentError
        from kvtier.bench.tpmodel import as_cache

        try:
            self.kv.save(tokens, as_cache(self.decoder.slot_view(slot), kv_tokens), wait=self.save_wait_s)
        except AgentError:  # the arena was full of blocks not yet on NVMe: the engine skips the save
            self.saves_refused += 1

    def decode(self, batch: list[tuple[int, int, int]]) -> list[int]:
        """One token for each (slot, position, token): the decoder's captured step for the batch's
        bucket (see kvtier.bench.decode)."""
        return self.decoder.step(batch)

    def hint(self, tokens: list[int]) -> None:
        if self._hints is None:
            return
        self._hints.submit(self._post_hint, tokens)

    def _post_hint(self, tokens: list[int]) -> None:
        body = json.dumps(
            {"fingerprint": self.kv.layout.fingerprint, "token_ids": tokens, "deadline_ms": 30_000}
        ).encode()
        req = urllib.request.Request(
            self.hint_url, data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                result = json.loads(resp.read())
        except OSError as exc:
            result = {"error": str(exc)}
        with self._hint_lock:
            self.hint_results.append(result)


# ------------------------------------------------------------------------ agent and sidecar


def start_agent(
    work: Path, dram_bytes: int, nvme_bytes: int, block_tokens: int, nvme_dir: Path
) -> AgentProcess:
    return start_bench_agent(work, dram_bytes, nvme_bytes, block_tokens, nvme_dir / "kvtier-serve.cache", 32)


def start_sidecar(socket_path: str) -> tuple[ThreadingHTTPServer, str]:
    """The prefetch sidecar's HTTP API on a loopback port, in a thread of this process."""
    from kvtier.agent.sidecar import Sidecar, make_handler

    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(Sidecar(socket_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1/hints"


def seed_pool(kv, tokens: list[int], seed_kv, piece_blocks: int = 32, patience_s: float = 600) -> None:
    """Save a history (its KV: the first len(tokens) positions of `seed_kv`) a few blocks at a time:
    a full arena makes room only as fast as write-behind moves blocks to NVMe, and the agent waits
    at most 30 s per allocation."""
    from kvtier.agent.client import AgentError
    from kvtier.bench.tpmodel import as_cache

    step = piece_blocks * kv.layout.block_tokens
    deadline = time.monotonic() + patience_s
    end = min(step, len(tokens))
    while True:
        try:
            kv.save(tokens, as_cache(seed_kv, end), wait=30)
        except AgentError:
            if time.monotonic() > deadline:
                raise
            continue
        if end == len(tokens):
            return
        end = min(end + step, len(tokens))


def wait_written_behind(agent: AgentProcess, blocks: int, patience_s: float = 900) -> None:
    deadline = time.monotonic() + patience_s
    while agent.stats()["nvme"]["blocks"] < blocks:
        if time.monotonic() > deadline:
            raise RuntimeError(f"write-behind did not reach {blocks} blocks on NVMe in {patience_s:.0f} s")
        time.sleep(0.2)


def agent_summary(agent: AgentProcess) -> dict[str, Any]:
    stats = agent.stats()
    keep = ("hits", "misses", "dram", "nvme", "promotions", "demotions", "prefetch")
    return {k: v for k, v in stats.items() if any(k.startswith(p) for p in keep)}


# ------------------------------------------------------------------------------------ the run


def write(report: dict[str, Any], out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2))


def run(args: argparse.Namespace, stamp: dict[str, str]) -> dict[str, Any]:
    try:
        import torch
        import transformers  # noqa: F401 - the HF connector's cache type
    except ImportError as exc:
        raise SystemExit(
            f"kvtier bench serve needs torch and transformers ({exc}): pip install 'kvtier[hf]'"
        ) from None
    from kvtier.agent.client import Client
    from kvtier.agent.connectors.hf import HFKVCache
    from kvtier.bench.prefill import pick_chunked_attention
    from kvtier.bench.tpmodel import ShardedLlama, random_weights

    on_gpu = torch.cuda.is_available() and not args.small
    if not on_gpu and not args.small:
        raise SystemExit("no GPU here: run on a GPU, or --small for the CPU-sized run")
    device = torch.device("cuda" if on_gpu else "cpu")
    shape = SHAPES["qwen2.5-7b" if on_gpu else "tiny-qwen2"]
    dtype = torch.bfloat16 if on_gpu else torch.float32
    try:
        w = workload_of(args, shape.vocab)
        w.check()
    except ValueError as exc:
        raise SystemExit(f"kvtier bench serve: {exc}") from None
    policies = [p.strip() for p in args.policies.split(",")]
    for p in policies:
        if p not in POLICIES:
            raise SystemExit(f"--policies: {p!r} is not one of {', '.join(POLICIES)}")
    user_scripts = scripts(w)
    B = args.block_tokens
    torch.manual_seed(0)
    model = ShardedLlama(shape, random_weights(shape, 1, 0, device, dtype))
    layout = KVLayout(
        shape.name, str(dtype).removeprefix("torch."), shape.layers, model.hk, shape.head_dim, B
    )
    capacity = w.max_context() + 16
    one_shot_max = args.one_shot_max or (1 << 30)
    bytes_per_token = layout.block_bytes // B
    work = Path(tempfile.mkdtemp(prefix="kvtier-serve-"))
    nvme_dir = Path(args.nvme_path) if args.nvme_path else work / "nvme"
    nvme_dir.mkdir(parents=True, exist_ok=True)
    dram_bytes = max(MiB, int(args.dram_gib * GiB) // MiB * MiB)
    # room on NVMe for every context at its longest
    longest = sum(s.history_tokens for s in user_scripts) + w.users * w.turns * (
        w.new_tokens + w.output_tokens
    )
    nvme_bytes = (
        args.nvme_gib * GiB
        if args.nvme_gib
        else max(64 * MiB, int(longest * bytes_per_token * 1.1) // MiB * MiB)
    )

    # Histories were computed in an earlier session: their KV comes from one real prefill of the
    # longest one (KV values do not change any timing), sliced per user.
    seed_len = max(s.history_tokens for s in user_scripts)
    t0 = time.perf_counter()
    with torch.inference_mode():
        seed_kv = model.new_kv(seed_len)
        extend(model, seed_kv, torch.randint(0, shape.vocab, (1, seed_len), device=device), 0, seed_len)
    if on_gpu:
        torch.cuda.synchronize()
    seed_prefill_s = time.perf_counter() - t0
    print(
        f"{shape.name} on {device}; one-shot prefill of {seed_len:,} tokens: {seed_prefill_s:.2f} s",
        flush=True,
    )

    chunked = pick_chunked_attention(model.hq, model.hk, shape.head_dim, device)
    report: dict[str, Any] = {
        "model": shape.name,
        "device": torch.cuda.get_device_name(device) if on_gpu else f"CPU ({platform.machine()}, torch)",
        "torch": torch.__version__,
        "workload": workload_dict(w),
        "block_tokens": B,
        "kv_bytes_per_token": bytes_per_token,
        "hbm_kv_budget_bytes": w.hbm_contexts * capacity * bytes_per_token,
        "agent_dram_bytes": dram_bytes,
        "agent_nvme_bytes": nvme_bytes,
        "prefill": {
            "one_shot_max_tokens": args.one_shot_max,
            "chunk_tokens": args.chunk,
            "seed_one_shot_prefill_s": {str(seed_len): round(seed_prefill_s, 3)},
            # a prefill after a cached prefix (a turn on a context in HBM, a restored context's
            # tail) runs in chunks: the faster correct chunked attention on this GPU
            "chunked_attention": chunked,
            "new_length_kernels": pick_prefill_attention(model, chunked),
        },
        "gpu_hour_usd": args.gpu_hour_usd,
        "gpu_hour_price_source": GPU_HOUR_SOURCE
        if args.gpu_hour_usd == GPU_HOUR_USD
        else "given on the command line",
        "policies": {},
        "ratios": {},
        **stamp,
    }
    summaries = report["policies"]
    # one decoder for every policy: the KV arena of the HBM budget, its attention path checked and
    # timed, then one CUDA graph per batch bucket (each policy overwrites the slots it uses)
    from kvtier.bench.decode import Decoder

    t0 = time.perf_counter()
    decoder = Decoder(model, w.hbm_contexts, capacity)
    lengths = sorted(x.history_tokens for x in user_scripts)
    report["decode"] = {
        "attention": decoder.check_and_pick_attention([lengths[len(lengths) // 2], lengths[-1]])
    }
    decoder.capture_all()
    report["decode"]["graphs"] = decoder.graph_note
    report["decode"]["setup_s"] = round(time.perf_counter() - t0, 2)
    print(f"decode: {report['decode']['attention'].get('chosen')}, {decoder.graph_note}", flush=True)
    for policy in policies:
        agent = server = None
        engine = None
        try:
            kv = hint_url = None
            if policy != "recompute":
                agent = start_agent(
                    work / f"agent-{policy.replace('+', '-')}", dram_bytes, nvme_bytes, B, nvme_dir
                )
                tenant = agent.tenant("bench")
                kv = HFKVCache(Client(tenant, timeout=None), layout, device)
                if policy == "kvtier+prefetch":
                    server, hint_url = start_sidecar(tenant)
            engine = TorchEngine(decoder, capacity, one_shot_max, args.chunk, kv, hint_url)
            engine.prefill_attention = report["prefill"]["new_length_kernels"]["one_shot"]["chosen"]
            t0 = time.perf_counter()
            if kv is not None and w.returning:
                for s in user_scripts:  # histories in the pool: DRAM, and NVMe by write-behind
                    seed_pool(kv, s.history, seed_kv)
                # the pool at rest, as after an earlier session: write-behind drained, so every
                # history is on NVMe and the most recently saved ones are in DRAM too
                try:
                    wait_written_behind(agent, sum(s.history_tokens // B for s in user_scripts), 240)
                    at_rest = True
                except RuntimeError as exc:  # a slow disk: run anyway, and say so in the report
                    print(f"  {exc}; running with write-behind still going", flush=True)
                    at_rest = False
            seeded_s = time.perf_counter() - t0
            print(f"  [{policy}] pool seeded in {seeded_s:.0f} s", flush=True)
            _warm_up(engine, user_scripts[0], w)
            if w.returning:  # the first hbm_contexts users' histories start in HBM, under every policy
                for u, s in enumerate(user_scripts[: w.hbm_contexts]):
                    decoder.slot_view(u)[..., : s.history_tokens, :].copy_(
                        seed_kv[..., : s.history_tokens, :]
                    )
                engine.sync()
            print(f"\n[{policy}] running {w.duration_s:.0f} s ...", flush=True)
            result = Scheduler(w, policy, engine, user_scripts=user_scripts).run()
            engine.close()
            result.notes = {"seed_pool_and_write_behind_s": round(seeded_s, 2)}
            if kv is not None and w.returning:
                result.notes["pool_at_rest_at_start"] = at_rest
            if kv is not None:
                result.notes["saves_refused"] = engine.saves_refused
                result.notes["agent"] = agent_summary(agent)
            if engine.hint_results:
                done = [r for r in engine.hint_results if "error" not in r]
                result.notes["hints"] = {
                    "answered": len(done),
                    "failed": len(engine.hint_results) - len(done),
                    "blocks_promoted": sum(r.get("promoted", 0) for r in done),
                    "blocks_already_in_dram": sum(r.get("dram", 0) for r in done),
                    "late": sum(r.get("late", 0) for r in done),
                }
            summaries[policy] = summarize(result, args.gpu_hour_usd)
            print_summary(summaries[policy])
            if "recompute" in summaries:
                report["ratios"] = ratios(summaries)
            write(report, args.out)  # after each policy: a run cut short keeps what it measured
        finally:
            if server is not None:
                server.shutdown()
                server.server_close()
            if kv is not None:
                kv.conn.close()
            if agent is not None:
                agent.kill()
            if engine is not None:
                engine.close()
            if on_gpu:
                torch.cuda.empty_cache()
            for f in nvme_dir.glob("kvtier-serve.cache*"):
                f.unlink()
    shutil.rmtree(work, ignore_errors=True)
    return report


def _warm_up(engine: TorchEngine, script, w: Workload) -> None:
    """First calls of each path (kernels, staging buffers) before the clock starts; slot 0 is
    overwritten afterwards."""
    tokens = script.history[: min(len(script.history), 2 * w.new_tokens + 2)]
    half = len(tokens) // 2
    engine.prefill(0, tokens[:half], 0)
    engine.prefill(0, tokens, half)
    engine.decode([(0, len(tokens), 1)])
    if engine.kv is not None:
        engine.restore(0, script.history[: engine.kv.layout.block_tokens + 1])
    engine.sync()


# ------------------------------------------------------------------------------ report, plot


def print_summary(s: dict[str, Any]) -> None:
    t, p, g = s["ttft_s"], s["tpot_s"], s["gpu_time_share"]
    print(
        f"{s['policy']:>16}: {s['turns_completed']} turns in {s['elapsed_s']:.0f} s "
        f"({s['turns_per_gpu_hour']:.0f}/GPU-h), {s['output_tokens_per_s']:.1f} output tok/s, "
        f"TTFT p50/p95/p99 {_f(t['p50'])}/{_f(t['p95'])}/{_f(t['p99'])} s, "
        f"TPOT p50/p99 {_f(p['p50'], 1e3)}/{_f(p['p99'], 1e3)} ms, "
        f"decode {_f(s['decode_step_ms_mean'])} ms/step at batch {_f(s['decode_batch_mean'])}, "
        f"GPU " + " ".join(f"{k} {v:.0%}" for k, v in g.items()) + f", ${s['usd_per_m_output_tokens']}/M out",
        flush=True,
    )


def _f(x: float | None, scale: float = 1.0) -> str:
    return "-" if x is None else f"{x * scale:.2f}"


def plot(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pols = list(report["policies"])
    s = report["policies"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    bars = a1.bar(
        pols, [s[p]["output_tokens_per_s"] for p in pols], color=["#888", "#2a7", "#27a"][: len(pols)]
    )
    for b, p in zip(bars, pols, strict=True):
        a1.annotate(
            f"{s[p]['turns_per_gpu_hour']:.0f} turns/GPU-h\n${s[p]['usd_per_m_output_tokens'] or 0:.2f}/M out",
            (b.get_x() + b.get_width() / 2, b.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    a1.set_ylim(0, max(b.get_height() for b in bars) * 1.25 or 1)
    a1.set_ylabel("output tokens per second")
    a1.set_title("throughput (same HBM KV budget)")
    width = 0.8 / len(pols)
    for i, p in enumerate(pols):
        vals = [s[p]["ttft_s"][q] or 0 for q in ("p50", "p95", "p99")]
        a2.bar([x + i * width for x in range(3)], vals, width, label=p)
    a2.set_xticks([x + width * (len(pols) - 1) / 2 for x in range(3)], ["p50", "p95", "p99"])
    a2.set_yscale("log")
    a2.set_ylabel("time to first token (s)")
    a2.set_title("TTFT percentiles")
    a2.legend()
    w = report["workload"]
    fig.suptitle(
        f"{report['model']} on {report['device']}: {w['users']} users, contexts {min(w['contexts']) // 1024}k-"
        f"{max(w['contexts']) // 1024}k, HBM budget {w['hbm_contexts']} contexts",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(args: argparse.Namespace) -> int:
    stamp = {"command": "kvtier bench serve " + " ".join(args.argv_echo), "date": time.strftime("%Y-%m-%d")}
    if args.probe:
        from kvtier.bench.serveprobe import probe

        probe(args)
        return 0
    report = run(args, stamp)
    write(report, args.out)
    for name, r in report["ratios"].items():
        cheaper = r["usd_per_m_output_tokens_lower_by"]
        print(
            f"{name}: {r['turns_per_gpu_hour']}x turns per GPU-hour, {r['output_tokens_per_s']}x output tok/s, "
            + (f"$/M output tokens lower by {cheaper:.0%}" if cheaper is not None else "no tokens to price")
        )
    if args.plot:
        plot(report, args.plot)
    print(f"\nwrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    return 0
