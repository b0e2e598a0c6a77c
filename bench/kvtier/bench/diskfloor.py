"""The NVMe tier's floor, measured right: cold direct reads of exactly the bytes a restore reads.

The agent's manifest says where each block lies in the tier's file; the floor reads those extents
(nothing else: not the file's first N bytes, which may hold other contexts' blocks or holes that
read back without touching the disk) with O_DIRECT, 4 MiB requests, as many in flight as the agent
issues. Before every cold read the page cache is dropped and then checked with mincore(2): the
bytes counted as resident must be zero, or the row says so.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from kvtier.agent.tiers.manifest import replay
from kvtier.agent.tiers.nvme import ALIGN, CHUNK, open_direct

PAGE = os.sysconf("SC_PAGE_SIZE")


def tier_extents(manifest: Path, exclude: set[bytes] = frozenset()) -> list[tuple[int, int]]:
    """(offset, length) of every live block in an NVMe tier's manifest, minus `exclude`d keys
    (blocks that were there before the context being measured), sorted, neighbours merged. File
    offsets: the tier's data starts after its one-page header."""
    live, _ = replay(manifest.read_bytes()) if manifest.exists() else ({}, 0)
    extents = sorted((ALIGN + r.offset, r.length) for k, r in live.items() if k not in exclude)
    merged: list[tuple[int, int]] = []
    for off, n in extents:
        if merged and merged[-1][0] + merged[-1][1] == off:
            merged[-1] = (merged[-1][0], merged[-1][1] + n)
        else:
            merged.append((off, n))
    return merged


def tier_keys(manifest: Path) -> set[bytes]:
    live, _ = replay(manifest.read_bytes()) if manifest.exists() else ({}, 0)
    return set(live)


def read_extents(path: Path, extents: list[tuple[int, int]], threads: int = 64) -> float:
    """Bytes/s reading `extents` of a file with O_DIRECT: 4 MiB requests kept `threads` deep without
    pause (a ring of buffers; a slot is reused once its read is done). Twice the agent's queue depth
    by default, so the floor is the disk's best, not the agent's."""
    total = sum(n for _, n in extents)
    if total == 0:
        return 0.0
    fd, _ = open_direct(path)
    slots = 2 * threads
    buf = mmap.mmap(-1, slots * CHUNK)
    view = memoryview(buf)
    try:
        with ThreadPoolExecutor(threads) as pool:
            ring: list = [None] * slots
            i = 0
            t0 = time.perf_counter()
            for off, n in extents:
                for pos in range(0, n, CHUNK):
                    slot = i % slots
                    if ring[slot] is not None:
                        ring[slot].result()
                    size = min(CHUNK, n - pos)
                    dst = view[slot * CHUNK : slot * CHUNK + size]
                    ring[slot] = pool.submit(_pread_full, fd, dst, off + pos)
                    i += 1
            for f in ring:
                if f is not None:
                    f.result()
            return total / (time.perf_counter() - t0)
    finally:
        os.close(fd)  # the buffer goes with its last view (slices may still be referenced here)


def _pread_full(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n <= 0:
            raise OSError(f"short read at offset {offset + done}")
        done += n


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def resident_bytes(path: Path, extents: list[tuple[int, int]] | None = None) -> int | None:
    """Bytes of `extents` (default: the whole file) held in the page cache (mincore), None if unknown."""
    size = path.stat().st_size
    if size == 0:
        return 0
    extents = extents if extents is not None else [(0, size)]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    fd = os.open(path, os.O_RDONLY)
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    try:
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        vec = (ctypes.c_ubyte * ((size + PAGE - 1) // PAGE))()
        if libc.mincore(addr, size, vec) != 0:
            return None
        pages = bytes(vec)
        resident = 0
        for off, n in extents:
            first, last = off // PAGE, min(len(pages), (off + n + PAGE - 1) // PAGE)
            chunk = pages[first:last]
            resident += (len(chunk) - chunk.count(0)) * PAGE
        return resident
    finally:
        if addr not in (None, ctypes.c_void_p(-1).value):
            libc.munmap(addr, size)
        os.close(fd)


def cold(path: Path, extents: list[tuple[int, int]] | None = None) -> dict[str, object]:
    """Drop the page cache and check it: {'page_cache_dropped': bool, 'resident_bytes': int|None}."""
    dropped = drop_page_cache()
    return {"page_cache_dropped": dropped, "resident_bytes": resident_bytes(path, extents)}


@contextmanager
def io_lock(path: str | None) -> Iterator[None]:
    """Serialise the disk- and copy-heavy part of two benchmark processes sharing one machine (each
    on its own GPU), so neither's floors or restores are measured while the other reads the disk."""
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
