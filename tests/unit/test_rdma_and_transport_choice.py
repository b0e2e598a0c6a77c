"""RDMA discovery against recorded `ibv_devinfo` output of real devices (a ConnectX-7 RoCE host and a
Soft-RoCE host), and how the agent turns it and the pool's `prefetch.transport` into UCX transports."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from kvtier.agent.devices import rdma
from kvtier.agent.devices.runner import RecordedRunner
from kvtier.agent.metrics import Metrics
from kvtier.agent.transports import NoTransport, select
from kvtier.agent.transports.nixl import _offered
from kvtier.api.v1alpha1 import NodeTransport

pytestmark = pytest.mark.unit
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "rdma"


def recorded(name: str) -> str:
    return (FIXTURES / name).read_text()


def test_connectx7_roce_ports_with_their_states_and_mtus():
    ports = rdma.parse_ibv_devinfo(recorded("ibv_devinfo-connectx7.txt"))
    assert [(p.device, p.port, p.state, p.activeMtu) for p in ports] == [
        ("rocep1s0f0", 1, "ACTIVE", 4096),
        ("rocep1s0f1", 1, "DOWN", 1024),
        ("roceP2p1s0f0", 1, "ACTIVE", 4096),
        ("roceP2p1s0f1", 1, "DOWN", 1024),
    ]
    assert {p.linkLayer for p in ports} == {"Ethernet"}
    assert all(p.gids == [] for p in ports), "plain ibv_devinfo lists no GIDs"


def test_soft_roce_verbose_output_lists_gids():
    (port,) = rdma.parse_ibv_devinfo(recorded("ibv_devinfo-v-soft-roce.txt"))
    assert (port.device, port.state, port.linkLayer, port.activeMtu) == ("rxe0", "ACTIVE", "Ethernet", 1024)
    assert port.gids == ["fe80::a00:27ff:fe58:ef89", "::ffff:10.0.0.1", "fe80::dedb:4745:a22:4f86"]


def test_discovery_through_the_command_seam_and_its_reasons():
    text = recorded("ibv_devinfo-v-soft-roce.txt")
    ports, reason = rdma.discover(RecordedRunner({"ibv_devinfo -v": (0, text)}))
    assert len(ports) == 1 and reason is None
    missing = (127, "ibv_devinfo: not installed on this node")
    ports, reason = rdma.discover(RecordedRunner({"ibv_devinfo -v": missing}))
    assert ports == [] and "neither pyverbs nor ibv_devinfo" in reason
    ports, reason = rdma.discover(RecordedRunner({"ibv_devinfo -v": (255, "No IB devices found")}))
    assert ports == [] and "No IB devices found" in reason


def test_pyverbs_attributes_map_to_the_same_port_report():
    """pyverbs returns the verbs enums ibv_devinfo prints in parentheses; both give one report."""
    gids = ["fe80:0000:0000:0000:0a00:27ff:fe58:ef89", "0000:0000:0000:0000:0000:ffff:0a00:0001"]
    gids += ["0000:0000:0000:0000:0000:0000:0000:0000"] * 3
    ctx = SimpleNamespace(
        query_device=lambda: SimpleNamespace(phys_port_cnt=1),
        query_port=lambda n: SimpleNamespace(state=4, link_layer=2, active_mtu=3, gid_tbl_len=5),
        query_gid=lambda n, i: SimpleNamespace(gid=gids[i]),
    )
    (port,) = rdma.ports_of("rxe0", ctx)
    (recorded_port,) = rdma.parse_ibv_devinfo(recorded("ibv_devinfo-v-soft-roce.txt"))
    assert port.model_dump() == {**recorded_port.model_dump(), "gids": recorded_port.gids[:2]}


def test_transport_choice_follows_the_pool_and_the_node():
    roce = rdma.parse_ibv_devinfo(recorded("ibv_devinfo-connectx7.txt"))
    auto = select("auto", roce, None, {})
    assert auto.ucx_tls == "rc,ud,tcp" and auto.rdma
    assert "rocep1s0f0/1 (RoCE)" in auto.reason and "rocep1s0f1" not in auto.reason, "only active ports"
    assert select("rdma", roce, None, {}).ucx_tls == "rc,ud"
    assert select("tcp", roce, None, {}).ucx_tls == "tcp"
    none = select("rdma", [], "no RDMA device on this node", {})
    assert none.ucx_tls == "tcp" and not none.rdma and "no RDMA device" in none.reason
    down = [p for p in roce if p.state == "DOWN"]
    assert select("auto", down, None, {}).ucx_tls == "tcp"
    assert select("auto", roce, None, {"UCX_TLS": "rc_mlx5,tcp"}).reason == "UCX_TLS set in the environment"


def test_without_nixl_peers_are_refused_and_fetches_find_nothing():
    off = NoTransport("NIXL is not importable (no wheel for this platform)")
    assert off.fetch("10.0.0.2:7070", "team-a", [b"k"], 0.0) == []
    answer = off.new_session().handle({"op": "fetch"})
    assert answer["ok"] is False and "not importable" in answer["error"]


def test_an_owners_answer_is_cut_at_the_first_entry_not_asked_for():
    want = [bytes([i]) * 24 for i in range(4)]
    good = [{"key": k.hex(), "size": 4096, "checksum": 7, "addr": 1 << 20} for k in want]
    assert len(_offered({"blocks": good}, want, 8192)) == 4
    swapped = [good[0], good[2], good[1], good[3]]
    assert len(_offered({"blocks": swapped}, want, 8192)) == 1
    oversized = [good[0], {**good[1], "size": 1 << 30}]
    assert len(_offered({"blocks": oversized}, want, 8192)) == 1
    assert _offered({"blocks": [{"key": "zz"}]}, want, 8192) == []
    assert _offered({"blocks": "garbage"}, want, 8192) == []


def test_transport_and_rdma_ports_show_in_metrics():
    metrics = Metrics()
    ports = rdma.parse_ibv_devinfo(recorded("ibv_devinfo-v-soft-roce.txt"))
    metrics.report_transport(
        NodeTransport(library="nixl 1.5.1 (UCX)", ucxTransports="rc,ud,tcp", rdma=True, rdmaPorts=ports)
    )
    from prometheus_client import generate_latest

    text = generate_latest(metrics.registry).decode()
    assert (
        'kvtier_peer_transport_info{library="nixl 1.5.1 (UCX)",rdma="true",ucx_tls="rc,ud,tcp"} 1.0' in text
    )
    assert (
        'kvtier_rdma_port_active_mtu_bytes{device="rxe0",link_layer="Ethernet",port="1",state="ACTIVE"} 1024.0'
        in text
    )
    assert 'kvtier_rdma_port_gids{device="rxe0",port="1"} 3.0' in text


def test_a_fetch_is_cut_into_windows_of_consecutive_blocks():
    from kvtier.agent.transports.nixl import _windows

    MiB = 1 << 20
    assert _windows([MiB] * 10, 4 * MiB) == [(0, 4), (4, 8), (8, 10)]
    assert _windows([16 * MiB, MiB, MiB], 4 * MiB) == [(0, 1), (1, 3)]
    assert _windows([], 4 * MiB) == []
