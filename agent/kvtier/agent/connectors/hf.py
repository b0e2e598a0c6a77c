"""Hugging Face transformers: save a prompt's KV into the pool, restore a DynamicCache from it.

    kv = HFKVCache(Client(), KVLayout.from_hf_config(model.config, block_tokens=256))
    kv.save(token_ids, cache)                       # after a prefill
    cache, n = kv.restore(token_ids, device="cuda") # longest cached prefix, n tokens
    out = model(input_ids=ids[:, n:], past_key_values=cache, use_cache=True, logits_to_keep=1)

A block blob holds every layer's K and V for block_tokens tokens, laid out [layer, k/v, kv head,
token, head dim] (the fingerprint says so), so one block is one contiguous extent in the arena.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache  # at import, not on the first restore (importing takes seconds)
from transformers.cache_utils import DynamicLayer

from kvtier.agent.api.protocol import AgentError
from kvtier.agent.client import CONNECTION_LOST, Client, Pinned
from kvtier.agent.connectors.gpu import ArenaConnection, GpuArena, Staging, gpu_to_host, host_to_gpu
from kvtier.agent.connectors.runs import GROUP_BYTES, READ_FIRST, READ_MOST
from kvtier.agent.keys import KVLayout, block_keys

log = logging.getLogger("kvtier.hf")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def dynamic_cache(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A DynamicCache over these per-layer K and V tensors, used as they are: each layer is filled
    in place (update() would copy the whole prefix once more)."""
    cache = DynamicCache()
    for k, v in layers:
        layer = DynamicLayer()
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
        cache.layers.append(layer)
    return cache


@dataclass
class Timings:
    """Where a save or restore spent its time (host clock; GPU phases end with a synchronize)."""

    blocks: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def mark(self, phase: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[phase] = round(now - since, 6)
        return now


class HFKVCache:
    """Save and restore through the agent; an agent that cannot be reached is a miss (restore gives
    (None, 0), save stores nothing), and the next call connects again, with the new agent's arena.

    Several threads may share one (and its Client): each call works on the connection it started
    with, and a connection another thread lost or replaced meanwhile makes the call a miss (the
    agent dropped that connection's pins and extents, and may have handed the memory to another
    writer). Restores run one at a time (they share the staging buffers)."""

    def __init__(self, client: Client, layout: KVLayout, device: str | torch.device = "cuda") -> None:
        self.conn = ArenaConnection(
            client=client, timeout=client.sock.gettimeout(), pin=torch.device(device).type == "cuda"
        )
        self.layout = layout
        self.dtype = _DTYPES[layout.dtype]
        self._staging: dict[torch.device, Staging] = {}
        self._restoring = threading.Lock()
        # dropped without close(): its CUDA registrations go before the client's mappings can
        weakref.finalize(self, self.conn.release_arena)

    def close(self) -> None:
        """Unregister the arena and close the connection (the client passed in too)."""
        self.conn.close()

    @property
    def client(self) -> Client | None:
        return self.conn.client

    @property
    def arena(self) -> GpuArena:
        """The connection's arena (registered with CUDA on a GPU), synced to the last reply."""
        return self.conn.arena()

    def staging(self, device: torch.device) -> Staging:
        if device not in self._staging:
            self._staging[device] = Staging(device, max(GROUP_BYTES, self.layout.block_bytes))
        return self._staging[device]

    # ------------------------------------------------------------------------------ shapes

    def _block_view(self, staged: torch.Tensor, n: int) -> torch.Tensor:
        lay = self.layout
        return staged.view(self.dtype).view(
            n, lay.num_layers, 2, lay.num_kv_heads, lay.block_tokens, lay.head_dim
        )

    def _layer_blocks(self, tensor: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """[1, H, T, D] cache tensor -> [n, H, B, D] view of blocks first..last (no copy)."""
        B = self.layout.block_tokens
        part = tensor[0, :, first * B : last * B, :]
        return part.unflatten(1, (last - first, B)).transpose(0, 1)

    def _joint_blocks(self, kv: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """[layer, k/v, 1, H, T, D] tensor -> [n, layer, k/v, H, B, D] view of blocks first..last (no
        copy): a group of staged blocks lands in every layer with one copy (one launch per group; a
        launch per layer was launch-bound for many-layer models)."""
        B = self.layout.block_tokens
        part = kv[:, :, 0, :, first * B : last * B, :]
        return part.unflatten(3, (last - first, B)).permute(3, 0, 1, 2, 4, 5)

    # ------------------------------------------------------------------------------- save

    def save(
        self,
        token_ids: list[int],
        cache,
        extra: str | None = None,
        sync: bool = False,
        wait: float = 0.0,
        timings: Timings | None = None,
    ) -> int:
        """Save the full blocks of `token_ids` whose KV is in `cache`. Returns blocks newly stored."""
        client = self.conn.get()
        if client is None:
            return 0
        try:
            return self._save(client, token_ids, cache, extra, sync, wait, timings)
        except CONNECTION_LOST as exc:
            self.conn.lost(exc, client)
            return 0
        except AgentError as exc:  # refused (an arena full of pinned blocks, a bad request): skipped
            log.warning("kvtier save skipped: %s", exc)
            return 0

    def _save(self, client: Client, token_ids, cache, extra, sync, wait, timings) -> int:
        lay = self.layout
        t = timings or Timings()
        t0 = time.perf_counter()
        keys = block_keys(token_ids, lay.block_tokens, extra)
        layers = cache.layers
        keys = keys[: layers[0].keys.shape[2] // lay.block_tokens]
        have = client.lookup(lay.fingerprint, keys)
        todo = keys[have:]
        if not todo:
            return 0
        slots = client.allocate([lay.block_bytes] * len(todo), wait=wait)
        t0 = t.mark("allocate", t0)
        # registers segments the agent handed over just now (first touch of their pages); None once
        # another thread lost this connection: its extents went back to the agent with it
        arena = self.conn.arena_for(client)
        if arena is None:
            log.warning("kvtier save skipped: the connection was lost meanwhile")
            return 0
        t0 = t.mark("register", t0)
        device = layers[0].keys.device

        def gather(start: int, end: int) -> torch.Tensor:
            n = end - start
            staged = torch.empty(n * lay.block_bytes, dtype=torch.uint8, device=device)
            blocks = self._block_view(staged, n)
            for li, layer in enumerate(layers):
                blocks[:, li, 0].copy_(self._layer_blocks(layer.keys, have + start, have + end))
                blocks[:, li, 1].copy_(self._layer_blocks(layer.values, have + start, have + end))
            return staged

        gpu_to_host(arena, [(s.segment, s.offset) for s in slots], lay.block_bytes, gather)
        t0 = t.mark("copy", t0)
        new = client.commit(lay.fingerprint, todo, slots, [lay.block_bytes] * len(todo), sync=sync)
        t.mark("commit", t0)
        t.blocks = len(todo)
        return new

    # ---------------------------------------------------------------------------- restore

    def restore(
        self,
        token_ids: list[int],
        device: str | torch.device = "cuda",
        extra: str | None = None,
        keep_last: int = 1,
        timings: Timings | None = None,
    ):
        """A DynamicCache holding the longest cached prefix of `token_ids` (leaving at least
        `keep_last` tokens for the model to compute), and its length in tokens. (None, 0) on a miss."""
        client = self.conn.get()
        if client is None:
            return None, 0
        try:
            with self._restoring:
                return self._restore(client, token_ids, device, extra, keep_last, timings)
        except CONNECTION_LOST as exc:
            self.conn.lost(exc, client)
            return None, 0
        except AgentError as exc:  # refused: a miss, never an exception in the model's code
            log.warning("kvtier restore missed: %s", exc)
            return None, 0

    def _restore(self, client: Client, token_ids, device, extra, keep_last, timings):
        lay = self.layout
        B = lay.block_tokens
        t = timings or Timings()
        device = torch.device(device)
        staging = self.staging(device)
        blocks = max(0, len(token_ids) - max(0, keep_last)) // B  # full blocks the model may skip
        t0 = time.perf_counter()
        # Pins and copies go chunk by chunk: each chunk's keys are hashed and its blocks pinned (and
        # promoted from NVMe) while the GPU copies the chunk before, and unpinned once copied. Only
        # the first chunk's keys and pin come before the first copy.
        keys: list[bytes] = []
        on_gpu = device.type == "cuda"
        kv = None
        copying: list[tuple[torch.cuda.Event | None, Pinned]] = []  # chunks in flight, oldest first
        n, size = 0, READ_FIRST
        try:
            while n < blocks:
                end = min(blocks, n + size)
                if len(keys) < end:  # chained from the last key hashed
                    more = token_ids[len(keys) * B : end * B]
                    keys += block_keys(more, B, extra, after=keys[-1] if keys else None)
                # a shorter answer than asked (a reply carries at most so many new segments) goes on
                # from where it stopped; an empty one is the end of what the pool holds
                pinned = client.read(lay.fingerprint, keys[n:end])
                copying.append((None, pinned))
                usable = pinned.usable(lay.block_bytes)  # a block of another size ends the prefix
                if not usable:
                    break
                if kv is None:
                    t0 = t.mark("read", t0)  # the first chunk's keys and pin (+ promotion from NVMe)
                    # every layer's K and V in one allocation, [layer, k/v, 1, heads, tokens, dim], sized
                    # for the whole prompt: the forward after a shorter hit needs that room anyway
                    kv = torch.empty(
                        (lay.num_layers, 2, 1, lay.num_kv_heads, blocks * B, lay.head_dim),
                        dtype=self.dtype,
                        device=device,
                    )

                def scatter(first: int, staged: torch.Tensor, lo: int = n, dest: torch.Tensor = kv) -> None:
                    g = staged.numel() // lay.block_bytes
                    self._joint_blocks(dest, lo + first, lo + first + g).copy_(self._block_view(staged, g))

                arena = self.conn.arena_for(client)
                if arena is None:  # another thread lost this connection: checked below
                    break
                locations = [(b.segment, b.offset) for b in pinned[:usable]]
                host_to_gpu(arena, locations, lay.block_bytes, scatter, staging)
                done = torch.cuda.Event() if on_gpu else None
                if done is not None:
                    done.record(torch.cuda.current_stream(device))
                copying[-1] = (done, pinned)
                n, size = n + usable, min(READ_MOST, size * 4)
                while copying and (copying[0][0] is None or copying[0][0].query()):
                    copying.pop(0)[1].release()  # copied: the agent may evict or reuse these now
                if usable < len(pinned):
                    break
            T = n * B
            if 0 < n < blocks:  # a shorter prefix: a tensor of its own size (the big one is freed)
                kv = kv[..., :T, :].contiguous()
            # built while the GPU still copies (holds views only)
            cache = dynamic_cache([(kv[li, 0], kv[li, 1]) for li in range(lay.num_layers)]) if n else None
        finally:
            # Every copy from the arena ends before any pin goes: a released block may be reused, and
            # a release that fails is a lost agent, whose arena is unregistered and unmapped next.
            for done, _ in copying:
                if done is not None:
                    done.synchronize()
            if on_gpu and copying:
                staging.stream.synchronize()  # a chunk cut off by an error mid-copy has no event
            for _, pinned in copying:
                pinned.release()
        if n and not self.conn.holds(client):  # the pins ended before the copies did: untrusted bytes
            log.warning("kvtier restore missed: the connection was lost during the copy")
            return None, 0
        t.blocks = n
        t.mark("copy", t0)
        return cache, T
