"""Hostile and odd requests, and an agent that lies, against the connector's scheduler side inside
vLLM's real v1 Scheduler (engine.py). What must hold: no exception from kvtier into the engine,
no read of wrong KV that the connector did not report, every request finishes and every page comes
back."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tests.support import agent_config, lying_agent

pytest.importorskip("torch")
pytest.importorskip("vllm")
from tests.vllm.engine import PAGE, B, Engine, connector_stats, prompt
from tests.vllm.test_vllm_scheduler import finished_clean, replica

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]


@pytest.mark.parametrize(
    "hits", [10**6, 4, 3.5, "3", -7], ids=["a-million", "past-the-prompt", "float", "string", "negative"]
)
def test_an_agent_that_lies_about_its_hits_costs_a_recompute_not_the_engine(tmp_path, hits):
    """The agent answers every lookup with `hits` blocks (a prompt of 3 full blocks and 8 tokens) and
    every read with blocks nobody can map. vLLM must not be told to skip tokens the prompt does not
    have (its scheduler asserts), and what the connector planned to load is recomputed."""

    def answer(msg):
        if msg["op"] == "lookup":
            return {"hits": hits, "tiers": []}
        if msg["op"] == "read":  # more blocks than asked for, in a segment it never sent
            return {"blocks": [[7, 0, 4096, "ab"]] * (len(msg["keys"]) + 2), "tiers": []}
        return {"extents": []} if msg["op"] == "allocate" else {}

    with lying_agent(tmp_path / "liar.sock", answer, block_tokens=B) as path:
        e = Engine(path)
        tokens = prompt(21, 3 * B + 8)
        e.add(e.request("r", tokens))
        e.run(timeout=60)
        assert e.wrong_kv_unreported() == [], "every page a failed load left was recomputed"
        assert "r" in e.finished
        finished_clean(e)
        e.close()


def _loaded(socket: str, tokens: list[int], **kw) -> tuple[int, list]:
    e = replica(socket, ("r", tokens, kw) if kw else ("r", tokens))
    e.close()
    finished_clean(e)
    return connector_stats(e).get("loaded_blocks", 0), e.wrong_reads


def test_prompts_at_block_boundaries_and_at_the_models_length(agent, tmp_path):
    """Prompts one token short of a block, exactly a block, one past it, two blocks, and as long as
    the model allows: what replica one saves, replica two loads, always leaving vLLM at least one
    token to compute, and never a block whose last token is not in the prompt."""
    a = agent(agent_config(tmp_path, nvme=None))
    socket = a.tenant("team-a")
    for n, saved, loaded in [
        (B - 1, 0, 0),
        (B, 1, 0),  # the last token is computed by the model: nothing to load
        (B + 1, 1, 1),
        (2 * B, 2, 1),
        (2 * B + 1, 2, 2),
        (63 * PAGE - 16, (63 * PAGE - 16) // B, (63 * PAGE - 17) // B),
    ]:
        tokens = prompt(100 + n, n)
        one = replica(socket, ("r", tokens))
        one.close()
        assert connector_stats(one).get("saved_blocks", 0) == saved, n
        assert one.wrong_reads == []
        got, wrong = _loaded(socket, tokens)
        assert (got, wrong) == (loaded, []), n


def test_cache_salts_that_look_alike_never_share_kv(agent, tmp_path):
    """Salts equal after Unicode normalisation, with a trailing NUL or space, or equal to a LoRA
    adapter's name: vLLM hashes the exact string under its own tag, so none of them loads the KV
    of another."""
    from vllm.lora.request import LoRARequest

    a = agent(agent_config(tmp_path, nvme=None))
    socket = a.tenant("team-a")
    tokens = prompt(31, 2 * B + 5)
    one = replica(socket, ("nfc", tokens, {"cache_salt": "caf\u00e9"}))
    one.close()
    assert connector_stats(one)["saved_blocks"] == 2
    for kw in (
        {"cache_salt": "cafe\u0301"},
        {"cache_salt": "caf\u00e9\x00"},
        {"cache_salt": "caf\u00e9 "},
        {"lora_request": LoRARequest("caf\u00e9", 1, "/adapters/a")},
        {},
    ):
        assert _loaded(socket, tokens, **kw) == (0, []), kw
    assert _loaded(socket, tokens, cache_salt="caf\u00e9") == (2, [])


def test_a_request_aborted_while_its_saves_are_in_flight_keeps_its_pages_until_they_end(agent, tmp_path):
    """The request is aborted right after the step that planned its saves, while the saver thread
    still copies its pages: vLLM must keep those pages until the worker reports the saves done
    (else another request could be computing into them mid-copy), and what lands is its KV."""
    from vllm.v1.request import RequestStatus

    a = agent(agent_config(tmp_path, nvme=None))
    socket = a.tenant("team-a")
    tokens = prompt(41, 3 * B + 8)
    e = Engine(socket, batched=512)
    worker = e.worker.worker
    gate = threading.Event()
    real_write = worker._write

    def slow_write(t):  # the saver thread is mid-copy until the test lets it go
        gate.wait(10)
        return real_write(t)

    worker._write = slow_write
    e.add(e.request("r", tokens, max_tokens=50))
    while not e.step().kv_connector_metadata.saves:
        pass
    pool = e.scheduler.kv_cache_manager.block_pool
    held = e.pages("r")
    e.scheduler.finish_requests("r", RequestStatus.FINISHED_ABORTED)
    e.add(e.request("other", prompt(42, 62 * PAGE), max_tokens=4))  # wants every page there is
    for _ in range(4):
        e.step()
    other = e.scheduler.requests["other"]
    assert other.num_computed_tokens < 62 * PAGE, "the other request waits for pages meanwhile"
    assert not set(e.pages("other")) & set(held), "the aborted request's pages went to another mid-save"
    assert "r" not in e.sent
    gate.set()
    e.run()
    assert "r" in e.sent and e.wrong_reads == []
    assert pool.free_block_queue.num_free_blocks == pool.num_gpu_blocks - 1
    e.close()
    assert _loaded(socket, tokens) == (3, [])


def test_more_replicas_than_the_agent_admits_run_on_misses(agent, tmp_path):
    """Four replicas on one socket whose namespace may hold four connections (each replica wants
    two): the refused ones run without kvtier (misses, no exception), the admitted ones load."""
    a = agent(agent_config(tmp_path, nvme=None, limits={"connectionsPerTenant": 4}))
    socket = a.tenant("team-a")
    tokens = prompt(51, 2 * B + 9)
    engines = [Engine(socket) for _ in range(4)]
    for i, e in enumerate(engines):
        e.add(e.request(f"r{i}", tokens))
        e.run(timeout=60)
        finished_clean(e)
        assert e.wrong_reads == []
        assert e.connector._conn.client is None or i < 2, "the namespace's connections were all taken"
    loaded = [connector_stats(e).get("loaded_blocks", 0) for e in engines]
    saved = [connector_stats(e).get("saved_blocks", 0) for e in engines]
    assert (saved, loaded) == ([2, 0, 0, 0], [0, 2, 0, 0])
    for e in engines:
        e.close()


def test_a_request_id_used_again_loads_only_its_own_prompt(agent, tmp_path):
    """Request ids come from the client. The same id again after it finished, with another prompt
    of the same length, then the first prompt again; and an id whose lookup was still pending when
    it was aborted, reused at once for another prompt of the same length (a lookup answer kept
    for the id would be the first prompt's)."""
    import os
    import signal

    from vllm.v1.request import RequestStatus

    a = agent(agent_config(tmp_path, nvme=None))
    socket = a.tenant("team-a")
    first, second = prompt(61, 2 * B + 3), prompt(62, 2 * B + 3)
    one = Engine(socket)
    for tokens in (first, second, first):
        one.add(one.request("same", tokens))
        one.run()
        finished_clean(one)
    assert one.wrong_reads == []
    one.close()
    two = Engine(socket, extra={"retry_after_s": 0, "io_timeout_s": 2})
    warm = two.request("warm", prompt(64, B + 1))
    while two.connector.get_num_new_matched_tokens(warm, 0)[0] is None:  # connected
        time.sleep(0.005)
    os.kill(a.proc.pid, signal.SIGSTOP)  # the lookup stays pending
    try:
        while Path(f"/proc/{a.proc.pid}/stat").read_text().split(")")[-1].split()[0] != "T":
            time.sleep(0.001)
        two.add(two.request("pending", first))
        two.step()
        assert "pending" in two.connector._lookups
        two.scheduler.finish_requests("pending", RequestStatus.FINISHED_ABORTED)
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    while "pending" in two.scheduler.requests:  # vLLM lets an id go at the next step
        two.step()
    two.add(two.request("pending", prompt(63, 2 * B + 3)))
    two.run()
    assert two.wrong_reads == [] and connector_stats(two).get("failed_blocks", 0) == 0
    finished_clean(two)
    two.close()


def test_a_request_preempted_again_and_again_never_reads_kv_it_did_not_load(agent, tmp_path):
    """A cache so small that vLLM preempts requests over and over: each resume plans a new load
    into new pages (or recomputes), and no request reads KV that is not its own."""
    from tests.vllm.test_vllm_scheduler import loads_of

    a = agent(agent_config(tmp_path, nvme=None))
    socket = a.tenant("team-a")
    prompts = [prompt(70 + i, 2 * B + 22) for i in range(5)]
    one = replica(socket, *[(f"p{i}", p) for i, p in enumerate(prompts)])
    one.close()
    two, seen = Engine(socket, num_blocks=36), []
    for i, p in enumerate(prompts):
        two.add(two.request(f"r{i}", p, max_tokens=(250, 20)[i % 2]))
    two.run(between=loads_of(two, seen))
    preemptions: dict[str, int] = {}
    for _, _, preempted, _ in seen:
        for r in preempted:
            preemptions[r] = preemptions.get(r, 0) + 1
    assert max(preemptions.values(), default=0) >= 2, f"a request preempted twice: {preemptions}"
    assert two.wrong_reads == []
    finished_clean(two)
    two.close()


# ------------------------------------------------------------------- vLLM's asynchronous scheduling


def _run_pipelined(e: Engine, limit: int = 400) -> None:
    """Prefill-only requests (max_tokens=1) through the asynchronous scheduler as vLLM's engine
    core runs it (the default in 0.33): two steps in flight, step N+1 scheduled and run before the
    scheduler takes step N's output (its load errors among it)."""
    from collections import deque

    in_flight: deque = deque()
    for _ in range(limit):
        if not e.scheduler.requests and not in_flight:
            break
        e.steps += 1
        out = e.scheduler.schedule()
        in_flight.append((out, e.execute(out)))
        while len(in_flight) > (1 if out.num_scheduled_tokens else 0):
            e.update(*in_flight.popleft())
    else:
        raise AssertionError(f"requests still running: {list(e.scheduler.requests)}")
    e.worker.worker.drain(timeout=10)


@pytest.mark.parametrize("layerwise", [True, False], ids=["layer-wise", "whole"])
def test_a_failed_load_under_asynchronous_scheduling_stores_nothing_computed_over_it(
    agent, tmp_path, layerwise
):
    """A load fails at step N. Step N+1 was scheduled before vLLM learned it (asynchronous
    scheduling), so it computes over the failed pages, and it completes a block whose save it
    plans. That block is wrong KV: the pool must not keep it, or every replica that loads the
    prompt later reads wrong KV."""
    a = agent(agent_config(tmp_path, nvme=None))
    socket = a.tenant("team-a")
    tokens = prompt(81, 6 * B + 8)
    replica(socket, ("r1", tokens[: 2 * B + 8])).close()  # the pool holds blocks 0-1
    two = Engine(socket, batched=48, asynchronous=True, extra={"layerwise": layerwise})
    worker = two.worker.worker
    real_pin, failed = worker._pin, []

    def pin(t):  # the first load finds the agent gone (a lost connection, a read that failed)
        if not failed:
            failed.append(t.req_id)
            return 0, None, None
        return real_pin(t)

    worker._pin = pin
    two.add(two.request("r2", tokens, max_tokens=1))
    _run_pipelined(two)
    assert failed and two.reported == {1}
    assert "r2" in two.sent or not two.scheduler.requests
    two.close()
    three = replica(socket, ("r3", tokens, {"max_tokens": 1}), batched=512)
    three.close()
    assert connector_stats(three)["loaded_blocks"] == 6
    assert three.wrong_reads == [], "a block computed over the failed load was stored"
