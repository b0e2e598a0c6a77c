"""NUMA binding of the arena: mbind's syscall number comes from a per-architecture table, and on
this machine the real call binds the segment (read back from /proc/self/numa_maps)."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from kvtier.agent.tiers import dram
from kvtier.agent.tiers.dram import DramTier, mbind_syscall_number

pytestmark = pytest.mark.unit
MiB = 1 << 20


@pytest.mark.parametrize(
    ("machine", "number"),
    [("x86_64", 237), ("aarch64", 235), ("arm64", 235), ("riscv64", 235), ("ppc64le", 259), ("s390x", 268)],
)
def test_mbind_number_follows_the_architecture(machine, number):
    assert mbind_syscall_number(machine) == number


def test_an_unknown_architecture_leaves_the_arena_unbound(monkeypatch):
    monkeypatch.setattr(dram.platform, "machine", lambda: "vax")
    assert mbind_syscall_number() is None
    arena = DramTier("p", 4 * MiB, 2 * MiB, numa=0)
    try:
        arena.allocate("t", 4096)
        assert arena.numa_bound is False, "no guessed syscall number: reported unbound, not bound"
    finally:
        arena.close()


@pytest.mark.skipif(mbind_syscall_number() is None, reason=f"mbind number unknown on {platform.machine()}")
def test_the_real_call_binds_the_segment_to_node_zero():
    arena = DramTier("p", 4 * MiB, 2 * MiB, numa=0)
    try:
        seg, _ = arena.allocate("t", 4096)  # type: ignore[misc]
        assert arena.numa_bound is True
        maps = Path("/proc/self/numa_maps").read_text().splitlines()
        line = next(line for line in maps if int(line.split()[0], 16) == seg.address)
        assert "bind:0" in line, line
    finally:
        arena.close()
