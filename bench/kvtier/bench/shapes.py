"""Model shapes the benchmarks build with random weights (prefill cost does not depend on weight values)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rope_theta: float
    qkv_bias: bool

    def check_tp(self, tp: int) -> None:
        if self.heads % tp or self.kv_heads % tp or self.intermediate % tp:
            raise SystemExit(
                f"--tp {tp} does not divide {self.name}: {self.heads} heads, {self.kv_heads} KV heads, "
                f"intermediate {self.intermediate}; choose a TP size that divides all three"
            )

    def kv_bytes_per_token(self, tp: int = 1, dtype_bytes: int = 2) -> int:
        """One rank's K and V for one token, every layer."""
        return self.layers * 2 * (self.kv_heads // tp) * self.head_dim * dtype_bytes

    def hf_config(self) -> dict[str, Any]:
        """Keyword arguments for a transformers config of this shape (Qwen2Config, LlamaConfig)."""
        return dict(
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            intermediate_size=self.intermediate,
            vocab_size=self.vocab,
            rope_theta=self.rope_theta,
        )


SHAPES = {
    "qwen2.5-7b": Shape("Qwen2.5-7B-shaped(random)", 3584, 28, 28, 4, 128, 18944, 152064, 1e6, True),
    # DeepSeek-R1-Distill-Llama-70B is the Llama-3-70B architecture
    "llama3-70b": Shape(
        "DeepSeek-R1-Distill-Llama-70B-shaped(random)", 8192, 80, 64, 8, 128, 28672, 128256, 5e5, False
    ),
    # CPU runs (the demo, tests)
    "tiny-qwen2": Shape("tiny-qwen2(random)", 256, 4, 8, 2, 32, 688, 2048, 1e4, True),
    "tiny": Shape("tiny-llama(random)", 256, 4, 8, 4, 32, 688, 2048, 1e4, True),
}
