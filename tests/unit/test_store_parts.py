"""The store's pure parts: extent allocation, eviction policies, the manifest's crash rules."""

from __future__ import annotations

import itertools
import random

import pytest

from kvtier.agent.store.eviction import LRU, S3FIFO
from kvtier.agent.store.extents import Extent, ExtentAllocator
from kvtier.agent.tiers.manifest import MAGIC, Manifest, Record, _encode, replay

pytestmark = pytest.mark.unit


def test_extents_allocate_aligned_and_coalesce():
    a = ExtentAllocator(1 << 20)
    x, y, z = a.allocate(100), a.allocate(5000), a.allocate(4096)
    assert (x.offset, x.length, y.offset, y.length, z.offset) == (0, 4096, 4096, 8192, 12288)
    a.release(y)
    a.release(x)
    assert a.allocate(12288) == Extent(0, 12288), "freed neighbours merge into one extent"
    assert a.allocate(2 << 20) is None


def test_extents_random_churn_never_overlaps_and_returns_to_empty():
    rng = random.Random(1)
    a = ExtentAllocator(64 << 20)
    live: list[Extent] = []
    for _ in range(5000):
        if live and rng.random() < 0.45:
            a.release(live.pop(rng.randrange(len(live))))
        else:
            e = a.allocate(rng.choice([4096, 65536, 1 << 20]))
            if e:
                live.append(e)
        spans = sorted((e.offset, e.end) for e in live)
        assert all(p[1] <= q[0] for p, q in itertools.pairwise(spans))
    for e in live:
        a.release(e)
    assert a.used == 0 and a.largest_free() == 64 << 20


def test_reserve_rebuilds_an_allocator_from_known_extents():
    a = ExtentAllocator(1 << 20)
    a.reserve(Extent(8192, 4096))
    assert a.allocate(8192) == Extent(0, 8192)
    assert a.allocate(4096) == Extent(12288, 4096)
    with pytest.raises(ValueError):
        a.reserve(Extent(8192, 4096))


def test_s3fifo_keeps_reused_blocks_through_a_scan():
    hot = [b"hot%d" % i for i in range(10)]
    for policy in (S3FIFO(), LRU()):
        for k in hot:
            policy.insert(k)
        for k in hot:
            policy.touch(k)
        evicted = []
        for i in range(200):  # a long prompt read once
            policy.insert(b"scan%d" % i)
            if len(policy) > 50:
                evicted.append(policy.victim(lambda _: True))
        survived = sum(1 for k in hot if k not in evicted)
        if isinstance(policy, S3FIFO):
            assert survived == 10, "S3-FIFO evicts the one-off scan, not the blocks that came back"
        else:
            assert survived == 0, "LRU loses the hot set to the scan"


def test_victim_skips_pinned_keys():
    for policy in (S3FIFO(), LRU()):
        for k in (b"a", b"b", b"c"):
            policy.insert(k)
        assert policy.victim(lambda k: k != b"a") == b"b"
        assert policy.victim(lambda k: False) is None


def _rec(i: int) -> Record:
    return Record(b"k%03d" % i, "team-a", i * 4096, 4096, 4000, i)


def test_manifest_replay_stops_at_a_torn_tail(tmp_path):
    m = Manifest(tmp_path / "m")
    m.open()
    for i in range(5):
        m.add(_rec(i))
    m.delete(_rec(1))
    m.close()
    data = (tmp_path / "m").read_bytes()
    live, valid = replay(data)
    assert sorted(live) == [b"k000", b"k002", b"k003", b"k004"] and valid == len(data)
    for cut in range(len(MAGIC), len(data)):  # a kill at any byte leaves a prefix of whole records
        live_cut, _ = replay(data[:cut])
        assert set(live_cut) <= {b"k000", b"k001", b"k002", b"k003", b"k004"}
        assert all(live_cut[k] == _rec(int(k[1:])) for k in live_cut)
    (tmp_path / "m").write_bytes(data[:-3])
    live = Manifest(tmp_path / "m").open()
    assert b"k001" in live, "the torn DEL record is dropped: the block is still indexed"
    assert (tmp_path / "m").stat().st_size < len(data) - 3, "and the torn tail was truncated away"


def test_manifest_corrupt_record_ends_replay():
    data = bytearray(MAGIC + _encode(1, _rec(0)) + _encode(1, _rec(1)))
    data[len(MAGIC) + 10] ^= 0xFF
    assert replay(bytes(data))[0] == {}
