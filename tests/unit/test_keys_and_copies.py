"""Block keys and copy planning: the pure parts every connector shares."""

from __future__ import annotations

import pytest

from kvtier.agent.connectors.runs import HostRun, groups, runs
from kvtier.agent.keys import KVLayout, block_keys

pytestmark = pytest.mark.unit


def test_block_keys_chain_and_only_full_blocks():
    tokens = list(range(1000))
    keys = block_keys(tokens, 256)
    assert len(keys) == 3, "a partial last block gets no key"
    assert block_keys(tokens[:512], 256) == keys[:2], "a prefix has the prefix of the chain"
    changed = block_keys([1, *tokens[1:]], 256)
    assert all(a != b for a, b in zip(changed, keys, strict=True)), "one token changes every later key"
    assert block_keys(tokens, 256, extra="salt")[0] != keys[0]
    assert all(len(k) == 32 for k in keys)


@pytest.mark.parametrize("extra", [None, "salt"])
def test_block_keys_continue_from_a_known_prefix(extra):
    """A restore hashes the first chunk's keys, then the rest from the last of them: same keys."""
    tokens = list(range(10 * 4 + 3))
    whole = block_keys(tokens, 4, extra)
    first = block_keys(tokens[:12], 4, extra)
    assert first + block_keys(tokens[12:], 4, extra, after=first[-1]) == whole


def test_layout_fingerprint_separates_incompatible_kv():
    a = KVLayout("qwen2.5-7b", "bfloat16", 28, 4, 128, 256)
    assert a.block_bytes == 256 * 57344, "Qwen2.5-7B: 57,344 KV bytes per token in bf16"
    assert (
        len(
            {
                a.fingerprint,
                KVLayout("qwen2.5-7b", "float16", 28, 4, 128, 256).fingerprint,
                KVLayout("qwen2.5-7b", "bfloat16", 28, 4, 128, 256, tp_rank=1, tp_size=2).fingerprint,
            }
        )
        == 3
    )


def test_adjacent_blocks_merge_into_one_copy():
    locs = [(1, 0), (1, 100), (1, 200), (2, 0), (1, 400)]
    assert runs(locs, 100) == [HostRun(1, 0, 0, 3), HostRun(2, 0, 3, 1), HostRun(1, 400, 4, 1)]
    assert list(groups(10, 100, group_bytes=400)) == [(0, 4), (4, 8), (8, 10)]


def test_only_the_leading_blocks_of_the_expected_size_inside_their_segment_are_usable():
    """What a read pinned is copied only up to the first block of another size (another engine's
    geometry under the fingerprint) or one not inside its segment: copies never read past a block."""
    from kvtier.agent.client import Pinned, PinnedBlock

    segment = memoryview(bytearray(4096))

    def block(offset: int, size: int) -> PinnedBlock:
        return PinnedBlock(b"h", 1, offset, size, segment[offset : offset + size])

    good = [block(0, 1024), block(1024, 1024)]
    assert Pinned(None, good).usable(1024) == 2
    assert Pinned(None, [*good, block(2048, 100), block(3072, 1024)]).usable(1024) == 2, "a short one"
    assert Pinned(None, [*good, block(2048, 2048)]).usable(1024) == 2, "a long one"
    assert Pinned(None, [*good, block(3584, 1024)]).usable(1024) == 2, "one running past its segment"
    assert Pinned(None, [block(-1024, 1024)]).usable(1024) == 0, "one before its segment"
    assert Pinned(None, []).usable(1024) == 0
