"""The node agent as users meet it: a real `kvtier agent` process, the client library, real files."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvtier.agent.api import protocol
from kvtier.agent.api.protocol import AgentError
from kvtier.agent.client import Client
from tests.support import agent_config

pytestmark = pytest.mark.integration
FP = "model=test;dtype=bf16;layers=2;kv_heads=2;head_dim=64;block=256;tp=0/1"
MiB = 1 << 20


def chain(n: int, seed: str = "prompt") -> list[bytes]:
    keys, parent = [], b""
    for i in range(n):
        parent = hashlib.sha256(parent + f"{seed}:{i}".encode()).digest()
        keys.append(parent)
    return keys


def blobs(n: int, size: int = MiB, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(size) for _ in range(n)]


def test_put_lookup_get_roundtrip(agent):
    a = agent()
    with Client(a.tenant("team-a")) as c:
        keys, data = chain(6), blobs(6)
        assert c.put(FP, keys, data) == 6
        assert c.put(FP, keys, data) == 0, "a second put of the same blocks is deduplicated"
        assert c.lookup(FP, keys) == 6
        assert c.lookup(FP, chain(3) + chain(3, "other")) == 3, "a prefix query stops at the first miss"
        assert c.lookup(FP.replace("bf16", "fp8"), keys) == 0, "another KV layout never matches"
        assert c.get(FP, keys) == data


def test_dram_full_demotes_to_nvme_and_hits_promote_back(agent):
    a = agent(dram="16Mi", nvme="128Mi")  # two 8 MiB segments
    with Client(a.tenant("team-a")) as c:
        keys, data = chain(40), blobs(40)  # 40 MiB: more than the arena
        for i in range(0, 40, 4):
            c.put(FP, keys[i : i + 4], data[i : i + 4], wait=5)
        deadline = time.monotonic() + 10
        while a.stats()["nvme"]["blocks"] < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = a.stats()
        assert stats["dram"]["usedBytes"] <= 16 * MiB
        assert stats["nvme"]["blocks"] == 40, "every block was written behind to NVMe"
        assert c.lookup(FP, keys) == 40
        tiers = c.call("lookup", fingerprint=FP, keys=[k.hex() for k in keys])["tiers"]
        assert "nvme" in tiers and tiers.count("nvme") >= 24, "the oldest blocks now live only on NVMe"
        # reading the first blocks promotes them back into the arena, with the right bytes
        assert c.get(FP, keys[:8]) == data[:8]
        tiers = c.call("lookup", fingerprint=FP, keys=[k.hex() for k in keys[:8]])["tiers"]
        assert tiers == ["dram"] * 8


def test_flipped_byte_on_nvme_is_a_miss_never_wrong_data(agent, tmp_path):
    cfg = agent_config(tmp_path, dram="16Mi", nvme="64Mi")
    a = agent(cfg)
    keys, data = chain(4), blobs(4)
    with Client(a.tenant("team-a")) as c:
        c.put(FP, keys, data, sync=True)
    a.kill()  # restart so the blocks come back from NVMe only
    path = Path(cfg.spec.tiers.nvme.path)
    raw = bytearray(path.read_bytes()[: 8 * MiB])
    first = raw.find(data[2][:64])
    assert first >= 0
    with open(path, "r+b") as f:
        f.seek(first + 1000)
        f.write(bytes([raw[first + 1000] ^ 0xFF]))
    b = agent(cfg, name="restarted")
    with Client(b.tenant("team-a")) as c:
        got = c.get(FP, keys)
        assert got == data[:2], "the corrupt third block ends the answer: the engine recomputes from there"
        assert c.lookup(FP, keys) == 2, "the corrupt block was dropped"
    metrics = _metrics(b)
    assert 'kvtier_checksum_failures_total{source="nvme"} 1.0' in metrics


def _metrics(a) -> str:
    import urllib.request

    port = a.ready_line.split("metrics=:")[1].split()[0]
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


CRASH_WRITER = r"""
import hashlib, os, sys
from kvtier.agent.client import Client
sock, fp, log = sys.argv[1], sys.argv[2], sys.argv[3]
c = Client(sock)
with open(log, "a", buffering=1) as out:
    i = 0
    while True:
        key = hashlib.sha256(b"crash%d" % i).digest()
        data = hashlib.sha256(key).digest() * (16384 // 32)
        c.put(fp, [key], [data], sync=True, wait=5)
        out.write(f"{i}\n")  # acknowledged: the agent said it is on NVMe
        i += 1
"""


@pytest.mark.parametrize("round_", range(3))
def test_sigkill_during_commits_keeps_every_acknowledged_block(agent, tmp_path, round_):
    cfg = agent_config(tmp_path, dram="32Mi", nvme="256Mi")  # room for every block: nothing is evicted
    a = agent(cfg)
    log = tmp_path / "acked.log"
    writer = subprocess.Popen([sys.executable, "-c", CRASH_WRITER, a.tenant("team-a"), FP, str(log)])
    time.sleep(0.4 + round_ * 0.37)
    a.kill(signal.SIGKILL)
    writer.wait(timeout=20)
    acked = [int(x) for x in log.read_text().split()] if log.exists() else []
    assert acked, "the writer got some commits acknowledged before the kill"
    b = agent(cfg, name="restarted")
    with Client(b.tenant("team-a")) as c:
        for i in acked:
            key = hashlib.sha256(b"crash%d" % i).digest()
            assert c.get(FP, [key]) == [hashlib.sha256(key).digest() * (16384 // 32)], (
                f"acknowledged block {i}"
            )
        # whatever else is present was fully written: anything indexed reads back whole
        n = b.stats()["blocks"]
        assert len(acked) <= n <= len(acked) + 1
        extra = [hashlib.sha256(b"crash%d" % (max(acked) + 1)).digest()]
        assert c.get(FP, extra) in ([], [hashlib.sha256(extra[0]).digest() * (16384 // 32)])


PINNER = r"""
import sys, time
from kvtier.agent.client import Client
c = Client(sys.argv[1])
blocks = c.read(sys.argv[2], [bytes.fromhex(k) for k in sys.argv[3:]])
print(len(blocks), flush=True)
time.sleep(60)
"""


def test_a_client_that_dies_releases_its_pins(agent):
    a = agent()
    sock = a.tenant("team-a")
    keys = chain(3)
    with Client(sock) as c:
        c.put(FP, keys, blobs(3))
    pinner = subprocess.Popen(
        [sys.executable, "-c", PINNER, sock, FP, *[k.hex() for k in keys]], stdout=subprocess.PIPE, text=True
    )
    assert pinner.stdout.readline().strip() == "3"
    assert a.stats()["pinned"] == 3
    pinner.send_signal(signal.SIGKILL)
    pinner.wait()
    deadline = time.monotonic() + 5
    while a.stats()["pinned"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert a.stats()["pinned"] == 0


def test_garbage_on_the_socket_never_disturbs_other_clients(agent):
    a = agent()
    sock_path = a.tenant("team-a")
    good = Client(sock_path)
    good.put(FP, chain(1), blobs(1))

    def raw() -> socket.socket:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        s.connect(sock_path)
        return s

    s = raw()
    s.sendall(struct.pack(">I", 5) + b"nope!")  # not JSON: an error reply, connection still usable
    reply, _ = protocol.recv(s)
    assert not reply["ok"] and "JSON" in reply["error"]
    protocol.send(s, {"op": "launch-missiles"})
    assert "unknown op" in protocol.recv(s)[0]["error"]
    protocol.send(s, {"op": "commit", "keys": ["zz"], "fingerprint": FP})
    assert "hex" in protocol.recv(s)[0]["error"]
    protocol.send(s, {"op": "commit", "keys": ["00"], "extents": [[1, 0]], "sizes": [10], "fingerprint": FP})
    assert "not allocated on this connection" in protocol.recv(s)[0]["error"]
    s.close()
    s = raw()
    s.sendall(struct.pack(">I", 1 << 30))  # absurd length: the agent hangs up
    assert s.recv(10) == b""
    s = raw()
    s.sendall(struct.pack(">I", 100) + b"{")  # truncated frame, then the client vanishes
    s.close()
    s = raw()
    s.sendall(os.urandom(4096))
    s.close()
    assert good.lookup(FP, chain(1)) == 1, "the well-behaved client is unaffected"
    assert good.get(FP, chain(1)) == blobs(1)
    assert a.proc.poll() is None


def test_tenants_share_neither_blocks_nor_memory(agent):
    a = agent(dram="16Mi", nvme=None, tenancy={"dramShare": 1})  # two 8 MiB segments, no NVMe, no quota
    ca, cb = Client(a.tenant("team-a")), Client(a.tenant("team-b"))
    keys, data = chain(2), blobs(2)
    ca.put(FP, keys, data)
    assert cb.lookup(FP, keys) == 0, "same prompt, other namespace: no hit"
    assert cb.get(FP, keys) == []
    a_segment = next(iter(ca.segments))
    a_view = ca.segment_view(a_segment)
    assert bytes(a_view[:MiB]) == data[0]

    b_keys, b_data = chain(8, "b"), blobs(8, seed=1)
    cb.put(FP, b_keys, b_data)  # fills B's own segment
    assert not set(ca.segments) & set(cb.segments), "B was never handed A's segment, nor A B's"
    with pytest.raises(AgentError, match="not allocated on this connection"):
        cb.call("commit", fingerprint=FP, keys=[keys[0].hex()], extents=[[a_segment, 0]], sizes=[10])

    # B pins all its blocks and needs more room: A's blocks are evicted, A's segment is retired and
    # B gets the slot back as a fresh segment.
    with cb.read(FP, b_keys) as pinned:
        assert len(pinned) == 8
        cb.put(FP, chain(1, "b-more"), blobs(1, seed=2))
    assert ca.lookup(FP, keys) == 0
    new_segment = max(cb.segments)
    assert new_segment not in ca.segments
    b_view = cb.segment_view(new_segment)
    assert bytes(b_view[MiB:]) == bytes(7 * MiB), "the segment B took over reads as zeros"
    assert bytes(a_view[:MiB]) == bytes(MiB), "A's stale mapping of its old segment now reads zeros"
    assert bytes(a_view[MiB : 2 * MiB]) == bytes(MiB)
    del a_view, b_view
    ca.close()
    cb.close()


def test_shared_pools_hit_across_namespaces(agent):
    a = agent(nvme=None, tenancy={"isolation": "shared"})
    with Client(a.tenant("team-a")) as ca, Client(a.tenant("team-b")) as cb:
        keys, data = chain(3, "system-prompt"), blobs(3)
        ca.put(FP, keys, data)
        assert cb.lookup(FP, keys) == 3
        assert cb.get(FP, keys) == data


def test_csi_style_node_calls_are_read_only_and_repeatable(agent):
    a = agent()
    first = {op: a.admin(op) for op in ("identity", "probe", "node_info", "capacity")}
    second = {op: a.admin(op) for op in ("identity", "probe", "node_info", "capacity")}
    assert first == second, "every node call is idempotent"
    assert first["identity"]["name"] == "csi.kvtier.io"
    assert first["probe"]["ready"] is True and first["probe"]["health"] == "Healthy"
    info = first["node_info"]
    assert info["nodeId"] and info["topology"]["kubernetes.io/hostname"] == info["nodeId"]
    assert info["nvme"][0]["state"] == "file"
    if not info["gpus"]:
        assert info["gpuReason"], "no GPU is reported with a reason, not an error"
    assert first["capacity"]["dram"] == {"capacityBytes": 64 << 20, "availableBytes": 64 << 20}
    assert first["capacity"]["nvme"]["capacityBytes"] == 256 << 20


def test_unavailable_nvme_device_degrades_the_agent_with_a_reason(agent, tmp_path):
    cfg = agent_config(tmp_path, nvme=None)
    raw = cfg.model_dump(mode="json")
    raw["spec"]["tiers"]["nvme"] = {
        "size": "1Gi",
        "mode": "namespace",
        "deviceSelector": {"model": ["NoSuchDrive*"]},
    }
    a = agent(type(cfg).model_validate(raw))
    probe = a.admin("probe")
    assert probe["health"] == "Degraded" and "NVMe tier unavailable" in probe["reason"]
    with Client(a.tenant("team-a")) as c:  # DRAM still serves
        c.put(FP, chain(1), blobs(1))
        assert c.get(FP, chain(1)) == blobs(1)
