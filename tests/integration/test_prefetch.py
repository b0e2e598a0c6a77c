"""Prefetch across nodes: blocks committed on agent A are fetched by the sidecar next to agent B over
TCP (checked against their checksums) and then hit locally on B; NVMe blocks are promoted by a hint."""

from __future__ import annotations

import json
import os
import urllib.request

import pytest

from kvtier.agent.client import Client
from tests.integration.test_agent import FP, blobs, chain
from tests.support import agent_config

pytestmark = pytest.mark.integration


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url + "/v1/hints", data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def test_sidecar_fetches_from_a_peer_agent_then_blocks_hit_locally(agent, sidecar, tmp_path):
    secret = tmp_path / "pool-secret"
    secret.write_bytes(os.urandom(32))
    a = agent(
        agent_config(tmp_path / "a", nvme=None).model_copy(update={"secretFile": str(secret)}), name="a"
    )
    b = agent(
        agent_config(tmp_path / "b", nvme=None).model_copy(
            update={"secretFile": str(secret), "peers": [a.peer]}
        ),
        name="b",
    )
    tokens = list(range(256 * 4))
    from kvtier.agent.keys import block_keys

    keys, data = block_keys(tokens, 256), blobs(4)
    with Client(a.tenant("team-a")) as on_a:
        on_a.put(FP, keys, data)
    url = sidecar(b.tenant("team-a"))
    with urllib.request.urlopen(url + "/healthz", timeout=10) as resp:
        assert resp.status == 200
    with Client(b.tenant("team-a")) as on_b:
        assert on_b.lookup(FP, keys) == 0, "B has nothing before the hint"
        result = _post(url, {"fingerprint": FP, "token_ids": tokens, "deadline_ms": 5000})
        assert result["fetched"] == 4 and result["missing"] == 0 and not result["late"]
        assert result["fetchedBytes"] == 4 << 20
        tiers = on_b.call("lookup", fingerprint=FP, keys=[k.hex() for k in keys])["tiers"]
        assert tiers == ["dram"] * 4, "the blocks now hit B's own arena"
        assert on_b.get(FP, keys) == data
    # another namespace's sidecar on B gets nothing from A's team-a blocks
    other = sidecar(b.tenant("team-b"))
    assert _post(other, {"fingerprint": FP, "keys": [k.hex() for k in keys]})["fetched"] == 0
    metrics = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    assert 'kvtier_sidecar_blocks_total{how="fetched"} 4.0' in metrics
    assert "kvtier_sidecar_prefetched_bytes_total 4.194304e+06" in metrics


def test_hint_promotes_nvme_blocks_and_unused_prefetches_are_counted(agent, sidecar, tmp_path):
    b = agent(agent_config(tmp_path, dram="16Mi", nvme="64Mi"))
    keys, data = chain(4), blobs(4)
    with Client(b.tenant("team-a")) as c:
        c.put(FP, keys, data, sync=True)
        b.admin("evict_dram", timeout=60)
        assert c.call("lookup", fingerprint=FP, keys=[k.hex() for k in keys])["tiers"] == ["nvme"] * 4
        url = sidecar(b.tenant("team-a"))
        result = _post(url, {"fingerprint": FP, "keys": [k.hex() for k in keys], "deadline_ms": 5000})
        assert result["promoted"] == 4 and result["late"] == 0
        assert c.call("lookup", fingerprint=FP, keys=[k.hex() for k in keys])["tiers"] == ["dram"] * 4
        assert c.get(FP, keys[:2]) == data[:2]
        b.admin("evict_dram", timeout=60)  # the two never read were prefetched for nothing
    metrics = urllib.request.urlopen(b.metrics_url, timeout=10).read().decode()
    assert "kvtier_prefetch_used_blocks_total 2.0" in metrics
    assert "kvtier_prefetch_unused_blocks_total 2.0" in metrics


def test_a_zero_deadline_gives_up_and_counts_late(agent, sidecar, tmp_path):
    b = agent(agent_config(tmp_path, dram="16Mi", nvme="64Mi"))
    keys = chain(2)
    with Client(b.tenant("team-a")) as c:
        c.put(FP, keys, blobs(2), sync=True)
        b.admin("evict_dram", timeout=60)
    url = sidecar(b.tenant("team-a"))
    result = _post(url, {"fingerprint": FP, "keys": [k.hex() for k in keys], "deadline_ms": 0.001})
    assert result["late"] == 1 and result["promoted"] < 2
    bad = urllib.request.Request(url + "/v1/hints", data=b'{"keys": []}', method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(bad, timeout=10)
    assert err.value.code == 400
