"""NVMe tier: direct-I/O extents on a block device, a partition or a file (file mode runs anywhere).

Reads and writes bypass the page cache (O_DIRECT) from page-aligned buffers (the arena's own
mapping), split into chunks that a thread pool issues in parallel so the device sees a deep queue.
Where the filesystem refuses O_DIRECT (tmpfs), the tier still works through the page cache and says
so in `direct`.
"""

from __future__ import annotations

import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kvtier.agent.store.extents import ALIGN, Extent, ExtentAllocator
from kvtier.agent.tiers.manifest import Manifest, Record

CHUNK = 4 << 20  # one direct-I/O request; several run at once


def open_direct(path: Path, size: int | None = None) -> tuple[int, bool]:
    """(fd, direct) for a file (created and sized when `size` is given) or a block device."""
    flags = os.O_RDWR | getattr(os, "O_DIRECT", 0)
    if size is not None and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        flags |= os.O_CREAT
    try:
        fd, direct = os.open(path, flags, 0o600), True
    except OSError:
        fd, direct = os.open(path, (flags & ~getattr(os, "O_DIRECT", 0)), 0o600), False
    if size is not None and stat.S_ISREG(os.fstat(fd).st_mode) and os.fstat(fd).st_size < size:
        os.ftruncate(fd, size)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError:
            pass  # sparse is fine; fallocate only avoids fragmentation
    return fd, direct


def parallel_io(pool: ThreadPoolExecutor, fn, fd: int, buf: memoryview, offset: int) -> None:
    """Split one transfer into CHUNK-sized requests and run them in parallel."""
    length = len(buf)
    if length <= CHUNK:
        _full(fn, fd, buf, offset)
        return
    futures = [
        pool.submit(_full, fn, fd, buf[pos : pos + CHUNK], offset + pos) for pos in range(0, length, CHUNK)
    ]
    for f in futures:
        f.result()


def _full(fn, fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        n = fn(fd, [buf[done:]], offset + done)
        if n <= 0:
            raise OSError(f"short direct I/O at offset {offset + done}")
        done += n


class NvmeTier:
    def __init__(
        self, path: Path, capacity: int, io_threads: int = 8, manifest_path: Path | None = None
    ) -> None:
        self.path = path
        self.capacity = capacity // ALIGN * ALIGN
        self.fd, self.direct = open_direct(path, self.capacity)
        self.alloc = ExtentAllocator(self.capacity)
        self.manifest = Manifest(manifest_path or path.with_name(path.name + ".manifest"))
        self.io_threads = io_threads
        self.pool = ThreadPoolExecutor(io_threads, thread_name_prefix="nvme-io")

    def recover(self) -> dict[bytes, Record]:
        """Blocks committed before the last stop, from the manifest alone (no data is read)."""
        live = self.manifest.open()
        for rec in list(live.values()):
            try:
                self.alloc.reserve(Extent(rec.offset, rec.length))
            except ValueError:
                del live[rec.key]  # overlaps or lies outside a resized tier: not trusted
        return live

    @property
    def used(self) -> int:
        return self.alloc.used

    def allocate(self, length: int) -> Extent | None:
        return self.alloc.allocate(length)

    def write_at(self, extent: Extent, src: memoryview) -> None:
        """The data of a block (no lock needed: the extent is this caller's until logged)."""
        parallel_io(self.pool, os.pwritev, self.fd, src[: extent.length], extent.offset)

    def log(self, key: bytes, tenant: str, extent: Extent, size: int, checksum: int) -> Record:
        """After write_at completed: the block now survives a restart."""
        rec = Record(key, tenant, extent.offset, extent.length, size, checksum)
        self.manifest.add(rec)
        return rec

    def abandon(self, extent: Extent) -> None:
        self.alloc.release(extent)

    def read_into(self, rec: Record, dst: memoryview) -> None:
        parallel_io(self.pool, os.preadv, self.fd, dst[: rec.length], rec.offset)

    def delete(self, rec: Record) -> None:
        """Log the deletion before the extent can be reused (crash order matters)."""
        self.manifest.delete(rec)
        self.alloc.release(Extent(rec.offset, rec.length))

    def maybe_compact(self, live: list[Record]) -> bool:
        if self.manifest.records_written > 2 * len(live) + 4096:
            self.manifest.compact(live)
            return True
        return False

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.manifest.close()
        os.close(self.fd)
