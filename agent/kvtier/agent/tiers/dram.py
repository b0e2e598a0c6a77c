"""DRAM tier: the pool's host memory on this node as memfd segments that engines map and DMA from.

A segment belongs to one tenant at a time. It changes hands only when empty, and then as a new
memfd: the old file is hole-punched (a stale mapping in the old tenant's process reads zeros) and
the new tenant gets fresh zero pages it alone has ever seen. Tenancy therefore holds in memory,
not only in keys.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from kvtier.agent.store.extents import Extent, ExtentAllocator

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_MPOL_BIND = 2
_SYS_MBIND = 237  # x86_64

_HUGEPAGE_FLAGS = {
    "none": 0,
    "2Mi": getattr(os, "MFD_HUGETLB", 0) | getattr(os, "MFD_HUGE_2MB", 21 << 26),
    "1Gi": getattr(os, "MFD_HUGETLB", 0) | getattr(os, "MFD_HUGE_1GB", 30 << 26),
}


def punch_hole(fd: int, length: int) -> None:
    if _libc.fallocate(
        fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, ctypes.c_long(0), ctypes.c_long(length)
    ):
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(PUNCH_HOLE): {os.strerror(err)}")


def bind_to_numa(mm: mmap.mmap, length: int, node: int) -> bool:
    """Shared memory policy for the whole segment (applies to every process that maps it)."""
    addr = _address(mm)
    mask = ctypes.c_ulong(1 << node)
    rc = _libc.syscall(
        _SYS_MBIND, ctypes.c_void_p(addr), ctypes.c_ulong(length), _MPOL_BIND, ctypes.byref(mask), 64, 0
    )
    return rc == 0


@dataclass(eq=False)
class Segment:
    id: int  # unique over the agent's life: a new memfd gets a new id
    slot: int
    fd: int
    size: int
    owner: str
    mm: mmap.mmap
    alloc: ExtentAllocator = field(init=False)

    def __post_init__(self) -> None:
        self.alloc = ExtentAllocator(self.size)

    def view(self, extent: Extent, length: int | None = None) -> memoryview:
        return memoryview(self.mm)[extent.offset : extent.offset + (length or extent.length)]

    def describe(self) -> dict[str, int]:
        return {"id": self.id, "size": self.size}

    @property
    def address(self) -> int:
        """Where the segment is mapped in this process (what a transport registers)."""
        return _address(self.mm)


def _address(mm: mmap.mmap) -> int:
    pointer = ctypes.c_char.from_buffer(mm)
    try:
        return ctypes.addressof(pointer)
    finally:
        del pointer  # a live export would keep the mapping from ever being closed


class DramFull(Exception):
    """No room for the tenant in the arena even after reclaiming empty segments."""


class DramTier:
    def __init__(
        self,
        pool: str,
        capacity: int,
        segment_bytes: int,
        hugepages: str = "none",
        numa: int | None = None,
        quota_segments: int | None = None,
    ) -> None:
        self.pool = pool
        self.segment_bytes = segment_bytes
        self.slots: list[Segment | None] = [None] * max(1, capacity // segment_bytes)
        self.capacity = len(self.slots) * segment_bytes
        self.hugepages = hugepages
        self.numa = numa
        self.numa_bound: bool | None = None
        self.quota_segments = quota_segments
        self._ids = itertools.count(1)
        # called with a segment before its memory goes away (a transport drops its registration)
        self.retire_hooks: list[Callable[[Segment], None]] = []

    # --------------------------------------------------------------------------- geometry

    @property
    def used(self) -> int:
        return sum(s.alloc.used for s in self.slots if s)

    def segments_of(self, tenant: str) -> list[Segment]:
        return [s for s in self.slots if s and s.owner == tenant]

    def segment(self, segment_id: int) -> Segment | None:
        return next((s for s in self.slots if s and s.id == segment_id), None)

    # ------------------------------------------------------------------------- allocation

    def allocate(self, tenant: str, length: int) -> tuple[Segment, Extent] | None:
        """An extent in one of the tenant's segments, taking a free slot when needed; None when full.

        The caller evicts and retries; new segments are reported to the tenant's clients by the store.
        """
        for seg in self.segments_of(tenant):
            extent = seg.alloc.allocate(length)
            if extent:
                return seg, extent
        if length > self.segment_bytes:
            raise DramFull(f"a block of {length} bytes exceeds the segment size {self.segment_bytes}")
        if self.quota_segments and len(self.segments_of(tenant)) >= self.quota_segments:
            return None
        seg = self._take_slot(tenant)
        if not seg:
            return None
        extent = seg.alloc.allocate(length)
        assert extent is not None
        return seg, extent

    def free(self, seg: Segment, extent: Extent) -> None:
        seg.alloc.release(extent)

    def reclaimable(self, tenant: str) -> list[Segment]:
        """Other tenants' empty segments, which can change hands right away."""
        return [s for s in self.slots if s and s.owner != tenant and s.alloc.used == 0]

    def _take_slot(self, tenant: str) -> Segment | None:
        for i, seg in enumerate(self.slots):
            if seg is None:
                return self._new_segment(i, tenant)
        for seg in self.reclaimable(tenant):
            self.retire(seg)
            return self._new_segment(seg.slot, tenant)
        return None

    def _new_segment(self, slot: int, tenant: str) -> Segment:
        seg_id = next(self._ids)
        fd = os.memfd_create(f"kvtier-{self.pool}-{seg_id}", os.MFD_CLOEXEC | _HUGEPAGE_FLAGS[self.hugepages])
        os.ftruncate(fd, self.segment_bytes)
        mm = mmap.mmap(fd, self.segment_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        if self.numa is not None:
            self.numa_bound = bind_to_numa(mm, self.segment_bytes, self.numa)
        seg = Segment(id=seg_id, slot=slot, fd=fd, size=self.segment_bytes, owner=tenant, mm=mm)
        self.slots[slot] = seg
        return seg

    def retire(self, seg: Segment) -> None:
        """Drop a segment's memory for good: stale mappings elsewhere now read zeros."""
        for hook in self.retire_hooks:
            hook(seg)
        punch_hole(seg.fd, seg.size)
        seg.mm.close()
        os.close(seg.fd)
        self.slots[seg.slot] = None

    def close(self) -> None:
        for seg in list(self.slots):
            if seg:
                for hook in self.retire_hooks:
                    hook(seg)
                seg.mm.close()
                os.close(seg.fd)
        self.slots = [None] * len(self.slots)
