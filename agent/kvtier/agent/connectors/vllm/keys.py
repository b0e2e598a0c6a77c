"""kvtier block keys from vLLM's own block hashes (pure; imports neither vLLM nor torch).

vLLM hashes a request in blocks of `hash_block_size` tokens, each hash chained over the whole prefix
and over the block's extra keys: the request's `cache_salt`, its LoRA adapter, its multimodal inputs
and prompt embeddings. So the hash at a token boundary names that prefix exactly as vLLM's prefix
cache does. A kvtier block of `block_tokens` tokens ends on such a boundary; its key is that hash,
under a domain tag. Saves and lookups use this one scheme, so every isolation vLLM's prefix cache
has, kvtier has too; the agent applies the tenant salt on top (from the socket a request came in on).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

DOMAIN = b"kvtier-vllm-block-hash-v1\0"


def hash_bytes(block_hash: Any) -> bytes:
    """vLLM's BlockHash (bytes; an int in some releases and for KV events) as bytes."""
    if isinstance(block_hash, bytes | bytearray | memoryview):
        return bytes(block_hash)
    if isinstance(block_hash, int):
        return block_hash.to_bytes((block_hash.bit_length() + 8) // 8, "big", signed=True)
    raise TypeError(f"unsupported vLLM block hash {type(block_hash).__name__}")


def block_keys(
    block_hashes: Sequence[Any], hash_block_size: int, block_tokens: int, max_tokens: int
) -> list[bytes]:
    """Keys of the kvtier blocks that end at or before `max_tokens` and whose hashes vLLM has."""
    if block_tokens % hash_block_size:
        raise ValueError(
            f"kvtier blocks of {block_tokens} tokens are not whole vLLM hash blocks of {hash_block_size}"
        )
    step = block_tokens // hash_block_size
    n = min(max_tokens // block_tokens, len(block_hashes) // step)
    return [hashlib.sha256(DOMAIN + hash_bytes(block_hashes[(i + 1) * step - 1])).digest() for i in range(n)]
