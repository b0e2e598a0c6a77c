"""Planning copies of equal-size blocks (pure): merge neighbours into runs, cut work into groups."""

from __future__ import annotations

import operator
from collections.abc import Iterator
from dataclasses import dataclass

GROUP_BYTES = 256 << 20  # staging buffer per group of blocks (two in flight)
# A restore pins blocks chunk by chunk: a small first chunk (its keys and pin are all the copies wait
# for), then chunks growing 4x up to READ_MOST blocks, each pinned while the GPU copies the one before.
READ_FIRST, READ_MOST = 32, 512


@dataclass(frozen=True)
class HostRun:
    """Consecutive blocks that sit back to back in one segment: one DMA."""

    segment: int
    offset: int
    first: int  # index of the first block in the request
    count: int


def runs(locations: list[tuple[int, int]], block_bytes: int) -> list[HostRun]:
    """Merge (segment, offset) locations of equal-size blocks into contiguous runs (pure)."""
    out: list[HostRun] = []
    for i, (seg, off) in enumerate(locations):
        last = out[-1] if out else None
        if last and last.segment == seg and last.offset + last.count * block_bytes == off:
            out[-1] = HostRun(seg, last.offset, last.first, last.count + 1)
        else:
            out.append(HostRun(seg, off, i, 1))
    return out


def pages_ok(page_ids: list[int], num_pages: int, written: set[int] | None = None) -> bool:
    """An engine's page ids are pages of its cache (torch reads a negative index from the end: -1
    would be another request's page). Pages to be written (`written`: those other transfers of the
    step write) must also be distinct and not already written. Anything else is refused: a miss."""
    seen: set[int] = set()
    for raw in page_ids:
        try:
            page = operator.index(raw)  # ints of any kind (numpy's too); not floats or strings
        except TypeError:
            return False
        if not 0 <= page < num_pages:
            return False
        if written is not None and (page in seen or page in written):
            return False
        seen.add(page)
    return True


def groups(n_blocks: int, block_bytes: int, group_bytes: int = GROUP_BYTES) -> Iterator[tuple[int, int]]:
    per = max(1, group_bytes // block_bytes)
    for start in range(0, n_blocks, per):
        yield start, min(n_blocks, start + per)


def runs_in(all_runs: list[HostRun], start: int, end: int) -> Iterator[HostRun]:
    for run in all_runs:
        if run.first < end and run.first + run.count > start:
            yield run
