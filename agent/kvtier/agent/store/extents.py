"""First-fit allocator of aligned, contiguous extents inside one region, with coalescing frees.

Used for every place bytes live: DRAM arena segments and the NVMe tier's file or device. One
model's blocks all have one size, so first-fit over a sorted free list keeps fragmentation low;
freed neighbours merge back into one extent.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

ALIGN = 4096  # direct I/O and DMA want page-aligned offsets and lengths


def align_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


@dataclass(frozen=True, slots=True)
class Extent:
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


class ExtentAllocator:
    def __init__(self, size: int, align: int = ALIGN) -> None:
        self.size = size // align * align
        self.align = align
        self._starts: list[int] = [0] if self.size else []  # sorted free extent offsets
        self._lengths: dict[int, int] = {0: self.size} if self.size else {}
        self.used = 0

    @property
    def free(self) -> int:
        return self.size - self.used

    def largest_free(self) -> int:
        return max(self._lengths.values(), default=0)

    def allocate(self, length: int) -> Extent | None:
        need = align_up(length, self.align)
        for i, start in enumerate(self._starts):
            have = self._lengths[start]
            if have >= need:
                del self._lengths[start]
                if have == need:
                    self._starts.pop(i)
                else:
                    self._starts[i] = start + need
                    self._lengths[start + need] = have - need
                self.used += need
                return Extent(start, need)
        return None

    def reserve(self, extent: Extent) -> None:
        """Mark a known extent used (rebuilding the allocator from a manifest)."""
        i = bisect.bisect_right(self._starts, extent.offset) - 1
        if i < 0:
            raise ValueError(f"{extent} is not free")
        start = self._starts[i]
        have = self._lengths[start]
        if extent.end > start + have:
            raise ValueError(f"{extent} is not free")
        del self._lengths[start]
        self._starts.pop(i)
        if extent.offset > start:
            self._insert(start, extent.offset - start)
        if extent.end < start + have:
            self._insert(extent.end, start + have - extent.end)
        self.used += extent.length

    def release(self, extent: Extent) -> None:
        offset, length = extent.offset, extent.length
        i = bisect.bisect_left(self._starts, offset)
        # merge with the free extent after, then the one before
        if i < len(self._starts) and self._starts[i] == offset + length:
            length += self._lengths.pop(self._starts.pop(i))
        if i > 0:
            prev = self._starts[i - 1]
            if prev + self._lengths[prev] == offset:
                self._lengths[prev] += length
                self.used -= extent.length
                return
        self._insert(offset, length)
        self.used -= extent.length

    def _insert(self, offset: int, length: int) -> None:
        bisect.insort(self._starts, offset)
        self._lengths[offset] = length
