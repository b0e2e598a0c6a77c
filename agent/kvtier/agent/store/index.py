"""The block store: index (key -> tier, extent, checksum), pins, eviction and promotion.

Keys arrive from clients as opaque bytes with a layout fingerprint. The store salts them with the
tenant's secret salt (derived here, from the socket the request came in on, never from the client),
so two tenants' identical prompts never share an entry, and in `shared` pools every tenant uses
one salt. Every operation takes one lock; data moves (NVMe I/O, checksums of large blocks) happen
outside it with the block pinned.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import xxhash
from kvtier.agent.metrics import Metrics
from kvtier.agent.store.eviction import make_policy
from kvtier.agent.store.extents import Extent, align_up
from kvtier.agent.tiers.dram import DramFull, DramTier, Segment
from kvtier.agent.tiers.manifest import Record
from kvtier.agent.tiers.nvme import NvmeTier


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
    pins: int = 0
    last_used: float = 0.0
    unpersistable: bool = False  # the NVMe tier had no room: dropping it from DRAM loses it
    prefetched: bool = False  # brought up ahead of a request and not read since (unused if evicted so)

    @property
    def tier(self) -> str:
        return "dram" if self.seg else "nvme"


@dataclass
class Lease:
    """What one client connection holds: pinned blocks and allocated-but-uncommitted extents."""

    tenant: str
    pins: Counter[bytes] = field(default_factory=Counter)
    reserved: dict[tuple[int, int], tuple[Segment, Extent]] = field(default_factory=dict)
    segments_sent: set[int] = field(default_factory=set)


class StoreError(Exception):
    pass


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
        self.hits = 0
        self.misses = 0
        self._closed = False
        self.refusing: str | None = None  # set while the node drains (drain.py): no new blocks
        self._persisting = 0
        self._salts: dict[str, bytes] = {}
        # promotions run beside the NVMe tier's own I/O pool (each one fans out into chunk reads there)
        self._promoters = ThreadPoolExecutor(
            nvme.pool._max_workers if nvme else 1, thread_name_prefix="kvtier-promote"
        )
        if nvme:
            for rec in nvme.recover().values():
                self.blocks[rec.key] = Block(rec.key, rec.tenant, rec.size, rec.checksum, nvme=rec)
                self.nvme_policy.insert(rec.key)
        self._worker = threading.Thread(target=self._maintain, name="kvtier-maintain", daemon=True)
        self._worker.start()
        self._update_gauges()

    # ------------------------------------------------------------------------ tenancy & keys

    def tenant_of(self, namespace: str) -> str:
        """The key space and memory owner of a namespace's connections."""
        return "shared" if self.isolation == "shared" else namespace

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
            for size in sizes:
                got = self._allocate_dram(lease.tenant, size)
                while got is None and self.nvme and time.monotonic() < deadline:
                    self.work.notify_all()
                    self.persisted.wait(timeout=min(0.05, max(0.0, deadline - time.monotonic())))
                    got = self._allocate_dram(lease.tenant, size)
                if got is None:
                    for seg, ext in out:
                        self.dram.free(seg, ext)
                        del lease.reserved[(seg.id, ext.offset)]
                    self.metrics.alloc_failures.inc()
                    raise StoreError("arena full: no evictable blocks for this tenant (save skipped)")
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
                # The checksum is taken when the block first leaves DRAM (write-behind, a peer), off
                # the commit path; a client that sends one gets it verified now.
                sum_ = None
                if given is not None:
                    sum_ = checksum(seg.view(ext, size))
                    if given != sum_:
                        self.dram.free(seg, ext)
                        self.metrics.checksum_failures.labels("commit").inc()
                        raise StoreError("checksum does not match the bytes in the arena (torn write?)")
                ikey = self.index_key(lease.tenant, fingerprint, key)
                if ikey in self.blocks:
                    self.dram.free(seg, ext)  # already have it: keep the first copy
                    continue
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
                deadline = time.monotonic() + 60
                while any(k in self.blocks and self.blocks[k].nvme is None for k in new_keys):
                    if not self.persisted.wait(timeout=max(0.0, deadline - time.monotonic())):
                        raise StoreError("timed out persisting to the NVMe tier")
        return len(new_keys)

    def lookup(self, tenant: str, fingerprint: str, keys: list[bytes]) -> list[str]:
        """Tiers of the leading keys that hit (a prefix query: stops at the first miss)."""
        tiers = []
        with self.lock:
            for key in keys:
                block = self.blocks.get(self.index_key(tenant, fingerprint, key))
                if block is None:
                    break
                tiers.append(block.tier)
        return tiers

    def read(self, lease: Lease, fingerprint: str, keys: list[bytes]) -> list[tuple[Segment, Extent, Block]]:
        """Pin the leading blocks that hit, promoting NVMe blocks into the arena first (in parallel,
        so the device sees a deep queue).

        A block whose bytes fail their checksum on the way up is dropped and the answer ends
        before it: a miss, never wrong data.
        """
        t0 = time.perf_counter()
        pinned: list[Block] = []
        with self.lock:
            for key in keys:
                block = self.blocks.get(self.index_key(lease.tenant, fingerprint, key))
                if block is None:
                    break
                block.pins += 1
                lease.pins[block.key] += 1
                pinned.append(block)
        tiers = [b.tier for b in pinned]
        cold = [b for b in pinned if b.seg is None]
        if cold:
            assert self.nvme
            ok = list(self._promoters.map(self._promote, cold)) if len(cold) > 1 else [self._promote(cold[0])]
            bad = {id(b) for b, good in zip(cold, ok, strict=True) if not good}
            if bad:
                cut = next(i for i, b in enumerate(pinned) if id(b) in bad)
                for block in pinned[cut:]:
                    self._unpin(lease, block.key)
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
            self.hits += len(pinned)
            if len(pinned) < len(keys):
                self.misses += 1
                self.metrics.lookups.labels("miss").inc()
        self.metrics.latency.labels("read_blocks").observe(time.perf_counter() - t0)
        return [(b.seg, b.extent, b) for b in pinned]  # type: ignore[misc]

    def prefetch_local(
        self, tenant: str, fingerprint: str, keys: list[bytes], deadline: float
    ) -> dict[str, int]:
        """Bring the leading cached blocks of a chain into DRAM (promoting from NVMe) before the
        engine asks, stopping at the deadline. Returns counts, and the index keys still missing."""
        ikeys = [self.index_key(tenant, fingerprint, k) for k in keys]
        dram = promoted = 0
        late = False
        for ikey in ikeys:
            if time.monotonic() > deadline:
                late = True
                break
            with self.lock:
                block = self.blocks.get(ikey)
                if block is None:
                    break
                if block.seg:
                    dram += 1
                    continue
                block.pins += 1
            ok = self._promote(block)
            with self.lock:
                block.pins -= 1
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
        for ikey in ikeys:
            self._unpin(lease, ikey)

    def close_lease(self, lease: Lease) -> None:
        """A client went away: its pins end and its uncommitted extents return to the arena."""
        with self.lock:
            for ikey, count in lease.pins.items():
                block = self.blocks.get(ikey)
                if block:
                    block.pins = max(0, block.pins - count)
            lease.pins.clear()
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
                block.pins += 1
            if block.seg is None and not self._promote(block):
                with self.lock:
                    block.pins -= 1
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
                block.pins = max(0, block.pins - 1)

    def ingest(self, ikey: bytes, tenant: str, data: memoryview, sum_: int) -> bool:
        """A block fetched from a peer (already verified) becomes a local DRAM block."""
        with self.lock:
            if ikey in self.blocks or self.refusing:
                return False
            got = self._allocate_dram(tenant, len(data))
            if got is None:
                return False
            seg, ext = got
            seg.view(ext, len(data))[:] = data
            self.blocks[ikey] = Block(
                ikey,
                tenant,
                len(data),
                sum_,
                seg=seg,
                extent=ext,
                last_used=time.monotonic(),
                prefetched=True,
            )
            self.dram_policy.insert(ikey)
            if self.nvme:
                self.persist_queue.append(ikey)
                self.work.notify_all()
            self.metrics.peer_bytes.labels("fetched").inc(len(data))
            self._update_gauges()
            return True

    def stats(self) -> dict[str, object]:
        with self.lock:
            dram_blocks = sum(1 for b in self.blocks.values() if b.seg)
            return {
                "blocks": len(self.blocks),
                "dram": {
                    "capacityBytes": self.dram.capacity,
                    "usedBytes": self.dram.used,
                    "blocks": dram_blocks,
                },
                "nvme": {
                    "capacityBytes": self.nvme.capacity if self.nvme else 0,
                    "usedBytes": self.nvme.used if self.nvme else 0,
                    "blocks": sum(1 for b in self.blocks.values() if b.nvme),
                    "direct": bool(self.nvme and self.nvme.direct),
                },
                "hits": self.hits,
                "misses": self.misses,
                "pinned": sum(1 for b in self.blocks.values() if b.pins),
            }

    def flush(self, timeout: float = 60.0) -> None:
        """Wait until every committed block has its NVMe copy (tests, shutdown)."""
        if not self.nvme:
            return
        deadline = time.monotonic() + timeout
        with self.lock:
            while self.persist_queue or self._persisting:
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

    def _unpin(self, lease: Lease, ikey: bytes) -> None:
        with self.lock:
            if lease.pins.get(ikey, 0) <= 0:
                return
            lease.pins[ikey] -= 1
            if not lease.pins[ikey]:
                del lease.pins[ikey]
            block = self.blocks.get(ikey)
            if block:
                block.pins = max(0, block.pins - 1)

    def _allocate_dram(self, tenant: str, size: int) -> tuple[Segment, Extent] | None:
        try:
            got = self.dram.allocate(tenant, size)
        except DramFull as exc:
            raise StoreError(str(exc)) from None
        # Full: drop blocks that are safe to drop right now (already on NVMe, or no NVMe tier)
        # from this tenant's segments, then reclaim segments that other tenants left empty.
        while got is None:
            victim = self.dram_policy.victim(lambda k: self._cheap_dram_victim(k, tenant))
            if victim is None:
                victim = self.dram_policy.victim(lambda k: self._cheap_dram_victim(k, None))
                if victim is None:
                    return None
            self._drop_dram_copy(self.blocks[victim])
            got = self.dram.allocate(tenant, size)
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
        self.nvme.delete(block.nvme)
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
            got = self._allocate_dram(block.tenant, rec.length)
            if got is None:
                return False
            seg, ext = got
        t0 = time.perf_counter()
        view = seg.view(ext)
        self.nvme.read_into(rec, view)
        good = checksum(view[: rec.size]) == rec.checksum
        self.metrics.latency.labels("promote").observe(time.perf_counter() - t0)
        with self.lock:
            if block.seg:  # lost a race with another promoter: keep theirs
                self.dram.free(seg, ext)
                return True
            if not good:
                self.dram.free(seg, ext)
                self.metrics.checksum_failures.labels("nvme").inc()
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
            except Exception:  # an I/O error on one block must not stop write-behind for good
                logging.getLogger("kvtier.agent.store").exception("writing a block to NVMe failed")
                with self.lock:
                    block.pins -= 1
                    self._persisting -= 1
                    block.unpersistable = True
                    self.metrics.persist_failures.inc()
                    self.persisted.notify_all()

    def _next_job(self) -> tuple[Block, Segment, Extent] | None:
        """Under the lock: the next block to write to NVMe (pinned while it is written), after
        dropping DRAM copies that are already safe when above the high watermark."""
        while self.persist_queue:
            block = self.blocks.get(self.persist_queue.pop(0))
            if block and block.seg and block.nvme is None:
                block.pins += 1
                self._persisting += 1
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
        """Write one pinned block behind to NVMe: room under the lock, data outside it, then log."""
        assert self.nvme
        t0 = time.perf_counter()
        with self.lock:
            target = self.nvme.allocate(ext.length)
            while target is None:
                victim = self.nvme_policy.victim(
                    lambda k: k in self.blocks and self.blocks[k].nvme is not None and not self.blocks[k].pins
                )
                if victim is None:
                    break
                self._drop_nvme_copy(self.blocks[victim])
                target = self.nvme.allocate(ext.length)
        if target is not None:
            if block.checksum is None:
                block.checksum = checksum(seg.view(ext, block.size))
            self.nvme.write_at(target, seg.view(ext))
        with self.lock:
            block.pins -= 1
            self._persisting -= 1
            if target is None:
                block.unpersistable = True
                self.metrics.persist_failures.inc()
            elif self.blocks.get(block.key) is not block:
                self.nvme.abandon(target)
            else:
                block.nvme = self.nvme.log(block.key, block.tenant, target, block.size, block.checksum or 0)
                self.nvme_policy.insert(block.key)
                self.metrics.bytes_moved.labels("dram_to_nvme").inc(block.size)
                self.nvme.maybe_compact([b.nvme for b in self.blocks.values() if b.nvme])
            self.metrics.latency.labels("persist").observe(time.perf_counter() - t0)
            self._update_gauges()
            self.persisted.notify_all()

    def _update_gauges(self) -> None:
        m = self.metrics
        m.tier_bytes.labels("dram").set(self.dram.used)
        m.tier_capacity.labels("dram").set(self.dram.capacity)
        if self.nvme:
            m.tier_bytes.labels("nvme").set(self.nvme.used)
            m.tier_capacity.labels("nvme").set(self.nvme.capacity)


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


__all__ = ["Block", "Lease", "Store", "StoreError", "align_up", "checksum", "load_secret"]
