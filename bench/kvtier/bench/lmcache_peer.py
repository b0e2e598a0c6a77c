"""LMCache as a peer: its in-process engine (v1 API) storing a context's KV and retrieving it to the GPU.

LMCache is configured as its users configure it next to an engine: `LMCacheEngineConfig` with the
local CPU backend (pinned host memory) and the local disk backend, 256-token chunks, the last partial
chunk kept (`save_unfull_chunk`), and the vLLM paged-memory GPU connector that LMCache picks for vLLM
(`CreateGPUConnector`). The KV it moves is the same HF DynamicCache kvtier saves. Each layer's K and V
live in one [2, 1, kv_heads, L, head_dim] tensor: vLLM's flash-attention paged layout in its HND
form ("kv_layout": "HND") with one block of L tokens, and also the layout kvtier restores into, so
the retrieved K and V are used by the DynamicCache as they are (views, no copy), and the slot
mapping is 0..L-1.

A restore is LMCache's `retrieve` into that buffer + the DynamicCache over it + one decode step, the
same TTFT the file peers and kvtier report. From the CPU backend: the second of two retrieves (the
first pays for LMCache's pointer tables and kernels). From the disk backend: after the context is
removed from the CPU backend and the page cache is dropped, one cold retrieve. Besides the benchmark's
sampled bit-for-bit check, every byte retrieved is compared with the stored KV through per-layer
fingerprints taken at store time.

When LMCache cannot be imported, or its compiled CUDA ops do not load (a wheel built for another
torch falls back to slow torch paths: not a comparison worth making), the peer records why and the
benchmark runs without it.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from kvtier.bench.diskfloor import drop_page_cache, resident_bytes
from kvtier.bench.prefill import sync

PEER = "lmcache"
CHUNK_TOKENS = 256
GiB = 1 << 30
CPU_BACKEND, DISK_BACKEND = "LocalCPUBackend", "LocalDiskBackend"

_engines: dict[int, dict[str, Any]] = {}  # context length -> what the peer keeps between store and restores


def _no_telemetry() -> None:
    """LMCache reports usage to its authors' server by default; a benchmark does not (set before its
    first import, which starts the reporting)."""
    os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")


def unavailable() -> str | None:
    """Why LMCache cannot be a peer here (None: it can). Never raises."""
    _no_telemetry()
    try:
        import lmcache
    except Exception as exc:  # an install missing a dependency raises anything at import
        return f"lmcache does not import: {type(exc).__name__}: {exc}"
    if not torch.cuda.is_available():
        return "no CUDA device: LMCache's GPU connector needs one"
    try:
        import lmcache.cuda_ops  # noqa: F401  the compiled kernels; without them LMCache is on slow paths
    except Exception as exc:
        return (
            f"lmcache.cuda_ops does not load ({type(exc).__name__}: {exc}); build LMCache against this torch"
        )
    return None


def describe() -> dict[str, Any]:
    """For the report: which LMCache ran, or why none did."""
    return {"version": version(), "unavailable": unavailable()}


def version() -> str:
    try:
        import lmcache

        return str(getattr(lmcache, "__version__", "unknown"))
    except Exception:
        return "not installed"


def config_fields(kv_bytes: int, disk: Path) -> dict[str, Any]:
    """LMCacheEngineConfig fields: both local backends, each with room for the context."""
    room = round(kv_bytes * 1.1 / GiB + 1, 1)
    return {
        "chunk_size": CHUNK_TOKENS,
        "local_cpu": True,
        "max_local_cpu_size": room,
        "local_disk": f"file://{disk}/",
        "max_local_disk_size": room,
        "save_unfull_chunk": True,
    }


def layer_buffers(num_layers: int, kv_heads: int, tokens: int, head_dim: int, dtype, device) -> torch.Tensor:
    """[layer, k/v, 1 block, kv heads, tokens, head dim]: LMCache's NL x [2, NB, NH, BS, HS] (HND)."""
    return torch.empty((num_layers, 2, 1, kv_heads, tokens, head_dim), dtype=dtype, device=device)


def fingerprint(t: torch.Tensor, piece: int = 1 << 26) -> tuple[int, int]:
    """Two sums of a tensor's 16-bit words, one weighted by position: equal KV gives equal prints; a
    changed, moved or missing word changes them. In pieces, so the int64 temporaries stay small."""
    words = t.contiguous().view(torch.int16).view(-1)
    plain = weighted = 0
    for first in range(0, words.numel(), piece):
        w = words[first : first + piece].to(torch.int64)
        pos = torch.arange(first, first + w.numel(), device=t.device, dtype=torch.int64)
        plain += int(w.sum())
        weighted += int((w * (pos % 65521 + 1)).sum())
    return plain, weighted


def _host_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


def _slot_mapping(tokens: int, device) -> torch.Tensor:
    return torch.arange(tokens, dtype=torch.int64, device=device)


def _disk_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def _build_engine(
    L: int, layers: int, kv_heads: int, head_dim: int, dtype, kv_bytes: int, disk: Path, connector=None
):
    _no_telemetry()
    from lmcache.utils import EngineType
    from lmcache.v1.cache_engine import LMCacheEngineBuilder
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.gpu_connector import CreateGPUConnector
    from lmcache.v1.metadata import LMCacheMetadata

    # LMCache's own LMCACHE_* environment variables apply on top, as they do for its users
    config = LMCacheEngineConfig.from_defaults(**config_fields(kv_bytes, disk)).update_config_from_env()
    fields = {
        **{k: getattr(config, k) for k in config_fields(kv_bytes, disk)},
        "extra_config": config.extra_config,
        "use_gpu_connector_v3": config.use_gpu_connector_v3,
        "environment": {k: v for k, v in os.environ.items() if k.startswith("LMCACHE_")},
    }
    metadata = LMCacheMetadata(
        model_name="kvtier-bench",
        world_size=1,
        local_world_size=1,
        worker_id=0,
        local_worker_id=0,
        kv_dtype=dtype,
        kv_shape=(layers, 2, CHUNK_TOKENS, kv_heads, head_dim),
        chunk_size=CHUNK_TOKENS,
    )
    if connector is None:  # the one LMCache builds for vLLM
        connector = CreateGPUConnector(config, metadata, EngineType.VLLM, layout_hints={"kv_layout": "HND"})
    instance = f"kvtier-bench-{os.getpid()}-{L}"
    engine = LMCacheEngineBuilder.get_or_create(
        instance, config, metadata, connector, lambda t, src: None, lambda o, src: o
    )
    engine.post_init()
    return instance, engine, fields, type(connector).__name__


def save(cache, work: Path, disk_dir: Path, L: int, connector=None) -> list[dict[str, Any]]:
    """Store the cache's first L tokens through LMCache; one entry per backend to restore from
    (none, with the reason printed, when LMCache cannot run here or the store fails). `connector`:
    another GPU connector than the one LMCache makes for vLLM (a CPU one in tests)."""
    why = unavailable() if connector is None else None
    if why:
        print(f"peer {PEER}: {why}; skipped")
        return []
    first = cache.layers[0].keys
    _, kv_heads, _, head_dim = first.shape
    layers, dtype, device = len(cache.layers), first.dtype, first.device
    kv_bytes = sum(la.keys[:, :, :L].nbytes + la.values[:, :, :L].nbytes for la in cache.layers)
    disk = disk_dir / f"kvtier-bench-lmcache-{os.getpid()}-{L}"
    if shutil.disk_usage(disk_dir).free < kv_bytes * 1.1 + GiB:
        print(f"peer {PEER}: not enough room in {disk_dir} for {kv_bytes / 1e9:.1f} GB; skipped")
        return []
    if _host_available() < kv_bytes * 1.15 + 8 * GiB:  # its CPU backend pins that much host memory
        print(f"peer {PEER}: not enough free host memory for {kv_bytes / 1e9:.1f} GB pinned; skipped")
        return []
    state: dict[str, Any] = {"disk": disk}
    _engines[L] = state
    try:
        instance, engine, fields, connector = _build_engine(
            L, layers, kv_heads, head_dim, dtype, kv_bytes, disk, connector
        )
        state.update(instance=instance, engine=engine)
        # The engine's paged buffer: the stored KV goes in through it, the retrieved comes out into it.
        buf = layer_buffers(layers, kv_heads, L, head_dim, dtype, device)
        for i, la in enumerate(cache.layers):
            buf[i, 0, 0].copy_(la.keys[0, :, :L])
            buf[i, 1, 0].copy_(la.values[0, :, :L])
        prints = [fingerprint(buf[i]) for i in range(layers)]
        tokens = state["tokens"] = _context_tokens(L)
        slots = _slot_mapping(L, device)
        sync(device)
        t0 = time.perf_counter()
        engine.store(tokens, kvcaches=list(buf), slot_mapping=slots)
        deadline = time.monotonic() + 60 + kv_bytes / 0.2e9  # the disk backend writes behind
        cpu_s = _wait_stored(engine, tokens, CPU_BACKEND, t0, deadline)
        disk_s = _wait_stored(engine, tokens, DISK_BACKEND, t0, deadline)
        for f in _disk_files(disk):  # as the file peers: written through to the disk before timing
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        state.update(buf=buf, prints=prints, slots=slots)
    except Exception as exc:  # LMCache failing is a finding for its row, never the benchmark's end
        print(f"peer {PEER}: store failed: {type(exc).__name__}: {exc}; skipped")
        remove_all(work, disk_dir, L)
        return []
    common = {
        "peer": PEER,
        "path": disk,
        "row": {
            "lmcache": {
                "version": version(),
                "config": fields,
                "gpu_connector": connector,
                "layout": "NL x [2, 1, kv_heads, L, head_dim] (vLLM HND paged, one block)",
            }
        },
    }
    disk_bytes = sum(f.stat().st_size for f in _disk_files(disk))
    return [
        {
            **common,
            "where": "tmpfs",
            "tier": f"{PEER}:cpu",
            "file_bytes": kv_bytes,
            "save_s": round(cpu_s, 3),
        },
        {
            **common,
            "where": "disk",
            "tier": f"{PEER}:disk",
            "file_bytes": disk_bytes,
            "save_s": round(disk_s, 3),
        },
    ]


def _wait_stored(engine, tokens: torch.Tensor, backend: str, t0: float, deadline: float) -> float:
    """Seconds from t0 until `backend` holds every token (LMCache stores in the background)."""
    while (held := engine.lookup(tokens, search_range=[backend])) < len(tokens):
        if time.monotonic() > deadline:
            raise TimeoutError(f"LMCache's {backend} holds {held} of {len(tokens)} tokens")
        time.sleep(0.05)  # a lookup hashes the whole context: poll gently
    return time.perf_counter() - t0


def _context_tokens(L: int) -> torch.Tensor:
    """The token ids LMCache keys the context by (its chunk hashes); the values only need to be the
    same for store and retrieve, and distinct per length."""
    g = torch.Generator().manual_seed(L)
    return torch.randint(0, 150000, (L,), generator=g, dtype=torch.int64)


def _retrieve(state: dict[str, Any], device: torch.device) -> tuple[int, float]:
    engine, buf, tokens = state["engine"], state["buf"], state["tokens"]
    t0 = time.perf_counter()
    mask = engine.retrieve(tokens, kvcaches=list(buf), slot_mapping=state["slots"])
    sync(device)
    return int(mask.sum()), time.perf_counter() - t0


def restore(stored: dict[str, Any], model, ids: torch.Tensor, L: int, device: torch.device, check) -> dict:
    """Retrieve + DynamicCache + one decode step, timed; `check(cache, out)` -> dict, as for the file peers."""
    from kvtier.agent.connectors.hf import dynamic_cache

    state = _engines[L]
    buf = state["buf"]
    got: dict[str, Any] = {}
    if stored["where"] == "disk":
        state["engine"].clear(state["tokens"], locations=[CPU_BACKEND])
        left = state["engine"].lookup(state["tokens"], search_range=[CPU_BACKEND])
        dropped = drop_page_cache()
        files = _disk_files(state["disk"])
        got["page_cache"] = {
            "page_cache_dropped": dropped,
            "resident_bytes": sum(resident_bytes(f) or 0 for f in files),
            "cpu_backend_tokens_left": left,
        }
    else:
        buf.zero_()  # a retrieve that writes nothing cannot pass for one that worked
        got["first_retrieve_s"] = round(_retrieve(state, device)[1], 4)
    buf.zero_()
    sync(device)
    t0 = time.perf_counter()
    n, retrieve_s = _retrieve(state, device)
    cache = dynamic_cache([(buf[i, 0], buf[i, 1]) for i in range(buf.shape[0])])
    t1 = time.perf_counter()
    out = model(input_ids=ids[:, L:], past_key_values=cache, use_cache=True, logits_to_keep=1)
    sync(device)
    t2 = time.perf_counter()
    got.update(check(cache, out))
    got["retrieved_tokens"] = n
    got["kv_bitwise_equal_all"] = n == L and all(
        fingerprint(buf[i]) == p for i, p in enumerate(state["prints"])
    )
    got["kv_equal"] = got["kv_equal"] and got["kv_bitwise_equal_all"]
    got["row"] = {
        "lmcache_retrieved_tokens": n,
        "kv_bitwise_equal_all": got["kv_bitwise_equal_all"],
        **({"first_retrieve_s": got["first_retrieve_s"]} if "first_retrieve_s" in got else {}),
    }
    got["restore_s"] = t2 - t0
    got["phases"] = {"retrieve": round(retrieve_s, 6), "load": round(t1 - t0, 6), "decode": round(t2 - t1, 6)}
    del cache, out
    if stored["where"] == "disk":  # the last of its restores: give back its GPU buffer and pinned memory
        _close(state)
    return got


def _close(state: dict[str, Any]) -> None:
    """Destroy the engine (it holds the paged buffer and the pinned host memory)."""
    state.pop("buf", None)
    state.pop("engine", None)
    instance = state.pop("instance", None)
    if instance is None:
        return
    try:
        from lmcache.v1.cache_engine import LMCacheEngineBuilder

        LMCacheEngineBuilder.destroy(instance)
    except Exception as exc:
        print(f"peer {PEER}: closing the engine: {type(exc).__name__}: {exc}")


def remove_all(work: Path, disk_dir: Path, L: int) -> None:
    state = _engines.pop(L, None)
    if not state:
        return
    _close(state)
    shutil.rmtree(state["disk"], ignore_errors=True)
