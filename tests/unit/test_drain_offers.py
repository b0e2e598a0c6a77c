"""A drain's offer of its hottest blocks: which blocks are chosen (pure), which offers a peer refuses
before it spends anything on them, and the pool field that bounds both."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from kvtier.agent.drain import offer_plan
from kvtier.agent.metrics import Metrics
from kvtier.agent.store.index import Block, Lease, Store
from kvtier.agent.tiers.dram import DramTier
from kvtier.agent.transports.offers import MAX_OFFER, OfferRefused, OfferTaker, read_offer
from kvtier.api import v1alpha1 as api

pytestmark = pytest.mark.unit
MiB = 1 << 20
OWNER = "10.0.0.1:7070"


def _block(n: int, tenant: str, last_used: float, size: int = MiB, on_nvme: bool = False) -> Block:
    return Block(
        n.to_bytes(24, "big"), tenant, size, 0, last_used=last_used, nvme=object() if on_nvme else None
    )  # type: ignore[arg-type]


def test_the_hottest_blocks_of_any_tier_up_to_the_bound_grouped_by_tenant():
    blocks = [
        _block(1, "team-a", 1.0),
        _block(2, "team-b", 9.0, on_nvme=True),  # NVMe-only blocks count as much as DRAM ones
        _block(3, "team-a", 8.0),
        _block(4, "team-b", 7.0),
        _block(5, "team-a", 6.0, size=3 * MiB),  # does not fit what is left: passed over
        _block(6, "team-a", 5.0),
    ]
    groups = offer_plan(blocks, 4 * MiB)
    assert [(t, [b.key[-1] for b in bs]) for t, bs in groups] == [("team-b", [2, 4]), ("team-a", [3, 6])]
    assert sum(b.size for _, bs in groups for b in bs) == 4 * MiB
    assert offer_plan(blocks, MiB // 2) == [], "nothing fits: nothing is offered"
    everything = offer_plan(blocks, 1 << 40)
    assert sorted(b.key[-1] for _, bs in everything for b in bs) == [1, 2, 3, 4, 5, 6]


def test_a_chain_saved_or_read_together_is_offered_head_first():
    """Commit stamps each block of a chain a little later than the one before; an offer cut by
    the bound still takes the chain's head (what an engine's prefix lookup needs)."""
    chain = [_block(i, "team-a", 100.0 + i * 1e-6) for i in range(8)]
    older = [_block(10 + i, "team-a", 50.0 + i) for i in range(4)]
    ((tenant, chosen),) = offer_plan(older + chain, 3 * MiB)
    assert tenant == "team-a" and [b.key[-1] for b in chosen] == [0, 1, 2]


def _offer(**overrides) -> dict:
    return {
        "op": "offer",
        "from": OWNER,
        "tenant": "team-a",
        "keys": [bytes([i]).hex() * 24 for i in range(1, 4)],
        "sizes": [MiB, MiB, MiB],
        **overrides,
    }


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        ({"from": "10.0.0.9:7070"}, "not a known peer"),
        ({"from": None}, "not a known peer"),
        ({"tenant": "team-b"}, "not a tenant this agent serves"),
        ({"tenant": ["team-a"]}, "not a tenant this agent serves"),
        ({"sizes": [MiB, MiB]}, "one each"),
        ({"keys": "ab" * 24}, "one each"),
        ({"keys": ["zz" * 24] * 3}, "hex strings"),
        ({"keys": ["ab" * 23, "ac" * 24, "ad" * 24]}, "index keys of 24 bytes"),
        ({"keys": ["ab" * 24] * 3}, "distinct"),
        ({"sizes": [MiB, 0, MiB]}, "sizes must be"),
        ({"sizes": [MiB, -5, MiB]}, "sizes must be"),
        ({"sizes": [MiB, 9 * MiB, MiB]}, "sizes must be"),
        ({"sizes": [MiB, 1.5, MiB]}, "sizes must be"),
        ({"sizes": [MiB, True, MiB]}, "sizes must be"),
        ({"sizes": [4 * MiB, 4 * MiB, 4 * MiB]}, r"drain\.offerBytes is 8388608"),
        (
            {
                "keys": [i.to_bytes(24, "big").hex() for i in range(MAX_OFFER + 1)],
                "sizes": [1] * (MAX_OFFER + 1),
            },
            f"at most {MAX_OFFER} keys",
        ),
    ],
)
def test_a_hostile_or_malformed_offer_is_refused_whole(overrides, why):
    with pytest.raises(OfferRefused, match=why):
        read_offer(_offer(**overrides), [OWNER], {"team-a"}, 8 * MiB, 8 * MiB)


def test_a_well_formed_offer_reads_back_and_a_pool_without_the_field_takes_none():
    owner, tenant, keys, sizes = read_offer(_offer(), [OWNER], {"team-a"}, 8 * MiB, 8 * MiB)
    assert (owner, tenant, sizes) == (OWNER, "team-a", [MiB] * 3) and keys[0] == bytes([1]) * 24
    with pytest.raises(OfferRefused, match=r"drain\.offerBytes is unset"):
        read_offer(_offer(), [OWNER], {"team-a"}, None, 8 * MiB)


class _Counting:
    """A transport that records whether a refused offer reached it (it must not)."""

    def __init__(self) -> None:
        self.fetches = 0

    def fetch(self, peer, tenant, ikeys, deadline, sizes=None):
        self.fetches += 1
        return []


class _Peers:
    def peers(self) -> list[str]:
        return [OWNER]


def test_a_refused_offer_costs_nothing_and_a_draining_peer_takes_none():
    store = Store(os.urandom(32), DramTier("p", 16 * MiB, 8 * MiB), None, metrics=Metrics())
    try:
        transport = _Counting()
        taker = OfferTaker(store, transport, _Peers(), lambda: {"team-a"}, 8 * MiB)
        before = store.stats()
        reply = taker.take(_offer(tenant="team-b"))
        assert reply == {"ok": False, "error": "not a tenant this agent serves"}
        assert transport.fetches == 0 and store.stats() == before, "no pull, no memory"
        store.refusing = "node draining (Cordoned): not taking new blocks"
        assert "draining" in taker.take(_offer())["error"] and transport.fetches == 0
        store.refusing = None
        reply = taker.take(_offer())
        assert reply["ok"] and reply["taken"] == [] and transport.fetches == 3, (
            "gives up on an owner that has none"
        )
        assert store.stats()["dram"]["usedBytes"] == 0
        store.pins.check(store.blocks.values(), [Lease("team-a")])
    finally:
        store.close()


def test_the_pool_field_is_a_positive_quantity_and_needs_the_drain():
    assert api.Drain(offerBytes="2Gi").offerBytes == "2Gi"
    with pytest.raises(ValidationError, match="positive quantity"):
        api.Drain(offerBytes="0")
    with pytest.raises(ValidationError, match="offerBytes needs enabled: true"):
        api.Drain(enabled=False, offerBytes="1Gi")
