"""The NVMe tier's manifest: an append-only log of ADD/DEL records, each with its own CRC.

Crash consistency (SIGKILL at any instant): a block's data is written with direct I/O and
completes before its ADD record is appended; a DEL record is appended before its extent is reused.
Replay stops at the first torn or corrupt record and truncates there, so a restart indexes every
block whose ADD was written and nothing else, without reading block data. Compaction writes the live
set to a new file, fsyncs it and renames it over the old one (atomic).
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"KVTM1\n"
_ADD, _DEL = 1, 2
_FIXED = struct.Struct(">BBHQQQQ")  # op, key length, tenant length, offset, length, size, checksum
_CRC = struct.Struct(">I")
_LEN = struct.Struct(">H")


@dataclass(frozen=True, slots=True)
class Record:
    key: bytes
    tenant: str
    offset: int
    length: int
    size: int
    checksum: int


def _encode(op: int, rec: Record) -> bytes:
    tenant = rec.tenant.encode()
    body = _FIXED.pack(op, len(rec.key), len(tenant), rec.offset, rec.length, rec.size, rec.checksum)
    body += rec.key + tenant
    return _LEN.pack(len(body)) + body + _CRC.pack(zlib.crc32(body))


def replay(data: bytes) -> tuple[dict[bytes, Record], int]:
    """Live records and the length of the valid prefix of the log."""
    live: dict[bytes, Record] = {}
    if not data.startswith(MAGIC):
        return live, 0
    pos = len(MAGIC)
    while pos + _LEN.size <= len(data):
        (n,) = _LEN.unpack_from(data, pos)
        end = pos + _LEN.size + n + _CRC.size
        if n < _FIXED.size or end > len(data):
            break
        body = data[pos + _LEN.size : pos + _LEN.size + n]
        if _CRC.unpack_from(data, end - _CRC.size)[0] != zlib.crc32(body):
            break
        op, klen, tlen, offset, length, size, checksum = _FIXED.unpack_from(body)
        if _FIXED.size + klen + tlen != n:
            break
        key = body[_FIXED.size : _FIXED.size + klen]
        tenant = body[_FIXED.size + klen :].decode(errors="replace")
        if op == _ADD:
            live[key] = Record(key, tenant, offset, length, size, checksum)
        elif op == _DEL:
            live.pop(key, None)
        else:
            break
        pos = end
    return live, pos


def _starts_with_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


class NotOurs(Exception):
    """The tier's file or device holds data kvtier did not write there (and the pool did not say adopt)."""


class Manifest:
    def __init__(self, path: Path, adopt: bool = False) -> None:
        self.path = path
        self.records_written = 0
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise NotOurs(f"{path} is not a regular file; the manifest must be one kvtier creates")
        if not adopt and path.exists() and path.stat().st_size and not _starts_with_magic(path):
            raise NotOurs(
                f"{path} holds data kvtier did not write; move it away, or set allowInUse: true on the pool"
            )

    def reset(self) -> None:
        """An empty log (the tier's data file was just created or adopted)."""
        self._rewrite([])

    def open(self) -> dict[bytes, Record]:
        """Replay the log (truncating a torn tail) and keep it open for appends."""
        data = self.path.read_bytes() if self.path.exists() else b""
        live, valid = replay(data)
        if valid == 0:
            self._rewrite([])
        else:
            if valid < len(data):
                with open(self.path, "r+b") as f:
                    f.truncate(valid)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
            self._size = valid
            self.records_written = len(live)
        return live

    def add(self, rec: Record) -> None:
        self._append(_encode(_ADD, rec))

    def delete(self, rec: Record) -> None:
        self._append(_encode(_DEL, rec))

    def _append(self, record: bytes) -> None:
        """A whole record or none: a short write (a full disk) is cut off again and raised, so no
        torn record can sit in front of later ones (replay would stop there and lose them)."""
        try:
            written = os.write(self._fd, record)
            if written != len(record):
                raise OSError(errno.ENOSPC, f"manifest record cut short ({written} of {len(record)} bytes)")
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            raise
        self._size += len(record)
        self.records_written += 1

    def sync(self) -> None:
        os.fdatasync(self._fd)

    def compact(self, live: Iterable[Record]) -> None:
        self._rewrite(list(live))

    def _rewrite(self, live: list[Record]) -> None:
        tmp = self.path.with_suffix(".tmp")
        data = MAGIC + b"".join(_encode(_ADD, r) for r in live)
        # Whatever sits at the temporary name goes first (unlink removes a planted symlink, not its
        # target) and the file is created new, never opened through a link someone put there.
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError:  # a full disk: the old log stays as it was
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
        self._size = len(data)
        self.records_written = len(live)

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None
