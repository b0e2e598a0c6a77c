"""Write-behind to NVMe when the manifest fails: the block stays in DRAM, nothing leaks, and
`flush()` returns at once (a pin or the persisting count given back twice would make it wait
for its whole timeout)."""

from __future__ import annotations

import errno
import time

import pytest

from kvtier.agent.store.index import StoreError
from tests.support import put_blocks, small_store

pytestmark = pytest.mark.unit
FP = "layout-1"
KEYS = [b"k%d" % i for i in range(4)]


def _failing(exc: BaseException):
    def fail(*_args, **_kwargs):
        raise exc

    return fail


@pytest.fixture
def store(tmp_path):
    store = small_store(tmp_path, sync_timeout=5)
    yield store
    store.close()


def _put_and_flush(store) -> float:
    """Seconds flush() took after four blocks were committed (write-behind runs meanwhile)."""
    put_blocks(store, store.lease("t"), FP, KEYS)
    t0 = time.monotonic()
    store.flush(timeout=5)
    elapsed = time.monotonic() - t0
    assert store.pins.writing == 0 and store.stats()["pinned"] == 0, "pins given back exactly once"
    store.pins.check(store.blocks.values(), [])
    return elapsed


@pytest.mark.parametrize(
    "exc", [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("manifest bug")], ids=str
)
def test_a_failing_manifest_append_keeps_the_block_in_dram_and_flush_returns_promptly(store, exc):
    store.nvme.manifest.add = _failing(exc)
    assert _put_and_flush(store) < 1.0, "flush waited although nothing was left to write"
    stats = store.stats()
    assert stats["nvme"]["blocks"] == 0 and stats["nvme"]["usedBytes"] == 0, "the NVMe extents went back"
    assert stats["dram"]["blocks"] == 4, "the blocks are still served from DRAM"
    assert store.metrics.persist_failures._value.get() == 4
    assert store.lookup("t", FP, KEYS) == ["dram"] * 4
    with pytest.raises(StoreError, match="could not be written to the NVMe tier"):
        put_blocks(store, store.lease("t"), FP, [b"sync"], sync=True)


@pytest.mark.parametrize(
    "exc", [OSError(errno.EIO, "Input/output error"), ValueError("compaction bug")], ids=str
)
def test_a_failing_compaction_keeps_the_logged_blocks_and_flush_returns_promptly(store, exc):
    store.nvme.maybe_compact = _failing(exc)
    assert _put_and_flush(store) < 1.0
    assert store.stats()["nvme"]["blocks"] == 4, "each block was logged before compaction failed"
    assert store.metrics.persist_failures._value.get() == 0
