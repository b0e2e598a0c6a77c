"""Hostile tenants, peers and disks against real agent processes (a short run; `kvtier bench chaos`
runs the long one). Each test is an attack someone could make, and what the other tenants see."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import shutil
import signal
import socket
import struct
import subprocess
import time

import pytest

from kvtier.agent.api import protocol
from kvtier.agent.api.protocol import AgentError
from kvtier.agent.client import Client
from kvtier.agent.metrics import Metrics
from kvtier.agent.store.index import Store
from kvtier.agent.tiers.dram import DramTier, punch_hole
from kvtier.agent.tiers.nvme import DiskIO, NotOurs, NvmeTier
from kvtier.bench.chaos import (
    FP,
    POOL_THREADS,
    FuzzCounts,
    KillCounts,
    block_of,
    fuzz,
    key_of,
    kill_loop,
    settle,
    usage,
)
from tests.support import agent_config

pytestmark = pytest.mark.adversarial
MiB = 1 << 20


def _keys(n: int, prefix: str = "k") -> list[bytes]:
    return [key_of(prefix, i) for i in range(n)]


def _raw_hello(path: str) -> tuple[socket.socket, dict, list[int]]:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(5)
    sock.connect(path)
    protocol.send(sock, {"op": "hello", "id": 1})
    reply, fds = protocol.recv(sock)
    return sock, reply, fds


def _metric(agent, name: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(agent.metrics_url, timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


# ------------------------------------------------------------------------------ protocol fuzzing


def test_fuzzed_frames_on_every_socket_leave_others_served_and_nothing_leaked(agent, tmp_path):
    cfg = agent_config(
        tmp_path, limits={"descriptorsPerMessage": 4}
    )  # descriptors get in: each must be closed
    a = agent(cfg)
    good = Client(a.tenant("bystander"))
    keys = _keys(3, "bystander")
    good.put(FP, keys, [block_of(k) for k in keys])
    tenant = a.tenant("fuzz")
    baseline = usage(a.proc.pid)
    counts = FuzzCounts()
    for target in (tenant, str(a.socket_dir / "admin.sock"), f"tcp:{a.peer}"):
        fuzz(target, 250, counts)
        assert good.get(FP, keys) == [block_of(k) for k in keys], f"the bystander is served after {target}"
    assert a.proc.poll() is None
    assert counts.frames == 750 and counts.frames_with_fds > 50
    grown = settle(a.proc.pid, baseline)
    assert grown["fds"] <= 4, f"descriptors leaked: {grown}"
    assert grown["threads"] <= POOL_THREADS, f"threads leaked: {grown}"
    assert grown["rss_kib"] < 64 * 1024, f"memory grew: {grown}"
    good.close()


def test_descriptors_sent_with_bad_frames_are_all_closed(agent, tmp_path):
    a = agent(agent_config(tmp_path, limits={"descriptorsPerMessage": 4}))
    path = a.tenant("team-a")
    before = usage(a.proc.pid)["fds"]
    for i in range(300):  # the repro: a few hundred malformed frames carrying descriptors
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
            r, w = os.pipe()
            frame = struct.pack(">I", 5) + b"nope!" if i % 2 else struct.pack(">I", 100) + b"{"
            s.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("ii", r, w))])
            os.close(r)
            os.close(w)
    deadline = time.monotonic() + 10
    while usage(a.proc.pid)["fds"] > before + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert usage(a.proc.pid)["fds"] <= before + 2
    with Client(a.tenant("team-b")) as c:  # still able to make sockets and segments
        assert c.put(FP, _keys(1), [block_of(_keys(1)[0])]) == 1


def test_half_sent_frames_idle_and_excess_connections_are_bounded(agent, tmp_path):
    limits = {"connectionsPerTenant": 8, "connections": 32, "readTimeout": "1s", "idleTimeout": "2s"}
    a = agent(agent_config(tmp_path, limits=limits))
    path = a.tenant("team-a")
    baseline = usage(a.proc.pid)
    hogs = []
    for _ in range(8):  # each promises a 60 KiB request and sends 1 KB of it
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        s.connect(path)
        s.sendall(struct.pack(">I", 60 << 10) + b"x" * 1000)
        hogs.append(s)
    extra = socket.socket(socket.AF_UNIX)
    extra.settimeout(5)
    extra.connect(path)
    reply, _ = protocol.recv(extra)
    assert not reply["ok"] and "too many connections for team-a" in reply["error"]
    with Client(a.tenant("team-b")) as c:
        assert c.lookup(FP, _keys(1)) == 0, "another tenant still gets connections"
    assert usage(a.proc.pid)["rss_kib"] - baseline["rss_kib"] < 32 * 1024
    t0 = time.monotonic()
    for s in hogs:  # a request that does not complete within readTimeout ends its connection
        assert s.recv(10) == b""
    assert time.monotonic() - t0 < 4
    huge = socket.socket(socket.AF_UNIX)
    huge.settimeout(5)
    huge.connect(path)
    huge.sendall(struct.pack(">I", 16 << 20))  # before hello only 64 KiB: hung up on at once
    assert huge.recv(10) == b""
    idle = Client(path)
    time.sleep(2.5)
    with pytest.raises((OSError, protocol.ProtocolError)):
        idle.lookup(FP, _keys(1))
    grown = settle(a.proc.pid, baseline)
    assert grown["threads"] <= POOL_THREADS and grown["fds"] <= 4, grown
    assert _metric(a, "kvtier_refused_connections_total") >= 1


# -------------------------------------------------------------------------- memory handed out


def test_a_tenant_cannot_resize_its_segments_and_the_agent_survives(agent, tmp_path):
    a = agent(agent_config(tmp_path, nvme=None))
    path = a.tenant("team-a")
    with Client(path) as c:
        c.put(FP, _keys(2), [block_of(k) for k in _keys(2)])
    sock, _, fds = _raw_hello(path)
    assert fds, "the tenant got its segment"
    for fd in fds:
        for size in (0, 4096, 1 << 40):
            with pytest.raises(PermissionError):
                os.ftruncate(fd, size)  # shrinking would SIGBUS the agent; sealed
        punch_hole(fd, 4096)  # its own memory: allowed, and harmless to the agent (reads zeros)
        os.close(fd)
    sock.close()
    with Client(path) as c:
        assert c.put(FP, _keys(4, "more"), [block_of(k) for k in _keys(4, "more")]) == 4
        c.call("commit", fingerprint=FP, keys=[], extents=[], sizes=[])
    assert a.proc.poll() is None
    assert a.stats()["blocks"] == 6


def test_shared_pool_blocks_are_immutable_for_every_namespace(agent, tmp_path):
    a = agent(agent_config(tmp_path, nvme=None, tenancy={"isolation": "shared"}))
    writer, reader = Client(a.tenant("team-a")), Client(a.tenant("team-b"))
    keys = _keys(2, "system-prompt")
    data = [block_of(k) for k in keys]
    slots = writer.allocate([len(d) for d in data])
    for slot, d in zip(slots, data, strict=True):
        slot.view[: len(d)] = d
    writer.commit(FP, keys, slots, [len(d) for d in data])
    for slot in slots:  # the writer scribbles over what it committed, through its mapping
        slot.view[:] = b"\xff" * len(slot.view)
    assert reader.get(FP, keys) == data, "what the other namespace reads is what was committed"
    with reader.read(FP, keys) as blocks:
        seg = blocks[0].segment
        assert seg in reader.readonly
    sock, reply, fds = _raw_hello(a.tenant("team-c"))
    sealed = [f for f, info in zip(fds, reply["segments"], strict=True) if not info["writable"]]
    assert sealed, "committed blocks live in sealed segments"
    for fd in sealed:
        with pytest.raises(PermissionError):
            mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        with pytest.raises(OSError) as exc:
            punch_hole(fd, 4096)
        assert exc.value.errno == errno.EPERM
        with pytest.raises(OSError):
            os.pwrite(fd, b"x", 0)
        # and reopening it writable through /proc gains nothing: the seal is on the file
        reopened = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
        with pytest.raises(PermissionError):
            mmap.mmap(reopened, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        os.close(reopened)
    for fd in fds:
        os.close(fd)
    sock.close()
    assert reader.get(FP, keys) == data
    writer.close()
    reader.close()


# ------------------------------------------------------------------------------------ tenancy


def test_a_tenant_sees_its_own_stats_and_cannot_take_the_whole_arena(agent, tmp_path):
    a = agent(agent_config(tmp_path, dram="32Mi", nvme=None))  # four 8 MiB segments, share 0.5
    ca, cb = Client(a.tenant("team-a")), Client(a.tenant("team-b"))
    for i in range(40):  # far more than the arena
        keys = _keys(1, f"a{i}")
        ca.put(FP, keys, [os.urandom(MiB)])
    cb.put(FP, _keys(3, "b"), [block_of(k) for k in _keys(3, "b")])
    mine = ca.stats()
    assert mine["dram"]["capacityBytes"] == 16 * MiB, "A's share: half the arena"
    assert mine["dram"]["usedBytes"] <= 16 * MiB
    assert cb.stats()["blocks"] == 3, "B sees its own blocks, none of A's"
    assert cb.stats()["hits"] == 0
    assert a.stats()["blocks"] == mine["blocks"] + 3, "the admin socket sees the pool"
    assert cb.get(FP, _keys(3, "b")) == [block_of(k) for k in _keys(3, "b")]
    ca.close()
    cb.close()


# ------------------------------------------------------------------------------------ disks


class FailingDisk(DiskIO):
    """A disk whose reads fail: EIO, or a short read (the file or device ends early)."""

    def __init__(self) -> None:
        self.mode: str | None = None

    def read(self, fd, buf, offset):
        if self.mode == "eio":
            raise OSError(errno.EIO, "Input/output error")
        if self.mode == "short":  # the first half arrives, then the file ends
            return super().read(fd, buf[: len(buf) // 2], offset) if len(buf) > 8192 else 0
        return super().read(fd, buf, offset)


@pytest.mark.parametrize("mode", ["eio", "short"])
def test_nvme_read_errors_are_misses_and_leak_nothing(tmp_path, mode):
    disk = FailingDisk()
    nvme = NvmeTier(tmp_path / "nvme.img", 32 * MiB, io_threads=2, pool="p", io=disk)
    metrics = Metrics()
    store = Store(os.urandom(32), DramTier("p", 16 * MiB, 8 * MiB), nvme, metrics=metrics)
    from kvtier.agent.store.index import Lease

    lease = Lease(tenant="t")
    keys = _keys(3)
    got = store.allocate(lease, [BLOCK_ := 64 << 10] * 3)
    for (seg, ext), k in zip(got, keys, strict=True):
        seg.view(ext, BLOCK_)[:] = (block_of(k) * 4)[:BLOCK_]
    store.commit(lease, FP, keys, [(seg.id, ext.offset) for seg, ext in got], [BLOCK_] * 3, sync=True)
    store.evict_dram()
    used_before = store.dram.used
    disk.mode = mode
    assert store.read(lease, FP, keys) == [], "a failing read is a miss, not an exception"
    assert store.dram.used == used_before, "the extent allocated for the read went back"
    assert store.lookup("t", FP, keys) == [], "the unreadable block left the index"
    assert metrics.checksum_failures.labels("nvme_read_error")._value.get() == 3
    assert metrics.io_errors.labels("read")._value.get() == 3
    disk.mode = None
    assert store.stats()["nvme"]["usedBytes"] == 0, "the dropped blocks' NVMe extents were freed"
    store.close()


def test_truncated_nvme_file_is_a_miss_for_the_client(agent, tmp_path):
    cfg = agent_config(tmp_path, dram="16Mi", nvme="64Mi")
    a = agent(cfg)
    keys = _keys(4)
    with Client(a.tenant("team-a")) as c:
        c.put(FP, keys, [block_of(k) for k in keys], sync=True)
        a.admin("evict_dram")
        os.truncate(cfg.spec.tiers.nvme.path, 4096)  # someone cuts the file under the agent
        assert c.get(FP, keys) == []
        assert c.lookup(FP, keys) == 0
        assert c.put(FP, keys, [block_of(k) for k in keys], sync=True) == 4, "the connection still works"
        assert c.get(FP, keys) == [block_of(k) for k in keys]
    assert a.proc.poll() is None
    assert _metric(a, 'kvtier_checksum_failures_total{source="nvme_read_error"}') >= 1


def test_agent_never_overwrites_a_file_it_did_not_create(tmp_path):
    victim = tmp_path / "precious.db"
    victim.write_bytes(b"customer data" * 1000)
    with pytest.raises(NotOurs, match="allowInUse"):
        NvmeTier(victim, 16 * MiB, pool="p")
    assert victim.read_bytes() == b"customer data" * 1000
    (tmp_path / "link.img").symlink_to("/etc/passwd")
    with pytest.raises(NotOurs, match="not a regular file"):
        NvmeTier(tmp_path / "link.img", 16 * MiB, pool="p")
    ours = NvmeTier(tmp_path / "ours.img", 16 * MiB, pool="p")
    ours.close()
    with pytest.raises(NotOurs, match="belongs to the kvtier pool 'p'"):
        NvmeTier(tmp_path / "ours.img", 16 * MiB, pool="other")
    NvmeTier(tmp_path / "ours.img", 16 * MiB, pool="p").close()  # its own file: reopened
    NvmeTier(victim, 16 * MiB, pool="p", adopt=True).close()  # the pool said allowInUse
    assert not victim.read_bytes().startswith(b"customer data")


def _can_mount_tmpfs() -> bool:
    return bool(shutil.which("unshare")) and (
        subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0
    )


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unprivileged user and mount namespaces")
def test_full_disk_fails_a_sync_put_clearly_and_frees_what_it_reserved(tmp_path):
    from kvtier.dev.agents import spawn_agent

    disk = tmp_path / "disk"
    disk.mkdir()
    cfg = agent_config(
        tmp_path, dram="32Mi", nvme="64Mi", tenancy={"nvmeShare": 1}, limits={"syncTimeout": "5s"}
    )
    cfg.spec.tiers.nvme.path = str(disk / "nvme.img")
    wrapper = ["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o size=8m tmpfs {disk} && exec "$@"', "sh"]
    a = spawn_agent(cfg, tmp_path / "agent.yaml", log=tmp_path / "agent.log", argv_prefix=wrapper)
    try:
        refused = 0
        with Client(a.tenant("team-a"), timeout=30) as c:
            for i in range(24):  # 24 MiB into an 8 MiB disk
                t0 = time.monotonic()
                try:
                    c.put(FP, _keys(1, f"full{i}"), [os.urandom(MiB)], sync=True, wait=5)
                except AgentError as exc:
                    refused += 1
                    assert "could not be written to the NVMe tier" in str(exc)
                assert time.monotonic() - t0 < 10, "a sync put answers well before the client's timeout"
        assert refused >= 10
        stats = a.stats()
        assert stats["nvme"]["usedBytes"] == stats["nvme"]["blocks"] * MiB, "no tier space leaked"
        assert stats["nvme"]["blocks"] <= 8
        assert a.proc.poll() is None
        assert _metric(a, "kvtier_nvme_io_errors_total") >= 10
    finally:
        a.kill(signal.SIGTERM)
    log = (tmp_path / "agent.log").read_text()
    assert log.count("Traceback") == 0 and log.count("NVMe write failed") <= 2, "no traceback flood"


# ---------------------------------------------------------------------------------- crashes


def test_sigkill_loop_under_concurrent_writers_never_returns_wrong_bytes(agent, tmp_path):
    cfg = agent_config(tmp_path, dram="32Mi", nvme="256Mi")
    counts: KillCounts = kill_loop(lambda name="agent": agent(cfg, name=name), tmp_path, kills=3, writers=2)
    assert counts.kills == 3
    assert counts.acknowledged > 0
    assert counts.wrong_bytes == 0
    assert counts.missing == 0, "acknowledged sync puts survive a SIGKILL"
    assert counts.verified == counts.acknowledged


def test_a_rogue_peer_cannot_make_the_fetching_agent_allocate_or_crash(tmp_path):
    """The peer path's reader side: a pool member that lies in its answers gets a miss (or a
    refused fetch), and the reader's arena stays empty."""
    import threading

    from kvtier.agent.api.server import ServerLimits
    from kvtier.agent.store.index import Store
    from kvtier.agent.tiers.dram import DramTier
    from kvtier.agent.transports import open_transport
    from kvtier.agent.transports.control import accept
    from kvtier.agent.transports.nixl import PeerError

    key = os.urandom(24)
    lies = [
        {
            "ok": True,
            "agent": "x",
            "metadata": "",
            "blocks": [{"key": key.hex(), "size": 1 << 50, "checksum": 1, "addr": 4096}],
        },
        {
            "ok": True,
            "agent": "x",
            "metadata": "",
            "blocks": [{"key": "zz", "size": 10, "checksum": 1, "addr": 4096}],
        },
        {"ok": True, "agent": "x", "metadata": "", "blocks": "nope"},
        {
            "ok": True,
            "agent": "x",
            "metadata": "!!",
            "blocks": [{"key": key.hex(), "size": 4, "checksum": 1, "addr": 4096}],
        },
        {
            "ok": True,
            "agent": "x",
            "metadata": "",
            "blocks": [{"key": key.hex(), "size": 4, "checksum": 1, "addr": -1}],
        },
    ]
    server = socket.create_server(("127.0.0.1", 0))
    secret = os.urandom(32)  # the liar is a pool member: it holds the secret

    def serve() -> None:
        for lie in lies:
            conn, _ = server.accept()
            with conn:
                channel = accept(conn, secret, ServerLimits())
                assert channel is not None
                channel.open(protocol.recv(conn)[0])
                channel.send(lie)
                with contextlib.suppress(OSError, protocol.ProtocolError):
                    channel.open(protocol.recv(conn)[0])  # "done"
                    channel.send({"ok": True})

    threading.Thread(target=serve, daemon=True).start()
    peer = f"127.0.0.1:{server.getsockname()[1]}"
    store = Store(secret, DramTier("p", 32 << 20, 8 << 20), None)
    transport, _ = open_transport(store, secret, f"rogue-test-{os.getpid()}", "tcp", [], None)
    try:
        for _ in lies:
            try:
                assert transport.fetch(peer, "t", [key], time.monotonic() + 5) == [], "a lie is a miss"
            except PeerError:
                pass  # refused: also a miss for the caller
        assert store.stats()["dram"]["usedBytes"] == 0, "nothing stays reserved for a liar"
    finally:
        server.close()
        store.close()


def test_a_tenant_with_more_segments_than_one_message_can_carry_is_still_served(agent, tmp_path):
    """The kernel passes at most 253 descriptors per message: replies stay below, reads get shorter."""
    cfg = agent_config(tmp_path, dram="32Mi", nvme=None, tenancy={"dramShare": 1})
    a = agent(cfg.model_copy(update={"segmentBytes": 64 << 10}))  # 512 segments of 64 KiB
    keys = _keys(300, "many")
    data = [os.urandom(64 << 10) for _ in keys]
    with Client(a.tenant("team-a")) as c:
        for i in range(0, 300, 100):
            c.put(FP, keys[i : i + 100], data[i : i + 100])
    with Client(a.tenant("team-a")) as c:
        assert len(c.segments) == 250, "hello carries what fits"
        assert c.get(FP, keys) == data, "the rest arrive with the read that needs them"


def test_a_manifest_append_cut_short_by_a_full_disk_leaves_no_torn_record(tmp_path, monkeypatch):
    from kvtier.agent.tiers import manifest as manifest_module
    from kvtier.agent.tiers.manifest import Manifest, Record

    log = Manifest(tmp_path / "m")
    log.open()
    log.add(Record(b"a" * 24, "t", 0, 4096, 10, 1))
    real_write = os.write
    monkeypatch.setattr(manifest_module.os, "write", lambda fd, data: real_write(fd, data[:7]))
    with pytest.raises(OSError, match="cut short"):
        log.add(Record(b"b" * 24, "t", 4096, 4096, 10, 2))
    monkeypatch.setattr(manifest_module.os, "write", real_write)
    log.add(Record(b"c" * 24, "t", 8192, 4096, 10, 3))  # after the disk has room again
    log.close()
    assert sorted(Manifest(tmp_path / "m").open()) == [b"a" * 24, b"c" * 24], (
        "no record lost behind a torn one"
    )
