"""The worker side: loads into and saves from vLLM's paged KV cache through the agent's arena.

- Loads: `start_load_kv` pins the step's blocks; with `layerwise` (the default) each layer is copied
  when the model reaches it (`wait_for_layer_load`), the next layer's DMA overlapping this layer's
  compute; otherwise every layer is loaded before the forward. Blocks that could not be pinned or
  read are reported for recompute (`get_block_ids_with_load_errors`), and a request with a failed
  load saves nothing in that step.
- Saves: `wait_for_save` hands the step's completed blocks to a saver thread and returns; the pages
  of a finished request are freed only after its saves are done (`request_finished` keeps them,
  `get_finished` releases them); a step with preemptions first waits for the saves in flight.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from dataclasses import dataclass, field

import torch

from kvtier.agent.client import CONNECTION_LOST, Client, Pinned
from kvtier.agent.connectors.gpu import ArenaConnection, Staging
from kvtier.agent.connectors.paged import LayerLoad, PagedCache
from kvtier.agent.connectors.runs import GROUP_BYTES, pages_ok
from kvtier.agent.connectors.vllm.plan import Transfer

log = logging.getLogger("kvtier.vllm")


@dataclass
class Stored:
    """A save the worker finished (or dropped): the scheduler turns these into KV events."""

    req_id: str
    first_block: int
    blocks: int  # blocks now in the pool (0: dropped)


@dataclass
class WorkerCounters:
    loaded_blocks: int = 0
    failed_blocks: int = 0
    saved_blocks: int = 0
    skipped_saves: int = 0
    loaded_bytes: int = 0
    saved_bytes: int = 0

    def take(self) -> dict[str, int]:
        out = dict(vars(self))
        for k in out:
            setattr(self, k, 0)
        return out


@dataclass
class _Loading:
    pinned: list[Pinned] = field(default_factory=list)
    loaded: list[tuple[Transfer, int, Client]] = field(default_factory=list)  # (load, blocks, connection)
    layers: LayerLoad | None = None


class Worker:
    def __init__(
        self, conn: ArenaConnection, fingerprint: str, page: int, block_tokens: int, layerwise: bool
    ) -> None:
        self.conn, self.fingerprint = conn, fingerprint
        self.page, self.block_tokens, self.layerwise = page, block_tokens, layerwise
        self.paged: PagedCache | None = None
        self.layer_index: dict[str, int] = {}
        self.failed_pages: set[int] = set()
        self.failed_reqs: set[str] = set()
        # request -> the epoch its saves must carry: a load of it failed, and saves planned before
        # the scheduler heard (asynchronous scheduling plans a step ahead) were computed over it
        self.stale: dict[str, int] = {}
        self.counters = WorkerCounters()
        self.stored: list[Stored] = []
        self._loading = _Loading()
        self._staging: Staging | None = None  # whole-block loads: two reusable device buffers
        self._lock = threading.Lock()
        self._jobs: queue.Queue = queue.Queue()
        self._in_flight: Counter[str] = Counter()
        self._finishing: set[str] = set()
        self._had_saves: set[str] = set()  # requests whose pages vLLM keeps until get_finished
        self._idle = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------- layout

    def register(self, kv_caches: dict[str, torch.Tensor], num_pages: int | None) -> PagedCache:
        """Map vLLM's caches (layers sharing one cache counted once); raises UnsupportedLayout."""
        distinct: dict[tuple, int] = {}
        tensors: list[torch.Tensor] = []
        for name, t in kv_caches.items():
            ident = (
                (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
                if isinstance(t, torch.Tensor)
                else (id(t),)
            )
            if ident not in distinct:
                distinct[ident] = len(tensors)
                tensors.append(t)
            self.layer_index[name] = distinct[ident]
        self.paged = PagedCache.of(tensors, self.page, self.block_tokens, num_pages)
        self.conn.pin = self.paged.device.type == "cuda"
        return self.paged

    # -------------------------------------------------------------------------------- loads

    def start_loads(self, loads: list[Transfer]) -> None:
        paged = self.paged
        if paged is None or not loads:
            return
        pinned: list[tuple[Transfer, int, Client, Pinned]] = []  # (load, usable, its connection, blocks)
        written: set[int] = set()  # pages this step's loads write
        for t in loads:
            kept = [p for i, p in enumerate(t.page_ids) if t.skip <= i < t.end]
            # another block size, or pages to write that are not distinct pages of this cache: a miss
            fits = len(t.page_ids) == len(t.keys) * paged.per and pages_ok(kept, paged.num_pages, written)
            got, client, blocks = self._pin(t) if fits else (0, None, None)
            if got and client is not None and blocks is not None:
                written.update(kept)
                pinned.append((t, got, client, blocks))
            else:
                self._failed(t, 0)
        # A connection lost later in the step took the earlier loads' pins with it, and the next one
        # (a restarted agent numbers its segments from 1 again) maps other memory at those locations.
        current = self.conn.client
        arena = self.conn.arena_for(current) if current is not None else None
        located: list[tuple[int, int]] = []  # (segment, offset) of each usable block, in page order
        page_ids: list[int] = []
        keep: list[bool] = []
        for t, got, client, blocks in pinned:
            if arena is None or client is not current:
                self._failed(t, 0)
                continue
            if got < len(t.keys):
                self._failed(t, got)
            located += [(b.segment, b.offset) for b in blocks[:got]]
            self._loading.loaded.append((t, got, client))
            page_ids += t.page_ids[: got * paged.per]
            keep += [t.skip <= i < t.end for i in range(got * paged.per)]
            with self._lock:
                self.counters.loaded_blocks += got
                self.counters.loaded_bytes += got * paged.block_bytes
        if not located or arena is None:
            return
        if self.layerwise:
            views = [arena.host[seg][off : off + paged.block_bytes] for seg, off in located]
            self._loading.layers = LayerLoad(paged, views, page_ids, keep)
        else:  # every layer before the forward, whole blocks (adjacent ones in one DMA)
            if self._staging is None:
                self._staging = Staging(paged.device, max(GROUP_BYTES, paged.block_bytes))
            paged.load(arena, self._staging, located, page_ids, keep)

    def _failed(self, t: Transfer, got: int) -> None:
        """Blocks of a load from `got` on are not loaded: vLLM recomputes their pages."""
        assert self.paged is not None
        self.recompute(t, t.page_ids[max(t.skip, got * self.paged.per) : t.end])
        with self._lock:
            self.counters.failed_blocks += len(t.keys) - got

    def _unloaded(self, t: Transfer, got: int) -> None:
        """Blocks copied while their pins ended (the saver thread lost the connection mid-copy, and
        the agent may have handed their memory to another writer): their pages are recomputed too."""
        assert self.paged is not None
        self.recompute(t, t.page_ids[t.skip : min(got * self.paged.per, t.end)])
        with self._lock:
            self.counters.loaded_blocks -= got
            self.counters.loaded_bytes -= got * self.paged.block_bytes
            self.counters.failed_blocks += got

    def recompute(self, t: Transfer, pages: list[int]) -> None:
        """The load `t` failed: this step saves nothing of its request, and `pages` are reported for
        recompute; until the scheduler has heard (it then plans with a later epoch), the request's
        saves were computed over them and are dropped."""
        self.failed_reqs.add(t.req_id)
        if pages:
            self.failed_pages.update(pages)
            self.stale[t.req_id] = max(self.stale.get(t.req_id, 0), t.epoch + 1)

    def _pin(self, t: Transfer) -> tuple[int, Client | None, Pinned | None]:
        """Pin the transfer's blocks: how many leading ones are usable (the rest is recomputed), the
        connection whose pins they are, and the pinned blocks."""
        client = self.conn.get()
        if client is None:
            return 0, None, None
        try:
            pinned = client.read(self.fingerprint, t.keys)
        except Exception as exc:  # a failed load becomes a recompute, never wrong KV
            log.warning("kvtier load for %s failed: %s", t.req_id, exc)
            if isinstance(exc, CONNECTION_LOST):
                self.conn.lost(exc)
            return 0, None, None
        usable = pinned.usable(self.paged.block_bytes if self.paged else 0)
        self._loading.pinned.append(pinned)
        # only the usable prefix is copied; the rest of the pins go with the others after the copy
        return usable, client, pinned

    def wait_layer(self, layer_name: str) -> None:
        if self._loading.layers is not None:
            self._loading.layers.wait(self.layer_index.get(layer_name, -1))

    def finish_loads(self) -> None:
        """Every layer in place (layers the model did not reach too), then release the pins."""
        loading, self._loading = self._loading, _Loading()
        try:
            if loading.layers is not None:
                loading.layers.finish()
            for t, got, client in loading.loaded:
                if not self.conn.holds(client):
                    self._unloaded(t, got)
        finally:
            for pinned in loading.pinned:
                try:
                    pinned.release()
                except Exception as exc:  # the agent drops a lost connection's pins itself
                    if isinstance(exc, CONNECTION_LOST):
                        self.conn.lost(exc)

    # -------------------------------------------------------------------------------- saves

    def submit_saves(self, saves: list[Transfer], sync: bool, dropped: bool = False) -> None:
        for t in saves:
            self._had_saves.add(t.req_id)
            stale = t.epoch < self.stale.get(t.req_id, 0)
            if dropped or stale or t.req_id in self.failed_reqs:  # computed over pages never loaded
                with self._lock:
                    self.stored.append(Stored(t.req_id, t.first_block, 0))
                    self.counters.skipped_saves += 1
                continue
            with self._lock:
                self._in_flight[t.req_id] += 1
            if sync:
                self._save(t)
            else:
                self._start_thread()
                self._jobs.put(t)

    def _start_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="kvtier-saver", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            t = self._jobs.get()
            if t is None:
                return
            self._save(t)

    def _save(self, t: Transfer) -> None:
        stored = 0
        try:
            stored = self._write(t)
        except Exception as exc:  # a failed save is a future miss, never an engine error
            log.warning("kvtier save for %s skipped: %s", t.req_id, exc)
            if isinstance(exc, CONNECTION_LOST):
                self.conn.lost(exc)
        with self._lock:
            self.stored.append(Stored(t.req_id, t.first_block, stored))
            if not stored:
                self.counters.skipped_saves += 1
            self._in_flight[t.req_id] -= 1
            if self._in_flight[t.req_id] <= 0:
                del self._in_flight[t.req_id]
            self._idle.notify_all()

    def _write(self, t: Transfer) -> int:
        paged, client = self.paged, self.conn.get()
        if paged is None or client is None or len(t.page_ids) != len(t.keys) * paged.per:
            return 0
        if not pages_ok(t.page_ids, paged.num_pages):  # would store other pages' KV under these keys
            log.warning("kvtier save for %s skipped: page ids outside the cache", t.req_id)
            return 0
        present = client.lookup(self.fingerprint, t.keys)
        todo = t.keys[present:]
        if todo:
            size = paged.block_bytes
            slots = client.allocate([size] * len(todo))  # wait=0: a full arena skips the save
            arena = self.conn.arena_for(client)
            if arena is None:  # a load lost the connection meanwhile: these extents are gone with it
                log.warning("kvtier save for %s skipped: the connection was lost", t.req_id)
                return 0
            paged.save(arena, [(s.segment, s.offset) for s in slots], t.page_ids[present * paged.per :])
            client.commit(self.fingerprint, todo, slots, [size] * len(todo))
            with self._lock:
                self.counters.saved_blocks += len(todo)
                self.counters.saved_bytes += len(todo) * size
        return len(t.keys)

    def drain(self, timeout: float | None = None) -> None:
        """Wait for every save in flight (preemptions, shutdown)."""
        with self._idle:
            self._idle.wait_for(lambda: not self._in_flight, timeout=timeout)

    def finished(self, finished_req_ids: set[str]) -> set[str]:
        """Finished requests whose saves are all done: vLLM may free their pages now."""
        with self._lock:
            self._finishing |= finished_req_ids & self._had_saves
            done = {r for r in self._finishing if r not in self._in_flight}
            self._finishing -= done
            self._had_saves -= done
        for req_id in finished_req_ids:
            self.stale.pop(req_id, None)
        return done

    def take_stored(self) -> list[Stored]:
        with self._lock:
            out, self.stored = self.stored, []
        return out

    def take_counters(self) -> dict[str, int]:
        with self._lock:  # the saver thread counts too
            return self.counters.take()

    def take_load_errors(self) -> set[int]:
        out, self.failed_pages = self.failed_pages, set()
        return out

    def close(self) -> None:
        self.drain(timeout=30)
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout=5)
        self.conn.close()
