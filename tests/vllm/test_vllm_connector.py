"""The vLLM connector against vLLM's real KVConnectorBase_V1 and VllmConfig, with CPU tensors standing
in for the paged KV cache (no engine runs). Needs vllm installed: `pytest -m vllm` in such an env."""

from __future__ import annotations

import mmap
from types import SimpleNamespace

import pytest

from tests.support import agent_config

pytestmark = pytest.mark.vllm
torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

PAGE, B, PAGES, H, D, LAYERS = 16, 64, 48, 2, 8, 3


def _config(socket: str, **extra):
    from vllm.config import DeviceConfig, KVTransferConfig, VllmConfig

    return VllmConfig(
        device_config=DeviceConfig(device="cpu"),
        kv_transfer_config=KVTransferConfig(
            kv_connector="KVTierConnector",
            kv_connector_module_path="kvtier.agent.connectors.vllm",
            kv_role="kv_both",
            kv_load_failure_policy="recompute",
            kv_connector_extra_config={
                "socket": socket,
                "fingerprint": "test-model;L2THD",
                "block_tokens": B,
                **extra,
            },
        ),
    )


def _connectors(socket: str, **extra):
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole

    config = _config(socket, **extra)
    sched = KVConnectorFactory.create_connector(config, KVConnectorRole.SCHEDULER, None)
    worker = KVConnectorFactory.create_connector(config, KVConnectorRole.WORKER, None)
    assert isinstance(sched, KVConnectorBase_V1) and type(sched).__name__ == "KVTierConnector"
    return sched, worker


def _caches(layout: str, fill: bool):
    shape = (2, PAGES, PAGE, H, D) if layout == "flash" else (PAGES, 2, PAGE, H, D)
    make = torch.randn if fill else torch.zeros
    return {f"model.layers.{i}.self_attn": make(shape, dtype=torch.bfloat16) for i in range(LAYERS)}


def _step(req_id: str, tokens: list[int], pages: list[int], computed: int = 0):
    new = SimpleNamespace(
        req_id=req_id, prompt_token_ids=tokens, block_ids=(pages,), num_computed_tokens=computed
    )
    cached = SimpleNamespace(req_ids=[], new_block_ids=[], num_computed_tokens=[])
    return SimpleNamespace(
        scheduled_new_reqs=[new],
        scheduled_cached_reqs=cached,
        num_scheduled_tokens={req_id: len(tokens) - computed},
    )


def _pages_of(caches, layout: str, pages: list[int]):
    idx = torch.tensor(pages)
    out = []
    for t in caches.values():
        k, v = (t[0], t[1]) if layout == "flash" else (t[:, 0], t[:, 1])
        out += [k[idx], v[idx]]
    return out


@pytest.mark.parametrize("layout", ["flash", "flashinfer"])
def test_prompt_saved_after_prefill_is_loaded_into_new_pages(agent, tmp_path, layout):
    a = agent(agent_config(tmp_path, nvme=None))
    sched, worker = _connectors(a.tenant("team-a"))
    tokens = list(range(1000, 1000 + 2 * B + 32))  # 2 full kvtier blocks and a tail
    first_pages = list(range(0, 10))
    source = _caches(layout, fill=True)
    worker.register_kv_caches(source)

    # request 1: nothing cached; its prefill completes in this step -> saved
    req = SimpleNamespace(request_id="r1", prompt_token_ids=tokens, cache_salt=None)
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    meta = sched.build_connector_meta(_step("r1", tokens, first_pages))
    assert [len(s.keys) for s in meta.saves] == [2] and not meta.loads
    worker.bind_connector_metadata(meta)
    worker.wait_for_save()
    worker.clear_connector_metadata()

    # request 2: the same prompt returns; the scheduler sees 2 blocks, the worker loads them
    req2 = SimpleNamespace(request_id="r2", prompt_token_ids=tokens, cache_salt=None)
    assert sched.get_num_new_matched_tokens(req2, 0) == (2 * B, False)
    assert sched.get_num_new_matched_tokens(req2, 16) == (2 * B - 16, False), "beyond vLLM's own prefix hit"
    sched.update_state_after_alloc(req2, None, 2 * B)
    new_pages = list(range(20, 30))
    meta = sched.build_connector_meta(_step("r2", tokens, new_pages, computed=0))
    assert [len(t.keys) for t in meta.loads] == [2]
    target = _caches(layout, fill=False)
    worker.register_kv_caches(target)
    worker.bind_connector_metadata(meta)
    worker.start_load_kv(None)
    worker.clear_connector_metadata()
    assert worker.get_block_ids_with_load_errors() == set()
    n = 2 * B // PAGE
    for got, want in zip(
        _pages_of(target, layout, new_pages[:n]), _pages_of(source, layout, first_pages[:n]), strict=True
    ):
        assert torch.equal(got, want), "every layer's K and V, bit for bit"
    # another tenant's scheduler sees nothing for the same prompt
    other, _ = _connectors(a.tenant("team-b"))
    assert other.get_num_new_matched_tokens(req2, 0) == (0, False)


def test_a_failed_load_reports_its_pages_for_recompute_and_a_down_agent_is_a_miss(agent, tmp_path):
    a = agent(agent_config(tmp_path, nvme=None))
    _, worker = _connectors(a.tenant("team-a"))
    worker.register_kv_caches(_caches("flash", fill=False))
    from kvtier.agent.connectors.vllm import KVTierConnectorMetadata, Transfer

    missing = Transfer("r9", [b"\x01" * 32, b"\x02" * 32], list(range(8)))
    worker.bind_connector_metadata(KVTierConnectorMetadata(loads=[missing]))
    worker.start_load_kv(None)
    assert worker.get_block_ids_with_load_errors() == set(range(8)), "vLLM recomputes these pages"
    a.kill()
    down, _ = _connectors(str(tmp_path / "nowhere.sock"))
    req = SimpleNamespace(request_id="r", prompt_token_ids=list(range(300)), cache_salt=None)
    assert down.get_num_new_matched_tokens(req, 0) == (0, False), "kvtier down: the engine just prefills"


def _save(worker, sched, req_id: str, tokens: list[int], pages: list[int]) -> None:
    worker.bind_connector_metadata(sched.build_connector_meta(_step(req_id, tokens, pages)))
    worker.wait_for_save()
    worker.clear_connector_metadata()


def _load(worker, sched, req_id: str, tokens: list[int], pages: list[int]) -> set[int]:
    from kvtier.agent.connectors.vllm import KVTierConnectorMetadata, Transfer
    from kvtier.agent.keys import block_keys

    keys = block_keys(tokens[:-1], B)
    worker.bind_connector_metadata(KVTierConnectorMetadata(loads=[Transfer(req_id, keys, pages)]))
    worker.start_load_kv(None)
    worker.clear_connector_metadata()
    return worker.get_block_ids_with_load_errors()


def test_after_an_agent_restart_loads_read_the_new_agents_memory(agent, tmp_path):
    """The agent restarts (its arena is new memory; segment ids start over). The worker must reconnect
    and map the new arena: reading through the old mappings would copy the old agent's bytes, wrong KV
    for blocks the new agent holds. Saves resume after the restart too."""
    cfg = agent_config(tmp_path, nvme=None)
    a = agent(cfg)
    sched, worker = _connectors(a.tenant("team-a"), retry_after_s=0)
    tokens = list(range(5000, 5000 + 2 * B + 1))
    pages = list(range(0, 2 * B // PAGE))
    old = _caches("flash", fill=True)
    worker.register_kv_caches(old)
    _save(worker, sched, "r1", tokens, pages)
    worker.register_kv_caches(_caches("flash", fill=False))
    assert _load(worker, sched, "r2", tokens, pages) == set(), "loaded from the first agent"

    a.kill()
    b = agent(cfg, name="agent-restarted")
    assert b.tenant("team-a") == a.tenant("team-a"), "same socket: the engine pod is unchanged"
    # another replica saves the same prompt, with other KV, into the restarted agent
    sched2, replica = _connectors(b.tenant("team-a"))
    new = _caches("flash", fill=True)
    replica.register_kv_caches(new)
    _save(replica, sched2, "r3", tokens, pages)

    target = _caches("flash", fill=False)
    worker.register_kv_caches(target)
    failed = _load(worker, sched, "r4", tokens, pages)  # the old connection is gone: a miss, recomputed
    assert failed == set(pages)
    # Whatever the process maps next may land where the old arena was (the kernel reuses the range):
    # a connector still reading through its old views would copy this decoy.
    decoys = [mmap.mmap(-1, 8 << 20) for _ in range(4)]
    for d in decoys:
        d.write(b"\x5a" * (8 << 20))
    assert _load(worker, sched, "r5", tokens, pages) == set(), "reconnected"
    for got, want in zip(_pages_of(target, "flash", pages), _pages_of(new, "flash", pages), strict=True):
        assert torch.equal(got, want), "the new agent's KV, not the old arena's"

    # the worker's own saves resume once it has reconnected
    tokens2 = list(range(9000, 9000 + B + 1))
    worker.register_kv_caches(new)
    _save(worker, sched, "r6", tokens2, pages[: B // PAGE])
    req = SimpleNamespace(request_id="r7", prompt_token_ids=tokens2, cache_salt=None)
    assert sched.get_num_new_matched_tokens(req, 0) in ((0, False), (B, False))  # first call may reconnect
    assert sched.get_num_new_matched_tokens(req, 0) == (B, False)


def test_a_hung_agent_costs_the_scheduler_one_short_wait_then_nothing(agent, tmp_path):
    """The agent is alive but not answering (stopped): the first lookup is a miss after
    lookup_timeout_s, the following ones are misses at once until retry_after_s has passed; once the
    agent answers again, hits come back."""
    import os
    import signal
    import time

    a = agent(agent_config(tmp_path, nvme=None))
    sched, worker = _connectors(a.tenant("team-a"), lookup_timeout_s=0.2, retry_after_s=1.0)
    tokens = list(range(7000, 7000 + B + 1))
    worker.register_kv_caches(_caches("flash", fill=True))
    _save(worker, sched, "r1", tokens, list(range(B // PAGE)))
    req = SimpleNamespace(request_id="r2", prompt_token_ids=tokens, cache_salt=None)
    assert sched.get_num_new_matched_tokens(req, 0) == (B, False)

    os.kill(a.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
        first = time.monotonic() - t0
        t0 = time.monotonic()
        for _ in range(100):
            assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
        rest = time.monotonic() - t0
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    assert 0.15 < first < 1.0, f"one wait of about lookup_timeout_s, not more ({first:.3f}s)"
    assert rest < 0.1, f"100 lookups while backing off took {rest:.3f}s"
    time.sleep(1.1)
    assert sched.get_num_new_matched_tokens(req, 0) == (B, False), "the agent answers again: hits"
