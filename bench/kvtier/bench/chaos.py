"""`kvtier bench chaos`: hostile clients, peers and disks against real agent processes.

Each attack is a function the adversarial tests call with small counts and this benchmark with
large ones, against a real `kvtier agent` process:

- `fuzz`: thousands of frames (JSON requests with random fields, random bytes, lying length
  headers, truncated frames), some with file descriptors attached, on a tenant socket, the admin
  socket and the peer port; meanwhile a well-behaved client keeps reading its blocks;
- `kill_loop`: writers put blocks with `sync=True` while the agent is SIGKILLed at random moments
  and restarted; every acknowledged block must come back bit-exact (or be reported missing, never
  wrong);
- `usage`: the agent's descriptors, threads and resident memory, read from /proc, to assert
  they stay bounded.
"""

from __future__ import annotations

import argparse
import array
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from kvtier.agent.api import protocol
from kvtier.agent.client import Client
from kvtier.dev.agents import AgentProcess, local_agent_config, spawn_agent

FP = "chaos;bf16;L2;H2;D64;B16;tp0/1"
BLOCK = 16 << 10


# ---------------------------------------------------------------------------------- observation


def usage(pid: int) -> dict[str, int]:
    """Open descriptors, threads and resident KiB of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    field_of = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": int(field_of["Threads"]),
        "rss_kib": int(field_of["VmRSS"].split()[0]),
    }


# Threads the agent may start lazily and keep (its bounded worker pools: NVMe I/O, promotions,
# prefetches): growth up to this is a warm pool, not a leak.
POOL_THREADS = 24


def settle(pid: int, baseline: dict[str, int], timeout: float = 15.0) -> dict[str, int]:
    """Usage once the agent has closed what the attack left (connections end asynchronously):
    the growth over `baseline`, after waiting up to `timeout` for descriptors and threads to return."""
    deadline = time.monotonic() + timeout
    while True:
        now = usage(pid)
        grown = {k: now[k] - baseline[k] for k in now}
        if (grown["fds"] <= 4 and grown["threads"] <= POOL_THREADS) or time.monotonic() > deadline:
            return grown
        time.sleep(0.2)


# ------------------------------------------------------------------------------------- fuzzing

OPS = [
    "hello", "ping", "stats", "lookup", "allocate", "commit", "read", "prefetch", "release",
    "ensure_tenant", "evict_dram", "identity", "probe", "capacity", "fetch", "", "x" * 300,
]  # fmt: skip
_scalar = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=16)
_json = st.recursive(
    _scalar,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
)
_hex = st.text(alphabet="0123456789abcdef", max_size=66)
_request = st.fixed_dictionaries(
    {"op": st.sampled_from(OPS)},
    optional={
        "id": _json,
        "keys": st.lists(_hex, max_size=6) | _json,
        "handles": st.lists(_hex, max_size=4) | _json,
        "sizes": st.lists(st.integers(-(2**70), 2**70), max_size=4) | _json,
        "extents": st.lists(st.lists(st.integers(-5, 2**40), max_size=3), max_size=4) | _json,
        "checksums": st.lists(st.integers(), max_size=4) | _json,
        "fingerprint": st.text(max_size=40) | _json,
        "wait": st.floats() | st.integers(-5, 100) | _json,
        "deadline": st.floats() | _json,
        "sync": st.booleans() | _json,
        "namespace": st.sampled_from(["fuzz-a", "fuzz-b", "", "..", "A" * 70, "kube-system\n"]),
        "mac": st.text(max_size=80),
    },
)
_frame = st.one_of(
    _request.map(lambda m: protocol.encode(m)),
    st.binary(max_size=256),  # anything at all
    st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=64)).map(
        lambda t: struct.pack(">I", t[0]) + t[1]
    ),
    st.tuples(_request, st.integers(1, 8)).map(lambda t: protocol.encode(t[0])[: -t[1]]),  # truncated
    st.builds(lambda d: struct.pack(">I", len(d)) + d, st.binary(max_size=128)),  # framed garbage
)


@dataclass
class FuzzCounts:
    frames: int = 0
    frames_with_fds: int = 0
    replies: int = 0
    per_socket: dict[str, int] = field(default_factory=dict)


def _connect(target: str) -> socket.socket:
    if target.startswith("tcp:"):
        host, port = target[4:].rsplit(":", 1)
        sock = socket.create_connection((host, int(port)), timeout=2)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(2)
        sock.connect(target)
    return sock


def _send_with_fds(sock: socket.socket, data: bytes, nfds: int) -> None:
    """Attach descriptors the agent never asked for (a pipe's ends, a memfd)."""
    r, w = os.pipe()
    m = os.memfd_create("chaos")
    fds = [r, w, m][:nfds]
    try:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sock.sendmsg([data or b"\0"], ancillary)
    finally:
        for fd in (r, w, m):
            os.close(fd)


def fuzz(target: str, frames: int, counts: FuzzCounts, with_fds: bool = True) -> None:
    """`frames` hypothesis-generated frames at one socket (a path, or tcp:host:port), each on a fresh
    connection, some carrying descriptors; the reply (if any) is read and dropped."""
    label = "peer" if target.startswith("tcp:") else Path(target).name

    @settings(
        max_examples=frames,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate],  # no shrinking of an attack
    )
    @given(frame=_frame, nfds=st.integers(0, 3) if with_fds else st.just(0), follow=st.booleans())
    def attack(frame: bytes, nfds: int, follow: bool) -> None:
        try:
            with _connect(target) as sock:
                sock.settimeout(2)
                if target.startswith("tcp:"):
                    protocol.recv(sock)  # the nonce
                if nfds and not target.startswith("tcp:"):
                    _send_with_fds(sock, frame, nfds)
                    counts.frames_with_fds += 1
                else:
                    sock.sendall(frame)
                if follow:  # a valid request after the junk: is the stream still sane?
                    sock.sendall(protocol.encode({"op": "ping", "id": 1}))
                sock.shutdown(socket.SHUT_WR)  # the agent answers what it can, then sees the end
                try:
                    while sock.recv(65536):
                        counts.replies += 1
                except OSError:
                    pass
        except OSError:
            pass  # refused or reset: fine, the agent decides
        counts.frames += 1
        counts.per_socket[label] = counts.per_socket.get(label, 0) + 1

    attack()


# ----------------------------------------------------------------------------------- kill loop

WRITER = r"""
import hashlib, sys
from kvtier.agent.client import Client
sock, fp, log, prefix, start, size = sys.argv[1:4] + [sys.argv[4], int(sys.argv[5]), int(sys.argv[6])]
c = Client(sock, timeout=20)
with open(log, "a", buffering=1) as out:
    i = start
    while True:
        key = hashlib.sha256(f"{prefix}:{i}".encode()).digest()
        c.put(fp, [key], [hashlib.sha256(key).digest() * (size // 32)], sync=True, wait=5)
        out.write(f"{i}\n")  # acknowledged: the agent said it is on NVMe
        i += 1
"""


def block_of(key: bytes) -> bytes:
    return hashlib.sha256(key).digest() * (BLOCK // 32)


def key_of(prefix: str, i: int) -> bytes:
    return hashlib.sha256(f"{prefix}:{i}".encode()).digest()


@dataclass
class KillCounts:
    kills: int = 0
    acknowledged: int = 0  # blocks acknowledged by the end
    verified: int = 0  # of those, read back bit-exact after the last restart
    missing: int = 0  # of those, reported missing after the last restart
    reads_checked: int = 0  # acknowledged blocks read back over all restarts
    wrong_bytes: int = 0  # reads that returned bytes other than the ones written, over all restarts


def _acked(log: Path) -> list[int]:
    return [int(x) for x in log.read_text().split()] if log.exists() else []


def kill_loop(
    start_agent, folder: Path, kills: int, writers: int = 3, counts: KillCounts | None = None, seed: int = 0
) -> KillCounts:
    """SIGKILL the agent `kills` times under `writers` concurrent writers, restarting it each time;
    after each restart every block acknowledged so far is read back and compared byte for byte."""
    counts = counts or KillCounts()
    rng = random.Random(seed)
    agent: AgentProcess = start_agent()
    for round_ in range(kills):
        socket_path = agent.tenant("chaos")
        procs = []
        for w in range(writers):
            log = folder / f"writer{w}.log"
            done = _acked(log)
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        WRITER,
                        socket_path,
                        FP,
                        str(log),
                        f"w{w}",
                        str(max(done, default=-1) + 1),
                        str(BLOCK),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE if os.environ.get("CHAOS_DEBUG") else subprocess.DEVNULL,
                )
            )
        before = sum(len(_acked(folder / f"writer{w}.log")) for w in range(writers))
        deadline = time.monotonic() + 10  # writers are running (their start-up is not the test)
        while time.monotonic() < deadline and (
            sum(len(_acked(folder / f"writer{w}.log")) for w in range(writers)) <= before
        ):
            time.sleep(0.05)
        time.sleep(rng.uniform(0.05, 0.8))  # then a kill at a random moment of the writes
        agent.kill(signal.SIGKILL)
        counts.kills += 1
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        agent = start_agent(name=f"restart{round_}")
        _verify(agent, folder, writers, counts)
    agent.kill(signal.SIGTERM)
    return counts


def _verify(agent: AgentProcess, folder: Path, writers: int, counts: KillCounts) -> None:
    """Read back every block acknowledged so far: bit-exact, or missing; never other bytes."""
    acknowledged = verified = missing = 0
    with Client(agent.tenant("chaos")) as c:
        for w in range(writers):
            for i in _acked(folder / f"writer{w}.log"):
                acknowledged += 1
                key = key_of(f"w{w}", i)
                got = c.get(FP, [key])
                if not got:
                    missing += 1
                elif got[0] != block_of(key):
                    counts.wrong_bytes += 1
                else:
                    verified += 1
    counts.acknowledged, counts.verified, counts.missing = acknowledged, verified, missing
    counts.reads_checked += acknowledged


# ------------------------------------------------------------------------------------- bench


def run(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    folder = Path(tempfile.mkdtemp(prefix="kvtier-chaos-"))
    spec = {
        "tiers": {
            "dram": {"size": "64Mi"},
            # room for every acknowledged block: a missing one would be a lost write, not an eviction
            "nvme": {"size": "2Gi", "mode": "file", "path": str(folder / "nvme.img")},
        },
        "tenancy": {"nvmeShare": 1},
        "limits": {"descriptorsPerMessage": 4},  # let descriptors in, to check each one is closed
    }
    config = local_agent_config(folder, "chaos", spec, segment_bytes=8 << 20)
    started: list[AgentProcess] = []

    def start_agent(name: str = "agent") -> AgentProcess:
        proc = spawn_agent(config, folder / f"{name}.yaml", log=folder / "agent.log")
        started.append(proc)
        return proc

    try:
        agent = start_agent()
        good = Client(agent.tenant("bystander"))
        keys = [key_of("bystander", i) for i in range(4)]
        good.put(FP, keys, [block_of(k) for k in keys])
        tenant = agent.tenant("fuzz")
        baseline = usage(agent.proc.pid)
        fuzzed = FuzzCounts()
        for target in (tenant, str(agent.socket_dir / "admin.sock"), f"tcp:{agent.peer}"):
            fuzz(target, args.frames, fuzzed)
            assert good.get(FP, keys) == [block_of(k) for k in keys], "the bystander lost its blocks"
        grown = settle(agent.proc.pid, baseline)
        alive = agent.proc.poll() is None
        good.close()
        agent.kill(signal.SIGTERM)
        killed = kill_loop(start_agent, folder, args.kills)
        result: dict[str, Any] = {
            "command": "kvtier bench chaos " + " ".join(getattr(args, "argv_echo", [])),
            "frames": fuzzed.frames,
            "frames_with_fds": fuzzed.frames_with_fds,
            "frames_per_socket": fuzzed.per_socket,
            "agent_alive_after_fuzzing": alive,
            "leaks_after_fuzzing": {
                "fds": grown["fds"],
                "threads": grown["threads"],
                "rss_kib": grown["rss_kib"],
            },
            "kills": killed.kills,
            "blocks_acknowledged": killed.acknowledged,
            "blocks_verified": killed.verified,
            "blocks_missing": killed.missing,
            "reads_checked_over_all_restarts": killed.reads_checked,
            "wrong_bytes": killed.wrong_bytes,
            "seconds": round(time.monotonic() - t0, 1),
        }
    finally:
        for proc in started:
            proc.kill(signal.SIGKILL)
        shutil.rmtree(folder, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["wrong_bytes"] == 0 and result["blocks_missing"] == 0 and alive else 1


main = run
