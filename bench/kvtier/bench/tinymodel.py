"""A small Llama/Qwen-style decoder in numpy: real prefill, real KV, real decode, no torch.

It lets the demo and CI run the whole save/restore path on a CPU: the KV it saves is the KV a
transformer computes (RoPE'd keys, grouped-query heads), and restoring it must give the very logits
a full recompute gives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TinyConfig:
    vocab: int = 2048
    hidden: int = 256
    layers: int = 4
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 32
    intermediate: int = 688
    rope_theta: float = 10000.0
    name: str = "kvtier/tiny-llama"


class TinyModel:
    def __init__(self, cfg: TinyConfig, seed: int = 0) -> None:
        self.cfg = cfg
        rng = np.random.default_rng(seed)
        s = 0.02
        h, q, kv, f = cfg.hidden, cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.intermediate
        self.embed = rng.standard_normal((cfg.vocab, h), dtype=np.float32) * s
        self.layers = [
            {
                "wq": rng.standard_normal((h, q), dtype=np.float32) * s,
                "wk": rng.standard_normal((h, kv), dtype=np.float32) * s,
                "wv": rng.standard_normal((h, kv), dtype=np.float32) * s,
                "wo": rng.standard_normal((q, h), dtype=np.float32) * s,
                "w1": rng.standard_normal((h, f), dtype=np.float32) * s,
                "w3": rng.standard_normal((h, f), dtype=np.float32) * s,
                "w2": rng.standard_normal((f, h), dtype=np.float32) * s,
            }
            for _ in range(cfg.layers)
        ]
        self.head = rng.standard_normal((h, cfg.vocab), dtype=np.float32) * s
        inv = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
        self.inv_freq = inv

    def empty_cache(self) -> list[tuple[np.ndarray, np.ndarray]]:
        shape = (self.cfg.kv_heads, 0, self.cfg.head_dim)
        return [(np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in range(self.cfg.layers)]

    def _rope(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        angles = positions[:, None] * self.inv_freq[None, :]
        cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
        x1, x2 = x[..., ::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., ::2] = x1 * cos - x2 * sin
        out[..., 1::2] = x1 * sin + x2 * cos
        return out

    @staticmethod
    def _norm(x: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + np.float32(1e-6))

    def forward(self, tokens: np.ndarray, cache: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """Run `tokens` after whatever `cache` holds; extends the cache; returns the last logits."""
        cfg = self.cfg
        past = cache[0][0].shape[1]
        n = len(tokens)
        pos = np.arange(past, past + n, dtype=np.float64)
        x = self.embed[tokens]
        group = cfg.heads // cfg.kv_heads
        for li, w in enumerate(self.layers):
            h = self._norm(x)
            q = (h @ w["wq"]).reshape(n, cfg.heads, cfg.head_dim).transpose(1, 0, 2)
            k = (h @ w["wk"]).reshape(n, cfg.kv_heads, cfg.head_dim).transpose(1, 0, 2)
            v = (h @ w["wv"]).reshape(n, cfg.kv_heads, cfg.head_dim).transpose(1, 0, 2)
            q, k = self._rope(q, pos), self._rope(k, pos)
            keys = np.concatenate([cache[li][0], k], axis=1)
            values = np.concatenate([cache[li][1], v], axis=1)
            cache[li] = (keys, values)
            kq = np.repeat(keys, group, axis=0)
            vq = np.repeat(values, group, axis=0)
            scores = q @ kq.transpose(0, 2, 1) * np.float32(cfg.head_dim**-0.5)
            mask = np.arange(past + n)[None, :] > (past + np.arange(n))[:, None]
            scores = np.where(mask[None], -np.inf, scores)
            scores -= scores.max(-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(-1, keepdims=True)
            att = (probs @ vq).transpose(1, 0, 2).reshape(n, cfg.heads * cfg.head_dim)
            x = x + att @ w["wo"]
            h = self._norm(x)
            a, b = h @ w["w1"], h @ w["w3"]
            x = x + ((a / (1 + np.exp(-a))) * b) @ w["w2"]
        return self._norm(x[-1:]) @ self.head

    def prefill(self, tokens: np.ndarray, chunk: int = 1024):
        cache = self.empty_cache()
        logits = None
        for start in range(0, len(tokens), chunk):
            logits = self.forward(tokens[start : start + chunk], cache)
        return logits, cache


def cache_to_blocks(cache, block_tokens: int, n_blocks: int) -> list[bytes]:
    """[layer, k/v, kv head, token, dim] per block: the same blob layout as the GPU connector."""
    k = np.stack([c[0] for c in cache])  # [L, H, T, D]
    v = np.stack([c[1] for c in cache])
    kv = np.stack([k, v], axis=1)  # [L, 2, H, T, D]
    out = []
    for b in range(n_blocks):
        out.append(np.ascontiguousarray(kv[:, :, :, b * block_tokens : (b + 1) * block_tokens, :]).tobytes())
    return out


def blocks_to_cache(views: list[memoryview], cfg: TinyConfig, block_tokens: int):
    shape = (cfg.layers, 2, cfg.kv_heads, block_tokens, cfg.head_dim)
    kv = np.concatenate([np.frombuffer(v, dtype=np.float32).reshape(shape) for v in views], axis=3)
    return [(np.ascontiguousarray(kv[li, 0]), np.ascontiguousarray(kv[li, 1])) for li in range(cfg.layers)]
