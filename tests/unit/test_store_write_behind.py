"""Write-behind to NVMe when the manifest fails: the block stays in DRAM, nothing leaks, and
`flush()` returns at once (a pin or the persisting count given back twice would make it wait
for its whole timeout)."""

from __future__ import annotations

import errno
import os
import time

import pytest

from kvtier.agent.metrics import Metrics
from kvtier.agent.store.index import Lease, Store, StoreError
from kvtier.agent.tiers.dram import DramTier
from kvtier.agent.tiers.nvme import NvmeTier

pytestmark = pytest.mark.unit
MiB = 1 << 20
BLOCK = 64 << 10
FP = "layout-1"


def _store(tmp_path) -> Store:
    nvme = NvmeTier(tmp_path / "nvme.img", 8 * MiB, io_threads=2, pool="p")
    return Store(os.urandom(32), DramTier("p", 8 * MiB, 4 * MiB), nvme, metrics=Metrics(), sync_timeout=5)


def _put(store: Store, lease: Lease, keys: list[bytes], sync: bool = False) -> None:
    got = store.allocate(lease, [BLOCK] * len(keys))
    for seg, ext in got:
        seg.view(ext, BLOCK)[:] = os.urandom(BLOCK)
    store.commit(lease, FP, keys, [(seg.id, ext.offset) for seg, ext in got], [BLOCK] * len(keys), sync=sync)


def _flush_seconds(store: Store) -> float:
    t0 = time.monotonic()
    store.flush(timeout=5)
    return time.monotonic() - t0


def _failing(exc: BaseException):
    def fail(*_args, **_kwargs):
        raise exc

    return fail


@pytest.mark.parametrize(
    "exc", [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("manifest bug")], ids=str
)
def test_a_failing_manifest_append_keeps_the_block_in_dram_and_flush_returns_promptly(tmp_path, exc):
    store = _store(tmp_path)
    lease = store.lease("t")
    keys = [b"k%d" % i for i in range(4)]
    store.nvme.manifest.add = _failing(exc)  # type: ignore[method-assign]
    try:
        _put(store, lease, keys)
        assert _flush_seconds(store) < 1.0, "flush waited although nothing was left to write"
        stats = store.stats()
        assert stats["pinned"] == 0, "the write-behind pins were given back exactly once"
        assert store.pins.writing == 0
        assert all(b.pins == 0 for b in store.blocks.values())
        assert stats["nvme"]["blocks"] == 0 and stats["nvme"]["usedBytes"] == 0, "the NVMe extents went back"
        assert stats["dram"]["blocks"] == 4, "the blocks are still served from DRAM"
        assert store.metrics.persist_failures._value.get() == 4
        assert store.lookup("t", FP, keys) == ["dram"] * 4
        with pytest.raises(StoreError, match="could not be written to the NVMe tier"):
            _put(store, lease, [b"sync"], sync=True)
    finally:
        store.close()


@pytest.mark.parametrize(
    "exc", [OSError(errno.EIO, "Input/output error"), ValueError("compaction bug")], ids=str
)
def test_a_failing_compaction_keeps_the_logged_blocks_and_flush_returns_promptly(tmp_path, exc):
    store = _store(tmp_path)
    lease = store.lease("t")
    keys = [b"k%d" % i for i in range(4)]
    store.nvme.maybe_compact = _failing(exc)  # type: ignore[method-assign]
    try:
        _put(store, lease, keys)
        assert _flush_seconds(store) < 1.0
        assert store.pins.writing == 0
        assert store.stats()["pinned"] == 0
        assert store.stats()["nvme"]["blocks"] == 4, "each block was logged before compaction failed"
        assert store.metrics.persist_failures._value.get() == 0
    finally:
        store.close()
