"""How blocks move between nodes' agents. One interface; TCP here, RDMA (pyverbs) beside it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class FetchedBlock:
    key: bytes  # the pool-wide index key (already salted by the tenant's salt)
    tenant: str
    checksum: int
    data: memoryview


class Transport(Protocol):
    name: str

    def fetch(self, peer: str, keys: list[bytes]) -> Iterator[FetchedBlock]:
        """Leading blocks of `keys` that `peer` holds, verified against their checksums."""
        ...
