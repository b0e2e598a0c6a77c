"""The contract every tier keeps with the store.

A tier is byte space on one kind of medium, handed out as page-aligned extents. It holds no index,
no pins and no eviction order: the store owns those (`store/index.py`) and decides what goes
where. A tier is not thread-safe on its own: the store calls its allocation and bookkeeping
methods under its one lock, and moves data (segment views, `NvmeTier.write_at`/`read_into`)
outside it, on extents only the caller holds.

Each tier's own methods say what they promise and raise in their docstrings. Shared by all:
a full tier answers `allocate` with None (the store evicts and retries), never with an exception;
an exception means the request can never succeed (DRAM: a block larger than a segment) or the
medium failed (NVMe: an OSError from the disk, which the store treats like a bad checksum, a miss).
"""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable


@runtime_checkable
class Tier(Protocol):
    name: ClassVar[str]
    """The tier's label in metrics and in lookup answers ("dram", "nvme")."""

    capacity: int
    """Bytes available to blocks, fixed for the tier's life (whole pages; the NVMe tier's header
    page is not counted)."""

    @property
    def used(self) -> int:
        """Bytes in extents handed out and not given back yet: 0 <= used <= capacity. Never raises."""
        ...

    def close(self) -> None:
        """Give the memory or descriptors back. Called once, after the store's last use; extents
        and views handed out before are invalid afterwards. May raise OSError from the OS."""
        ...


__all__ = ["Tier"]
