"""The RDMA transport's pure parts: connection setup messages and memory-region address translation.
(The verbs data path needs an RDMA device; none was available.)"""

from __future__ import annotations

import pytest
from kvtier.agent.transports import choose_transport, rdma
from kvtier.agent.transports.tcp import TcpTransport

pytestmark = pytest.mark.unit


def test_conn_info_round_trips_and_rejects_garbage():
    info = rdma.ConnInfo(qp_num=0x1234, psn=0xABCDEF, lid=7, gid="fe80::1")
    assert rdma.ConnInfo.decode(info.encode()) == info
    with pytest.raises(ValueError, match="invalid QP number"):
        rdma.ConnInfo.decode(b'{"qp_num": 0, "psn": 1, "lid": 0, "gid": ""}')
    assert rdma.ConnInfo.decode(b'{"qp_num": 5, "psn": 33554431, "lid": 0, "gid": ""}').psn == 0xFFFFFF


def test_region_table_translates_and_bounds_checks():
    table = rdma.RegionTable(
        [rdma.Region(1, 0x7F0000000000, 1 << 30, 0x42), rdma.Region(2, 0x7F8000000000, 1 << 30, 0x43)]
    )
    assert table.remote(2, 4096, 14 << 20) == (0x7F8000000000 + 4096, 0x43)
    with pytest.raises(ValueError, match="outside segment 1"):
        table.remote(1, (1 << 30) - 4096, 8192)
    with pytest.raises(KeyError):
        table.remote(3, 0, 1)
    assert rdma.RegionTable.decode(table.encode()).remote(1, 0, 1) == (0x7F0000000000, 0x42)


def test_without_a_device_every_pool_uses_tcp(monkeypatch):
    monkeypatch.setattr(rdma, "SYSFS_IB", "/nonexistent")
    assert rdma.unavailable_reason() == "no RDMA device in this pod"
    for wanted in ("auto", "rdma", "tcp"):
        assert isinstance(choose_transport(wanted, b"s"), TcpTransport)
