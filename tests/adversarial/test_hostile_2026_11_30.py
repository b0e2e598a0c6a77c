"""Second round of hostile tenants, listeners and disks: attacks the first round (test_hostile.py)
did not make. Each test is an attack and what the agent's other users see."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from kvtier.agent.api import protocol
from kvtier.agent.api.protocol import AgentError
from kvtier.agent.client import Client
from kvtier.agent.store.index import Store, checksum
from kvtier.agent.tiers.dram import DramTier
from kvtier.agent.tiers.manifest import Manifest
from kvtier.agent.tiers.nvme import NvmeTier
from kvtier.agent.transports import open_transport
from kvtier.bench.chaos import FP, block_of, key_of
from tests.support import agent_config, eventually, put_blocks, small_store

pytestmark = pytest.mark.adversarial
MiB = 1 << 20
BLOCK = 64 << 10


def _keys(n: int, prefix: str = "k") -> list[bytes]:
    return [key_of(prefix, i) for i in range(n)]


# ------------------------------------------------------------------------- the NVMe directory


def test_a_symlink_planted_at_the_manifests_temporary_name_is_not_written_through(tmp_path):
    """Whoever can write the tier's folder links the manifest's temporary name to a file of theirs
    choosing: the agent's (re)start writes a fresh manifest there and renames it into place."""
    victim = tmp_path / "precious.db"
    victim.write_bytes(b"customer data" * 100)
    (tmp_path / "nvme.img.tmp").symlink_to(victim)
    tier = NvmeTier(tmp_path / "nvme.img", 16 * MiB, pool="p")
    try:
        assert tier.recover() == {}
    finally:
        tier.close()
    assert victim.read_bytes() == b"customer data" * 100, "the link's target was overwritten"
    manifest = tmp_path / "nvme.img.manifest"
    assert manifest.is_file() and not manifest.is_symlink()


# ------------------------------------------------------------------- listeners on the peer port


@contextlib.contextmanager
def _transport(secret: bytes, name: str):
    store = Store(secret, DramTier("p", 8 * MiB, 4 * MiB), None)
    transport, _ = open_transport(store, secret, f"{name}-{os.getpid()}", "tcp", [], None)
    try:
        assert transport.name == "nixl", "NIXL is needed for this attack"
        yield store, transport
    finally:
        store.close()


def _serve_once(listener: socket.socket, handshake, transport) -> threading.Thread:
    """A listener that answers one connection: `handshake(conn)`, then every request with what
    `transport`'s own session authorises (real NIXL metadata of its memory)."""

    def serve() -> None:
        conn, _ = listener.accept()
        session = transport.new_session()
        with conn, contextlib.suppress(OSError, protocol.ProtocolError):
            conn.settimeout(10)
            handshake(conn)
            while True:
                msg, _ = protocol.recv(conn)
                protocol.send(conn, session.handle(msg))
        session.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_a_listener_without_the_pool_secret_cannot_serve_forged_blocks(tmp_path):
    """A process on a peer's address (a stale one, a squatted port) that does not hold the pool
    secret answers a fetch with its own NIXL memory holding bytes of its choosing, and checksums
    that match them. The fetching agent must not index them: that would be wrong KV for the
    tenant on every later read."""
    secret = os.urandom(32)
    with (
        _transport(secret, "victim") as (victim, fetcher),
        _transport(os.urandom(32), "rogue") as (rogue, liar),
    ):
        ikey = victim.index_key("team-a", FP, key_of("prompt", 0))  # what the victim will ask for
        forged = b"\x66" * BLOCK
        seg, ext = rogue.reserve_for_peer("team-a", BLOCK)
        seg.view(ext, BLOCK)[:] = forged
        assert rogue.adopt(ikey, "team-a", seg, ext, BLOCK, checksum(forged))

        def pretend(conn: socket.socket) -> None:  # it cannot check the proof, nor prove anything
            protocol.send(conn, {"nonce": os.urandom(16).hex()})
            protocol.recv(conn)
            protocol.send(conn, {"ok": True})

        listener = socket.create_server(("127.0.0.1", 0))
        with listener:
            thread = _serve_once(listener, pretend, liar)
            peer = f"127.0.0.1:{listener.getsockname()[1]}"
            try:
                landed = fetcher.fetch(peer, "team-a", [ikey], time.monotonic() + 5)
            except OSError:
                landed = []
            thread.join(timeout=10)
        assert landed == [] and ikey not in victim.blocks, "forged bytes were indexed as the tenant's KV"
        assert victim.stats()["dram"]["usedBytes"] == 0


def test_one_host_holding_half_open_handshakes_keeps_no_member_out():
    """A host on the pod network opens every slot of the peer port and never answers the handshake.
    It holds a few of them at most (the rest are refused at once), so a pool member connecting from
    another address is still served."""
    from kvtier.agent.api.server import ServerLimits
    from kvtier.agent.transports.control import HANDSHAKES_PER_SOURCE, ControlClient, ControlServer

    class Echo:
        def handle(self, msg):
            return {"ok": True, "echo": msg}

        def close(self):
            pass

    secret, slots = os.urandom(32), 8
    server = ControlServer(
        secret, "127.0.0.1", 0, Echo, limits=ServerLimits(connections_per_tenant=slots, read_timeout=30)
    )
    host, port = server.address.rsplit(":", 1)
    held: list[socket.socket] = []
    try:
        answers = []
        for _ in range(slots):
            s = socket.create_connection((host, int(port)), timeout=5, source_address=("127.0.0.2", 0))
            held.append(s)
            answers.append(protocol.recv(s)[0])
        assert sum("nonce" in a for a in answers) == HANDSHAKES_PER_SOURCE
        refused = [s for s, a in zip(held, answers, strict=True) if "nonce" not in a]
        for s in refused:  # closed by the agent: their slots are free again
            assert s.recv(1) == b""
        member = ControlClient(server.address, secret, timeout=5)
        try:
            assert member.call({"op": "hello"}, 5) == {"ok": True, "echo": {"op": "hello"}}
        finally:
            member.close()
    finally:
        for s in held:
            s.close()
        server.close()


def test_a_relay_without_the_secret_cannot_inject_requests_into_a_members_session(agent, tmp_path):
    """A listener without the secret relays a fetching agent's handshake to a real agent (so the
    real agent takes the relay for a member), then sends a request of its own on that connection:
    a fetch of a tenant's blocks, whose answer would hand it their addresses and NIXL metadata."""
    secret = os.urandom(32)
    (tmp_path / "secret").write_bytes(secret)
    cfg = agent_config(tmp_path, nvme=None, prefetch={"transport": "tcp"})
    owner = agent(cfg.model_copy(update={"secretFile": str(tmp_path / "secret")}))
    keys = _keys(4, "secret-prompt")
    with Client(owner.tenant("team-a")) as c:
        assert c.put(FP, keys, [block_of(k) for k in keys]) == 4
    # the tenant's index keys: a relay sees them in the requests it passes on; the test computes them
    store = Store(secret, DramTier("p", 4 * MiB, 4 * MiB), None)
    ikeys = [store.index_key("team-a", FP, k) for k in keys]
    store.close()
    host, port = owner.peer.rsplit(":", 1)
    upstream = socket.create_connection((host, int(port)), timeout=10)
    injected: dict = {}

    def relay(conn: socket.socket) -> None:
        hello, _ = protocol.recv(upstream)
        protocol.send(conn, hello)  # the real agent's nonce, as if it were ours
        proof, _ = protocol.recv(conn)
        protocol.send(upstream, proof)  # the fetching agent's proof, as if it were ours
        verdict, _ = protocol.recv(upstream)
        protocol.send(conn, verdict)
        request = {"op": "fetch", "tenant": "team-a", "keys": [k.hex() for k in ikeys]}
        try:
            protocol.send(upstream, request)
            injected.update(protocol.recv(upstream)[0])
        except (OSError, protocol.ProtocolError) as exc:
            injected["closed"] = str(exc) or type(exc).__name__
        conn.close()  # the fetching agent's own requests are not the point here

    with _transport(secret, "fetcher") as (_, fetcher), upstream:
        listener = socket.create_server(("127.0.0.1", 0))
        with listener:
            thread = _serve_once(listener, relay, fetcher)  # never reached past the handshake
            peer = f"127.0.0.1:{listener.getsockname()[1]}"
            with contextlib.suppress(OSError):
                fetcher.fetch(peer, "team-a", [os.urandom(24)], time.monotonic() + 3)
            thread.join(timeout=10)
    assert injected, "the relay never got to inject its request"
    assert not injected.get("blocks"), f"the agent answered a request nobody in the pool signed: {injected}"
    assert owner.proc.poll() is None
    with Client(owner.tenant("team-a")) as c:
        assert c.get(FP, keys) == [block_of(k) for k in keys]
        assert c.stats()["pinned"] == 0, "the injected fetch left pins behind"


# --------------------------------------------------------------------------------- pins


def test_a_block_on_nvme_longer_than_a_segment_is_a_miss_and_pins_nothing(agent, tmp_path):
    """Blocks written under one segment size meet an agent restarted with a smaller one (the pool's
    DRAM shrunk; or a manifest that says so): they can never be promoted. Reads and prefetches of
    them must be misses that give back every pin, not errors that keep the chain pinned for good
    (unevictable, the tenant's share filling up)."""
    cfg = agent_config(tmp_path, dram="64Mi", nvme="256Mi")
    first = agent(cfg, name="before")
    keys = _keys(3, "long")
    big = [os.urandom(6 * MiB) for _ in keys]
    with Client(first.tenant("team-a")) as c:
        assert c.put(FP, keys, big, sync=True) == 3
    first.kill()
    second = agent(cfg.model_copy(update={"segmentBytes": 4 * MiB}), name="after")
    with Client(second.tenant("team-a")) as c:
        assert c.lookup(FP, keys) == 3, "the blocks are still indexed"
        for _ in range(3):
            assert c.get(FP, keys) == []
        assert c.stats()["pinned"] == 0, "a failed read kept its pins on a live connection"
        c.call("prefetch", fingerprint=FP, keys=[k.hex() for k in keys], deadline=2)
    with Client(second.tenant("team-a")) as c:
        assert c.stats()["pinned"] == 0, "a failed prefetch kept its pin after its connection went"
        small = _keys(2, "small")
        assert c.put(FP, small, [block_of(k) for k in small]) == 2
        assert c.get(FP, small) == [block_of(k) for k in small]
    assert second.proc.poll() is None


def _relabel(manifest_path: Path, **changes) -> None:
    """Rewrite every record of a (stopped) tier's manifest with `changes`: what whoever can write
    the tier's folder can do, CRCs included."""
    log = Manifest(manifest_path)
    live = log.open()
    log.compact([dataclasses.replace(rec, **changes) for rec in live.values()])
    log.close()


@pytest.mark.parametrize(
    "changes", [{"tenant": "team-b"}, {"size": 8 * BLOCK}], ids=["another-tenant", "size-past-extent"]
)
def test_manifest_records_that_lie_are_misses_not_another_tenants_memory(tmp_path, changes):
    """A manifest rewritten with valid CRCs: team-a's blocks labelled as team-b's (their promotion
    would land in team-b's segment, and team-a's read would be handed that segment), or a size
    past the block's extent (a reader would be pointed at the bytes after it)."""
    store = small_store(tmp_path)
    lease = store.lease("team-a")
    keys = _keys(3, "relabelled")
    put_blocks(store, lease, FP, keys, size=BLOCK, sync=True)
    secret = store.secret
    store.close()
    _relabel(tmp_path / "nvme.img.manifest", **changes)
    nvme = NvmeTier(tmp_path / "nvme.img", 8 * MiB, io_threads=2, pool="p")
    store = Store(secret, DramTier("p", 8 * MiB, 4 * MiB), nvme)
    try:
        b_lease = store.lease("team-b")
        put_blocks(store, b_lease, FP, _keys(1, "b"), size=BLOCK)  # team-b owns a segment now
        got = store.read(store.lease("team-a"), FP, keys)
        assert got == [], "a lying record was served"
        assert store.lookup("team-a", FP, keys) == []
        assert store.stats()["pinned"] == 0
    finally:
        store.close()


def test_pin_handles_replayed_on_other_connections_release_nothing(agent, tmp_path):
    """A read's handles are the blocks' index keys. Another tenant, or another connection of the
    same tenant, that sends them in `release` (or asks for them as keys) must not end the pins of
    the connection that holds them, nor reach the blocks."""
    a = agent(agent_config(tmp_path, nvme=None))
    keys = _keys(4, "pinned")
    holder = Client(a.tenant("team-a"))
    holder.put(FP, keys, [block_of(k) for k in keys])
    blocks = holder.read(FP, keys)
    handles = [b.handle for b in blocks]
    with Client(a.tenant("team-b")) as other, Client(a.tenant("team-a")) as sibling:
        for hostile in (other, sibling):
            for _ in range(3):
                hostile.release(handles)
        assert other.lookup(FP, handles) == 0 and other.get(FP, keys) == []
        assert sibling.stats()["pinned"] == 4, "the holder's pins survived every replayed release"
    assert [bytes(b.view) for b in blocks] == [block_of(k) for k in keys]
    holder.close()  # its pins go with its connection
    with Client(a.tenant("team-a")) as c:
        eventually(lambda: c.stats()["pinned"] == 0, timeout=5, message="the closed connection's pins ended")


# ------------------------------------------------------------------------- the vLLM worker


@pytest.mark.torch
@pytest.mark.parametrize("retry_after", [0.0, 5.0], ids=["reconnects", "waits"])
@pytest.mark.parametrize("layerwise", [False, True], ids=["whole", "layer-wise"])
def test_an_agent_lost_between_two_loads_of_a_step_loads_no_stale_pins(
    agent, tmp_path, layerwise, retry_after
):
    """The vLLM worker on the CPU pins each load of a step in turn. The agent is killed and
    restarted after the first load's read: the second read finds the connection gone. The first
    load's pins went with that connection, and a restarted agent numbers its segments from 1
    again, so its (segment, offset) locations now name other memory. The step must go on (no
    exception into the engine) and every load it reports as done must hold the saved KV."""
    torch = pytest.importorskip("torch")
    from kvtier.agent.connectors.gpu import ArenaConnection
    from kvtier.agent.connectors.vllm.plan import Transfer
    from kvtier.agent.connectors.vllm.worker import Worker

    pages, page, block = 24, 16, 64  # 4 pages a block
    cfg = agent_config(tmp_path, dram="64Mi", nvme="256Mi")
    first = agent(cfg, name="first")
    path = first.tenant("team-a")
    g = torch.Generator().manual_seed(5)
    kv = {f"layer{i}": torch.randn(pages, 2, page, 32, generator=g) for i in range(2)}
    client = Client(path)
    worker = Worker(
        ArenaConnection(client=client, pin=False, retry_after=retry_after), "fp", page, block, layerwise
    )
    worker.register(kv, pages)
    keys = [[bytes([i, j]) * 16 for j in range(1)] for i in range(3)]  # three requests, one block each
    for i, k in enumerate(keys):
        worker.submit_saves([Transfer(f"saved{i}", k, list(range(4 * i, 4 * i + 4)))], sync=True)
    saved = {name: t[:12].clone() for name, t in kv.items()}
    first.admin("evict_dram")  # on NVMe: the restarted agent finds them there, in new segments
    restarted = []
    real_read = client.read

    def read(fingerprint, want):  # the agent dies right after the first load's read
        if restarted:
            return real_read(fingerprint, want)
        got = real_read(fingerprint, want)
        first.kill()
        restarted.append(agent(cfg, name="second"))
        return got

    client.read = read
    for t in kv.values():
        t[12:].zero_()
    loads = [Transfer(f"load{i}", k, list(range(12 + 4 * i, 16 + 4 * i))) for i, k in enumerate(keys)]
    worker.start_loads(loads)
    worker.finish_loads()
    assert "load0" in worker.failed_reqs, "the first load's pins went with the lost connection"
    assert "load1" in worker.failed_reqs
    for i in range(3):
        if f"load{i}" in worker.failed_reqs:
            continue
        for name, t in kv.items():
            assert torch.equal(t[12 + 4 * i : 16 + 4 * i], saved[name][4 * i : 4 * i + 4]), (
                f"load{i}: wrong KV"
            )
    worker.close()


@pytest.mark.torch
def test_a_save_whose_connection_changed_under_it_writes_nothing(agent, tmp_path):
    """The worker's saver thread shares the connection with the loads of the next step. A load that
    loses the connection (and connects again, retry_after 0) while a save sits between its allocate
    and its copy: the agent freed that save's extents with the old connection, and another engine of
    the namespace has since stored a block there. The save must not write over that block."""
    torch = pytest.importorskip("torch")
    from kvtier.agent.connectors.gpu import ArenaConnection
    from kvtier.agent.connectors.vllm.plan import Transfer
    from kvtier.agent.connectors.vllm.worker import Worker

    pages, page, block = 8, 16, 64
    a = agent(agent_config(tmp_path, nvme=None))
    path = a.tenant("team-a")
    g = torch.Generator().manual_seed(7)
    kv = {f"layer{i}": torch.randn(pages, 2, page, 32, generator=g) for i in range(2)}
    client = Client(path)
    conn = ArenaConnection(client=client, pin=False, retry_after=0)
    worker = Worker(conn, "fp", page, block, layerwise=False)
    paged = worker.register(kv, pages)
    other_key, other_block = b"o" * 32, os.urandom(paged.block_bytes)
    real_allocate = client.allocate
    landed: list[tuple[int, int]] = []

    def allocate(sizes, wait=0.0):
        slots = real_allocate(sizes, wait)
        conn.lost(ConnectionError("a load on the main thread lost it"))
        with Client(path) as other:  # once the agent has freed the old connection's extents

            def stored_where_the_save_was() -> bool:
                got = other.allocate([paged.block_bytes])
                if (got[0].segment, got[0].offset) != (slots[0].segment, slots[0].offset):
                    return False
                got[0].view[:] = other_block
                other.commit("fp", [other_key], got, [paged.block_bytes])
                return True

            eventually(stored_where_the_save_was, timeout=5, message="the freed extent taken again")
            landed.append((slots[0].segment, slots[0].offset))
        assert conn.get() is not None  # the loader connects again
        return slots

    client.allocate = allocate
    worker.submit_saves([Transfer("save", [b"s" * 32], list(range(4)))], sync=True)
    assert landed, "the other engine's block went where the save's extent was"
    with Client(path) as reader:
        assert reader.get("fp", [other_key]) == [other_block], "the save wrote over another block"
        assert reader.lookup("fp", [b"s" * 32]) == 0
    worker.close()


@pytest.mark.torch
def test_a_load_whose_pins_ended_mid_copy_is_recomputed(agent, tmp_path):
    """The saver thread loses the worker's connection while a layer-wise load is still copying
    (after its pins were taken, before its last layer). The agent dropped those pins with the
    connection and may hand their memory to another writer, so what the copy read is not to be
    trusted: the load's pages are reported as load errors (vLLM recomputes them) and the request's
    pages are not saved over."""
    torch = pytest.importorskip("torch")
    from kvtier.agent.connectors.gpu import ArenaConnection
    from kvtier.agent.connectors.vllm.plan import Transfer
    from kvtier.agent.connectors.vllm.worker import Worker

    pages, page, block = 8, 16, 64
    a = agent(agent_config(tmp_path, nvme=None))
    g = torch.Generator().manual_seed(11)
    kv = {f"layer{i}": torch.randn(pages, 2, page, 32, generator=g) for i in range(2)}
    conn = ArenaConnection(client=Client(a.tenant("team-a")), pin=False, retry_after=0)
    worker = Worker(conn, "fp", page, block, layerwise=True)
    worker.register(kv, pages)
    key = [b"k" * 32]
    worker.submit_saves([Transfer("saved", key, list(range(4)))], sync=True)
    worker.start_loads([Transfer("load", key, list(range(4, 8)))])
    worker.wait_layer("layer0")
    conn.lost(ConnectionError("the saver thread lost it"))  # mid-copy: layer1 not copied yet
    worker.wait_layer("layer1")
    worker.finish_loads()
    assert "load" in worker.failed_reqs
    assert worker.take_load_errors() == {4, 5, 6, 7}
    worker.submit_saves([Transfer("load", key, list(range(4, 8)))], sync=True)
    counters = worker.take_counters()
    assert (counters["loaded_blocks"], counters["failed_blocks"], counters["skipped_saves"]) == (0, 1, 1)
    worker.close()


def test_a_namespace_of_a_shared_pool_cannot_pin_the_whole_arena(agent, tmp_path):
    """In a shared pool committed blocks live in sealed segments that belong to no namespace, so
    they never counted against a namespace's share. One namespace stores blocks and keeps every
    one pinned (a read it never releases): the others must still be able to save and read."""
    cfg = agent_config(tmp_path, dram="32Mi", nvme=None, tenancy={"isolation": "shared", "dramShare": 0.5})
    a = agent(cfg)
    hostile = Client(a.tenant("hostile"))
    held, pinned = [], 0
    for i in range(40):
        k = [key_of("hog", i)]
        try:
            hostile.put(FP, k, [os.urandom(MiB)])
        except AgentError:
            break
        held.append(hostile.read(FP, k))
        pinned += sum(b.size for b in held[-1])
    assert pinned <= 16 * MiB, "a namespace pinned more than its share of the arena"
    with Client(a.tenant("victim")) as victim:
        keys = _keys(4, "victim")
        assert victim.put(FP, keys, [block_of(k) for k in keys]) == 4
        assert victim.get(FP, keys) == [block_of(k) for k in keys]
    hostile.close()
