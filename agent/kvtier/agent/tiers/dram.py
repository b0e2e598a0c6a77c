"""DRAM tier: the pool's host memory on this node as memfd segments that engines map and DMA from.

A segment belongs to one owner at a time. It changes hands only when empty, and then as a new
memfd: the old file is hole-punched (a stale mapping in the old owner's process reads zeros) and
the new owner gets fresh zero pages it alone has ever seen. Tenancy therefore holds in memory,
not only in keys.

Clients hold the same memory the agent reads, so every segment is sealed before it is handed out:
its size can never change (a client's ftruncate would otherwise SIGBUS the agent on its next
access). A `sealed` segment is also closed to writers (F_SEAL_FUTURE_WRITE): only the agent's own
mapping, made before the seal, can change it; clients map it read-only. Shared pools keep their
committed blocks there, so no namespace can alter what another one reads.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import itertools
import mmap
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field

from kvtier.agent.store.extents import Extent, ExtentAllocator
from kvtier.agent.tiers.base import Tier

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_MPOL_BIND = 2
_F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x10)  # Linux 5.1
_SIZE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
# mbind(2) has no libc wrapper, and its syscall number differs per architecture (237 on x86_64
# is another call on aarch64). The numbers come from each architecture's unistd table in Linux.
_SYS_MBIND = {
    "x86_64": 237,
    "amd64": 237,
    "aarch64": 235,  # the generic table, shared by arm64, riscv64 and loongarch64
    "arm64": 235,
    "riscv64": 235,
    "loongarch64": 235,
    "ppc64le": 259,
    "ppc64": 259,
    "s390x": 268,
    "i686": 274,
    "i386": 274,
    "armv7l": 319,
}

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


def mbind_syscall_number(machine: str | None = None) -> int | None:
    """mbind's number on this machine's architecture (`platform.machine()`); None where unknown."""
    return _SYS_MBIND.get(machine or platform.machine())


def bind_to_numa(mm: mmap.mmap, length: int, node: int) -> bool:
    """Shared memory policy for the whole segment (applies to every process that maps it).
    False where the kernel refuses it or the architecture is not in the table (memory unbound)."""
    number = mbind_syscall_number()
    if number is None or not 0 <= node < 64:
        return False
    addr = _address(mm)
    mask = ctypes.c_ulong(1 << node)
    rc = _libc.syscall(
        number, ctypes.c_void_p(addr), ctypes.c_ulong(length), _MPOL_BIND, ctypes.byref(mask), 64, 0
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
    sealed: bool = False  # read-only for every client (the agent writes through its own mapping)
    alloc: ExtentAllocator = field(init=False)

    def __post_init__(self) -> None:
        self.alloc = ExtentAllocator(self.size)

    def view(self, extent: Extent, length: int | None = None) -> memoryview:
        return memoryview(self.mm)[extent.offset : extent.offset + (length or extent.length)]

    def describe(self) -> dict[str, int | bool]:
        return {"id": self.id, "size": self.size, "writable": not self.sealed}

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


class DramTier(Tier):
    """The arena: `capacity` bytes in slots of `segment_bytes`, each slot a memfd segment owned by
    one namespace (or, sealed, by a shared pool) while it holds anything."""

    name = "dram"

    def __init__(
        self,
        pool: str,
        capacity: int,
        segment_bytes: int,
        hugepages: str = "none",
        numa: int | None = None,
        share: float = 1.0,
    ) -> None:
        self.pool = pool
        self.segment_bytes = segment_bytes
        self.slots: list[Segment | None] = [None] * max(1, capacity // segment_bytes)
        self.capacity = len(self.slots) * segment_bytes
        self.hugepages = hugepages
        self.numa = numa
        self.numa_bound: bool | None = None
        # a tenant's share of the arena, in whole segments (at least one, so every tenant can save)
        self.quota_segments = max(1, int(share * len(self.slots))) if share < 1 else None
        self._ids = itertools.count(1)
        # called with a segment before its memory goes away (a transport drops its registration)
        self.retire_hooks: list[Callable[[Segment], None]] = []

    # --------------------------------------------------------------------------- geometry

    @property
    def used(self) -> int:
        return sum(s.alloc.used for s in self.slots if s)

    def segments_of(self, owner: str, sealed: bool | None = None) -> list[Segment]:
        return [s for s in self.slots if s and s.owner == owner and (sealed is None or s.sealed == sealed)]

    def segment(self, segment_id: int) -> Segment | None:
        return next((s for s in self.slots if s and s.id == segment_id), None)

    # ------------------------------------------------------------------------- allocation

    def allocate(
        self, owner: str, length: int, sealed: bool = False, held: int = 0
    ) -> tuple[Segment, Extent] | None:
        """An extent in one of the owner's segments, taking a free slot when needed; None when full
        (no free or reclaimable slot, or the owner at its quota). Raises DramFull when `length`
        exceeds a segment (no eviction can help) and OSError when the OS refuses a new memfd.

        Writable segments count against the owner's quota; sealed ones hold a shared pool's
        blocks, which belong to no namespace. The caller evicts and retries; new segments are
        reported to the owner's clients by the store.
        """
        for seg in self.segments_of(owner, sealed):
            extent = seg.alloc.allocate(length)
            if extent:
                return seg, extent
        if length > self.segment_bytes:
            raise DramFull(f"a block of {length} bytes exceeds the segment size {self.segment_bytes}")
        if self.at_quota(owner, sealed, held):
            return None
        seg = self._take_slot(owner, sealed)
        if not seg:
            return None
        extent = seg.alloc.allocate(length)
        assert extent is not None
        return seg, extent

    def at_quota(self, owner: str, sealed: bool, held: int = 0) -> bool:
        """The owner holds its whole share (its writable segments, and `held` bytes it keeps
        pinned elsewhere: a shared pool's sealed blocks): it may only reuse its own memory."""
        return (
            not sealed
            and self.quota_segments is not None
            and len(self.segments_of(owner, False)) * self.segment_bytes + held
            >= self.quota_segments * self.segment_bytes
        )

    def free(self, seg: Segment, extent: Extent) -> None:
        """Give an extent back to its segment (the segment stays its owner's until retired). The
        extent must be one the segment handed out and not freed since: that is not checked."""
        seg.alloc.release(extent)

    def reclaimable(self, owner: str, sealed: bool) -> list[Segment]:
        """Other owners' empty segments, which can change hands right away."""
        return [s for s in self.slots if s and (s.owner, s.sealed) != (owner, sealed) and s.alloc.used == 0]

    def _take_slot(self, owner: str, sealed: bool) -> Segment | None:
        for i, seg in enumerate(self.slots):
            if seg is None:
                return self._new_segment(i, owner, sealed)
        for seg in self.reclaimable(owner, sealed):
            self.retire(seg)
            return self._new_segment(seg.slot, owner, sealed)
        return None

    def _new_segment(self, slot: int, owner: str, sealed: bool) -> Segment:
        seg_id = next(self._ids)
        fd = os.memfd_create(
            f"kvtier-{self.pool}-{seg_id}",
            os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | _HUGEPAGE_FLAGS[self.hugepages],
        )
        try:
            os.ftruncate(fd, self.segment_bytes)
            mm = mmap.mmap(fd, self.segment_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            # sealed before any client can hold it; the agent's mapping above keeps its write access
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SIZE_SEALS | (_F_SEAL_FUTURE_WRITE if sealed else 0))
        except BaseException:
            os.close(fd)
            raise
        if self.numa is not None:
            self.numa_bound = bind_to_numa(mm, self.segment_bytes, self.numa)
        seg = Segment(id=seg_id, slot=slot, fd=fd, size=self.segment_bytes, owner=owner, mm=mm, sealed=sealed)
        self.slots[slot] = seg
        return seg

    def retire(self, seg: Segment) -> None:
        """Drop a segment's memory for good: stale mappings elsewhere now read zeros. (A sealed
        segment refuses the hole punch; its stale readers keep what every namespace could read.)"""
        for hook in self.retire_hooks:  # a transport drops its registration first
            hook(seg)
        try:
            punch_hole(seg.fd, seg.size)
        except OSError as exc:
            if exc.errno != errno.EPERM or not seg.sealed:
                raise
        seg.mm.close()
        os.close(seg.fd)
        self.slots[seg.slot] = None

    def close(self) -> None:
        """Unmap and close every segment (transports told first); a view still held elsewhere
        keeps its mapping until the process ends."""
        for seg in list(self.slots):
            if seg:
                for hook in self.retire_hooks:
                    hook(seg)
                with contextlib.suppress(BufferError):  # a view still held elsewhere: the process ends anyway
                    seg.mm.close()
                os.close(seg.fd)
        self.slots = [None] * len(self.slots)
