"""`kvtier bench store`: the agent's data path on the CPU, against ceilings measured in the same run.

- arena put/get through the client (allocate, copy into the mapped arena, commit; pin, copy out,
  release) for 256 KiB, 1 MiB and 4 MiB blocks, against memcpy of the same bytes;
- NVMe-tier reads (promotion into the arena through the agent) against raw O_DIRECT reads of the
  same file;
- the same blocks through a local Redis server (the remote backend many deployments use today).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from kvtier.agent.client import Client
from kvtier.dev.agents import local_agent_config, spawn_agent

MiB = 1 << 20
FP = "bench;float16;L1;H1;D1;B1;tp0/1;raw"


def _best(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def memcpy_gbps(block: int, total: int) -> float:
    src = np.random.default_rng(1).integers(0, 255, total, dtype=np.uint8)
    dst = np.empty(total, dtype=np.uint8)
    n = total // block

    def copy() -> None:
        for i in range(n):
            np.copyto(dst[i * block : (i + 1) * block], src[i * block : (i + 1) * block])

    copy()
    return total / _best(copy) / 1e9


def _row(path: str, op: str, block: int, gbps: float, ceiling: float, **extra: Any) -> dict[str, Any]:
    return {
        "path": path,
        "op": op,
        "block_bytes": block,
        "gbps": round(gbps, 2),
        "ceiling_gbps": round(ceiling, 2),
        "ratio": round(gbps / ceiling, 3),
        **extra,
    }


def bench_arena(agent, block: int, total: int, memcpy: float, batch: int = 1024) -> list[dict[str, Any]]:
    rng = np.random.default_rng(block)
    n = total // block
    data = [rng.integers(0, 255, block, dtype=np.uint8) for _ in range(min(n, 64))]
    dst = np.empty(total, dtype=np.uint8)
    rows = []
    with Client(agent.tenant("bench")) as c:
        rounds = iter(range(1_000_000))

        def put() -> None:
            r = next(rounds)
            for s in range(0, n, batch):
                keys = [f"{block}:{r}:{i}".encode() for i in range(s, min(n, s + batch))]
                c.put(FP, keys, [data[i % len(data)] for i in range(s, s + len(keys))], wait=10)

        put()  # first touch of fresh segments
        agent.admin("evict_dram", timeout=None)
        t = _best(put)
        rows.append(_row("arena", "put", block, total / t / 1e9, memcpy))
        keys = [f"{block}:final:{i}".encode() for i in range(n)]
        for s in range(0, n, batch):
            c.put(
                FP, keys[s : s + batch], [data[i % len(data)] for i in range(s, min(n, s + batch))], wait=10
            )

        def get() -> None:
            for s in range(0, n, batch):
                with c.read(FP, keys[s : s + batch]) as pinned:
                    for j, b in enumerate(pinned):
                        np.copyto(dst[(s + j) * block : (s + j + 1) * block], np.frombuffer(b.view, np.uint8))

        get()
        t = _best(get)
        rows.append(_row("arena", "get", block, total / t / 1e9, memcpy))
        assert np.array_equal(dst[:block], data[0]), "read back what was written"
        # NVMe tier: the blocks leave DRAM, then reads promote them back through the agent
        agent.admin("evict_dram", timeout=None)
        t0 = time.perf_counter()
        get()
        t_nvme = time.perf_counter() - t0
        from kvtier.bench.diskfloor import cold, read_extents, tier_extents

        nvme_file = Path(agent.config.spec.tiers.nvme.path)
        extents = tier_extents(nvme_file.with_name(nvme_file.name + ".manifest"))
        cold(nvme_file, extents)
        raw = read_extents(nvme_file, extents)
        rows.append(
            _row("nvme", "get", block, total / t_nvme / 1e9, raw / 1e9, ceiling_kind="raw O_DIRECT read")
        )
    return rows


def bench_redis(block: int, total: int, memcpy: float, work: Path) -> list[dict[str, Any]]:
    import redis

    from kvtier.dev.ports import free_port

    server = shutil.which("redis-server")
    if not server:
        return []
    port = free_port()
    proc = subprocess.Popen(
        [
            server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(work),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        r = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                r.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        n = total // block
        blob = np.random.default_rng(2).integers(0, 255, block, dtype=np.uint8).tobytes()

        def put() -> None:
            p = r.pipeline(transaction=False)
            for i in range(n):
                p.set(f"kv:{block}:{i}", blob)
                if i % 64 == 63:
                    p.execute()
            p.execute()

        def get() -> None:
            p = r.pipeline(transaction=False)
            for i in range(n):
                p.get(f"kv:{block}:{i}")
                if i % 64 == 63:
                    p.execute()
            p.execute()

        put()
        tp, tg = _best(put), _best(get)
        return [
            _row("redis", "put", block, total / tp / 1e9, memcpy, server="local redis-server, pipelined"),
            _row("redis", "get", block, total / tg / 1e9, memcpy, server="local redis-server, pipelined"),
        ]
    finally:
        proc.terminate()
        proc.wait()


def main(args: argparse.Namespace) -> int:
    total = (64 if args.quick else 256) * MiB
    blocks = [256 * 1024, MiB, 4 * MiB]
    work = Path(tempfile.mkdtemp(prefix="kvtier-bench-store-"))
    spec = {
        "tiers": {
            "dram": {"size": 4 * total},
            "nvme": {"size": 4 * total, "mode": "file", "path": str(work / "nvme.cache")},
        },
        "tenancy": {"dramShare": 1, "nvmeShare": 1},  # one tenant: the whole pool is its share
        "eviction": {"highWatermark": 1.0, "lowWatermark": 0.95},
    }
    agent = spawn_agent(
        local_agent_config(work, "bench", spec, segment_bytes=total, ioThreads=16), work / "agent.yaml"
    )
    results = []
    try:
        for block in blocks:
            memcpy = memcpy_gbps(block, total)
            results += bench_arena(agent, block, total, memcpy)
            results += bench_redis(block, total, memcpy, work)
    except Exception:
        print("".join(list(agent.output)[-40:]))
        raise
    finally:
        agent.kill()
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "command": "kvtier bench store " + " ".join(args.argv_echo),
        "date": time.strftime("%Y-%m-%d"),
        "bytes_per_measurement": total,
        "nvme_direct_io": True,
        "results": results,
    }
    print(f"{'path':>6} {'op':>4} {'block':>8} {'GB/s':>7} {'ceiling':>8} {'ratio':>6}")
    for r in results:
        print(
            f"{r['path']:>6} {r['op']:>4} {r['block_bytes'] // 1024:>6}Ki {r['gbps']:>7.2f} {r['ceiling_gbps']:>8.2f} {r['ratio']:>6.2f}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0
