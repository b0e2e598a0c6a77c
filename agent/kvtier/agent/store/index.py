"""The block store: index (key -> tier, extent, checksum), pins, eviction and promotion.

Keys arrive from clients as opaque bytes with a layout fingerprint. The store salts them with the
tenant's secret salt (derived here, from the socket the request came in on, never from the client),
so two tenants' identical prompts never share an entry, and in `shared` pools every tenant uses
one salt. Every operation takes one lock; data moves (NVMe I/O, checksums of large blocks) happen
outside it with the block pinned.

Memory a client can write is read only by its own namespace. In `namespace` pools a block stays
in the tenant's own segment. In `shared` pools a namespace writes into segments of its own
(staging) and the commit copies the block into a sealed segment nobody but the agent can write,
taking the checksum of that copy: what another namespace reads is what was committed.
A disk is untrusted like a client: a block whose NVMe read fails, comes back short or fails its
checksum is dropped and answered as a miss.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from kvtier.agent.metrics import LogThrottle, Metrics
from kvtier.agent.store.eviction import make_policy
from kvtier.agent.store.extents import Extent, align_up
from kvtier.agent.tiers.base import Tier
from kvtier.agent.tiers.dram import DramFull, DramTier, Segment
from kvtier.agent.tiers.manifest import Record
from kvtier.agent.tiers.nvme import NvmeTier

log = logging.getLogger("kvtier.agent.store")


def checksum(data: memoryview | bytes) -> int:
    return xxhash.xxh3_64_intdigest(data)


@dataclass(eq=False, slots=True)
class Block:
    key: bytes
    tenant: str
    size: int
    checksum: int | None  # None until the block first leaves DRAM
    seg: Segment | None = None
    extent: Extent | None = None
    nvme: Record | None = None
    pins: int = 0  # changed only through `Pins`
    last_used: float = 0.0
    unpersistable: bool = False  # the NVMe tier had no room: dropping it from DRAM loses it
    prefetched: bool = False  # brought up ahead of a request and not read since (unused if evicted so)

    @property
    def tier(self) -> str:
        return "dram" if self.seg else "nvme"


@dataclass
class Lease:
    """What one client connection holds: pinned blocks and allocated-but-uncommitted extents."""

    tenant: str  # key space (and owner of committed memory)
    namespace: str = ""  # owner of the extents this connection allocates ("" = the tenant)
    pins: Counter[bytes] = field(default_factory=Counter)  # index key -> pins held (changed by `Pins`)
    held: dict[bytes, Block] = field(default_factory=dict)  # index key -> the block those pins are on
    held_bytes: int = 0  # the size of the blocks in `held` (shared pools count it against a share)
    reserved: dict[tuple[int, int], tuple[Segment, Extent]] = field(default_factory=dict)
    segments_sent: set[int] = field(default_factory=set)


class Pins:
    """The one owner of pin counts: every pin on a block is taken and given back here, under the
    store's lock. A pinned block keeps its DRAM copy and its NVMe extent (eviction skips it).

    Three kinds of holder:
    - a client's lease (`take`/`give_lease`/`end_lease`): counted per key in the lease, against
      the very block it pinned, so a closed connection gives back exactly what it held, even when
      the index has since moved on to another block under the same key;
    - a transient holder, a prefetch or a peer transfer (`take`/`give`);
    - write-behind (`start_write`/`end_write`), also counted in `writing`, which flush waits on.

    Invariants (`check`, asserted in tests): `writing` >= 0; a lease holds only positive counts,
    each on the block it names; a block's pins are at least what the leases still count on it.
    Giving back never takes a block below zero (a client's release of a key it does not hold is
    ignored).
    """

    def __init__(self) -> None:
        self.writing = 0

    @staticmethod
    def take(block: Block, lease: Lease | None = None) -> None:
        block.pins += 1
        if lease is not None:
            lease.pins[block.key] += 1
            before = lease.held.get(block.key)
            lease.held_bytes += block.size - (before.size if before else 0)
            lease.held[block.key] = block

    @staticmethod
    def give(block: Block) -> None:
        """A transient pin ends."""
        block.pins = max(0, block.pins - 1)

    @staticmethod
    def give_lease(lease: Lease, ikey: bytes) -> None:
        """One of the lease's pins on `ikey` ends (client input: a key it does not hold is ignored)."""
        if lease.pins.get(ikey, 0) <= 0:
            return
        block = lease.held[ikey]
        lease.pins[ikey] -= 1
        if not lease.pins[ikey]:
            del lease.pins[ikey], lease.held[ikey]
            lease.held_bytes -= block.size
        block.pins = max(0, block.pins - 1)

    @staticmethod
    def end_lease(lease: Lease) -> None:
        """The connection went away: every pin it held ends."""
        for ikey, count in lease.pins.items():
            block = lease.held[ikey]
            block.pins = max(0, block.pins - count)
        lease.pins.clear()
        lease.held.clear()
        lease.held_bytes = 0

    def start_write(self, block: Block) -> None:
        block.pins += 1
        self.writing += 1

    def end_write(self, block: Block) -> None:
        block.pins = max(0, block.pins - 1)
        self.writing -= 1

    def check(self, blocks: Iterable[Block], leases: Iterable[Lease]) -> None:
        """AssertionError when an invariant is broken (for tests; the store never calls it)."""
        assert self.writing >= 0, f"write-behind count {self.writing}"
        on_block: Counter[int] = Counter()
        for lease in leases:
            assert set(lease.pins) == set(lease.held), "a lease counts pins on blocks it does not name"
            assert lease.held_bytes == sum(b.size for b in lease.held.values()), "held bytes"
            for ikey, count in lease.pins.items():
                assert count > 0 and lease.held[ikey].key == ikey, (ikey, count)
                on_block[id(lease.held[ikey])] += count
        for block in blocks:
            assert block.pins >= on_block[id(block)] >= 0, (block.key, block.pins, on_block[id(block)])


class StoreError(Exception):
    pass


# Keys a lookup or read handles per hold of the store's lock: one request of 65536 keys would
# otherwise hold every other connection up for its whole length (engines ask for at most 512 at once).
LOCKED_KEYS = 1024


def _slices(items: list[bytes]) -> list[list[bytes]]:
    return [items[i : i + LOCKED_KEYS] for i in range(0, len(items), LOCKED_KEYS)] or [[]]


class Store:
    def __init__(
        self,
        secret: bytes,
        dram: DramTier,
        nvme: NvmeTier | None,
        *,
        isolation: str = "namespace",
        policy: str = "s3fifo",
        high_watermark: float = 0.9,
        low_watermark: float = 0.8,
        metrics: Metrics | None = None,
        nvme_share: float = 1.0,
        sync_timeout: float = 10.0,
    ) -> None:
        self.secret = secret
        self.dram = dram
        self.nvme = nvme
        self.isolation = isolation
        self.high, self.low = high_watermark, low_watermark
        self.metrics = metrics or Metrics()
        self.blocks: dict[bytes, Block] = {}
        self.dram_policy = make_policy(policy)
        self.nvme_policy = make_policy(policy)
        self.lock = threading.RLock()
        self.persist_queue: list[bytes] = []
        self.work = threading.Condition(self.lock)
        self.persisted = threading.Condition(self.lock)
        self.hits: Counter[str] = Counter()  # per tenant
        self.misses: Counter[str] = Counter()
        self.sync_timeout = sync_timeout
        self.nvme_share = nvme_share
        self.nvme_used: Counter[str] = Counter()  # bytes of NVMe extents per tenant
        self._log = LogThrottle(log)
        self._closed = False
        self.pins = Pins()
        self.refusing: str | None = None  # set while the node drains (drain.py): no new blocks
        self._salts: dict[str, bytes] = {}
        self._leases: dict[int, Lease] = {}  # the open connections' leases (shared pools count their pins)
        # promotions run beside the NVMe tier's own I/O pool (each one fans out into chunk reads there)
        self._promoters = ThreadPoolExecutor(
            nvme.pool._max_workers if nvme else 1, thread_name_prefix="kvtier-promote"
        )
        if nvme:
            for rec in nvme.recover().values():
                self.blocks[rec.key] = Block(rec.key, rec.tenant, rec.size, rec.checksum, nvme=rec)
                self.nvme_policy.insert(rec.key)
                self.nvme_used[rec.tenant] += rec.length
        self._worker = threading.Thread(target=self._maintain, name="kvtier-maintain", daemon=True)
        self._worker.start()
        self._update_gauges()

    # ------------------------------------------------------------------------ tenancy & keys

    def tenant_of(self, namespace: str) -> str:
        """The key space and memory owner of a namespace's connections."""
        return "shared" if self.isolation == "shared" else namespace

    @property
    def sealed(self) -> bool:
        """Committed blocks live in sealed segments (shared pools: many namespaces read them)."""
        return self.isolation == "shared"

    def lease(self, namespace: str) -> Lease:
        lease = Lease(tenant=self.tenant_of(namespace), namespace=namespace)
        with self.lock:
            self._leases[id(lease)] = lease
        return lease

    def _pinned_bytes(self, namespace: str) -> int:
        """Under the lock: bytes of the blocks a namespace's connections keep pinned."""
        return sum(lease.held_bytes for lease in self._leases.values() if lease.namespace == namespace)

    def _pin_room(self, lease: Lease) -> float:
        """Under the lock: bytes of blocks the lease's namespace may still pin. In shared pools its
        share, less what its connections hold (pinned, or allocated in its own segments): sealed
        blocks belong to no namespace, and one that pinned them all would leave the others no room
        to save. Unbounded elsewhere: a namespace's blocks sit in its own segments, within its share."""
        quota = self.dram.quota_segments
        if not self.sealed or quota is None:
            return math.inf
        namespace = lease.namespace or lease.tenant
        own = sum(s.alloc.used for s in self.dram.segments_of(namespace, False))
        return quota * self.dram.segment_bytes - own - self._pinned_bytes(namespace)

    def segments_for(self, lease: Lease) -> list[Segment]:
        """Every segment a connection may map: its namespace's own and, in shared pools, the sealed ones."""
        with self.lock:
            own = self.dram.segments_of(lease.namespace or lease.tenant, False)
            return own + (self.dram.segments_of(lease.tenant, True) if self.sealed else [])

    def _nvme_quota(self, tenant: str) -> float:
        if self.sealed or self.nvme is None or self.nvme_share >= 1:
            return math.inf  # a shared pool's blocks belong to every namespace
        return self.nvme_share * self.nvme.capacity

    def salt(self, tenant: str) -> bytes:
        """Derived once per tenant (every key of every lookup, read and commit needs it)."""
        salt = self._salts.get(tenant)
        if salt is None:
            salt = self._salts[tenant] = hmac.new(
                self.secret, b"tenant\0" + tenant.encode(), hashlib.sha256
            ).digest()
        return salt

    def index_key(self, tenant: str, fingerprint: str, key: bytes) -> bytes:
        h = hashlib.blake2b(key, digest_size=24, key=self.salt(tenant)[:32], person=b"kvtier-index")
        h.update(fingerprint.encode())
        return h.digest()

    def index_keys(self, tenant: str, fingerprint: str, keys: list[bytes]) -> list[bytes]:
        """Index keys of a request's keys, hashed before the store's lock is taken: a request of
        65536 keys would otherwise hold every other connection up while it hashes."""
        return [self.index_key(tenant, fingerprint, key) for key in keys]

    # --------------------------------------------------------------------------- client ops

    def allocate(self, lease: Lease, sizes: list[int], wait: float = 0.0) -> list[tuple[Segment, Extent]]:
        """Room for blocks in the tenant's segments. If the arena is full of blocks still being
        written behind to NVMe, waits at most `wait` seconds (the client's choice; engines pass 0
        and skip the save) and then refuses."""
        out = []
        deadline = time.monotonic() + wait
        with self.lock:
            if self.refusing:
                raise StoreError(self.refusing)
            owner = lease.namespace or lease.tenant
            held = self._pinned_bytes(owner) if self.sealed else 0  # shared pools: pins count too
            for size in sizes:
                got = self._allocate_dram(owner, size, held=held)
                while got is None and self.nvme and time.monotonic() < deadline:
                    self.work.notify_all()
                    self.persisted.wait(timeout=min(0.05, max(0.0, deadline - time.monotonic())))
                    got = self._allocate_dram(owner, size, held=held)
                if got is None:
                    for seg, ext in out:
                        self.dram.free(seg, ext)
                        del lease.reserved[(seg.id, ext.offset)]
                    self.metrics.alloc_failures.inc()
                    raise StoreError(
                        "arena full: no evictable blocks within this tenant's share (save skipped)"
                    )
                lease.reserved[(got[0].id, got[1].offset)] = got
                out.append(got)
            self._update_gauges()
            self._wake_if_high()
        return out

    def commit(
        self,
        lease: Lease,
        fingerprint: str,
        keys: list[bytes],
        locations: list[tuple[int, int]],
        sizes: list[int],
        checksums: list[int | None] | None = None,
        sync: bool = False,
    ) -> int:
        """Index blocks the client wrote into extents it allocated. Returns how many were new."""
        if not (len(keys) == len(locations) == len(sizes)):
            raise StoreError("keys, locations and sizes must have the same length")
        checksums = checksums or [None] * len(keys)
        new_keys = []
        with self.lock:
            for key, loc, size, given in zip(keys, locations, sizes, checksums, strict=True):
                seg_ext = lease.reserved.pop(tuple(loc), None)
                if seg_ext is None:
                    raise StoreError(f"location {loc} was not allocated on this connection")
                seg, ext = seg_ext
                if not 0 < size <= ext.length:
                    self.dram.free(seg, ext)
                    raise StoreError(f"size {size} does not fit the allocated extent of {ext.length}")
                ikey = self.index_key(lease.tenant, fingerprint, key)
                if ikey in self.blocks:
                    self.dram.free(seg, ext)  # already have it: keep the first copy
                    continue
                if self.sealed:
                    seg, ext = self._seal_copy(lease.tenant, seg, ext, size)
                # The checksum is taken when the block first leaves DRAM (write-behind, a peer), off
                # the commit path; a client that sends one, and a sealed copy, get it now.
                sum_ = None
                if given is not None or seg.sealed:
                    sum_ = checksum(seg.view(ext, size))
                    if given is not None and given != sum_:
                        self.dram.free(seg, ext)
                        self.metrics.checksum_failures.labels("commit").inc()
                        raise StoreError("checksum does not match the bytes in the arena (torn write?)")
                block = Block(ikey, lease.tenant, size, sum_, seg=seg, extent=ext, last_used=time.monotonic())
                self.blocks[ikey] = block
                self.dram_policy.insert(ikey)
                new_keys.append(ikey)
                self.metrics.committed_blocks.inc()
                self.metrics.committed_bytes.inc(size)
            if self.nvme and new_keys:
                self.persist_queue.extend(new_keys)
                self.work.notify_all()
            self._update_gauges()
            if sync and self.nvme:
                self._wait_persisted(new_keys)
        return len(new_keys)

    def _wait_persisted(self, ikeys: list[bytes]) -> None:
        """Under the lock: until every block has its NVMe copy; a clear error once one cannot get
        one (no room, an I/O error) or after sync_timeout (below the client's own timeout)."""
        deadline = time.monotonic() + self.sync_timeout
        while True:
            pending = [self.blocks[k] for k in ikeys if k in self.blocks and self.blocks[k].nvme is None]
            failed = sum(1 for b in pending if b.unpersistable)
            if failed:
                raise StoreError(
                    f"{failed} block(s) could not be written to the NVMe tier (full or failing; see the "
                    "agent's kvtier_persist_failures); they are held in DRAM only"
                )
            if not pending:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise StoreError(
                    f"{len(pending)} block(s) not on NVMe after {self.sync_timeout:g}s (the tier is "
                    "slow or backed up); they are held in DRAM and still being written"
                )
            self.work.notify_all()
            self.persisted.wait(timeout=min(left, 0.5))

    def _seal_copy(self, tenant: str, seg: Segment, ext: Extent, size: int) -> tuple[Segment, Extent]:
        """Under the lock: move a staged block into the shared pool's sealed memory."""
        got = self._allocate_dram(tenant, size, sealed=True)
        if got is None:
            self.dram.free(seg, ext)
            self.metrics.alloc_failures.inc()
            raise StoreError("arena full: no evictable blocks for the shared pool (save skipped)")
        sealed_seg, sealed_ext = got
        sealed_seg.view(sealed_ext, size)[:] = seg.view(ext, size)
        self.dram.free(seg, ext)
        return sealed_seg, sealed_ext

    def lookup(self, tenant: str, fingerprint: str, keys: list[bytes]) -> list[str]:
        """Tiers of the leading keys that hit (a prefix query: stops at the first miss)."""
        tiers: list[str] = []
        for part in _slices(self.index_keys(tenant, fingerprint, keys)):
            with self.lock:
                hits = self._leading(tenant, part)
                tiers += [b.tier for b in hits]
            if len(hits) < len(part):
                break
        return tiers

    def _leading(self, tenant: str, ikeys: list[bytes]) -> list[Block]:
        """Under the lock: the tenant's blocks under the leading index keys that hit."""
        hits = []
        for ikey in ikeys:
            block = self._hit(tenant, ikey)
            if block is None:
                break
            hits.append(block)
        return hits

    def _hit(self, tenant: str, ikey: bytes) -> Block | None:
        """Under the lock: the tenant's block under an index key. A block of another tenant there
        (the key space is salted per tenant, so only a manifest that lies puts one there) is a
        miss: its memory is that tenant's."""
        block = self.blocks.get(ikey)
        return block if block is not None and block.tenant == tenant else None

    def read(self, lease: Lease, fingerprint: str, keys: list[bytes]) -> list[tuple[Segment, Extent, Block]]:
        """Pin the leading blocks that hit, promoting NVMe blocks into the arena first (in parallel,
        so the device sees a deep queue).

        A block whose bytes fail their checksum on the way up is dropped and the answer ends
        before it: a miss, never wrong data.
        """
        t0 = time.perf_counter()
        pinned: list[Block] = []
        for part in _slices(self.index_keys(lease.tenant, fingerprint, keys)):
            took = 0
            with self.lock:
                room = self._pin_room(lease)
                for block in self._leading(lease.tenant, part):
                    if block.key not in lease.held:
                        if block.size > room:  # the namespace holds its share: a miss for the rest
                            break
                        room -= block.size
                    self.pins.take(block, lease)
                    pinned.append(block)
                    took += 1
            if took < len(part):
                break
        tiers = [b.tier for b in pinned]
        cold = [b for b in pinned if b.seg is None]
        if cold:
            assert self.nvme
            ok = list(self._promoters.map(self._promote, cold)) if len(cold) > 1 else [self._promote(cold[0])]
            bad = {id(b) for b, good in zip(cold, ok, strict=True) if not good}
            if bad:
                cut = next(i for i, b in enumerate(pinned) if id(b) in bad)
                with self.lock:
                    for block in pinned[cut:]:
                        self.pins.give_lease(lease, block.key)
                pinned, tiers = pinned[:cut], tiers[:cut]
        with self.lock:
            now = time.monotonic()
            for block, tier in zip(pinned, tiers, strict=True):
                if block.prefetched:
                    block.prefetched = False
                    self.metrics.prefetch_used.inc()
                self.metrics.lookups.labels(tier).inc()
                block.last_used = now
                self.dram_policy.touch(block.key)
            # Hits and misses both count blocks (blocks served / blocks asked): a read that stops at
            # the first absent key misses every key from there on, as the engine recomputes them.
            missed = len(keys) - len(pinned)
            self.hits[lease.tenant] += len(pinned)
            self.misses[lease.tenant] += missed
            if missed:
                self.metrics.lookups.labels("miss").inc(missed)
        self.metrics.latency.labels("read_blocks").observe(time.perf_counter() - t0)
        return [(b.seg, b.extent, b) for b in pinned]  # type: ignore[misc]

    def prefetch_local(
        self, tenant: str, fingerprint: str, keys: list[bytes], deadline: float
    ) -> dict[str, int]:
        """Bring the leading cached blocks of a chain into DRAM (promoting from NVMe) before the
        engine asks, stopping at the deadline. Returns counts, and the index keys still missing."""
        ikeys = self.index_keys(tenant, fingerprint, keys)
        dram = promoted = 0
        late = False
        for ikey in ikeys:
            if time.monotonic() > deadline:
                late = True
                break
            with self.lock:
                block = self._hit(tenant, ikey)
                if block is None:
                    break
                if block.seg:
                    dram += 1
                    continue
                self.pins.take(block)
            ok = self._promote(block)
            with self.lock:
                self.pins.give(block)
                if ok:
                    block.prefetched = True
            if not ok:
                break
            promoted += 1
        return {"dram": dram, "promoted": promoted, "late": int(late), "first_missing": dram + promoted}

    def evict_dram(self) -> int:
        """Drop every DRAM copy that is safe to drop (benchmarks of the NVMe tier, maintenance)."""
        self.flush()
        dropped = 0
        with self.lock:
            for block in list(self.blocks.values()):
                if block.seg and not block.pins and (self.nvme is None or block.nvme):
                    self._drop_dram_copy(block)
                    dropped += 1
            self._update_gauges()
        return dropped

    def release(self, lease: Lease, ikeys: list[bytes]) -> None:
        with self.lock:
            for ikey in ikeys:
                self.pins.give_lease(lease, ikey)

    def close_lease(self, lease: Lease) -> None:
        """A client went away: its pins end and its uncommitted extents return to the arena."""
        with self.lock:
            self._leases.pop(id(lease), None)
            self.pins.end_lease(lease)
            for seg, ext in lease.reserved.values():
                if self.dram.slots[seg.slot] is seg:
                    self.dram.free(seg, ext)
            lease.reserved.clear()
            self._update_gauges()

    # ------------------------------------------------------------------------- peer support

    def pin_for_peer(self, ikeys: list[bytes]) -> list[tuple[Block, memoryview]]:
        """Leading blocks a peer asked for (by index key), pinned in DRAM (promoted if needed)."""
        out: list[tuple[Block, memoryview]] = []
        for ikey in ikeys:
            with self.lock:
                block = self.blocks.get(ikey)
                if block is None:
                    break
                self.pins.take(block)
            if block.seg is None and not self._promote(block):
                with self.lock:
                    self.pins.give(block)
                break
            assert block.seg and block.extent
            view = block.seg.view(block.extent, block.size)
            if block.checksum is None:
                block.checksum = checksum(view)
            out.append((block, view))
        return out

    def unpin_for_peer(self, blocks: list[Block]) -> None:
        with self.lock:
            for block in blocks:
                self.pins.give(block)

    def reserve_for_peer(self, tenant: str, size: int) -> tuple[Segment, Extent] | None:
        """Room in the tenant's segments for a block a peer is about to write (not indexed yet);
        None when full or while the node drains."""
        with self.lock:
            if self.refusing:
                return None
            try:
                # shared pools: straight into sealed memory, the agent's own mapping writes it
                return self._allocate_dram(tenant, size, self.sealed)
            except StoreError:
                return None

    def unreserve(self, seg: Segment, ext: Extent) -> None:
        with self.lock:
            self.dram.free(seg, ext)

    def adopt(self, ikey: bytes, tenant: str, seg: Segment, ext: Extent, size: int, sum_: int) -> bool:
        """A peer's block, already landed in `ext` and verified there, becomes a local DRAM block.
        False (and the extent freed) when the key arrived meanwhile by another path."""
        with self.lock:
            if ikey in self.blocks or self.refusing:
                self.dram.free(seg, ext)
                return False
            self.blocks[ikey] = Block(
                ikey, tenant, size, sum_, seg=seg, extent=ext, last_used=time.monotonic(), prefetched=True
            )
            self.dram_policy.insert(ikey)
            if self.nvme:
                self.persist_queue.append(ikey)
                self.work.notify_all()
            self.metrics.peer_bytes.labels("fetched").inc(size)
            self._update_gauges()
            return True

    def stats(self, tenant: str | None = None) -> dict[str, object]:
        """Pool-wide numbers (admin socket, metrics), or one tenant's own (its socket): its blocks,
        its memory, its share, its hits; never another tenant's."""
        with self.lock:
            blocks = [b for b in self.blocks.values() if tenant is None or b.tenant == tenant]
            nvme_cap = self.nvme.capacity if self.nvme else 0
            if tenant is None:
                dram_cap, dram_used = self.dram.capacity, self.dram.used
                nvme_used = self.nvme.used if self.nvme else 0
                hits, misses = sum(self.hits.values()), sum(self.misses.values())
            else:
                quota = self.dram.quota_segments if not self.sealed else None
                dram_cap = min(self.dram.capacity, (quota or len(self.dram.slots)) * self.dram.segment_bytes)
                dram_used = sum(s.alloc.used for s in self.dram.segments_of(tenant))
                nvme_cap = int(min(nvme_cap, self._nvme_quota(tenant)))
                nvme_used = self.nvme_used[tenant]
                hits, misses = self.hits[tenant], self.misses[tenant]
            return {
                "blocks": len(blocks),
                "dram": {
                    "capacityBytes": dram_cap,
                    "usedBytes": dram_used,
                    "blocks": sum(1 for b in blocks if b.seg),
                },
                "nvme": {
                    "capacityBytes": nvme_cap,
                    "usedBytes": nvme_used,
                    "blocks": sum(1 for b in blocks if b.nvme),
                    "direct": bool(self.nvme and self.nvme.direct),
                },
                "hits": hits,
                "misses": misses,
                "pinned": sum(1 for b in blocks if b.pins),
            }

    def flush(self, timeout: float = 60.0) -> None:
        """Wait until every committed block has its NVMe copy (tests, shutdown)."""
        if not self.nvme:
            return
        deadline = time.monotonic() + timeout
        with self.lock:
            while self.persist_queue or self.pins.writing:
                self.work.notify_all()
                if not self.persisted.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise StoreError("NVMe write-behind did not drain in time")

    def close(self) -> None:
        with self.lock:
            self._closed = True
            self.work.notify_all()
        self._worker.join(timeout=10)
        self._promoters.shutdown(wait=True)
        if self.nvme:
            self.nvme.close()
        self.dram.close()

    # ----------------------------------------------------------------------------- internals

    def _allocate_dram(
        self, owner: str, size: int, sealed: bool = False, held: int = 0
    ) -> tuple[Segment, Extent] | None:
        """Room in the owner's segments, evicting what is safe to evict; `held`: bytes the owner
        keeps pinned outside its segments (shared pools), which count against its share."""
        try:
            got = self.dram.allocate(owner, size, sealed, held)
        except DramFull as exc:
            raise StoreError(str(exc)) from None
        # Full: drop blocks that are safe to drop right now (already on NVMe, or no NVMe tier)
        # from this owner's segments, then (below its share only) reclaim what others left empty.
        while got is None:
            victim = self.dram_policy.victim(lambda k: self._cheap_dram_victim(k, owner))
            if victim is None and not self.dram.at_quota(owner, sealed, held):
                victim = self.dram_policy.victim(lambda k: self._cheap_dram_victim(k, None))
            if victim is None:
                return None
            self._drop_dram_copy(self.blocks[victim])
            got = self.dram.allocate(owner, size, sealed, held)
        return got

    def _cheap_dram_victim(self, ikey: bytes, tenant: str | None) -> bool:
        block = self.blocks.get(ikey)
        if block is None or block.seg is None or block.pins:
            return False
        if tenant is not None and block.tenant != tenant:
            return False
        return self.nvme is None or block.nvme is not None or block.unpersistable

    def _drop_dram_copy(self, block: Block) -> None:
        assert block.seg and block.extent
        if block.prefetched:
            block.prefetched = False
            self.metrics.prefetch_unused.inc()
        self.dram.free(block.seg, block.extent)
        block.seg, block.extent = None, None
        self.dram_policy.remove(block.key)
        if block.nvme is None:
            del self.blocks[block.key]
            self.metrics.evictions.labels("dram").inc()
        else:
            self.metrics.demotions.inc()

    def _drop_nvme_copy(self, block: Block) -> None:
        assert self.nvme and block.nvme
        self.nvme_used[block.tenant] -= block.nvme.length
        try:
            self.nvme.delete(block.nvme)
        except OSError as exc:  # no DEL record: the extent stays out of use (crash order), the block goes
            self.metrics.io_errors.labels("manifest").inc()
            self._log.warning("manifest", "could not log an NVMe deletion: %s", str(exc))
        block.nvme = None
        self.nvme_policy.remove(block.key)
        if block.seg is None:
            del self.blocks[block.key]
        else:
            block.unpersistable = True  # NVMe chose to drop it: its DRAM copy may go too
        self.metrics.evictions.labels("nvme").inc()

    def _promote(self, block: Block) -> bool:
        """NVMe -> DRAM for a pinned block. False (and the block is gone) if its bytes are bad."""
        assert self.nvme
        with self.lock:
            if block.seg:  # another reader promoted it meanwhile
                return True
            rec = block.nvme
            if rec is None:
                return False
            try:
                got = self._allocate_dram(block.tenant, rec.length, self.sealed)
            except (StoreError, OSError) as exc:  # longer than a segment (it shrank), no new memfd
                self._log.warning("promote", "an NVMe block cannot be promoted (a miss): %s", str(exc))
                got = None
            if got is None:
                return False
            seg, ext = got
        t0 = time.perf_counter()
        view = seg.view(ext)
        try:
            self.nvme.read_into(rec, view)
            good = checksum(view[: rec.size]) == rec.checksum
            failure = "nvme"
        except OSError as exc:  # EIO, a short read of a truncated file: the same as bad bytes
            good, failure = False, "nvme_read_error"
            self.metrics.io_errors.labels("read").inc()
            self._log.warning("read", "NVMe read failed (served as a miss): %s", str(exc))
        del view
        self.metrics.latency.labels("promote").observe(time.perf_counter() - t0)
        with self.lock:
            if block.seg:  # lost a race with another promoter: keep theirs
                self.dram.free(seg, ext)
                return True
            if not good:
                self.dram.free(seg, ext)
                self.metrics.checksum_failures.labels(failure).inc()
                if block.nvme is rec:
                    self._drop_nvme_copy(block)
                self.blocks.pop(block.key, None)
                return False
            block.seg, block.extent = seg, ext
            self.dram_policy.insert(block.key)
            self.nvme_policy.touch(block.key)
            self.metrics.promotions.inc()
            self.metrics.bytes_moved.labels("nvme_to_dram").inc(rec.size)
            self._update_gauges()
            self._wake_if_high()
            return True

    def _wake_if_high(self) -> None:
        if self.dram.used > self.high * self.dram.capacity:
            self.work.notify_all()

    def _maintain(self) -> None:
        """Background: write committed blocks behind to NVMe, and demote above the high watermark."""
        while True:
            with self.lock:
                while (
                    not self._closed
                    and not self.persist_queue
                    and self.dram.used <= self.high * self.dram.capacity
                ):
                    self.work.wait(timeout=1.0)
                if self._closed:
                    return
                job = self._next_job()
            if job is None:
                with self.lock:
                    self.work.wait(timeout=0.05)
                continue
            block, seg, ext = job
            try:
                self._persist(block, seg, ext)
            except Exception as exc:  # a bug on one block must not stop write-behind for good
                self._log.exception("persist", "writing a block to NVMe failed: %s", exc)
                with self.lock:
                    if block.nvme is None and not block.unpersistable:
                        block.unpersistable = True
                        self.metrics.persist_failures.inc()
            finally:
                self._end_write_behind(block)

    def _end_write_behind(self, block: Block) -> None:
        """The one place a write-behind job gives back what `_next_job` took (its pin and its
        place in the count `flush` waits on), whatever `_persist` did or raised."""
        with self.lock:
            self.pins.end_write(block)
            self.persisted.notify_all()

    def _next_job(self) -> tuple[Block, Segment, Extent] | None:
        """Under the lock: the next block to write to NVMe (pinned while it is written), after
        dropping DRAM copies that are already safe when above the high watermark."""
        while self.persist_queue:
            block = self.blocks.get(self.persist_queue.pop(0))
            if block and block.seg and block.nvme is None:
                self.pins.start_write(block)
                return block, block.seg, block.extent  # type: ignore[return-value]
        # no write-behind pending: demote until below the low watermark
        while self.dram.used > self.low * self.dram.capacity:
            victim = self.dram_policy.victim(lambda k: self._cheap_dram_victim(k, None))
            if victim is None:
                break
            self._drop_dram_copy(self.blocks[victim])
        self._update_gauges()
        self.persisted.notify_all()
        return None

    def _persist(self, block: Block, seg: Segment, ext: Extent) -> None:
        """Write one pinned block behind to NVMe: room under the lock (within the tenant's share),
        data outside it, then log. Whatever fails, the reserved extent goes back: no room or an
        I/O error leaves the block in DRAM only (`unpersistable`), counted, never a leak. The pin
        and the persisting count are the caller's (`_maintain`) to give back."""
        assert self.nvme
        t0 = time.perf_counter()
        with self.lock:
            target = self._allocate_nvme(block.tenant, ext.length)
        error: OSError | None = None
        if target is not None:
            if block.checksum is None:
                block.checksum = checksum(seg.view(ext, block.size))
            try:
                self.nvme.write_at(target, seg.view(ext))
            except OSError as exc:  # ENOSPC on a sparse file, EIO
                error = OSError(exc.errno, str(exc))  # without the traceback's views of the arena
        with self.lock:
            try:
                if target is not None and error is None and self.blocks.get(block.key) is block:
                    try:
                        block.nvme = self.nvme.log(
                            block.key, block.tenant, target, block.size, block.checksum or 0
                        )
                    except OSError as exc:
                        error = exc
                    else:
                        self.nvme_policy.insert(block.key)
                        self.metrics.bytes_moved.labels("dram_to_nvme").inc(block.size)
                        try:
                            self.nvme.maybe_compact([b.nvme for b in self.blocks.values() if b.nvme])
                        except OSError as exc:  # the old log stays valid; compaction is tried again later
                            self._log.warning("compact", "manifest compaction failed: %s", str(exc))
            finally:  # also when the manifest raised something else: the extent is not leaked
                if target is not None and block.nvme is None:
                    self.nvme.abandon(target)
                    self.nvme_used[block.tenant] -= target.length
                if block.nvme is None and self.blocks.get(block.key) is block:
                    block.unpersistable = True
                    self.metrics.persist_failures.inc()
            if error is not None:
                self.metrics.io_errors.labels("write").inc()
                self._log.warning("write", "NVMe write failed (block kept in DRAM only): %s", str(error))
            self.metrics.latency.labels("persist").observe(time.perf_counter() - t0)
            self._update_gauges()
            self.persisted.notify_all()

    def _allocate_nvme(self, tenant: str, length: int) -> Extent | None:
        """Under the lock: an NVMe extent within the tenant's share, evicting its own blocks (then,
        below its share, anyone's) that are not pinned."""
        assert self.nvme

        def evictable(k: bytes, own: bool) -> bool:
            b = self.blocks.get(k)
            return b is not None and b.nvme is not None and not b.pins and (not own or b.tenant == tenant)

        quota = self._nvme_quota(tenant)
        while self.nvme_used[tenant] + length > quota:
            victim = self.nvme_policy.victim(lambda k: evictable(k, True))
            if victim is None:
                return None
            self._drop_nvme_copy(self.blocks[victim])
        target = self.nvme.allocate(length)
        while target is None:
            victim = self.nvme_policy.victim(lambda k: evictable(k, True)) or self.nvme_policy.victim(
                lambda k: evictable(k, False)
            )
            if victim is None:
                return None
            self._drop_nvme_copy(self.blocks[victim])
            target = self.nvme.allocate(length)
        self.nvme_used[tenant] += target.length
        return target

    def _update_gauges(self) -> None:
        tiers: list[Tier] = [self.dram, self.nvme] if self.nvme else [self.dram]
        for tier in tiers:
            self.metrics.tier_bytes.labels(tier.name).set(tier.used)
            self.metrics.tier_capacity.labels(tier.name).set(tier.capacity)


def load_secret(state_dir: Path) -> bytes:
    """The pool's per-node secret that tenant salts derive from; created once, kept across restarts."""
    import os

    path = state_dir / "secret"
    if path.exists():
        return path.read_bytes()
    state_dir.mkdir(parents=True, exist_ok=True)
    secret = os.urandom(32)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
    os.replace(tmp, path)
    return secret


__all__ = ["Block", "Lease", "Pins", "Store", "StoreError", "align_up", "checksum", "load_secret"]
