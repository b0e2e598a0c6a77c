"""Both tiers keep the contract in tiers/base.py: declared against it, every member present with
the Protocol's signature, and the accounting it promises (0 <= used <= capacity, a full tier
answers None, giving back returns the bytes)."""

from __future__ import annotations

import inspect

import pytest

from kvtier.agent.tiers import Tier
from kvtier.agent.tiers.dram import DramTier
from kvtier.agent.tiers.nvme import NvmeTier

pytestmark = pytest.mark.unit
MiB = 1 << 20


def _dram(tmp_path):
    tier = DramTier("p", 4 * MiB, 1 * MiB)

    def take(n):
        got = tier.allocate("t", n)
        return None if got is None else (lambda: tier.free(*got))

    return tier, take


def _nvme(tmp_path):
    tier = NvmeTier(tmp_path / "nvme.img", 4 * MiB, io_threads=1, pool="p")
    tier.recover()

    def take(n):
        ext = tier.allocate(n)
        return None if ext is None else (lambda: tier.abandon(ext))

    return tier, take


@pytest.mark.parametrize("cls", [DramTier, NvmeTier])
def test_each_tier_is_declared_against_the_contract_with_its_signatures(cls):
    assert Tier in cls.__mro__, "declared against the contract, not only shaped like it"
    assert cls.name in ("dram", "nvme")
    for member, promised in vars(Tier).items():
        if inspect.isfunction(promised) and not member.startswith("_"):
            assert inspect.signature(getattr(cls, member)) == inspect.signature(promised), member
        elif isinstance(promised, property):
            assert isinstance(inspect.getattr_static(cls, member), property), member
    assert set(Tier.__annotations__) == {"name", "capacity"}


@pytest.mark.parametrize("make", [_dram, _nvme], ids=["dram", "nvme"])
def test_each_tier_keeps_the_accounting_it_promises(tmp_path, make):
    tier, take = make(tmp_path)
    try:
        assert isinstance(tier, Tier)
        assert tier.capacity == 4 * MiB and tier.used == 0
        held = []
        while (give_back := take(1 * MiB)) is not None:  # full is None, not an exception
            held.append(give_back)
            assert 0 < tier.used <= tier.capacity
        assert tier.used == tier.capacity == len(held) * MiB
        for give_back in held:
            give_back()
        assert tier.used == 0
    finally:
        tier.close()
