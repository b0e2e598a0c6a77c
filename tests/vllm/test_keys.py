"""kvtier keys from vLLM's block hashes (pure: runs without vLLM)."""

from __future__ import annotations

import hashlib

import pytest

from kvtier.agent.connectors.vllm.keys import DOMAIN, block_keys

pytestmark = pytest.mark.unit


def test_a_kvtier_block_is_keyed_by_the_vllm_hash_at_its_end():
    hashes = [hashlib.sha256(bytes([i])).digest() for i in range(12)]  # 12 vLLM blocks of 16 tokens
    keys = block_keys(hashes, 16, 64, max_tokens=12 * 16)
    assert keys == [hashlib.sha256(DOMAIN + hashes[i]).digest() for i in (3, 7, 11)]
    assert block_keys(hashes, 16, 64, max_tokens=12 * 16 - 1) == keys[:2], "only blocks within max_tokens"
    assert block_keys(hashes[:7], 16, 64, max_tokens=10_000) == keys[:1], "only blocks vLLM has hashed"
    other = [*hashes[:11], b"another prefix or salt"]
    assert block_keys(other, 16, 64, 12 * 16)[2] != keys[2]


def test_int_hashes_and_misaligned_blocks():
    assert block_keys([5, 6], 16, 32, 32) == [hashlib.sha256(DOMAIN + (6).to_bytes(1, "big")).digest()]
    with pytest.raises(ValueError, match="not whole vLLM hash blocks"):
        block_keys([b"x"], 16, 40, 100)
