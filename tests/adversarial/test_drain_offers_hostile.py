"""A hostile pool member against the drain-offer path, with real agent processes over NIXL (UCX tcp
on loopback). The attacker holds the pool secret, so it can speak the control protocol and name any
known peer as an offer's owner; what it must not be able to do is make a receiver hold more than the
pool's `drain.offerBytes`, evict a tenant's own blocks en masse, tie up the receiver, or have it
index bytes other than the ones the owner's checksums vouch for."""

from __future__ import annotations

import os
import time

import pytest

from kvtier.agent.client import Client
from kvtier.agent.store.index import Store
from kvtier.agent.tiers.dram import DramTier
from kvtier.agent.transports.control import ControlClient
from kvtier.bench.chaos import settle, usage
from tests.integration.test_agent import FP, blobs, chain
from tests.support import agent_config

pytestmark = pytest.mark.adversarial
MiB = 1 << 20


def _index_keys(secret: bytes, tenant: str, keys: list[bytes]) -> list[bytes]:
    """What any holder of the pool secret can compute: the tenant's index keys on every agent."""
    store = Store(secret, DramTier("p", 4 * MiB, 4 * MiB), None)
    try:
        return [store.index_key(tenant, FP, k) for k in keys]
    finally:
        store.close()


@pytest.fixture
def pool(agent, tmp_path):
    """An owner holding 24 blocks of team-a (1 MiB each) and a receiver that serves team-a and
    takes offers of at most 4 MiB; both share the pool secret the attacker also holds."""
    secret = os.urandom(32)
    (tmp_path / "secret").write_bytes(secret)

    def config(name: str, peers: list[str], dram: str) -> object:
        return agent_config(
            tmp_path / name,
            dram=dram,
            nvme=None,
            prefetch={"transport": "tcp"},
            drain={"offerBytes": "4Mi"},
            tenancy={"dramShare": 0.5},
        ).model_copy(update={"secretFile": str(tmp_path / "secret"), "peers": peers, "segmentBytes": 4 * MiB})

    owner = agent(config("owner", [], "64Mi"), name="owner")
    receiver = agent(config("receiver", [owner.peer], "32Mi"), name="receiver")
    offered = chain(24, "offered")
    with Client(owner.tenant("team-a")) as c:
        assert c.put(FP, offered, blobs(24, seed=1)) == 24
    return secret, owner, receiver, _index_keys(secret, "team-a", offered)


def _offer(receiver, secret: bytes, owner_peer: str, ikeys: list[bytes], sizes: list[int]) -> dict:
    with ControlClient(receiver.peer, secret, timeout=10) as control:
        msg = {"op": "offer", "from": owner_peer, "tenant": "team-a", "keys": [k.hex() for k in ikeys]}
        return control.call({**msg, "sizes": sizes}, 30)


def test_blocks_served_larger_than_offered_are_not_taken(pool):
    """Offer 1-byte blocks (well inside drain.offerBytes) whose owner serves 1 MiB each: the
    receiver must not land more than the offer said, so the bound cannot be walked around."""
    secret, owner, receiver, ikeys = pool
    receiver.tenant("team-a")
    reply = _offer(receiver, secret, owner.peer, ikeys[:16], [1] * 16)
    assert reply["ok"] and reply["taken"] == [], reply
    assert receiver.stats()["dram"]["usedBytes"] == 0, "nothing beyond what was offered stays"
    reply = _offer(receiver, secret, owner.peer, ikeys[16:18], [2 * MiB] * 2)  # and smaller
    assert reply["ok"] and reply["taken"] == [], reply
    assert receiver.stats()["dram"]["usedBytes"] == 0


def test_an_offer_flood_stays_within_offer_bytes_and_spares_the_tenants_own_blocks(pool):
    """Many offers in a row, each within drain.offerBytes, for distinct keys: the receiver takes
    at most drain.offerBytes from one owner per window, refuses the rest with the reason, and the
    tenant's own hot blocks on the receiver stay."""
    secret, owner, receiver, ikeys = pool
    own_keys, own_data = chain(8, "own"), blobs(8, seed=2)
    with Client(receiver.tenant("team-a")) as c:
        assert c.put(FP, own_keys, own_data) == 8
        baseline = usage(receiver.proc.pid)
        replies = [_offer(receiver, secret, owner.peer, ikeys[i : i + 4], [MiB] * 4) for i in range(0, 24, 4)]
        taken = sum(len(r.get("taken", [])) for r in replies)
        assert taken <= 4, f"{taken} MiB taken from one owner: more than drain.offerBytes"
        refused = [r for r in replies if not r["ok"]]
        assert refused and all("drain.offerBytes" in r["error"] for r in refused), replies
        assert c.get(FP, own_keys) == own_data, "the tenant's own blocks were evicted by offers"
    grown = settle(receiver.proc.pid, baseline)
    assert grown["fds"] <= 4 and grown["threads"] <= 4, grown


def test_replayed_offers_take_nothing_twice(pool):
    secret, owner, receiver, ikeys = pool
    receiver.tenant("team-a")
    first = _offer(receiver, secret, owner.peer, ikeys[:2], [MiB] * 2)
    assert first["ok"] and len(first["taken"]) == 2, first
    used = receiver.stats()["dram"]["usedBytes"]
    for _ in range(5):
        again = _offer(receiver, secret, owner.peer, ikeys[:2], [MiB] * 2)
        assert again["ok"] and again["taken"] == [] and len(again["held"]) == 2, again
    assert receiver.stats()["dram"]["usedBytes"] == used


def test_offers_for_keys_the_owner_does_not_hold_take_nothing(pool):
    secret, owner, receiver, _ = pool
    receiver.tenant("team-a")
    forged = _index_keys(secret, "team-a", chain(4, "nobody-has-these"))
    reply = _offer(receiver, secret, owner.peer, forged, [MiB] * 4)
    assert reply["ok"] and reply["taken"] == [], reply
    # and another tenant's keys offered as team-a's: the owner authorises by tenant, so nothing
    with Client(owner.tenant("team-b")) as c:
        assert c.put(FP, chain(2, "b"), blobs(2, seed=3)) == 2
    theirs = _index_keys(secret, "team-b", chain(2, "b"))
    reply = _offer(receiver, secret, owner.peer, theirs, [MiB] * 2)
    assert reply["ok"] and reply["taken"] == [], reply
    assert receiver.stats()["dram"]["usedBytes"] == 0


def test_an_offer_whose_owner_never_answers_the_read_ends_by_its_deadline(tmp_path, monkeypatch):
    """The owner answers the fetch and never serves the READ: the pull ends at the offer's deadline
    (60 s in the agent, 1 s here), nothing stays reserved, and while it hangs a second offer from
    the same owner is refused at once rather than taking another thread and more memory."""
    import threading

    from kvtier.agent.store.index import Store
    from kvtier.agent.tiers.dram import DramTier
    from kvtier.agent.transports import offers, open_transport
    from tests.adversarial.test_nixl_fetch_hostile import _owner

    monkeypatch.setattr(offers, "OFFER_DEADLINE_S", 1.0)
    secret = os.urandom(32)
    stuck, address = _owner(secret, "hang")
    store = Store(secret, DramTier("p", 32 * MiB, 8 * MiB), None)
    transport, _ = open_transport(store, secret, f"offer-hang-{os.getpid()}", "tcp", [], None)

    class Peers:
        def peers(self) -> list[str]:
            return [address]

    taker = offers.OfferTaker(store, transport, Peers(), lambda: {"team-a"}, 8 * MiB)
    keys = [os.urandom(24).hex() for _ in range(4)]
    offer = {"op": "offer", "from": address, "tenant": "team-a", "keys": keys, "sizes": [MiB] * 4}
    try:
        replies: list[dict] = []
        start = time.monotonic()
        pulling = threading.Thread(target=lambda: replies.append(taker.take(offer)))
        pulling.start()
        time.sleep(0.3)
        second = taker.take({**offer, "keys": [os.urandom(24).hex()], "sizes": [MiB]})
        assert not second["ok"] and "being pulled already" in second["error"], second
        pulling.join(10)
        took = time.monotonic() - start
        assert replies == [{"ok": True, "taken": [], "held": []}] and took < 3, (replies, took)
        assert store.stats()["dram"]["usedBytes"] == 0, "the hung pull's extents went back"
        again = taker.take(offer)  # the owner's turn is over: its next offer is heard (and fails)
        assert again["ok"] and again["taken"] == []
    finally:
        stuck.kill()
        stuck.wait()
        store.close()
