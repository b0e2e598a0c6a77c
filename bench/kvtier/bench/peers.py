"""What a transformers user does without kvtier: save the DynamicCache to a file, load it back.

Two formats (`torch.save` of the DynamicCache object, and safetensors of its per-layer K and V) in
two places (tmpfs, i.e. host memory, and the disk the NVMe tier uses); and LMCache, the KV-cache
layer, from its local CPU and local disk backends (`lmcache_peer`). A restore is load to the GPU,
rebuild the cache, one decode step; its KV and logits are checked like kvtier's. Disk loads start
cold: the page cache is dropped and checked first (the write before it went through the cache).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from kvtier.bench import lmcache_peer
from kvtier.bench.diskfloor import cold

PEERS = ("torch.save", "safetensors")
TMPFS = Path("/dev/shm")


def _places(work: Path, disk_dir: Path) -> dict[str, Path]:
    tmpfs = TMPFS if TMPFS.is_dir() else work
    return {"tmpfs": tmpfs, "disk": disk_dir}


def _path(where: Path, peer: str, L: int) -> Path:
    return where / f"kvtier-bench-peer-{os.getpid()}-{L}.{'pt' if peer == 'torch.save' else 'safetensors'}"


def save_all(cache, work: Path, disk_dir: Path, L: int, lmcache: bool = True) -> list[dict[str, Any]]:
    """Write the cache in each format to each place (fsynced), and store it through LMCache; what
    `restore` needs to load it back."""
    out = []
    kv_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    for where, folder in _places(work, disk_dir).items():
        for peer in PEERS:
            path = _path(folder, peer, L)
            if shutil.disk_usage(folder).free < kv_bytes * 1.1 + (1 << 30):
                print(
                    f"peer {peer} on {where}: not enough room in {folder} for {kv_bytes / 1e9:.1f} GB; skipped"
                )
                continue
            t0 = time.perf_counter()
            try:
                _write(peer, cache, path)
            except (OSError, RuntimeError) as exc:  # a full tmpfs or disk: that peer is not measured
                print(f"peer {peer} on {where}: {exc}; skipped")
                path.unlink(missing_ok=True)
                continue
            out.append(
                {
                    "peer": peer,
                    "where": where,
                    "tier": f"{peer}:{where}",
                    "path": path,
                    "file_bytes": path.stat().st_size,
                    "save_s": round(time.perf_counter() - t0, 3),
                }
            )
    if lmcache:  # last: it pins host memory for the context, and checks that the files left room for it
        out += lmcache_peer.save(cache, work, disk_dir, L)
    return out


def _write(peer: str, cache, path: Path) -> None:
    from safetensors.torch import save_file

    if peer == "torch.save":
        with open(path, "wb") as f:
            torch.save(cache, f)
    else:
        tensors = {}
        for i, layer in enumerate(cache.layers):
            tensors[f"{i}.keys"] = layer.keys.contiguous()
            tensors[f"{i}.values"] = layer.values.contiguous()
        save_file(tensors, str(path))
        del tensors
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def load(peer: str, path: Path, device: torch.device):
    """The file back as a DynamicCache on `device`."""
    if peer == "torch.save":
        return torch.load(path, map_location=device, weights_only=False)  # a pickled DynamicCache
    from safetensors.torch import load_file

    from kvtier.agent.connectors.hf import dynamic_cache

    where = "cpu"
    if device.type == "cuda":  # safetensors wants an indexed CUDA device
        where = f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    tensors = load_file(str(path), device=where)
    return dynamic_cache([(tensors[f"{i}.keys"], tensors[f"{i}.values"]) for i in range(len(tensors) // 2)])


def restore(stored: dict[str, Any], model, ids: torch.Tensor, L: int, device: torch.device, check) -> dict:
    """Time load + one decode step (the TTFT a user of this peer sees); `check(cache, out)` -> dict."""
    if stored["peer"] == lmcache_peer.PEER:
        return lmcache_peer.restore(stored, model, ids, L, device, check)
    got: dict[str, Any] = {}
    if stored["where"] == "disk":
        got["page_cache"] = cold(stored["path"])
    t0 = time.perf_counter()
    cache = load(stored["peer"], stored["path"], device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t1 = time.perf_counter()
    out = model(input_ids=ids[:, L:], past_key_values=cache, use_cache=True, logits_to_keep=1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t2 = time.perf_counter()
    got.update(check(cache, out))
    got["restore_s"] = t2 - t0
    got["phases"] = {"load": round(t1 - t0, 6), "decode": round(t2 - t1, 6)}
    del cache, out
    return got


def remove_all(work: Path, disk_dir: Path, L: int) -> None:
    lmcache_peer.remove_all(work, disk_dir, L)
    for folder in _places(work, disk_dir).values():
        for peer in PEERS:
            _path(folder, peer, L).unlink(missing_ok=True)
