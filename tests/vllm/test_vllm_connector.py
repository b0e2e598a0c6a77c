"""The vLLM connector against vLLM's real KVConnectorBase_V1 and VllmConfig, with CPU tensors standing
in for the paged KV cache (no engine runs). Needs vllm installed: `pytest -m vllm` in such an env."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.conftest import agent_config

pytestmark = pytest.mark.vllm
torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

PAGE, B, PAGES, H, D, LAYERS = 16, 64, 48, 2, 8, 3


def _config(socket: str):
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
            },
        ),
    )


def _connectors(socket: str):
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole

    config = _config(socket)
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
