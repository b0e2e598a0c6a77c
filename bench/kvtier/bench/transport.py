"""`kvtier bench transport`: peer fetches between two agents on two "nodes" (network namespaces on
one private bridge), against the raw TCP socket throughput between the same namespaces in the same
run (the ceiling).

Per block size: throughput of a prefetch of a whole chain (owner -> reader through NIXL READs,
checksums verified, blocks indexed), the latency of fetching one block, and the CPU seconds both
agents spent per GB moved, next to the CPU seconds per GB of the raw stream's two ends. Each repeat
is a pair: one raw stream and one fetch of the same bytes, back to back (in alternating order), and
the ratio is taken within the pair; the report gives medians over the pairs, because a shared
2-core machine's load moves both from one second to the next. The first fetch of each block size
(which also connects to the peer and registers the reader's segments) is reported on its own. Needs root for the namespaces.
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
# buffer: the kernel's TCP path between the two namespaces, with the least user-space work possible
# (4 MiB buffers, the kernel's own socket-buffer autotuning). Each reports the CPU seconds it spent
# on the stream itself (not its interpreter's start).
SINK = """
import os, socket, sys, time
s = socket.socket(); s.bind((sys.argv[1], 0)); s.listen(1)
print(s.getsockname()[1], flush=True)
c, _ = s.accept(); buf = bytearray(4 << 20); view = memoryview(buf); got = 0; t0 = None; c0 = os.times()
while True:
    n = c.recv_into(view)
    if t0 is None: t0 = time.perf_counter()
    if not n: break
    got += n
t1 = time.perf_counter(); c1 = os.times()
print(got, t1 - t0, c1.user + c1.system - c0.user - c0.system, flush=True)
"""
SOURCE = """
import os, socket, sys
total = int(sys.argv[3]); buf = memoryview(bytearray(4 << 20))
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
sent = 0; c0 = os.times()
while sent < total:
    c.sendall(buf); sent += len(buf)
c.close(); c1 = os.times()
print(c1.user + c1.system - c0.user - c0.system, flush=True)
"""


def socket_stream(nodes: Nodes, total: int) -> tuple[float, float]:
    """GB/s of one raw TCP stream of `total` bytes from node 0 to node 1, and both ends' CPU s/GB."""
    sink = subprocess.Popen(
        [*nodes.argv(1), sys.executable, "-c", SINK, nodes.addresses[1]], stdout=subprocess.PIPE, text=True
    )
    assert sink.stdout is not None
    port = sink.stdout.readline().strip()
    sent = subprocess.run(
        [*nodes.argv(0), sys.executable, "-c", SOURCE, nodes.addresses[1], port, str(total)],
        check=True,
        capture_output=True,
        text=True,
    )
    got, seconds, sink_cpu = sink.stdout.readline().split()
    sink.wait(timeout=30)
    gb = int(got) / 1e9
    return gb / float(seconds), (float(sink_cpu) + float(sent.stdout)) / gb


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
        raise RuntimeError(
            f"prefetch left {result['missing']} blocks behind: {result}\nreader log:\n"
            + "".join(reader.output)
        )
    return result


def measure(nodes: Nodes, owner: AgentProcess, reader: AgentProcess, block: int, total: int, repeats: int):
    """`repeats` pairs of (raw stream, fetch) of the same bytes, back to back, in alternating order;
    medians over the pairs."""
    n = total // block
    keys = _chain(f"b{block}", n)
    payload = os.urandom(block)
    per_put = max(1, (64 * MiB) // block)
    with Client(owner.tenant(TENANT)) as c:
        for i in range(0, n, per_put):
            part = keys[i : i + per_put]
            c.put(FP, part, [payload] * len(part))
    gb = n * block / 1e9
    reader.admin("evict_dram", timeout=60)
    t0 = time.perf_counter()
    _fetch(reader, keys)  # the first fetch from a peer also connects and registers: reported apart
    first = time.perf_counter() - t0
    pairs = []
    for i in range(repeats):
        stream = None
        if i % 2 == 0:
            stream = socket_stream(nodes, n * block)
        reader.admin("evict_dram", timeout=60)  # no NVMe tier on the reader: the blocks are gone again
        c0 = (cpu_seconds(owner.proc.pid), cpu_seconds(reader.proc.pid))
        t0 = time.perf_counter()
        _fetch(reader, keys)
        seconds = time.perf_counter() - t0
        c1 = (cpu_seconds(owner.proc.pid), cpu_seconds(reader.proc.pid))
        if stream is None:
            stream = socket_stream(nodes, n * block)
        pairs.append(
            {
                "gbps": gb / seconds,
                "socket_gbps": stream[0],
                "ratio": gb / seconds / stream[0],
                "owner_cpu": (c1[0] - c0[0]) / gb,
                "reader_cpu": (c1[1] - c0[1]) / gb,
                "socket_cpu": stream[1],
            }
        )
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

    def median(field: str) -> float:
        return round(statistics.median(p[field] for p in pairs), 3)

    return {
        "block_bytes": block,
        "blocks": n,
        "bytes": n * block,
        "pairs": len(pairs),
        "gbps": median("gbps"),
        "socket_ceiling_gbps": median("socket_gbps"),
        "ratio": median("ratio"),
        "ratios": [round(p["ratio"], 3) for p in pairs],
        "fetch_gbps_each": [round(p["gbps"], 3) for p in pairs],
        "socket_gbps_each": [round(p["socket_gbps"], 3) for p in pairs],
        "first_fetch_gbps": round(gb / first, 3),
        "latency_ms_p50_one_block": round(statistics.median(latencies) * 1e3, 2),
        "owner_cpu_s_per_gb": median("owner_cpu"),
        "reader_cpu_s_per_gb": median("reader_cpu"),
        "agents_cpu_s_per_gb": round(statistics.median(p["owner_cpu"] + p["reader_cpu"] for p in pairs), 3),
        "socket_ends_cpu_s_per_gb": median("socket_cpu"),
    }


def main(args: argparse.Namespace) -> int:
    blocks = [int(float(b) * MiB) for b in args.block_mib.split(",")]
    total = args.total_mib * MiB
    load_at_start = [round(x, 2) for x in os.getloadavg()]
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
            "tenancy": {"dramShare": 1},  # one tenant: the whole arena is its share
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
                "accelerators": "none used: host memory only (no GPU in this benchmark); RDMA as reported "
                "under transport",
                "load_average_1_5_15_min_at_start": load_at_start,
                "load_average_1_5_15_min_at_end": [round(x, 2) for x in os.getloadavg()],
            },
            "between": "two network namespaces on one veth bridge (one machine)",
            "transport": transport,
            "ceiling": "one TCP stream of the same bytes between the same namespaces (4 MiB sendall/recv_into, "
            "kernel socket-buffer autotuning); each repeat is a (stream, fetch) pair back to back in "
            "alternating order, ratio taken within the pair; medians over --repeats pairs",
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
