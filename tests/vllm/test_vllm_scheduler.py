"""The vLLM connector inside vLLM's real v1 Scheduler, with a real agent process: two or three
"replicas" (engines, see engine.py) share one agent socket. The fake model checks every read of KV
against what the model would have computed, so wrong KV anywhere (loaded, or computed over it and
stored) shows up as a read of wrong KV that the connector did not report."""

from __future__ import annotations

import logging
import mmap
import os
import signal
import time

import pytest

from tests.support import agent_config

pytest.importorskip("torch")
pytest.importorskip("vllm")
from tests.vllm.engine import PAGE, B, Engine, connector_stats, prompt

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]


def finished_clean(engine: Engine) -> None:
    """No request left and every page back in the free queue (delayed frees were released)."""
    pool = engine.scheduler.kv_cache_manager.block_pool
    assert not engine.scheduler.requests
    assert pool.free_block_queue.num_free_blocks == pool.num_gpu_blocks - 1


def replica(socket: str, *requests: tuple, **engine) -> Engine:
    """An engine that ran `requests` ((id, tokens) or (id, tokens, request kwargs)) to the end."""
    e = Engine(socket, **engine)
    for req_id, tokens, *kw in requests:
        e.add(e.request(req_id, tokens, **(kw[0] if kw else {})))
    e.run()
    return e


def first_scheduled(engine: Engine) -> dict[str, int]:
    """The tokens of the first step that computes anything (lookups run on a thread: a request
    whose lookup has not come back yet waits a step)."""
    for _ in range(1000):
        out = engine.step()
        if out.num_scheduled_tokens:
            return out.num_scheduled_tokens
        time.sleep(0.005)
    raise AssertionError("nothing was scheduled")


def external(hashes) -> list:
    """Block hashes as vLLM publishes them in KV events."""
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

    return [maybe_convert_block_hash(h) for h in hashes]


def loads_of(engine: Engine, seen: list):
    def record(out):
        meta = out.kv_connector_metadata
        preempted = set(getattr(out, "preempted_req_ids", None) or ())
        loads = [(t.req_id, t.first_block, len(t.keys), t.skip) for t in meta.loads]
        saves = [(t.req_id, t.first_block, len(t.keys)) for t in meta.saves]
        seen.append((engine.steps, loads, preempted, saves))

    return record


@pytest.mark.parametrize(
    "layout,layerwise,v2",
    [
        ("LBNHC", True, False),
        ("LBHNC", False, False),
        ("BLNHC", True, False),
        ("BHLNC", True, False),
        ("LBNHC", True, True),
    ],
)
def test_a_prompt_saved_by_one_replica_is_loaded_by_another(agent, tmp_path, layout, layerwise, v2):
    a = agent(agent_config(tmp_path, nvme=None))
    socket = a.tenant("team-a")
    tokens = prompt(1, 3 * B + 8)  # 3 full kvtier blocks and a tail

    one, seen = Engine(socket, batched=48, layout=layout, v2=v2, extra={"layerwise": layerwise}), []
    r1 = one.request("r1", tokens)  # chunked prefill: 48 tokens a step
    one.add(r1)
    one.run(between=loads_of(one, seen))
    saves = [(step, save) for step, _, _, step_saves in seen for save in step_saves]
    assert [save for _, save in saves] == [("r1", 0, 1), ("r1", 1, 1), ("r1", 2, 1)]
    assert len({step for step, _ in saves}) == 3, "each block saved after the chunk that completes it"
    assert connector_stats(one)["saved_blocks"] == 3
    assert "r1" in one.sent, "pages freed only after the worker reported the saves done"
    finished_clean(one)
    stored = [e for e in one.events if type(e).__name__ == "BlockStored"]
    hashes = [h for e in stored for h in e.block_hashes]
    assert hashes == external(r1.block_hashes[: 3 * B // PAGE]) and {e.medium for e in stored} == {"CPU"}

    two = Engine(socket, batched=48, layout=layout, v2=v2, extra={"layerwise": layerwise})
    two.add(two.request("r2", tokens))
    assert first_scheduled(two)["r2"] == 8, "only the tail is computed"
    two.run()
    assert connector_stats(two)["loaded_blocks"] == 3
    assert two.wrong_reads == [], "every layer's KV as computed by replica one"
    finished_clean(two)
    # another tenant's replica sees nothing for the same prompt
    other = Engine(a.tenant("team-b"), batched=48, layout=layout)
    other.add(other.request("r3", tokens))
    assert first_scheduled(other)["r3"] == 48
    for e in (one, two, other):
        e.close()


def test_loads_start_after_the_pages_vllm_already_has(agent, tmp_path):
    a = agent(agent_config(tmp_path, nvme=None))
    socket = a.tenant("team-a")
    tokens = prompt(2, 3 * B + 8)
    one = replica(socket, ("r1", tokens))
    two, seen = replica(socket, ("x", tokens[:100] + prompt(3, 20))), []  # vLLM's own prefix cache: 96 tokens
    two.add(two.request("r2", tokens))
    two.run(between=loads_of(two, seen))
    loads = [load for _, step_loads, _, _ in seen for load in step_loads]
    assert loads == [("r2", 1, 2, 96 // PAGE - B // PAGE)], "blocks 1-2, the 2 pages vLLM holds left alone"
    assert two.wrong_reads == []
    for e in (one, two):
        e.close()


def test_salted_lora_and_multimodal_requests_never_share_kv_with_others(agent, tmp_path):
    from vllm.lora.request import LoRARequest
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange

    a = agent(agent_config(tmp_path, nvme=None))
    socket = a.tenant("team-a")
    tokens = prompt(4, 3 * B + 8)
    one = replica(
        socket,
        ("plain", tokens),
        ("salted", tokens, {"cache_salt": "s1"}),
        ("lora", tokens, {"lora_request": LoRARequest("adapter-a", 1, "/adapters/a")}),
    )
    assert connector_stats(one)["saved_blocks"] == 9, "three chains, stored apart"

    def loaded(req_kw: dict) -> int:
        e = replica(socket, ("r", tokens, req_kw))
        e.close()
        assert e.wrong_reads == []
        return connector_stats(e).get("loaded_blocks", 0)

    assert loaded({"cache_salt": "s1"}) == 3
    assert loaded({"cache_salt": "s2"}) == 0
    assert loaded({}) == 3
    assert loaded({"lora_request": LoRARequest("adapter-a", 1, "/adapters/a")}) == 3
    assert loaded({"lora_request": LoRARequest("adapter-b", 2, "/adapters/b")}) == 0
    # multimodal inputs are in vLLM's block hashes, so in the keys: an image in the prompt is a miss
    image = MultiModalFeatureSpec(
        data=None, modality="image", identifier="image-1", mm_position=PlaceholderRange(offset=10, length=20)
    )
    probe = one.request("mm", tokens, mm_features=[image])
    assert one.connector.get_num_new_matched_tokens(probe, 0)[0] in (0, None)
    plain = one.request("plain-again", tokens)
    hits = None
    for _ in range(100):
        hits = one.connector.get_num_new_matched_tokens(plain, 0)[0]
        if hits is not None:
            break
    assert hits == 3 * B
    time.sleep(0.1)
    assert one.connector.get_num_new_matched_tokens(probe, 0) == (0, False)
    one.close()


def test_a_failed_load_is_recomputed_and_nothing_computed_over_it_is_stored(agent, tmp_path):
    cfg = agent_config(tmp_path, nvme=None)
    a = agent(cfg)
    socket = a.tenant("team-a")
    tokens = prompt(5, 4 * B + 8)
    one = Engine(socket, extra={"retry_after_s": 0})
    r1 = one.request("r1", tokens[: 2 * B + 8])  # the pool holds blocks 0-1
    one.add(r1)
    q = one.request("q", prompt(9, B + 8))  # only replica one stores this one
    one.add(q)
    one.run()

    two = Engine(socket, extra={"retry_after_s": 0})
    two.add(two.request("r2", tokens))
    restarted = []

    def kill_agent_before_the_load(out):
        if out.kv_connector_metadata.loads and not restarted:
            a.kill()
            restarted.append(agent(cfg, name="agent-restarted"))
            assert restarted[0].tenant("team-a") == socket, "same socket: the engine pods are unchanged"

    two.run(between=kill_agent_before_the_load)
    assert restarted, "the load was planned, then the agent went away"
    assert two.wrong_reads and two.wrong_kv_unreported() == [], "the failed pages were reported"
    stats = connector_stats(two)
    assert stats["failed_blocks"] == 2 and stats["skipped_saves"] >= 1
    assert stats["saved_blocks"] == 4, "after the recompute, the prompt's 4 blocks, recomputed, are stored"
    finished_clean(two)

    three = Engine(socket)
    three.add(three.request("r3", tokens))
    three.run()
    assert connector_stats(three)["loaded_blocks"] == 4
    assert three.wrong_reads == [], "no block computed over the failed load was stored"
    # replica two's worker lost its connection with the old agent: it maps the new agent's arena, not
    # whatever the process maps next where the old arena was (here: a decoy)
    three.add(three.request("z", prompt(12, B + 8)))
    three.run()
    decoys = [mmap.mmap(-1, 8 << 20) for _ in range(4)]
    for d in decoys:
        d.write(b"\x5a" * (8 << 20))
    before = len(two.wrong_reads)
    two.connector.get_num_new_matched_tokens(
        two.request("probe", prompt(13, B + 8)), 0
    )  # finds the old agent gone
    two.add(two.request("z-again", prompt(12, B + 8)))
    two.run()
    assert connector_stats(two)["loaded_blocks"] == 1 and two.wrong_reads[before:] == []
    # replica one announced q's block; the restarted agent does not hold it: a removal event
    probe = one.request("q-probe", q.all_token_ids)
    removed: list = []
    deadline = time.monotonic() + 5
    while not removed and time.monotonic() < deadline:
        one.connector.get_num_new_matched_tokens(probe, 0)  # the first call finds the old agent gone
        removed = [
            h
            for e in one.connector.take_events()
            if type(e).__name__ == "BlockRemoved"
            for h in e.block_hashes
        ]
    assert removed == external(q.block_hashes[: B // PAGE])
    for e in (one, two, three):
        e.close()


@pytest.mark.parametrize("v2", [False, True], ids=["v1-runner", "v2-runner"])
def test_preempted_requests_keep_their_loads_when_they_resume(agent, tmp_path, v2):
    a = agent(agent_config(tmp_path, nvme=None))
    socket = a.tenant("team-a")
    prompts = [prompt(10 + i, 2 * B + 22) for i in range(2)]  # 150 tokens: 2 kvtier blocks, 10 pages
    one = replica(socket, *[(f"p{i}", p) for i, p in enumerate(prompts)], v2=v2)

    # 23 pages: r0 grows to 22 pages (350 tokens), so vLLM preempts r1, and r0 then takes the pages
    # r1's prompt had in vLLM's prefix cache: r1 resumes with its blocks from kvtier only
    two, seen = Engine(socket, num_blocks=24, v2=v2), []
    two.add(two.request("r0", prompts[0], max_tokens=200))
    two.add(two.request("r1", prompts[1], max_tokens=60))
    two.run(between=loads_of(two, seen))
    preempted = {r for _, _, p, _ in seen for r in p}
    assert preempted, "vLLM preempted a request"
    resumed_loads = [
        (step, load) for step, loads, _, _ in seen for load in loads if load[0] in preempted and step > 1
    ]
    assert resumed_loads, f"a resumed request loaded its blocks again: {seen}"
    assert two.wrong_reads == [], "no request read KV that was not loaded"
    finished_clean(two)
    for e in (one, two):
        e.close()


def test_mla_caches_are_saved_and_loaded(agent, tmp_path):
    a = agent(agent_config(tmp_path, nvme=None))
    socket = a.tenant("team-a")
    tokens = prompt(6, 2 * B + 3)
    one = replica(socket, ("r1", tokens), mla=True)
    two = replica(socket, ("r2", tokens), mla=True)
    assert connector_stats(two)["loaded_blocks"] == 2 and two.wrong_reads == []
    for e in (one, two):
        e.close()


def test_an_unsupported_cache_disables_the_connector_at_start_up_with_one_line(agent, tmp_path, caplog):
    import torch
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
        SlidingWindowSpec,
    )

    from kvtier.agent.connectors.vllm import KVTierConnectorMetadata, Transfer

    a = agent(agent_config(tmp_path, nvme=None))
    engine = Engine(a.tenant("team-a"))
    full = FullAttentionSpec(block_size=PAGE, num_kv_heads=2, head_size=16, dtype=torch.bfloat16)
    window = SlidingWindowSpec(
        block_size=PAGE, num_kv_heads=2, head_size=16, dtype=torch.bfloat16, sliding_window=64
    )
    hybrid = KVCacheConfig(
        num_blocks=8,
        kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(["a"], full), KVCacheGroupSpec(["b"], window)],
    )
    caplog.set_level(logging.INFO, logger="kvtier.vllm")
    meta = KVTierConnectorMetadata(
        loads=[Transfer("r", [b"\x01" * 32], list(range(4)))],
        saves=[Transfer("r", [b"\x02" * 32], list(range(4)))],
    )
    for cfg, caches in (
        (hybrid, None),  # a hybrid model: refused from its KV cache config
        (engine.worker._kv_cache_config, {"x": torch.zeros(4096, dtype=torch.int8)}),  # raw storage, no pages
    ):
        caplog.clear()
        worker = KVConnectorFactory.create_connector(engine.config, KVConnectorRole.WORKER, cfg)
        if caches is not None:
            worker.register_kv_caches(caches)
        assert worker.disabled
        lines = [r for r in caplog.records if "kvtier connector disabled" in r.getMessage()]
        assert len(lines) == 1, [r.getMessage() for r in caplog.records]
        worker.bind_connector_metadata(meta)
        worker.start_load_kv(None)  # the forward path never raises
        worker.wait_for_layer_load("a")
        worker.wait_for_save()
        worker.clear_connector_metadata()
        assert worker.get_block_ids_with_load_errors() == set()
        assert worker.get_finished({"r"}) == ({"r"}, None), "pages a scheduler kept for saves come back"
    engine.close()


def test_stats_reach_vllms_log_and_prometheus(agent, tmp_path):
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    from kvtier.agent.connectors.vllm import KVTierConnector

    a = agent(agent_config(tmp_path, nvme=None))
    one = replica(a.tenant("team-a"), ("r1", prompt(7, 2 * B + 1)))
    data = connector_stats(one)
    assert (
        data["saved_blocks"] == 2 and data["saved_bytes"] == 2 * 3 * 4 * (2 * 16 * 32) * 2
    )  # blocks x layers x pages x [H,N,C] x bf16
    stats = KVTierConnector.build_kv_connector_stats(data)
    assert stats.reduce()["kvtier_saved_blocks"] == 2
    registry = CollectorRegistry()

    def bound(cls):
        return type(
            cls.__name__, (cls,), {"__init__": lambda s, *a, **k: cls.__init__(s, *a, registry=registry, **k)}
        )

    prom = KVTierConnector.build_prom_metrics(
        one.config,
        {Gauge: bound(Gauge), Counter: bound(Counter), Histogram: bound(Histogram)},
        ["engine"],
        {0: ["0"]},
    )
    prom.observe(stats.data, 0)
    assert registry.get_sample_value("vllm:kvtier_saved_blocks_total", {"engine": "0"}) == 2
    one.close()


def test_a_hung_agent_never_holds_up_the_scheduler(agent, tmp_path):
    """Lookups run on a thread: while the agent does not answer (SIGSTOP) the scheduler is told to
    ask later, at once; after lookup_timeout_s it is a miss, and misses are immediate for
    retry_after_s; once the agent answers again, hits come back."""
    a = agent(agent_config(tmp_path, nvme=None))
    socket = a.tenant("team-a")
    tokens = prompt(8, B + 1)
    one = replica(socket, ("r1", tokens), extra={"lookup_timeout_s": 0.3, "retry_after_s": 1.0})
    probe = one.request("probe", tokens)
    sched = one.connector

    def ask():
        t0 = time.monotonic()
        got = sched.get_num_new_matched_tokens(probe, 0)
        return got, time.monotonic() - t0

    os.kill(a.proc.pid, signal.SIGSTOP)
    try:
        answers = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            answers.append(ask())
            if answers[-1][0] == (0, False):
                break
            time.sleep(0.01)
        rest = [ask() for _ in range(100)]
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    assert answers[0][0] == (None, False) and answers[-1][0] == (0, False), answers
    assert max(t for _, t in answers + rest) < 0.1, "no call waited on the agent"
    assert all(got == (0, False) for got, _ in rest)
    time.sleep(1.1)
    for _ in range(100):
        got, _ = ask()
        if got != (None, False):
            break
    assert got == (B, False), "the agent answers again: hits"
    one.close()


@pytest.mark.parametrize("layout", ["LBNHC", "LBHNC", "BLNHC", "BLHNC"])
def test_the_gpu_benchmarks_caches_are_the_ones_vllm_allocates(layout):
    """`kvtier bench vllm-worker` runs without vLLM (its GPU machine has none): the per-layer caches
    it builds have vLLM's shapes, strides, dtype and places in one buffer, layout by layout."""
    import torch

    from kvtier.bench.shapes import Shape
    from kvtier.bench.vllmworker import vllm_kv_caches
    from tests.vllm.engine import allocate, kv_cache_configs, vllm_config

    config = vllm_config("/nonexistent.sock", layout=layout, max_len=63 * PAGE)
    worker_cfg, _ = kv_cache_configs(config, 64)
    theirs = allocate(config, worker_cfg)
    shape = Shape("tiny-llama", 64, 3, 4, 2, 16, 128, 256, 1e4, False)  # tests/vllm/tiny-llama: 3x2x16
    ours = vllm_kv_caches(shape, 64, layout, torch.device("cpu"))
    assert list(ours) == list(theirs)
    base_t = next(iter(theirs.values())).untyped_storage().data_ptr()
    base_o = next(iter(ours.values())).untyped_storage().data_ptr()
    for name, t in theirs.items():
        o = ours[name]
        assert (o.shape, o.stride(), o.dtype) == (t.shape, t.stride(), t.dtype), name
        assert o.data_ptr() - base_o == t.data_ptr() - base_t, name
        assert o.untyped_storage().nbytes() == t.untyped_storage().nbytes()
