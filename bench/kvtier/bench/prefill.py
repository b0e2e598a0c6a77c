"""The fastest prefill this GPU runs for a model shape: the baseline a restore is divided by.

A restore is worth what it saves against the best recompute, so the benchmarks time that: one
forward over the whole prompt (`one-shot`: SDPA `is_causal`, which dispatches to cuDNN's or flash
attention's fused kernels) where its activations fit in GPU memory, else chunked prefill whose
attention keeps fused kernels with the chunk's causal offset (lower-right aligned: a chunk's queries
see every earlier token and the chunk's own up to themselves). Chunked attention runs one of two
ways, whichever is faster on the GPU in hand (`pick_chunked_attention`, both checked first):

- `lower-right`: SDPA with `causal_lower_right` (flash attention's bottom-right causal kernel);
- `split`: the chunk over every earlier key (no mask) and over itself (`is_causal`), both through
  cuDNN's fused kernel, merged by their log-sum-exp (cuDNN is the fastest kernel for the square
  case on Hopper, but SDPA sends lower-right masks to flash attention only).

`attention_kernels` reads the kernels actually dispatched from the profiler. Used by `kvtier bench
ttft` (HF and tensor-parallel paths) and by anything else that needs an honest recompute time.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

CHUNKED = {"impl": "lower-right", "lse_base": "e"}  # chosen by pick_chunked_attention
HF_ATTENTION = "kvtier_causal"
CHUNKS = (131072, 65536, 32768, 16384)  # candidate chunk sizes, largest first
_ATTENTION_WORDS = ("flash", "fmha", "sdpa", "attention", "attn", "cudnn", "softmax")


# --------------------------------------------------------------------------------- attention


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """q [B, Hq, s, D] over k, v [B, Hk, t, D] (t >= s; the last s keys are q's own positions):
    causal, lower-right aligned, grouped-query. Returns [B, Hq, s, D]."""
    s, t = q.shape[-2], k.shape[-2]
    if s == t:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    if s == 1:  # decode: the one query sees everything
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
    if CHUNKED["impl"] == "split":
        return split_attention(q, k, v, scale)
    return lower_right_attention(q, k, v, scale)


def lower_right_attention(q, k, v, scale=None) -> torch.Tensor:
    from torch.nn.attention.bias import causal_lower_right

    mask = causal_lower_right(q.shape[-2], k.shape[-2])
    try:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    except RuntimeError:  # a kernel without grouped-query support for this mask: expand K/V
        g = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(
            q, k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1), attn_mask=mask, scale=scale
        )


def split_attention(q, k, v, scale=None) -> torch.Tensor:
    """Lower-right causal attention as (queries over earlier keys) + (queries over their own chunk,
    causal), merged by log-sum-exp: each part runs in a fused kernel without a mask tensor."""
    s, t = q.shape[-2], k.shape[-2]
    o1, l1 = attention_lse(q, k[:, :, : t - s], v[:, :, : t - s], False, scale)
    o2, l2 = attention_lse(q, k[:, :, t - s :], v[:, :, t - s :], True, scale)
    shape = (q.shape[0], q.shape[1], s, 1)
    l1, l2 = l1.reshape(shape).float(), l2.reshape(shape).float()
    if CHUNKED["lse_base"] == "2":
        l1, l2 = l1 * 0.6931471805599453, l2 * 0.6931471805599453
    m = torch.maximum(l1, l2)
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    out = o1.float().mul_(w1).add_(o2.float().mul_(w2)).div_(w1.add_(w2))
    return out.to(q.dtype)


def attention_lse(q, k, v, causal: bool, scale=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and its log-sum-exp per query. cuDNN's fused kernel on the GPU (grouped-query
    K/V expanded if the kernel refuses them), a float32 reference on the CPU."""
    if q.is_cuda:
        try:
            out = torch.ops.aten._scaled_dot_product_cudnn_attention(
                q, k, v, None, True, 0.0, causal, False, scale=scale
            )
        except RuntimeError:
            g = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
            out = torch.ops.aten._scaled_dot_product_cudnn_attention(
                q, k, v, None, True, 0.0, causal, False, scale=scale
            )
        return out[0], out[1]
    g = q.shape[1] // k.shape[1]
    kf, vf = k.float().repeat_interleave(g, dim=1), v.float().repeat_interleave(g, dim=1)
    scores = q.float() @ kf.transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)
    if causal:
        s, t = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(s, t, dtype=torch.bool).triu(t - s + 1), float("-inf"))
    lse = scores.logsumexp(-1)
    return (torch.softmax(scores, -1) @ vf).to(q.dtype), lse


def attention_kernels(fn) -> list[str]:
    """Names of the GPU kernels `fn()` launches that look like attention (from the profiler)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        names = {e.key for e in prof.key_averages()}
    except Exception as exc:  # a profiler that cannot attach: say so, never fail the run
        return [f"unknown (profiler: {type(exc).__name__})"]
    return sorted(n[:160] for n in names if any(w in n.lower() for w in _ATTENTION_WORDS))


def pick_chunked_attention(
    hq: int, hk: int, d: int, device: torch.device, dtype=torch.bfloat16, chunk=8192, context=32768
) -> dict[str, Any]:
    """Check both chunked implementations against each other's reference and keep the faster correct
    one for this shape (sets CHUNKED). On the CPU: lower-right (the CPU runs are for correctness)."""
    if device.type != "cuda":
        CHUNKED.update(impl="lower-right", lse_base="e")
        return {"impl": "lower-right", "note": "CPU: not timed"}
    gen = torch.Generator(device).manual_seed(1)
    q = torch.randn(1, hq, chunk, d, device=device, dtype=dtype, generator=gen)
    k = torch.randn(1, hk, context, d, device=device, dtype=dtype, generator=gen)
    v = torch.randn(1, hk, context, d, device=device, dtype=dtype, generator=gen)
    ref = lower_right_attention(q, k, v).float()
    report: dict[str, Any] = {"problem": {"q": list(q.shape), "kv": list(k.shape)}, "candidates": {}}
    best = ("lower-right", "e", _time(lambda: lower_right_attention(q, k, v)))
    report["candidates"]["lower-right"] = {
        "ms": round(best[2] * 1e3, 3),
        "kernels": attention_kernels(lambda: lower_right_attention(q, k, v)),
    }
    for base in ("e", "2"):
        CHUNKED["lse_base"] = base
        try:
            out = split_attention(q, k, v).float()
        except RuntimeError as exc:
            report["candidates"]["split"] = {"error": str(exc)[:300]}
            break
        err = ((out - ref).norm() / ref.norm()).item()
        if err < 2e-2:
            t = _time(lambda: split_attention(q, k, v))
            report["candidates"]["split"] = {
                "ms": round(t * 1e3, 3),
                "lse_base": base,
                "rel_err_vs_lower_right": round(err, 5),
                "kernels": attention_kernels(lambda: split_attention(q, k, v)),
            }
            if t < best[2]:
                best = ("split", base, t)
            break
        report["candidates"][f"split-base-{base}"] = {"rel_err_vs_lower_right": round(err, 5)}
    CHUNKED.update(impl=best[0], lse_base=best[1])
    report["impl"] = best[0]
    return report


def chunk_shapes(P: int, chunk: int | None) -> list[tuple[int, int]]:
    """(queries, keys) of each attention call a prefill of P tokens makes, in order."""
    step = chunk or P
    return [(min(step, P - s), min(P, s + step)) for s in range(0, P, step)]


def warm_attention(hq: int, hk: int, d: int, P: int, chunk: int | None, device, dtype) -> None:
    """Run one attention call of every shape a prefill will make: cuDNN builds an execution plan the
    first time it sees a shape (up to about a second), which is set-up, not prefill."""
    if device.type != "cuda":
        return
    for q_len, kv_len in chunk_shapes(P, chunk):
        q = torch.randn(1, hq, q_len, d, device=device, dtype=dtype)
        k = torch.randn(1, hk, kv_len, d, device=device, dtype=dtype)
        causal_attention(q, k, k)
        del q, k
    torch.cuda.synchronize(device)


def probe_kernels(hq: int, hk: int, d: int, P: int, chunk: int | None, device, dtype) -> list[str]:
    """The attention kernels of the prefill's last (largest) attention call, from the profiler."""
    q_len, kv_len = chunk_shapes(P, chunk)[-1]
    q = torch.randn(1, hq, q_len, d, device=device, dtype=dtype)
    k = torch.randn(1, hk, kv_len, d, device=device, dtype=dtype)
    return attention_kernels(lambda: causal_attention(q, k, k))


def _time(fn, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


# ---------------------------------------------------------------------------------- planning


def activation_bytes(shape, tokens: int, tp: int = 1) -> int:
    """Peak activation memory of a forward over `tokens` positions at once (bf16), with a margin:
    the MLP's gate, up and product tensors plus the residual stream dominate (measured: 145 KB a
    token for the Qwen2.5-7B shape in transformers; this says 163 KB)."""
    return int(tokens * (shape.hidden * 8 + (shape.intermediate // tp) * 6) * 1.15)


def plan_prefill(shape, tokens: int, kv_bytes: int, free_bytes: int, tp: int = 1) -> int | None:
    """None for one-shot if the whole prompt's activations and KV fit in `free_bytes`, else the
    largest chunk that fits (tokens)."""
    budget = free_bytes * 0.92
    if activation_bytes(shape, tokens, tp) + kv_bytes <= budget:
        return None
    for chunk in CHUNKS:
        # chunked: the chunk's activations, the KV, and a transient copy of one layer's KV
        if activation_bytes(shape, chunk, tp) + kv_bytes * (1 + 2 / shape.layers) <= budget:
            return chunk
    return CHUNKS[-1]


def modes_to_time(
    prefill: str, chunk: int | None, chunked_upto: int, L: int, planned: int | None
) -> list[int | None]:
    """The prefill modes to time at length L (None: one-shot), the one whose KV is kept last.
    auto: one-shot where it fits, plus chunked (a quarter of L, at most 64k) up to `chunked_upto`;
    chunked alone where one-shot does not fit (`planned`: the largest chunk that fits). The fastest
    measured is the recompute time."""
    chunk = chunk or planned or min(65536, L // 4)
    if prefill == "one-shot":
        return [None]
    if prefill == "chunked" or planned is not None:
        return [chunk]
    return ([chunk] if prefill == "both" or chunked_upto >= L else []) + [None]


def sync(device: torch.device) -> None:
    """Wait for the device's work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_gpu_bytes(device: torch.device) -> int:
    """What a forward can still allocate: free device memory plus torch's cached, unused blocks."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def mode_name(chunk: int | None) -> str:
    return "one-shot" if chunk is None else f"chunked-{chunk // 1024}k-{CHUNKED['impl']}"


# ------------------------------------------------------------------------------ transformers


def hf_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function: `causal_attention` (no mask tensor is ever built)."""
    if attention_mask is not None:
        raise ValueError(f"{HF_ATTENTION} takes unpadded causal prompts only (no attention mask)")
    out = causal_attention(query, key, value, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register_hf_attention() -> str:
    """Register `hf_attention` with transformers; load models with attn_implementation=<the name>.
    A name without a mask function makes transformers skip building masks."""
    from transformers import AttentionInterface

    AttentionInterface.register(HF_ATTENTION, hf_attention)
    return HF_ATTENTION


def hf_prefill(model, ids: torch.Tensor, chunk: int | None = None):
    """Prefill ids [1, P] in one forward (chunk None) or chunk by chunk: next-token logits after the
    last token (float32) and the DynamicCache."""
    from transformers import DynamicCache

    cache = DynamicCache()
    step = chunk or ids.shape[1]
    out = None
    for s in range(0, ids.shape[1], step):
        out = model(input_ids=ids[:, s : s + step], past_key_values=cache, use_cache=True, logits_to_keep=1)
    if ids.is_cuda:
        torch.cuda.synchronize(ids.device)
    return out.logits[0, -1].float(), cache
