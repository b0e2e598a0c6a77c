"""The NVMe tier's floor, measured right: cold direct reads of exactly the bytes a restore reads.

The agent's manifest says where each block lies in the tier's file; the floor reads those extents
(nothing else: not the file's first N bytes, which may hold other contexts' blocks or holes that
read back without touching the disk) with O_DIRECT, at the request size and depth this disk reads
fastest (a sweep once per run that includes the agent's own 4 MiB x 8). Before every cold read the page cache is dropped and then checked with mincore(2): the
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
from kvtier.agent.tiers.nvme import ALIGN, open_direct

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


def read_extents(path: Path, extents: list[tuple[int, int]], config: tuple[int, int] | None = None) -> float:
    """Bytes/s reading `extents` of a file with O_DIRECT: `config` = (requests in flight, request
    bytes), kept that deep without pause (a ring of buffers; a slot is reused once its read is done).
    Default: the disk's best configuration (`best_config`), so the floor is the disk's, not the
    agent's."""
    threads, chunk = config or best_config(path, extents)
    total = sum(n for _, n in extents)
    if total == 0:
        return 0.0
    fd, _ = open_direct(path)
    slots = 2 * threads
    buf = mmap.mmap(-1, slots * chunk)
    view = memoryview(buf)
    try:
        with ThreadPoolExecutor(threads) as pool:
            ring: list = [None] * slots
            i = 0
            t0 = time.perf_counter()
            for off, n in extents:
                for pos in range(0, n, chunk):
                    slot = i % slots
                    if ring[slot] is not None:
                        ring[slot].result()
                    size = min(chunk, n - pos)
                    dst = view[slot * chunk : slot * chunk + size]
                    ring[slot] = pool.submit(_pread_full, fd, dst, off + pos)
                    i += 1
            for f in ring:
                if f is not None:
                    f.result()
            return total / (time.perf_counter() - t0)
    finally:
        os.close(fd)  # the buffer goes with its last view (slices may still be referenced here)


# (requests in flight, request bytes) tried once per process; the agent itself reads 4 MiB requests
# 8 deep per tier, so that configuration is always among them and the floor can never be below it
CONFIGS = [(d, c << 20) for d in (4, 8, 16, 32, 64) for c in (1, 4, 16)]
SWEEP_BYTES = 2 << 30
_best: dict[str, object] = {}


def best_config(path: Path, extents: list[tuple[int, int]]) -> tuple[int, int]:
    """The fastest (depth, request size) for cold direct reads on this disk, from a sweep over the
    first SWEEP_BYTES of `extents` (once per process; `sweep_report()` says what each gave)."""
    if "config" not in _best:
        prefix, left = [], SWEEP_BYTES
        for off, n in extents:
            if left <= 0:
                break
            prefix.append((off, min(n, left)))
            left -= n
        gbps = {}
        for cfg in CONFIGS:
            cold(path, prefix)
            gbps[f"{cfg[0]}x{cfg[1] >> 20}MiB"] = round(read_extents(path, prefix, cfg) / 1e9, 3)
        best = max(CONFIGS, key=lambda c: gbps[f"{c[0]}x{c[1] >> 20}MiB"])
        _best.update(config=best, report={"bytes": sum(n for _, n in prefix), "gbps": gbps})
    return _best["config"]  # type: ignore[return-value]


def sweep_report() -> dict[str, object]:
    """The sweep behind `best_config`: bytes read and GB/s per 'depth x request size', and the pick."""
    if "config" not in _best:
        return {}
    depth, size = _best["config"]  # type: ignore[misc]
    return {**_best["report"], "best": f"{depth}x{size >> 20}MiB"}  # type: ignore[dict-item]


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
