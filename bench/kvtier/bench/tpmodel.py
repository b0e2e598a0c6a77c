"""A Llama-architecture decoder sharded Megatron-style over tensor-parallel ranks (random weights).

Each rank holds its share of the attention heads (q, and the KV heads they read) and of the MLP
columns; one all-reduce after the attention output projection and one after the MLP down projection
join the ranks. Each rank's KV cache therefore holds only its own KV heads: the shard it saves to and
restores from kvtier. Embedding and LM head are replicated (one token's worth of compute at decode;
engines shard them to save memory, which does not change what is measured here).

Prefill (one forward, or chunks with lower-right causal attention: kvtier.bench.prefill) writes K/V
in place into one preallocated buffer [layer, k/v, 1, kv heads, tokens, dim] (no per-chunk
concatenation, as paged engines do).
Prefill cost does not depend on weight values, so random weights give the real recompute time.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from kvtier.bench.prefill import causal_attention
from kvtier.bench.shapes import Shape

# ------------------------------------------------------------------------------------ weights


def weight_shapes(shape: Shape, tp: int) -> dict[str, tuple[int, ...]]:
    """Every tensor one rank of a TP group holds, by name."""
    hq, hk, d, i = shape.heads // tp, shape.kv_heads // tp, shape.head_dim, shape.intermediate // tp
    out: dict[str, tuple[int, ...]] = {
        "embed": (shape.vocab, shape.hidden),
        "norm": (shape.hidden,),
        "lm_head": (shape.vocab, shape.hidden),
    }
    for n in range(shape.layers):
        out |= {
            f"{n}.in_norm": (shape.hidden,),
            f"{n}.wq": (hq * d, shape.hidden),
            f"{n}.wk": (hk * d, shape.hidden),
            f"{n}.wv": (hk * d, shape.hidden),
            f"{n}.wo": (shape.hidden, hq * d),
            f"{n}.post_norm": (shape.hidden,),
            f"{n}.w_gate": (i, shape.hidden),
            f"{n}.w_up": (i, shape.hidden),
            f"{n}.w_down": (shape.hidden, i),
        }
        if shape.qkv_bias:
            out |= {f"{n}.bq": (hq * d,), f"{n}.bk": (hk * d,), f"{n}.bv": (hk * d,)}
    return out


def random_weights(
    shape: Shape, tp: int, rank: int, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A rank's shard drawn directly on its device (a 70B shard in seconds, no host copy)."""
    gen = torch.Generator(device).manual_seed(seed * 1009 + rank)
    out = {}
    for name, dims in weight_shapes(shape, tp).items():
        t = torch.empty(dims, dtype=dtype, device=device)
        if name.endswith("norm"):
            t.fill_(1.0)
        else:
            t.normal_(0.0, 0.02, generator=gen)
        out[name] = t
    return out


# rows (dim 0) or columns (dim 1) split across ranks; the rest is replicated
_SPLIT_ROWS = ("wq", "wk", "wv", "bq", "bk", "bv", "w_gate", "w_up")
_SPLIT_COLS = ("wo", "w_down")


def shard(full: dict[str, torch.Tensor], tp: int, rank: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s slice of a whole model's weights (TP=1 weights): what a TP checkpoint loader does."""
    out = {}
    for name, t in full.items():
        kind = name.split(".")[-1]
        if kind in _SPLIT_ROWS:
            out[name] = t.chunk(tp, dim=0)[rank].contiguous()
        elif kind in _SPLIT_COLS:
            out[name] = t.chunk(tp, dim=1)[rank].contiguous()
        else:
            out[name] = t
    return out


# -------------------------------------------------------------------------------------- model


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class ShardedLlama:
    def __init__(
        self,
        shape: Shape,
        weights: dict[str, torch.Tensor],
        tp: int = 1,
        group: object | None = None,  # torch.distributed group; None when alone
    ) -> None:
        self.shape = shape
        self.w = weights
        self.tp = tp
        self.group = group
        self.hq, self.hk = shape.heads // tp, shape.kv_heads // tp
        self.device = weights["embed"].device
        self.dtype = weights["embed"].dtype
        d = shape.head_dim
        self.inv_freq = 1.0 / (
            shape.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=self.device) / d)
        )

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.group is not None:
            import torch.distributed as dist

            dist.all_reduce(x, group=self.group)
        return x

    def _rope(self, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(start, start + n, dtype=torch.float32, device=self.device)
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def _qkv(self, n: int, x: torch.Tensor, start: int):
        """[1, s, hidden] -> q [1, hq, s, d], k and v [1, hk, s, d], rotated."""
        w, s, d = self.w, x.shape[1], self.shape.head_dim
        a = _rms_norm(x, w[f"{n}.in_norm"])
        b = self.shape.qkv_bias
        q = F.linear(a, w[f"{n}.wq"], w[f"{n}.bq"] if b else None).view(1, s, self.hq, d).transpose(1, 2)
        k = F.linear(a, w[f"{n}.wk"], w[f"{n}.bk"] if b else None).view(1, s, self.hk, d).transpose(1, 2)
        v = F.linear(a, w[f"{n}.wv"], w[f"{n}.bv"] if b else None).view(1, s, self.hk, d).transpose(1, 2)
        cos, sin = self._rope(start, s)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return q, k, v

    def _finish_layer(self, n: int, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        w = self.w
        s = x.shape[1]
        o = F.linear(attn.transpose(1, 2).reshape(1, s, self.hq * self.shape.head_dim), w[f"{n}.wo"])
        x = x + self._all_reduce(o)
        m = _rms_norm(x, w[f"{n}.post_norm"])
        m = F.linear(F.silu(F.linear(m, w[f"{n}.w_gate"])) * F.linear(m, w[f"{n}.w_up"]), w[f"{n}.w_down"])
        return x + self._all_reduce(m)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_rms_norm(x[:, -1], self.w["norm"]), self.w["lm_head"])[0].float()

    def new_kv(self, tokens: int) -> torch.Tensor:
        return torch.empty(
            (self.shape.layers, 2, 1, self.hk, tokens, self.shape.head_dim),
            dtype=self.dtype,
            device=self.device,
        )

    def prefill(self, ids: torch.Tensor, chunk: int | None, kv: torch.Tensor | None = None):
        """Prefill of ids [1, P] in one forward (chunk None) or chunk by chunk: next-token logits
        after the last one, and the KV buffer."""
        P = ids.shape[1]
        chunk = chunk or P
        kv = self.new_kv(P) if kv is None else kv
        x = None
        for start in range(0, P, chunk):
            end = min(P, start + chunk)
            x = F.embedding(ids[:, start:end], self.w["embed"])
            for n in range(self.shape.layers):
                q, k, v = self._qkv(n, x, start)
                kv[n, 0, :, :, start:end] = k
                kv[n, 1, :, :, start:end] = v
                x = self._finish_layer(n, x, causal_attention(q, kv[n, 0, :, :, :end], kv[n, 1, :, :, :end]))
        return self._logits(x), kv

    def decode(self, token: torch.Tensor, past: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One token [1, 1] after a past cache (per layer K, V [1, hk, T, d]): next-token logits. The
        new position is appended to a copy of each layer's past, as transformers' DynamicCache does."""
        T = past[0][0].shape[2]
        x = F.embedding(token, self.w["embed"])
        for n, (pk, pv) in enumerate(past):
            q, k, v = self._qkv(n, x, T)
            attn = F.scaled_dot_product_attention(
                q, torch.cat((pk, k), dim=2), torch.cat((pv, v), dim=2), enable_gqa=True
            )
            x = self._finish_layer(n, x, attn)
        return self._logits(x)


def as_cache(kv: torch.Tensor, tokens: int) -> SimpleNamespace:
    """The first `tokens` positions of a KV buffer in the shape connectors read (cache.layers[i].keys)."""
    return SimpleNamespace(
        layers=[
            SimpleNamespace(keys=kv[n, 0, :, :, :tokens], values=kv[n, 1, :, :, :tokens])
            for n in range(kv.shape[0])
        ]
    )


def past_of(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def kv_digest(past: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """An exact, order-sensitive integer digest of every K/V byte: a wrong, torn or misplaced block
    changes it (integer sums do not depend on summation order, so equal bytes give equal digests)."""
    total = torch.zeros((), dtype=torch.int64, device=past[0][0].device)
    for n, pair in enumerate(past):
        for i, t in enumerate(pair):
            bits = t.view(torch.int16 if t.element_size() == 2 else torch.int32)
            rows = bits.to(torch.int64).sum(dim=-1)  # one number per (head, token)
            weights = torch.arange(1, rows.numel() + 1, device=rows.device, dtype=torch.int64).view_as(rows)
            total += (rows * weights).sum() * (2 * n + i + 1)  # wraps mod 2^64 the same way on both sides
    return int(total)
