"""NVMe tier: direct-I/O extents on a block device, a partition or a file (file mode runs anywhere).

Reads and writes bypass the page cache (O_DIRECT) from page-aligned buffers (the arena's own
mapping), split into chunks that a thread pool issues in parallel so the device sees a deep queue.
Where the filesystem refuses O_DIRECT (tmpfs), the tier still works through the page cache and says
so in `direct`.

The first 4 KiB of the tier are a header naming the pool: the agent writes only where it finds its
own header (or nothing at all), so a mistyped path never overwrites someone's file unless the pool
says `allowInUse`. Every byte read back is untrusted: a failed or short read is reported as an
OSError and the store treats it like a bad checksum (a miss).
"""

from __future__ import annotations

import json
import mmap
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kvtier.agent.store.extents import ALIGN, Extent, ExtentAllocator
from kvtier.agent.tiers.base import Tier
from kvtier.agent.tiers.manifest import Manifest, NotOurs, Record

CHUNK = 4 << 20  # one direct-I/O request; several run at once
HEADER_MAGIC = b"KVTIER-NVME-1\n"


class DiskIO:
    """The tier's only contact with the disk: one seam, where tests put a failing disk."""

    def read(self, fd: int, buf: memoryview, offset: int) -> int:
        return os.preadv(fd, [buf], offset)

    def write(self, fd: int, buf: memoryview, offset: int) -> int:
        return os.pwritev(fd, [buf], offset)


def open_direct(path: Path, size: int | None = None) -> tuple[int, bool]:
    """(fd, direct) for a file (created and sized when `size` is given) or a block device.
    Never follows a symlink at `path`: the file is the one the pool names."""
    flags = os.O_RDWR | getattr(os, "O_DIRECT", 0) | os.O_NOFOLLOW
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
        n = fn(fd, buf[done:], offset + done)
        if n <= 0:
            raise OSError(f"short I/O at offset {offset + done} (the file or device ends early)")
        done += n


class NvmeTier(Tier):
    """`capacity` bytes of direct-I/O extents behind a 4 KiB header, and the manifest that says
    which extents hold committed blocks. Construction raises NotOurs for a path that holds
    someone else's data (or is not a file or block device) and OSError when it cannot be opened."""

    name = "nvme"

    def __init__(
        self,
        path: Path,
        capacity: int,
        io_threads: int = 8,
        manifest_path: Path | None = None,
        pool: str = "",
        adopt: bool = False,
        io: DiskIO | None = None,
    ) -> None:
        self.path = path
        self.pool_name = pool
        self.io = io or DiskIO()
        device = False
        if path.exists() or path.is_symlink():
            mode = os.lstat(path).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise NotOurs(f"{path} is not a regular file or a block device; choose a file path")
            device = stat.S_ISBLK(mode)
        # the first 4 KiB hold the header: a file grows by them, a device gives them up
        self.capacity = (capacity - ALIGN if device else capacity) // ALIGN * ALIGN
        existing = path.exists()
        # an existing file is only read until it proves to be ours: sized after the header check
        self.fd, self.direct = open_direct(path, None if device or existing else self.capacity + ALIGN)
        try:
            fresh = self._claim(adopt)
            if existing and not device and os.fstat(self.fd).st_size < self.capacity + ALIGN:
                os.ftruncate(self.fd, self.capacity + ALIGN)
            self.alloc = ExtentAllocator(self.capacity)
            self.manifest = Manifest(manifest_path or path.with_name(path.name + ".manifest"), adopt=adopt)
            if fresh:
                self.manifest.reset()  # a new or adopted tier: nothing an old log says is on it
        except BaseException:
            os.close(self.fd)
            raise
        self.io_threads = io_threads
        self.pool = ThreadPoolExecutor(io_threads, thread_name_prefix="nvme-io")

    def _claim(self, adopt: bool) -> bool:
        """Check the header: ours (False), or blank/adopted and now written (True); else NotOurs."""
        buf = mmap.mmap(-1, ALIGN)  # page-aligned, as direct I/O wants
        try:
            n = os.preadv(self.fd, [buf], 0)
            head = bytes(buf[:n])
            if head.startswith(HEADER_MAGIC):
                owner = json.loads(head[len(HEADER_MAGIC) :].split(b"\0", 1)[0] or b"{}").get("pool")
                if owner == self.pool_name or adopt:
                    return owner != self.pool_name
                raise NotOurs(
                    f"{self.path} belongs to the kvtier pool {owner!r}; give this pool its own path"
                )
            if head.strip(b"\0") and not adopt:
                raise NotOurs(
                    f"{self.path} holds data kvtier did not write; choose another path, or set "
                    "allowInUse: true on the pool to overwrite it"
                )
            buf[:] = bytes(ALIGN)
            text = HEADER_MAGIC + json.dumps({"pool": self.pool_name}).encode()
            buf[: len(text)] = text
            _full(DiskIO().write, self.fd, memoryview(buf), 0)
            os.fsync(self.fd)
            return True
        finally:
            buf.close()

    def recover(self) -> dict[bytes, Record]:
        """Blocks committed before the last stop, from the manifest alone (no data is read)."""
        live = self.manifest.open()
        for rec in list(live.values()):
            try:
                if not 0 < rec.size <= rec.length:
                    raise ValueError("a block larger than its extent")  # a reader would read past it
                self.alloc.reserve(Extent(rec.offset, rec.length))
            except ValueError:
                del live[rec.key]  # overlaps, lies outside a resized tier, or lies: not trusted
        return live

    @property
    def used(self) -> int:
        return self.alloc.used

    def allocate(self, length: int) -> Extent | None:
        """Room for `length` bytes (rounded up to whole pages); None when no free run is that long.
        The extent is the caller's until it is logged (`log`) or given back (`abandon`)."""
        return self.alloc.allocate(length)

    def write_at(self, extent: Extent, src: memoryview) -> None:
        """The data of a block (no lock needed: the extent is this caller's until logged). Raises
        OSError on an I/O error or a short write; the extent then holds nothing anyone reads."""
        parallel_io(self.pool, self.io.write, self.fd, src[: extent.length], ALIGN + extent.offset)

    def log(self, key: bytes, tenant: str, extent: Extent, size: int, checksum: int) -> Record:
        """After write_at completed: the block now survives a restart. Raises OSError when the
        manifest cannot take the record (a full disk): then nothing was recorded, the extent is
        still the caller's to `abandon`."""
        rec = Record(key, tenant, extent.offset, extent.length, size, checksum)
        self.manifest.add(rec)
        return rec

    def abandon(self, extent: Extent) -> None:
        """Give back an extent that was never logged (its write or its record failed); like every
        release, unchecked: only the caller that allocated it may."""
        self.alloc.release(extent)

    def read_into(self, rec: Record, dst: memoryview) -> None:
        """A logged block's bytes into `dst`. Raises OSError on an I/O error or a short read (a
        truncated file); the bytes are untrusted either way: the caller checks `rec.checksum`."""
        parallel_io(self.pool, self.io.read, self.fd, dst[: rec.length], ALIGN + rec.offset)

    def delete(self, rec: Record) -> None:
        """Log the deletion before the extent can be reused (crash order matters). Raises OSError
        when the DEL record cannot be written: the extent then stays out of use until a restart."""
        self.manifest.delete(rec)
        self.alloc.release(Extent(rec.offset, rec.length))

    def maybe_compact(self, live: list[Record]) -> bool:
        """Rewrite the manifest as `live` once it has grown well past it; True if it did. Raises
        OSError when the rewrite fails, and the old log stays valid."""
        if self.manifest.records_written > 2 * len(live) + 4096:
            self.manifest.compact(live)
            return True
        return False

    def close(self) -> None:
        """Wait for in-flight I/O, then close the manifest and the device."""
        self.pool.shutdown(wait=True)
        self.manifest.close()
        os.close(self.fd)
