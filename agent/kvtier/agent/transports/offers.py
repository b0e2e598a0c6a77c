"""Drain offers: a draining agent hands its hottest blocks to the pool's other agents.

The owner sends each peer, over the authenticated control channel, an `offer`: one tenant's index
keys and sizes, hottest first. The peer checks it before anything else happens (the owner is a
known peer of the pool, the tenant is one it serves, at most `MAX_OFFER` keys of at most a segment
each, no more bytes than the pool's `drain.offerBytes`) and refuses it whole otherwise: a refused
offer costs no memory, no connection and no pin. An accepted offer is pulled with the one peer data
path there is (`NixlTransport.fetch`: the owner authorises and pins, the peer READs into its own
tenant segments and verifies each checksum before indexing), and the reply names the keys the peer
now holds. Keys are the tenant's index keys, the same on every agent of the pool (one secret), so
the tenant's engines on the peer hit them as if they had saved the blocks there.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvtier.agent.store.index import Block, Store
from kvtier.agent.transports.control import ControlClient, Session

log = logging.getLogger("kvtier.agent.offers")
MAX_OFFER = 4096  # keys in one offer, as in one fetch
INDEX_KEY_BYTES = 24  # Store.index_key's digest size
OFFER_DEADLINE_S = 60.0  # for the peer to pull one offer
EMPTY_FETCHES = 3  # a peer with no room, or an owner that lost the blocks, is given up on after these
# A drain offers each peer at most drain.offerBytes in all; a pool member that keeps offering would
# otherwise fill the tenant's share offer by offer and evict its own blocks. So one owner gets at
# most drain.offerBytes taken per window, and one offer pulled at a time.
OFFER_WINDOW_S = 600.0


class Fetcher(Protocol):
    def fetch(
        self, peer: str, tenant: str, ikeys: list[bytes], deadline: float, sizes: dict[bytes, int] | None
    ) -> list[Any]: ...


class Peers(Protocol):
    def peers(self) -> list[str]: ...


class OfferRefused(ValueError):
    """An offer that is not taken at all (the reason goes back to the owner)."""


# ------------------------------------------------------------------------------ peer side


def read_offer(
    msg: dict[str, Any],
    known_peers: Iterable[str],
    served: set[str],
    max_bytes: int | None,
    segment_bytes: int,
) -> tuple[str, str, list[bytes], list[int]]:
    """(owner address, tenant, index keys, sizes) of a well-formed offer this agent may take;
    OfferRefused saying why otherwise. Pure: every word of it came from another machine."""
    owner, tenant, keys, sizes = msg.get("from"), msg.get("tenant"), msg.get("keys"), msg.get("sizes")
    if max_bytes is None:
        raise OfferRefused("this pool takes no offers (drain.offerBytes is unset)")
    if not isinstance(owner, str) or owner not in set(known_peers):
        raise OfferRefused(f"{owner!r} is not a known peer of this pool")
    if not isinstance(tenant, str) or tenant not in served:
        raise OfferRefused("not a tenant this agent serves")
    if not isinstance(keys, list) or not isinstance(sizes, list) or len(keys) != len(sizes):
        raise OfferRefused("an offer is a list of keys and a list of their sizes, one each")
    if len(keys) > MAX_OFFER:
        raise OfferRefused(f"at most {MAX_OFFER} keys in one offer")
    try:
        ikeys = [bytes.fromhex(k) for k in keys]
    except (TypeError, ValueError):
        raise OfferRefused("keys must be hex strings") from None
    if any(len(k) != INDEX_KEY_BYTES for k in ikeys) or len(set(ikeys)) != len(ikeys):
        raise OfferRefused(f"keys must be distinct index keys of {INDEX_KEY_BYTES} bytes")
    if not all(type(s) is int and 0 < s <= segment_bytes for s in sizes):
        raise OfferRefused(f"sizes must be whole numbers of bytes from 1 to {segment_bytes}")
    if sum(sizes) > max_bytes:
        raise OfferRefused(f"{sum(sizes)} bytes offered, this pool's drain.offerBytes is {max_bytes}")
    return owner, tenant, ikeys, sizes


class OfferTaker:
    """Takes offers on behalf of this agent (one per agent; sessions call `take`)."""

    def __init__(
        self,
        store: Store,
        transport: Fetcher,
        directory: Peers,
        served: Callable[[], set[str]],
        max_bytes: int | None,
    ) -> None:
        self.store, self.transport, self.directory = store, transport, directory
        self.served, self.max_bytes = served, max_bytes
        self._lock = threading.Lock()
        self._pulling: set[str] = set()  # owners whose offer is being pulled now
        self._taken: dict[str, list[tuple[float, int]]] = {}  # owner -> (when, bytes) taken in the window

    def take(self, msg: dict[str, Any]) -> dict[str, Any]:
        try:
            if self.store.refusing:
                raise OfferRefused(self.store.refusing)
            owner, tenant, ikeys, sizes = read_offer(
                msg, self.directory.peers(), self.served(), self.max_bytes, self.store.dram.segment_bytes
            )
            with self.store.lock:
                held = {k for k in ikeys if k in self.store.blocks}
            size_of = dict(zip(ikeys, sizes, strict=True))
            self._admit(owner, sum(size_of[k] for k in ikeys if k not in held))
        except OfferRefused as exc:
            log.info("refused an offer: %s", exc)
            return {"ok": False, "error": str(exc)}
        try:
            taken = self._pull(owner, tenant, [k for k in ikeys if k not in held], size_of)
        finally:
            with self._lock:
                self._pulling.discard(owner)
        with self._lock:
            self._taken.setdefault(owner, []).append((time.monotonic(), sum(size_of[k] for k in taken)))
        log.info("took %d of %d offered blocks from %s", len(taken), len(ikeys) - len(held), owner)
        return {"ok": True, "taken": [k.hex() for k in taken], "held": [k.hex() for k in held]}

    def _admit(self, owner: str, wanted: int) -> None:
        """One offer of an owner at a time, and at most drain.offerBytes taken from it per window."""
        assert self.max_bytes is not None  # read_offer refused it otherwise
        with self._lock:
            if owner in self._pulling:
                raise OfferRefused("an offer from this owner is being pulled already")
            since = time.monotonic() - OFFER_WINDOW_S
            recent = [(t, n) for t, n in self._taken.get(owner, []) if t > since]
            self._taken[owner] = recent
            already = sum(n for _, n in recent)
            if wanted and already + wanted > self.max_bytes:
                raise OfferRefused(
                    f"{wanted} bytes offered after {already} taken from this owner in the last "
                    f"{OFFER_WINDOW_S:.0f} s; this pool's drain.offerBytes is {self.max_bytes}"
                )
            self._pulling.add(owner)

    def _pull(self, owner: str, tenant: str, want: list[bytes], sizes: dict[bytes, int]) -> list[bytes]:
        """The offered keys, READ from the owner. A fetch stops at the first key the owner no longer
        holds (evicted since the offer): that key is passed over and the rest asked for again."""
        deadline = time.monotonic() + OFFER_DEADLINE_S
        taken: list[bytes] = []
        empty = 0  # fetches in a row that landed nothing (no room here, or the owner lost them)
        while want and empty < EMPTY_FETCHES and time.monotonic() < deadline:
            try:
                # the offered sizes bound what lands: a block served larger than offered is not READ
                landed = self.transport.fetch(owner, tenant, want, deadline, sizes)
            except OSError as exc:  # refused, unreachable, killed mid-transfer: what landed stays
                log.info("pulling offered blocks from %s: %s", owner, exc)
                break
            taken += [got.key for got in landed]
            empty = 0 if landed else empty + 1
            want = want[len(landed) + 1 :] if len(landed) < len(want) else []
        return taken


class OfferingSession:
    """A peer's control session that also takes offers; everything else goes to the transport's."""

    def __init__(self, inner: Session, taker: OfferTaker) -> None:
        self.inner, self.taker = inner, taker

    def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        if msg.get("op") == "offer":
            return self.taker.take(msg)
        return self.inner.handle(msg)

    def close(self) -> None:
        self.inner.close()


# ----------------------------------------------------------------------------- owner side


@dataclass
class OfferOutcome:
    planned: int
    taken: int = 0
    declined: int = 0
    peers: set[str] = field(default_factory=set)


def offer_blocks(
    groups: list[tuple[str, list[Block]]],
    own_address: str,
    secret: bytes,
    peers: list[str],
    progress: Callable[[OfferOutcome], None],
    cancelled: Callable[[], bool] = lambda: False,
) -> OfferOutcome:
    """Offer each tenant's blocks (hottest first) to the peers in turn, each getting what the ones
    before it did not take. A peer that refuses or fails costs only its turn."""
    outcome = OfferOutcome(planned=sum(b.size for _, blocks in groups for b in blocks))
    for tenant, blocks in groups:
        left = {b.key: b.size for b in blocks}
        for peer in peers:
            if not left or cancelled():
                break
            try:
                with ControlClient(peer, secret, timeout=10.0) as control:
                    reply = control.call(
                        {
                            "op": "offer",
                            "from": own_address,
                            "tenant": tenant,
                            "keys": [k.hex() for k in left],
                            "sizes": list(left.values()),
                        },
                        OFFER_DEADLINE_S + 10.0,
                    )
            except (OSError, PermissionError) as exc:
                log.info("offering to %s: %s", peer, exc)
                continue
            if not reply.get("ok"):
                log.info("%s declined %d blocks of %s: %s", peer, len(left), tenant, reply.get("error"))
                continue
            got = _keys_in(reply.get("taken")) | _keys_in(reply.get("held"))
            moved = [k for k in left if k in got]
            if moved:
                outcome.peers.add(peer)
            for key in moved:
                outcome.taken += left.pop(key)
            progress(outcome)
        outcome.declined += sum(left.values())
        progress(outcome)
    return outcome


def _keys_in(value: Any) -> set[bytes]:
    """The peer's reply is untrusted too: what is not a hex key is ignored."""
    out = set()
    for item in value if isinstance(value, list) else []:
        try:
            out.add(bytes.fromhex(item))
        except (TypeError, ValueError):
            continue
    return out
