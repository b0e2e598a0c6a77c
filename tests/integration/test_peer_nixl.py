"""Agents on separate "nodes" (network namespaces made by the test, one private bridge between them)
move blocks by NIXL READs over UCX's TCP transport: exact bytes, pool membership, tenancy, a killed
peer costing a miss instead of a hang, and the prefetch sidecar's hints driving it all."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from kvtier.agent.client import Client
from kvtier.dev.agents import AgentProcess, spawn_agent
from kvtier.dev.netns import NetnsUnavailable, make_nodes
from tests.integration.test_agent import FP, blobs, chain
from tests.integration.test_prefetch import _post
from tests.support import agent_config, eventually

pytestmark = pytest.mark.integration
MiB = 1 << 20


@pytest.fixture
def nodes():
    made = []

    def make(count: int):
        try:
            made.append(make_nodes(count))
        except NetnsUnavailable as exc:
            pytest.skip(f"cannot make network namespaces here: {exc}")
        return made[-1]

    yield make
    for n in made:
        n.close()


@pytest.fixture
def node_agent(tmp_path: Path):
    """Start `kvtier agent` inside node `index` of `nodes`, listening on that node's address."""
    started: list[AgentProcess] = []

    def start(nodes, index: int, secret: Path, peers=(), dram: str = "64Mi", **spec) -> AgentProcess:
        folder = tmp_path / f"node{index}"
        cfg = agent_config(folder, dram=dram, nvme=None, **spec).model_copy(
            update={
                "secretFile": str(secret),
                "peerHost": nodes.addresses[index],
                "peers": [p.peer for p in peers],
                "nodeName": f"node{index}",
            }
        )
        proc = spawn_agent(cfg, folder / "agent.yaml", argv_prefix=nodes.argv(index))
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill(signal.SIGTERM)


def _secret(tmp_path: Path, name: str = "pool-secret") -> Path:
    path = tmp_path / name
    path.write_bytes(os.urandom(32))
    return path


def _prefetch(agent: AgentProcess, namespace: str, keys: list[bytes], deadline: float = 20) -> dict:
    with Client(agent.tenant(namespace)) as c:
        return c.call("prefetch", fingerprint=FP, keys=[k.hex() for k in keys], deadline=deadline)["result"]


def test_two_nodes_fetch_exact_bytes_over_nixl_and_strangers_get_nothing(nodes, node_agent, tmp_path):
    net = nodes(3)
    secret = _secret(tmp_path)
    a = node_agent(net, 0, secret)
    b = node_agent(net, 1, secret, peers=[a])
    stranger = node_agent(net, 2, _secret(tmp_path, "another-secret"), peers=[a])
    keys, data = chain(8), blobs(8)
    with Client(a.tenant("team-a")) as on_a:
        assert on_a.put(FP, keys, data) == 8

    transport = b.stats()["transport"]
    assert transport["library"].startswith("nixl ") and transport["ucxTransports"] == "tcp"
    assert transport["rdma"] is False and "no RDMA" in transport["reason"] + transport.get("rdmaReason", "")

    result = _prefetch(b, "team-a", keys)
    assert result["fetched"] == 8 and result["missing"] == 0 and result["fetchedBytes"] == 8 * MiB
    with Client(b.tenant("team-a")) as on_b:
        tiers = on_b.call("lookup", fingerprint=FP, keys=[k.hex() for k in keys])["tiers"]
        assert tiers == ["dram"] * 8, "the blocks now live in node 1's own arena"
        assert on_b.get(FP, keys) == data, "byte for byte what node 0 holds"
    assert a.stats()["pinned"] == 0, "the owner released its pins once the reader was done"

    # another tenant on node 1 asks for the same chain: its keys are salted differently, nothing moves
    assert _prefetch(b, "team-b", keys)["fetched"] == 0
    # an agent without the pool secret is refused before anything is pinned or read
    refused = _prefetch(stranger, "team-a", keys)
    assert refused["fetched"] == 0 and refused["missing"] == 8
    with Client(stranger.tenant("team-a")) as c:
        assert c.lookup(FP, keys) == 0


def test_three_nodes_assemble_one_chain_from_two_owners(nodes, node_agent, tmp_path):
    net = nodes(3)
    secret = _secret(tmp_path)
    a, c = node_agent(net, 0, secret), node_agent(net, 2, secret)
    b = node_agent(net, 1, secret, peers=[a, c])
    keys, data = chain(12), blobs(12, size=2 * MiB)
    with Client(a.tenant("team-a")) as on_a:
        on_a.put(FP, keys[:5], data[:5])  # node 0 has the first five blocks
    with Client(c.tenant("team-a")) as on_c:
        on_c.put(FP, keys, data)  # node 2 has all twelve
    result = _prefetch(b, "team-a", keys)
    assert result["fetched"] == 12 and result["missing"] == 0
    with Client(b.tenant("team-a")) as on_b:
        assert on_b.get(FP, keys) == data


def _slow_pair(nodes, node_agent, tmp_path: Path, blocks: int, rate: str):
    """Owner (node 0) holding `blocks` MiB blocks behind a link slowed to `rate`, and a reader."""
    net = nodes(2)
    secret = _secret(tmp_path)
    a = node_agent(net, 0, secret, dram="256Mi")
    b = node_agent(net, 1, secret, peers=[a], dram="256Mi")
    keys, data = chain(blocks), blobs(blocks)
    with Client(a.tenant("team-a")) as on_a:
        for i in range(0, blocks, 16):
            on_a.put(FP, keys[i : i + 16], data[i : i + 16])
    net.limit_rate(0, rate)
    return a, b, keys, data


def test_owner_killed_mid_transfer_is_a_miss_not_a_hang(nodes, node_agent, tmp_path):
    a, b, keys, data = _slow_pair(nodes, node_agent, tmp_path, 96, "200mbit")  # ~4 s to leave node 0

    outcome: dict = {}

    def fetch() -> None:
        t0 = time.monotonic()
        outcome["result"] = _prefetch(b, "team-a", keys, deadline=30)
        outcome["seconds"] = time.monotonic() - t0

    worker = threading.Thread(target=fetch)
    worker.start()
    eventually(lambda: a.stats()["pinned"] > 0, timeout=10, message="node 0 answering the READ")
    time.sleep(0.5)
    a.kill(signal.SIGKILL)
    worker.join(timeout=30)
    assert not worker.is_alive(), "the fetch hung on a dead peer"
    result = outcome["result"]
    assert result["fetched"] < 96 and result["missing"] == 96 - result["fetched"]
    assert outcome["seconds"] < 25, "a dead peer is noticed long before the deadline"
    with Client(b.tenant("team-a")) as on_b:
        hits = on_b.lookup(FP, keys)
        assert hits == result["fetched"], "only whole, verified blocks were indexed"
        if hits:
            assert on_b.get(FP, keys[:hits]) == data[:hits]


def test_reader_killed_mid_transfer_releases_the_owners_pins(nodes, node_agent, tmp_path):
    a, b, keys, data = _slow_pair(nodes, node_agent, tmp_path, 64, "100mbit")
    worker = threading.Thread(target=lambda: _safe_prefetch(b, keys), daemon=True)
    worker.start()
    eventually(lambda: a.stats()["pinned"] == 64, timeout=10, message="node 0 pinning the answer")
    b.kill(signal.SIGKILL)
    eventually(lambda: a.stats()["pinned"] == 0, timeout=15, message="pins released after the reader died")
    with Client(a.tenant("team-a")) as on_a:
        assert on_a.get(FP, keys[:2]) == data[:2], "the owner serves on"


def _safe_prefetch(agent: AgentProcess, keys: list[bytes]) -> None:
    try:
        _prefetch(agent, "team-a", keys)
    except Exception:
        pass  # the agent is killed under it


def test_sidecar_hints_trigger_fetches_from_another_node(nodes, node_agent, sidecar, tmp_path):
    net = nodes(2)
    secret = _secret(tmp_path)
    a = node_agent(net, 0, secret)
    b = node_agent(net, 1, secret, peers=[a])
    from kvtier.agent.keys import block_keys

    tokens = list(range(256 * 6))
    keys, data = block_keys(tokens, 256), blobs(6)
    with Client(a.tenant("team-a")) as on_a:
        on_a.put(FP, keys, data)
    url = sidecar(b.tenant("team-a"))  # the engine pod's sidecar on node 1 (its agent's socket)
    result = _post(url, {"fingerprint": FP, "token_ids": tokens, "deadline_ms": 20000})
    assert result["fetched"] == 6 and result["missing"] == 0 and not result["late"]
    with Client(b.tenant("team-a")) as on_b:
        assert on_b.get(FP, keys) == data


def test_a_block_corrupted_at_the_owner_is_a_miss_on_arrival():
    """In one process over loopback: the owner's copy of block 2 flips a byte after its checksum was
    taken; the reader READs all four, verifies them in place and keeps only the two before it."""
    from kvtier.agent.store.index import Lease, Store, checksum
    from kvtier.agent.tiers.dram import DramTier
    from kvtier.agent.transports import open_transport
    from kvtier.agent.transports.control import ControlServer

    secret = os.urandom(32)
    stores, servers = [], []
    for name in ("owner", "reader"):
        store = Store(secret, DramTier("p", 32 * MiB, 8 * MiB), None)
        transport, status = open_transport(store, secret, f"test-{name}-{os.getpid()}", "tcp", [], None)
        assert status.library and status.ucxTransports == "tcp"
        stores.append((store, transport))
        servers.append(ControlServer(secret, "127.0.0.1", 0, transport.new_session))
    (owner, _), (reader, reader_transport) = stores
    try:
        lease = Lease(tenant="team-a")
        data = blobs(4)
        extents = owner.allocate(lease, [MiB] * 4)
        for (seg, ext), blob in zip(extents, data, strict=True):
            seg.view(ext, MiB)[:] = blob
        keys = chain(4)
        sums = [checksum(b) for b in data]
        owner.commit(lease, FP, keys, [(s.id, e.offset) for s, e in extents], [MiB] * 4, sums, False)
        seg, ext = extents[2]
        seg.view(ext, MiB)[100] ^= 0xFF  # memory went bad after the checksum was taken
        ikeys = [owner.index_key("team-a", FP, k) for k in keys]
        landed = reader_transport.fetch(servers[0].address, "team-a", ikeys, time.monotonic() + 20)
        assert [b.key for b in landed] == ikeys[:2]
        assert [reader.lookup("team-a", FP, keys[:i]) for i in (2, 3)] == [["dram"] * 2, ["dram"] * 2]
        failures = reader.metrics.checksum_failures.labels("peer")._value.get()
        assert failures == 1
        assert reader.stats()["dram"]["usedBytes"] == 2 * MiB, "the bad block's extent went back"
    finally:
        for server in servers:
            server.close()
        for store, _ in stores:
            store.close()


def test_the_kvcachenode_says_which_transport_and_why(control_plane, kube, crds_installed, tmp_path):
    from kubernetes import client

    from kvtier.api import v1alpha1 as api

    node = f"node-{os.urandom(3).hex()}"
    cfg = agent_config(tmp_path, nvme=None, prefetch={"transport": "rdma"}).model_copy(
        update={"nodeName": node, "heartbeatSeconds": 0.5}
    )
    proc = spawn_agent(cfg, tmp_path / "agent.yaml", env=control_plane.env())
    try:
        objects = client.CustomObjectsApi(kube)
        name = api.kvcachenode_name(cfg.pool, node)
        status = eventually(
            lambda: objects.get_cluster_custom_object(api.GROUP, api.VERSION, "kvcachenodes", name).get(
                "status"
            ),
            message="the agent's KVCacheNode status",
        )
        transport = status["transport"]
        assert transport["requested"] == "rdma" and transport["rdma"] is False
        assert transport["ucxTransports"] == "tcp" and transport["library"].startswith("nixl ")
        assert "rdma asked for but" in transport["reason"] and transport["rdmaReason"]
    finally:
        proc.kill(signal.SIGTERM)


def test_bench_transport_runs_and_reports_against_its_ceiling(nodes, tmp_path):
    import json

    from kvtier.cli import main

    nodes(1)  # skips here, with the reason, where namespaces cannot be made
    out = tmp_path / "transport.json"
    argv = ["bench", "transport", "--out", str(out), "--block-mib", "1", "--total-mib", "8", "--repeats", "1"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    assert row["blocks"] == 8 and row["gbps"] > 0 and row["socket_ceiling_gbps"] > 0
    assert report["transport"]["ucxTransports"] == "tcp"


def test_an_agent_without_nixl_serves_its_own_tiers_and_says_why(agent, tmp_path):
    """A platform without the wheel, simulated by a `nixl_cu12` that fails to import."""
    fake = tmp_path / "no-nixl" / "nixl_cu12"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no NIXL wheel for this platform')\n")
    secret = _secret(tmp_path)
    cfg = agent_config(tmp_path / "a", nvme=None).model_copy(update={"secretFile": str(secret)})
    path = f"{fake.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    without = spawn_agent(cfg, tmp_path / "a.yaml", env={"PYTHONPATH": path})
    try:
        transport = without.stats()["transport"]
        assert "library" not in transport and "no NIXL wheel for this platform" in transport["reason"]
        keys, data = chain(2), blobs(2)
        with Client(without.tenant("team-a")) as c:
            c.put(FP, keys, data)
            assert c.get(FP, keys) == data, "its own tiers serve as usual"
        reader = agent(
            agent_config(tmp_path / "b", nvme=None).model_copy(
                update={"secretFile": str(secret), "peers": [without.peer]}
            ),
            name="b",
        )
        result = _prefetch(reader, "team-a", keys)
        assert result["fetched"] == 0 and result["missing"] == 2, "its peers are refused, with the reason"
    finally:
        without.kill(signal.SIGTERM)
