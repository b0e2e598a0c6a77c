"""Batched decode at an engine's speed for `kvtier bench serve`: a static KV arena, one CUDA graph per
batch-size bucket, and attention that reads only each request's live tokens.

- The arena is one HBM tensor [layer, k/v, slots * capacity, kv heads, dim] (token-major, as paged
  engines keep it): slot s holds its context at rows s * capacity ... Prefill, restore and save see a
  slot through `slot_view` in the [layer, k/v, 1, kv heads, tokens, dim] layout of `tpmodel`, which
  is the same memory (no copy), so prefill, restore and decode share weights and KV.
- Decode attention runs flash attention's variable-length kernel with `seqused_k`: request i reads
  rows kstart[i] .. kstart[i] + used[i] of the arena, nothing else (`flash`); optionally split over
  the context by hand, each split a separate "request" of the kernel, merged by log-sum-exp
  (`flash-split-N`, flash decoding for small batches). On the CPU a per-request reference.
- A decode step is captured once per batch bucket (1, 2, 4, ...) into a torch.cuda.CUDAGraph and
  replayed: one launch per step instead of ~1,000 operations from Python. Static inputs (tokens,
  positions, arena rows) are filled from one host copy. If capture fails, the step runs eagerly
  and `graph_note` says why.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from kvtier.bench.tpmodel import _rms_norm, _rotate_half

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
LSE_LAYOUT = {"rows_first": False}


def buckets_for(slots: int) -> list[int]:
    out = [b for b in BUCKETS if b < slots]
    return [*out, slots]


def bucket_of(n: int, buckets: list[int]) -> int:
    return next(b for b in buckets if b >= n)


# --------------------------------------------------------------------------------- attention


def _flash_varlen(q, k, v, kstart, used, max_k: int):
    """q [n, hq, d] (one query each) over arena rows kstart[i] .. + used[i] of k, v [rows, hk, d]:
    output [n, hq, d] and log-sum-exp [n, hq] (float32)."""
    n = q.shape[0]
    cu_q = torch.arange(n + 1, dtype=torch.int32, device=q.device)
    cu_k = torch.cat((kstart, kstart[-1:] + used[-1:]))
    out = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, 1, max_k, 0.0, False, False, seqused_k=used
    )
    o, lse = out[0], out[1]
    # [heads, rows] in the varlen kernel's own layout; when it packs a KV head's query heads into
    # one tile (decode with grouped-query heads) the same memory may be [rows, heads]:
    # check_and_pick_attention tells them apart against the reference and sets LSE_LAYOUT
    if LSE_LAYOUT["rows_first"] or lse.dim() != 2:
        return o, lse.reshape(n, q.shape[1]).float()
    return o, lse.reshape(q.shape[1], n).t().float()


def reference_varlen(q, k, v, kstart, used, max_k: int):
    """What `_flash_varlen` computes, per request in float32 (CPU; tests). An empty range gives
    output 0 and log-sum-exp +inf, as flash's kernel does."""
    hq, hk = q.shape[1], k.shape[1]
    outs, lses = [], []
    for i, (a, n) in enumerate(zip(kstart.tolist(), used.tolist(), strict=True)):
        if n == 0:
            outs.append(torch.zeros_like(q[i], dtype=torch.float32))
            lses.append(torch.full((hq,), float("inf")))
            continue
        ki = k[a : a + n].float().repeat_interleave(hq // hk, 1)  # [n, hq, d]
        vi = v[a : a + n].float().repeat_interleave(hq // hk, 1)
        scores = torch.einsum("hd,nhd->hn", q[i].float(), ki) * q.shape[-1] ** -0.5
        lses.append(scores.logsumexp(-1))
        outs.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), vi))
    return torch.stack(outs).to(q.dtype), torch.stack(lses)


def split_attention(q, k, v, kstart, used, cap: int, splits: int, varlen=_flash_varlen):
    """Each request's live rows cut into `splits` ranges, each range a separate row of the varlen
    kernel, merged by log-sum-exp (flash decoding by hand: more of the GPU busy at small batches)."""
    if splits == 1:
        return varlen(q, k, v, kstart, used, cap)[0]
    n, hq, d = q.shape
    s = splits
    chunk = (used + (s - 1)) // s  # [n]
    j = torch.arange(s, dtype=torch.int32, device=q.device)
    starts = (kstart[:, None] + j[None] * chunk[:, None]).reshape(-1).to(torch.int32)
    lens = torch.minimum((used[:, None] - j[None] * chunk[:, None]).clamp(0), chunk[:, None])
    lens = lens.reshape(-1).to(torch.int32)
    o, lse = varlen(q.repeat_interleave(s, 0), k, v, starts, lens, cap // s + 256)
    valid = (lens > 0)[:, None]
    lse = torch.where(valid, lse.float(), float("-inf")).view(n, s, hq)
    o = torch.where(valid[:, :, None], o.float(), 0.0).view(n, s, hq, d)
    w = torch.softmax(lse, dim=1)  # [n, s, hq]: each range's share of the request's softmax mass
    return (o * w[..., None]).sum(1).to(q.dtype)


def flash_attention(q, k, v, kstart, used, cap: int, splits: int = 1):
    return split_attention(q, k, v, kstart, used, cap, splits, _flash_varlen)


def reference_attention(q, k, v, kstart, used, cap: int, splits: int = 1):
    """The same per request with SDPA over its live rows (CPU, and the GPU check's reference)."""
    out = []
    for i, (a, n) in enumerate(zip(kstart.tolist(), used.tolist(), strict=True)):
        ki = k[a : a + n].transpose(0, 1)[None]  # [1, hk, n, d]
        vi = v[a : a + n].transpose(0, 1)[None]
        out.append(F.scaled_dot_product_attention(q[i][None, :, None], ki, vi, enable_gqa=True)[0, :, 0])
    return torch.stack(out)


def _gpu_time(fn, repeats: int = 20) -> float:
    """Seconds per call of fn on the GPU: captured in a CUDA graph and replayed (eager if capture
    fails), so what is timed is the kernels, not launching them."""
    fn()
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            fn()
        run = graph.replay
    except Exception:
        run = fn
    run()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        run()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


# ---------------------------------------------------------------------------------- decoder


class Decoder:
    """The model's decode over a KV arena of `slots` slots of `capacity` tokens each."""

    def __init__(self, model, slots: int, capacity: int, graphs: bool = True) -> None:
        sh = model.shape
        self.model, self.slots = model, slots
        self.capacity = -(-capacity // 256) * 256  # whole 256-token pages (what paged kernels want)
        self.device, self.dtype = model.device, model.dtype
        self.on_gpu = self.device.type == "cuda"
        self.arena = torch.zeros(
            (sh.layers, 2, slots * self.capacity, model.hk, sh.head_dim), dtype=self.dtype, device=self.device
        )
        self._fuse_weights()
        self.attention = "flash" if self.on_gpu else "reference"
        self.splits_by_bucket: dict[int, int] = {}  # flash decoding splits per batch bucket (1: none)
        self.buckets = buckets_for(slots)
        self.graphs: dict[int, Any] = {}
        self.graph_note = "eager (CPU)" if not self.on_gpu else "not captured yet"
        self.use_graphs = graphs and self.on_gpu
        B = self.buckets[-1]
        # static inputs of every step: token, position (= rows already held), arena row, slot start
        self._inputs = torch.zeros((4, B), dtype=torch.int64, device=self.device)
        self._host = torch.zeros((4, B), dtype=torch.int64, pin_memory=self.on_gpu)
        self._outputs: dict[int, torch.Tensor] = {}

    def _fuse_weights(self) -> None:
        """One QKV and one gate/up matrix a layer (fewer, larger matrix products); the model's own
        names become views of them, so prefill reads the very same weights."""
        w, sh = self.model.w, self.model.shape
        for n in range(sh.layers):
            if f"{n}.wqkv" in w:
                continue
            names = ("wq", "wk", "wv")
            w[f"{n}.wqkv"] = torch.cat([w[f"{n}.{x}"] for x in names])
            rows = [w[f"{n}.{x}"].shape[0] for x in names]
            for x, part in zip(names, w[f"{n}.wqkv"].split(rows), strict=True):
                w[f"{n}.{x}"] = part
            if sh.qkv_bias:
                w[f"{n}.bqkv"] = torch.cat([w[f"{n}.b{x[1]}"] for x in names])
                for x, part in zip(names, w[f"{n}.bqkv"].split(rows), strict=True):
                    w[f"{n}.b{x[1]}"] = part
            w[f"{n}.w_gate_up"] = torch.cat((w[f"{n}.w_gate"], w[f"{n}.w_up"]))
            w[f"{n}.w_gate"], w[f"{n}.w_up"] = w[f"{n}.w_gate_up"].chunk(2)

    def slot_view(self, slot: int) -> torch.Tensor:
        """Slot `slot` as [layer, k/v, 1, kv heads, capacity, dim] (a view of the arena)."""
        c = self.capacity
        return self.arena[:, :, slot * c : (slot + 1) * c].permute(0, 1, 3, 2, 4).unsqueeze(2)

    # ------------------------------------------------------------------------------ one step

    def _attend(self, q, k, v, kstart, used):
        if self.attention == "reference":
            return reference_attention(q, k, v, kstart, used, self.capacity)
        splits = self.splits_by_bucket.get(q.shape[0], 1)
        return flash_attention(q, k, v, kstart, used, self.capacity, splits)

    def _forward(self, inputs: torch.Tensor, logits: bool = False) -> torch.Tensor:
        """inputs [4, B] (token, position, arena row, slot start) -> next tokens [B] (or the logits);
        every shape fixed by B (capturable)."""
        m, w, sh = self.model, self.model.w, self.model.shape
        hq, hk, d = m.hq, m.hk, sh.head_dim
        tok, pos, row, kstart = inputs
        B = tok.shape[0]
        used = (pos + 1).to(torch.int32)
        kstart = kstart.to(torch.int32)
        x = F.embedding(tok, w["embed"])  # [B, h]
        freqs = pos.float()[:, None] * m.inv_freq[None]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, d]
        cos, sin = emb.cos().to(m.dtype), emb.sin().to(m.dtype)
        i = sh.intermediate // m.tp
        for n in range(sh.layers):
            a = _rms_norm(x, w[f"{n}.in_norm"])
            qkv = F.linear(a, w[f"{n}.wqkv"], w.get(f"{n}.bqkv")).view(B, hq + 2 * hk, d)
            qk = qkv[:, : hq + hk]
            qk = qk * cos + _rotate_half(qk) * sin
            k_arena, v_arena = self.arena[n, 0], self.arena[n, 1]
            k_arena.index_copy_(0, row, qk[:, hq:])
            v_arena.index_copy_(0, row, qkv[:, hq + hk :])
            attn = self._attend(qk[:, :hq].contiguous(), k_arena, v_arena, kstart, used)
            x = x + F.linear(attn.reshape(B, hq * d), w[f"{n}.wo"])
            a = _rms_norm(x, w[f"{n}.post_norm"])
            gu = F.linear(a, w[f"{n}.w_gate_up"])
            x = x + F.linear(F.silu(gu[:, :i]) * gu[:, i:], w[f"{n}.w_down"])
        out = F.linear(_rms_norm(x, w["norm"]), w["lm_head"])
        return out.float() if logits else out.argmax(-1)

    def _fill(self, batch: list[tuple[int, int, int]]) -> tuple[torch.Tensor, list[int]]:
        """The static inputs of the batch's bucket, in slot order (arena offsets ascending, as the
        varlen kernel's offsets are); the order."""
        n = len(batch)
        B = bucket_of(n, self.buckets)
        order = sorted(range(n), key=lambda i: batch[i][0])
        c = self.capacity
        last_start = batch[order[-1]][0] * c
        cols = [(t, p, s * c + p, s * c) for s, p, t in (batch[i] for i in order)]
        cols += [(0, 0, c - 1, last_start)] * (B - n)  # padding: the never-used last row of slot 0
        host = self._host[:, :B]
        host.copy_(torch.tensor(cols).t())
        inputs = self._inputs[:, :B]
        inputs.copy_(host, non_blocking=True)
        return inputs, order

    def logits(self, batch: list[tuple[int, int, int]]) -> torch.Tensor:
        """The step's logits [len(batch), vocab] (float32), eagerly: for checks."""
        with torch.inference_mode():
            inputs, order = self._fill(batch)
            out = self._forward(inputs, logits=True)[: len(batch)]
        back = torch.empty_like(out)
        back[torch.tensor(order)] = out
        return back

    def step(self, batch: list[tuple[int, int, int]]) -> list[int]:
        """One token for each (slot, position, token): its K/V land at `position` of its slot."""
        n = len(batch)
        B = bucket_of(n, self.buckets)
        if self.use_graphs and B not in self.graphs:
            self._capture(B)  # before the inputs are filled: capture runs on inputs of its own
        with torch.inference_mode():
            inputs, order = self._fill(batch)
            if B in self.graphs:
                self.graphs[B].replay()
                out = self._outputs[B]
            else:
                out = self._forward(inputs)
            tokens = out[:n].tolist()  # waits for the GPU
        result = [0] * n
        for j, i in enumerate(order):
            result[i] = tokens[j]
        return result

    # ---------------------------------------------------------------------------- CUDA graphs

    def capture_all(self) -> None:
        if self.on_gpu and self.attention == "reference":  # per-request Python loop: not capturable
            self.use_graphs = False
            self.graph_note = "eager: no flash attention path was correct, the reference loop runs"
        for B in self.buckets:
            if not self.use_graphs:
                return
            self._capture(B)

    def _capture(self, B: int) -> None:
        """Capture one step at bucket B (the inputs as they are: padding rows are harmless)."""
        inputs = self._inputs[:, :B]
        try:
            with torch.inference_mode():
                host = self._host[:, :B]
                host.zero_()
                host[2] = self.capacity - 1
                inputs.copy_(host)
                stream = torch.cuda.Stream(self.device)
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):
                    for _ in range(2):  # kernels chosen and workspaces allocated outside the capture
                        self._forward(inputs)
                torch.cuda.current_stream(self.device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                pool = next(iter(self.graphs.values())).pool() if self.graphs else None
                with torch.cuda.graph(graph, pool=pool):
                    out = self._forward(inputs)
                torch.cuda.synchronize(self.device)
            self.graphs[B], self._outputs[B] = graph, out
            self.graph_note = f"CUDA graphs for batch buckets {sorted(self.graphs)}"
        except Exception as exc:  # a capture that fails: eager steps, said in the report
            self.use_graphs = False
            self.graphs.clear()
            self._outputs.clear()
            self.graph_note = f"eager: CUDA graph capture failed at batch {B}: {type(exc).__name__}: {exc}"[
                :400
            ]
            torch.cuda.synchronize(self.device)

    # ---------------------------------------------------------------------------- kernel choice

    def check_and_pick_attention(self, contexts: list[int]) -> dict[str, Any]:
        """On the GPU: check every flash path (one pass, and 2-16 splits) against the per-request
        reference on live rows of the arena, then for each batch bucket time each correct path at
        the longest of `contexts` (the call captured in a CUDA graph, so launch cost does not decide)
        and keep the fastest for that bucket (small batches want more splits). Returns what was
        measured; on any failure the one-pass path, or the reference, with the reason."""
        if not self.on_gpu:
            return {"chosen": "reference", "note": "CPU: not timed"}
        report: dict[str, Any] = {"checked": {}}
        m = self.model
        g = torch.Generator(self.device).manual_seed(3)
        cap = self.capacity
        lengths = [max(1, min(c, cap - 1)) for c in contexts] or [cap - 1]
        k, v = self.arena[0, 0], self.arena[0, 1]
        k.normal_(generator=g)
        v.normal_(generator=g)

        def problem(n: int, length_of):
            q = torch.randn(n, m.hq, m.shape.head_dim, generator=g, device=self.device, dtype=self.dtype)
            kstart = torch.tensor([i * cap for i in range(n)], dtype=torch.int32, device=self.device)
            used = torch.tensor([length_of(i) for i in range(n)], dtype=torch.int32, device=self.device)
            return q, kstart, used

        try:
            n = min(self.slots, 4)
            q, kstart, used = problem(n, lambda i: lengths[i % len(lengths)])
            want = reference_attention(q, k, v, kstart, used, cap).float()
            ok, layout = [], None
            for s in (1, 2, 4, 8, 16):
                name = "flash" if s == 1 else f"flash-split-{s}"
                try:
                    for rows_first in (False, True) if s > 1 else (False,):
                        LSE_LAYOUT["rows_first"] = rows_first
                        got = flash_attention(q, k, v, kstart, used, cap, s).float()
                        err = ((got - want).norm() / want.norm()).item()
                        if err < 2e-2:
                            break
                except Exception as exc:
                    report["checked"][name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                    continue
                report["checked"][name] = {"rel_err": round(err, 6)}
                if s > 1:
                    report["checked"][name]["lse_rows_first"] = LSE_LAYOUT["rows_first"]
                if err < 2e-2:
                    ok.append(s)
                    if s > 1 and layout is None:
                        layout = LSE_LAYOUT["rows_first"]
            LSE_LAYOUT["rows_first"] = bool(layout)
            ok = [
                s for s in ok if s == 1 or report["checked"][f"flash-split-{s}"]["lse_rows_first"] == layout
            ]
            if not ok:
                self.attention = "reference"
                report["chosen"] = "reference (no flash path was correct here: eager, slow)"
                return report
            self.attention = "flash"
            timed: dict[str, dict[str, float]] = {}
            for B in self.buckets:
                q, kstart, used = problem(B, lambda i: max(lengths))
                times = {}
                for s in ok:
                    args = (q, k, v, kstart, used, cap, s)
                    times[s] = _gpu_time(lambda args=args: flash_attention(*args))
                self.splits_by_bucket[B] = min(times, key=times.get)
                timed[str(B)] = {str(s): round(t * 1e3, 4) for s, t in times.items()}
            report["attention_ms_by_bucket_and_splits"] = timed
            report["timed_at_context_tokens"] = max(lengths)
            report["splits_by_bucket"] = {str(b): s for b, s in self.splits_by_bucket.items()}
            report["chosen"] = "flash varlen (seqused_k), splits by bucket"
        except Exception as exc:  # never fail the run over a kernel choice: one pass, said why
            self.attention = "flash"
            self.splits_by_bucket.clear()
            report["chosen"] = "flash (choice failed)"
            report["error"] = f"{type(exc).__name__}: {exc}"[:400]
        finally:
            k.zero_()
            v.zero_()
        return report

    def time_eager(self, batch, steps: int) -> float:
        graphs = self.use_graphs
        self.use_graphs = False
        try:
            self.step(batch)
            torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            for _ in range(steps):
                self.step(batch)
            return (time.perf_counter() - t0) / steps
        finally:
            self.use_graphs = graphs
