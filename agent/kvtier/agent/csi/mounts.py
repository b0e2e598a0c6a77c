"""Mounts done safely: paths opened one folder at a time without following symlinks, bind mounts
made and removed through /proc/self/fd (so what was checked is what gets mounted), and the mount
table read with its escapes decoded. Linux only; the CSI plugin runs as root."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
from pathlib import Path

MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MNT_DETACH = 0x2
WALK = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_NAME = 255

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_ESCAPE = re.compile(r"\\([0-7]{3})")


class UnsafePath(ValueError):
    """A path that leaves its folder, goes through a symlink or is not a plain name."""


def check_name(name: str) -> str:
    if name in ("", ".", "..") or "/" in name or "\0" in name or len(name.encode()) > MAX_NAME:
        raise UnsafePath(f"{name[:64]!r} is not a plain folder name")
    return name


def open_beneath(root: str | os.PathLike[str] | int, names: list[str]) -> int:
    """Open `root/names...` as a folder, one component at a time, refusing symlinks and anything
    that is not a folder. `root` is a path or an open folder's fd. The caller closes the result."""
    fd = os.dup(root) if isinstance(root, int) else os.open(root, WALK)
    try:
        for name in names:
            try:
                nxt = os.open(check_name(name), WALK, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafePath(f"{name[:64]!r} is a symlink or not a folder") from None
                raise
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def bind_read_only(source_fd: int, target_fd: int, reopen) -> None:
    """Bind the folder open at `source_fd` onto the one open at `target_fd`, then make it read-only
    (nosuid, nodev, noexec). `reopen()` opens the target again, now crossing into the new mount, so
    the remount names the mount just made and nothing else."""
    _check(
        _libc.mount(
            f"/proc/self/fd/{source_fd}".encode(), f"/proc/self/fd/{target_fd}".encode(), None, MS_BIND, None
        ),
        "bind mount",
    )
    fd = reopen()
    try:
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
        rc = _libc.mount(None, f"/proc/self/fd/{fd}".encode(), None, flags, None)
        if rc != 0:
            err = ctypes.get_errno()
            _libc.umount2(f"/proc/self/fd/{fd}".encode(), MNT_DETACH)  # never leave a writable bind behind
            raise OSError(err, f"read-only remount: {os.strerror(err)}")
    finally:
        os.close(fd)


def unmount(fd: int) -> None:
    """Unmount the mount whose root is open at `fd` (opened through the mount point). Detached,
    since the fd that names it race-free also keeps it busy; it goes when that fd is closed."""
    _check(_libc.umount2(f"/proc/self/fd/{fd}".encode(), MNT_DETACH), "unmount")


def decode(field: str) -> str:
    """A mountinfo path field: the kernel writes space, tab, newline and backslash as octal escapes."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def mount_points(mountinfo: str) -> list[tuple[int, str, str]]:
    """(mount id, root within its filesystem, mount point) per line of a mountinfo text."""
    out = []
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if len(fields) > 4:
            out.append((int(fields[0]), decode(fields[3]), decode(fields[4])))
    return out


def mounts_at(path: str, mountinfo: Path = Path("/proc/self/mountinfo")) -> int:
    """How many mounts are stacked at `path` (an absolute, normalized path)."""
    return sum(1 for _, _, point in mount_points(mountinfo.read_text()) if point == path)
