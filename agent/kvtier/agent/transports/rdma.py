"""RDMA transport (pyverbs): RDMA READ of blocks straight from a peer agent's registered arena.

Setup rides on the TCP peer port: the reader asks for the blocks' locations and the peer answers
with its queue pair's connection info and, per arena segment, the memory region's address and rkey;
the reader then posts one RDMA READ per block into its own registered arena and verifies the
checksums. The bookkeeping is pure (tested here); the verbs calls need an RDMA device, which no
machine this project was tested on has.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from kvtier.agent.transports.base import FetchedBlock

SYSFS_IB = "/sys/class/infiniband"


def unavailable_reason() -> str | None:
    try:
        devices = os.listdir(SYSFS_IB)
    except OSError:
        devices = []
    if not devices:
        return "no RDMA device in this pod"
    try:
        import pyverbs  # noqa: F401
    except ImportError:
        return "pyverbs is not installed (pip install 'kvtier[rdma]')"
    return None


@dataclass(frozen=True)
class ConnInfo:
    """What each side sends to bring up an RC queue pair."""

    qp_num: int
    psn: int
    lid: int
    gid: str  # RoCE needs the GID; InfiniBand can use the LID

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, data: bytes) -> ConnInfo:
        raw = json.loads(data)
        info = cls(int(raw["qp_num"]), int(raw["psn"]) & 0xFFFFFF, int(raw["lid"]), str(raw["gid"]))
        if not 0 < info.qp_num < 1 << 24:
            raise ValueError(f"invalid QP number {info.qp_num}")
        return info


@dataclass(frozen=True)
class Region:
    segment: int
    addr: int
    length: int
    rkey: int


class RegionTable:
    """A peer's arena segments as memory regions: (segment, offset, length) -> (remote address, rkey)."""

    def __init__(self, regions: list[Region]) -> None:
        self.regions = {r.segment: r for r in regions}

    def remote(self, segment: int, offset: int, length: int) -> tuple[int, int]:
        region = self.regions.get(segment)
        if region is None:
            raise KeyError(f"segment {segment} is not registered on the peer")
        if offset < 0 or offset + length > region.length:
            raise ValueError(
                f"[{offset}, {offset + length}) lies outside segment {segment} ({region.length} bytes)"
            )
        return region.addr + offset, region.rkey

    def encode(self) -> bytes:
        return json.dumps([asdict(r) for r in self.regions.values()]).encode()

    @classmethod
    def decode(cls, data: bytes) -> RegionTable:
        return cls([Region(**r) for r in json.loads(data)])


class RdmaTransport:  # pragma: no cover - needs an RDMA device
    name = "rdma"

    def __init__(self, secret: bytes) -> None:
        from pyverbs.device import Context  # imported only where a device exists

        self.secret = secret
        self.ctx = Context(name=os.listdir(SYSFS_IB)[0])

    def fetch(self, peer: str, keys: list[bytes]) -> Iterator[FetchedBlock]:
        raise NotImplementedError(
            "RDMA READ is not implemented yet on hardware; the agent falls back to TCP "
            "(choose_transport only picks RDMA where a device exists)"
        )
