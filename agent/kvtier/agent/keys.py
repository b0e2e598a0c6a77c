"""Block keys: one scheme for every connector. Standard library only.

A prompt is cut into full blocks of `block_tokens`; block i's key is SHA-256 over the parent key,
the block's token ids (4-byte little-endian, as SGLang's HiCache hashes pages) and optional extra
keys (a request's cache_salt, LoRA or multimodal hashes; given for the first block they salt the
whole chain). Only full blocks get keys, as in vLLM's prefix cache.

The tenant salt is applied by the agent, not here: it keys every lookup with a secret per
namespace derived from the socket the request arrived on, so a client cannot name another tenant's
chain whatever it sends. The layout fingerprint travels beside the keys, so two models or KV layouts
never match even for the same tokens.
"""

from __future__ import annotations

import array
import hashlib
import struct
import sys
from dataclasses import dataclass
from typing import Any

ROOT = hashlib.sha256(b"kvtier-chain-v1").digest()


def block_keys(
    token_ids: list[int] | tuple[int, ...],
    block_tokens: int,
    extra: bytes | str | None = None,
    after: bytes | None = None,
) -> list[bytes]:
    """Keys of the full blocks of a token sequence (a partial last block gets none). `after`: the
    key of the block before these (the sequence continues a prefix whose keys are known; `extra`
    belongs to the first block of the whole sequence, so it is not applied again)."""
    n = len(token_ids) // block_tokens
    try:
        packed = memoryview(array.array("I", token_ids[: n * block_tokens]).tobytes())  # 4-byte LE, in C
    except OverflowError:
        packed = memoryview(
            struct.pack(f"<{n * block_tokens}I", *(t & 0xFFFFFFFF for t in token_ids[: n * block_tokens]))
        )
    if sys.byteorder != "little":
        packed = memoryview(struct.pack(f"<{n * block_tokens}I", *token_ids[: n * block_tokens]))
    extra_bytes = extra.encode() if isinstance(extra, str) else (extra or b"")
    if after is not None:
        extra_bytes = b""
    step = 4 * block_tokens
    keys = []
    parent = ROOT if after is None else after
    for i in range(n):
        h = hashlib.sha256(parent)
        h.update(packed[i * step : (i + 1) * step])
        if i == 0 and extra_bytes:
            h.update(b"\0extra\0" + extra_bytes)
        parent = h.digest()
        keys.append(parent)
    return keys


@dataclass(frozen=True)
class KVLayout:
    """What must match for KV bytes to be reusable."""

    model: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_tokens: int
    tp_rank: int = 0
    tp_size: int = 1
    layout: str = "LKHTD"  # block blob order: layer, k/v, kv head, token, head dim

    @property
    def fingerprint(self) -> str:
        return (
            f"{self.model};{self.dtype};L{self.num_layers};H{self.num_kv_heads};D{self.head_dim};"
            f"B{self.block_tokens};tp{self.tp_rank}/{self.tp_size};{self.layout}"
        )

    @property
    def dtype_bytes(self) -> int:
        return {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1, "float8": 1}.get(self.dtype, 2)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block: every layer's K and V for block_tokens tokens of this rank's heads."""
        return self.num_layers * 2 * self.num_kv_heads * self.block_tokens * self.head_dim * self.dtype_bytes

    @classmethod
    def from_hf_config(
        cls, config: Any, block_tokens: int, dtype: str = "bfloat16", tp_rank: int = 0, tp_size: int = 1
    ) -> KVLayout:
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        name = getattr(config, "_name_or_path", "") or getattr(config, "model_type", "model")
        return cls(
            model=name,
            dtype=dtype,
            num_layers=config.num_hidden_layers,
            num_kv_heads=heads // tp_size,
            head_dim=head_dim,
            block_tokens=block_tokens,
            tp_rank=tp_rank,
            tp_size=tp_size,
        )
