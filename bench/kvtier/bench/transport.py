"""`kvtier bench transport`: peer fetches between two agents on two "nodes" (network namespaces on
one private bridge), against the raw TCP socket throughput between the same namespaces in the same
run (the ceiling).

Per block size: throughput of a prefetch of a whole chain (owner -> reader through NIXL READs,
checksums verified, blocks indexed), the latency of fetching one block, and the CPU seconds both
agents spent per GB moved. Needs root for the namespaces.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kvtier.agent.client import Client
from kvtier.agent.transports.nixl import UCX_TCP_DEFAULTS
from kvtier.dev.agents import AgentProcess, local_agent_config, spawn_agent
from kvtier.dev.netns import NetnsUnavailable, Nodes, make_nodes

MiB = 1 << 20
FP = "bench;transport"
TENANT = "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# A sink that counts bytes until the sender closes, and a sender that writes `total` bytes from one
# buffer: the kernel's TCP path between the two namespaces, with the least user-space work possible.
SINK = """
import socket, sys, time
s = socket.socket(); s.bind((sys.argv[1], 0)); s.listen(1)
print(s.getsockname()[1], flush=True)
c, _ = s.accept(); buf = bytearray(4 << 20); view = memoryview(buf); got = 0; t0 = None
while True:
    n = c.recv_into(view)
    if t0 is None: t0 = time.perf_counter()
    if not n: break
    got += n
print(got, time.perf_counter() - t0, flush=True)
"""
SOURCE = """
import socket, sys
total = int(sys.argv[3]); buf = memoryview(bytearray(4 << 20))
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
sent = 0
while sent < total:
    c.sendall(buf); sent += len(buf)
c.close()
"""


def socket_gbps(nodes: Nodes, total: int) -> float:
    sink = subprocess.Popen(
        [*nodes.argv(1), sys.executable, "-c", SINK, nodes.addresses[1]], stdout=subprocess.PIPE, text=True
    )
    assert sink.stdout is not None
    port = sink.stdout.readline().strip()
    subprocess.run(
        [*nodes.argv(0), sys.executable, "-c", SOURCE, nodes.addresses[1], port, str(total)], check=True
    )
    got, seconds = sink.stdout.readline().split()
    sink.wait(timeout=30)
    return int(got) / float(seconds) / 1e9


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def _chain(prefix: str, n: int) -> list[bytes]:
    import hashlib

    return [hashlib.sha256(f"{prefix}:{i}".encode()).digest() for i in range(n)]


def _fetch(reader: AgentProcess, keys: list[bytes]) -> dict[str, Any]:
    with Client(reader.tenant(TENANT)) as c:
        result = c.call("prefetch", fingerprint=FP, keys=[k.hex() for k in keys], deadline=60)["result"]
    if result["missing"]:
        raise RuntimeError(f"prefetch left {result['missing']} blocks behind: {result}")
    return result


def measure(nodes: Nodes, owner: AgentProcess, reader: AgentProcess, block: int, total: int, repeats: int):
    """Best of `repeats` for the fetch and for the socket ceiling, taken in turns so that both see
    the same machine (a shared machine's load moves both)."""
    n = total // block
    keys = _chain(f"b{block}", n)
    payload = os.urandom(block)
    per_put = max(1, (64 * MiB) // block)
    with Client(owner.tenant(TENANT)) as c:
        for i in range(0, n, per_put):
            part = keys[i : i + per_put]
            c.put(FP, part, [payload] * len(part))
    best, cpu, ceiling = float("inf"), (0.0, 0.0), 0.0
    for _ in range(repeats):
        ceiling = max(ceiling, socket_gbps(nodes, total))
        reader.admin("evict_dram", timeout=60)  # no NVMe tier on the reader: the blocks are gone again
        c0 = (cpu_seconds(owner.proc.pid), cpu_seconds(reader.proc.pid))
        t0 = time.perf_counter()
        _fetch(reader, keys)
        seconds = time.perf_counter() - t0
        c1 = (cpu_seconds(owner.proc.pid), cpu_seconds(reader.proc.pid))
        if seconds < best:
            best, cpu = seconds, (c1[0] - c0[0], c1[1] - c0[1])
    with Client(reader.tenant(TENANT)) as c:
        sample = c.get(FP, keys[:1])[0]
        if sample != payload:
            raise RuntimeError("a fetched block differs from the owner's")
    latencies = []
    for key in keys[: min(n, 20)]:
        reader.admin("evict_dram", timeout=60)
        t0 = time.perf_counter()
        _fetch(reader, [key])
        latencies.append(time.perf_counter() - t0)
    reader.admin("evict_dram", timeout=60)
    gb = n * block / 1e9
    return {
        "block_bytes": block,
        "blocks": n,
        "bytes": n * block,
        "gbps": round(gb / best, 3),
        "socket_ceiling_gbps": round(ceiling, 3),
        "ratio": round(gb / best / ceiling, 3),
        "fetch_seconds": round(best, 4),
        "latency_ms_p50_one_block": round(statistics.median(latencies) * 1e3, 2),
        "owner_cpu_s_per_gb": round(cpu[0] / gb, 3),
        "reader_cpu_s_per_gb": round(cpu[1] / gb, 3),
    }


def main(args: argparse.Namespace) -> int:
    blocks = [int(float(b) * MiB) for b in args.block_mib.split(",")]
    total = args.total_mib * MiB
    try:
        nodes = make_nodes(2)
    except NetnsUnavailable as exc:
        print(f"kvtier bench transport: {exc}", file=sys.stderr)
        return 2
    folder = Path(tempfile.mkdtemp(prefix="kvtier-bench-transport-"))
    started: list[AgentProcess] = []
    try:
        secret = folder / "secret"
        secret.write_bytes(os.urandom(32))
        spec = {
            "tiers": {"dram": {"size": f"{args.total_mib + 64}Mi"}},
            "prefetch": {"transport": args.transport},
        }

        def agent(index: int, peers: list[str]) -> AgentProcess:
            cfg = local_agent_config(
                folder / f"node{index}",
                "bench",
                spec,
                segment_bytes=64 * MiB,
                secretFile=str(secret),
                peerHost=nodes.addresses[index],
                peers=peers,
                nodeName=f"node{index}",
            )
            proc = spawn_agent(cfg, folder / f"node{index}.yaml", argv_prefix=nodes.argv(index))
            started.append(proc)
            return proc

        owner = agent(0, [])
        reader = agent(1, [owner.peer])
        transport = reader.stats()["transport"]
        rows = []
        for block in blocks:
            row = measure(nodes, owner, reader, block, total, args.repeats)
            rows.append(row)
            print(json.dumps(row), flush=True)
        report = {
            "command": "kvtier bench transport " + " ".join(getattr(args, "argv_echo", [])),
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "load_average_1_5_15_min_at_end": [round(x, 2) for x in os.getloadavg()],
            },
            "between": "two network namespaces on one veth bridge (one machine)",
            "transport": transport,
            "ceiling": "one TCP stream between the same namespaces (4 MiB sendall/recv_into), measured in "
            "turns with the fetches; best of --repeats each",
            "ucx_defaults": UCX_TCP_DEFAULTS,
            "rows": rows,
        }
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    finally:
        for proc in started:
            proc.kill()
        nodes.close()
    return 0
