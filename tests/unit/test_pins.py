"""Pins have one owner (`store.index.Pins`): every way a pin is taken and given back keeps its
invariants, and a lease gives back exactly what it pinned."""

from __future__ import annotations

import pytest

from kvtier.agent.store.index import Block, Lease, Pins
from tests.support import put_blocks, small_store

pytestmark = pytest.mark.unit
FP = "layout-1"


def _block(key: bytes = b"k") -> Block:
    return Block(key, "t", 10, None)


def test_lease_pins_are_given_back_exactly_once():
    pins, lease, block = Pins(), Lease(tenant="t"), _block()
    pins.take(block, lease)
    pins.take(block, lease)
    pins.take(block)  # a peer transfer on the same block
    pins.check([block], [lease])
    assert block.pins == 3 and lease.pins[block.key] == 2
    pins.give_lease(lease, block.key)
    pins.give_lease(lease, b"never-pinned")  # client input: ignored
    pins.check([block], [lease])
    pins.end_lease(lease)
    pins.end_lease(lease)  # a second close gives back nothing more
    assert block.pins == 1 and not lease.pins and not lease.held
    pins.give(block)
    pins.give(block)  # never below zero
    assert block.pins == 0
    pins.check([block], [lease])


def test_a_lease_gives_back_the_block_it_pinned_not_a_newer_one_under_the_same_key():
    pins, lease = Pins(), Lease(tenant="t")
    old, new = _block(b"k"), _block(b"k")
    pins.take(old, lease)  # then the index drops `old` and indexes `new` under the same key
    pins.take(new)  # someone else's pin on the new block
    pins.give_lease(lease, b"k")
    assert (old.pins, new.pins) == (0, 1), "the other holder's pin on the new block survived"


def test_write_behind_is_counted_until_it_ends():
    pins, block = Pins(), _block()
    pins.start_write(block)
    assert (block.pins, pins.writing) == (1, 1)
    pins.end_write(block)
    assert (block.pins, pins.writing) == (0, 0)
    pins.check([block], [])
    pins.end_write(block)
    with pytest.raises(AssertionError, match="write-behind"):
        pins.check([block], [])


def test_the_store_keeps_the_invariants_through_reads_peers_prefetch_and_closes(tmp_path):
    store = small_store(tmp_path)
    a, b = store.lease("t"), store.lease("t")
    keys = [b"k%d" % i for i in range(6)]
    try:
        put_blocks(store, a, FP, keys, sync=True)
        store.evict_dram()  # cold: reads promote
        store.pins.check(store.blocks.values(), [a, b])
        read_a = store.read(a, FP, keys)
        read_b = store.read(b, FP, keys[:3])
        peer = store.pin_for_peer([blk.key for _, _, blk in read_a[:2]])
        store.pins.check(store.blocks.values(), [a, b])
        assert store.stats()["pinned"] == 6
        store.release(a, [blk.key for _, _, blk in read_a[:3]])
        store.unpin_for_peer([blk for blk, _ in peer])
        store.close_lease(b)
        store.pins.check(store.blocks.values(), [a, b])
        assert store.stats()["pinned"] == 3, "only a's last three remain"
        assert len(read_b) == 3
        store.close_lease(a)
        store.prefetch_local("t", FP, keys, deadline=float("inf"))
        store.flush(timeout=5)
        store.pins.check(store.blocks.values(), [a, b])
        assert store.stats()["pinned"] == 0 and store.pins.writing == 0
    finally:
        store.close()
