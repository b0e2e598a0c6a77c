"""The NVMe floor reads exactly the restored blocks' extents (from the tier's manifest, earlier
contexts' blocks left out), at full depth, and the page-cache check sees what is resident."""

from __future__ import annotations

import os

import pytest

from kvtier.agent.tiers.manifest import Manifest, Record
from kvtier.agent.tiers.nvme import ALIGN
from kvtier.bench.diskfloor import read_extents, resident_bytes, tier_extents, tier_keys

pytestmark = pytest.mark.unit
MiB = 1 << 20


def test_floor_reads_the_new_blocks_extents_only(tmp_path):
    data = tmp_path / "tier.cache"
    data.write_bytes(os.urandom(24 * MiB))
    manifest = Manifest(tmp_path / "tier.cache.manifest")
    manifest.open()
    manifest.add(Record(b"old", "t", 0, 4 * MiB, 4 * MiB, 0))  # an earlier context's block
    before = tier_keys(manifest.path)
    for i, off in enumerate((8, 12, 20)):  # two neighbours and one apart
        manifest.add(Record(b"new%d" % i, "t", off * MiB, 4 * MiB, 4 * MiB, 0))
    manifest.delete(Record(b"new2", "t", 20 * MiB, 4 * MiB, 4 * MiB, 0))
    manifest.add(Record(b"new3", "t", 16 * MiB, 2 * MiB, 2 * MiB, 0))
    manifest.close()
    extents = tier_extents(manifest.path, before)
    assert extents == [
        (ALIGN + 8 * MiB, 10 * MiB)
    ]  # file offsets (after the header); neighbours merged, the old and the deleted block left out
    assert read_extents(data, extents, (4, 1 << 20)) > 0
    assert read_extents(data, extents) > 0  # the best of a sweep that includes the agent's own 4 MiB x 8
    whole = tier_extents(manifest.path)
    assert whole == [(ALIGN, 4 * MiB), (ALIGN + 8 * MiB, 10 * MiB)]


def test_resident_bytes_sees_the_page_cache(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(os.urandom(8 * MiB))
    path.read_bytes()  # through the page cache
    resident = resident_bytes(path)
    assert resident is not None and 0 < resident <= 8 * MiB
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    assert resident_bytes(path, [(0, 4 * MiB)]) <= resident
