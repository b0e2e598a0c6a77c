"""What an engine (or a confused scheduler) can hand the vLLM connector's copy planning: page ids
that are negative, past the cache, repeated or claimed by another load of the step, and block
locations that are out of order, repeated, interleaved across segments or empty. The planning is
pure (`connectors/runs.py`, no torch): a bad page id refuses the load (a miss, recomputed), and every
copy the 2-D path issues for a run reads exactly the bytes of that run's own blocks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.agent.connectors.runs import groups, pages_ok, runs, runs_in

pytestmark = pytest.mark.adversarial


@pytest.mark.parametrize(
    "pages, written, ok",
    [
        ([0, 1, 2, 3], set(), True),
        ([], set(), True),  # a zero-length load writes nothing
        ([-1], set(), False),  # torch would write the cache's last page: another request's
        ([0, -8], set(), False),
        ([8], set(), False),  # past the cache: a device-side assert on a GPU
        ([2**63], set(), False),
        ([1.0], set(), False),
        (["3"], set(), False),
        ([None], set(), False),
        ([3, 3], set(), False),  # one page written by two blocks: which one lands is undefined
        ([4, 5], {5}, False),  # another load of the same step writes page 5
        ([4, 5], {6}, True),
    ],
)
def test_pages_a_load_writes_are_distinct_pages_of_the_cache(pages, written, ok):
    assert pages_ok(pages, 8, written) is ok


def test_pages_a_save_reads_are_pages_of_the_cache_repeats_allowed():
    assert pages_ok([0, 0, 7], 8)  # reading a page twice harms nothing
    assert not pages_ok([0, -1], 8), "a save would store another page's KV under this request's keys"
    assert not pages_ok([8], 8)


def test_numpy_page_ids_are_ids_too():
    np = pytest.importorskip("numpy")
    assert pages_ok(list(np.arange(4)), 8, set())
    assert not pages_ok([np.int64(-1)], 8, set())


def test_odd_locations_merge_only_truly_adjacent_blocks():
    bb = 100
    assert runs([], bb) == []
    got = runs([(1, 0), (1, 100), (1, 100), (1, 300), (1, 200), (2, 300), (1, 400), (1, 500)], bb)
    # repeated (1, 100), a gap, going backwards, another segment, back again: no merge across any
    assert [(r.segment, r.offset, r.first, r.count) for r in got] == [
        (1, 0, 0, 2),
        (1, 100, 2, 1),
        (1, 300, 3, 1),
        (1, 200, 4, 1),
        (2, 300, 5, 1),
        (1, 400, 6, 2),
    ]


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(1, 32),
    st.lists(st.tuples(st.integers(0, 2), st.integers(0, 6)), max_size=24),
    st.integers(1, 5),
)
def test_every_row_a_run_copies_is_its_own_blocks_layer_part(layers, layer_bytes, slots, group_blocks):
    """The 2-D path copies, for layer li of a run, `count` rows of `layer_bytes` from
    run.offset + li * layer_bytes, `block_bytes` apart (LayerLoad._issue_rows); the whole-block path
    copies a run's slice per group (host_to_gpu). Both must touch exactly each block's own bytes, in
    request order, whatever order, repeats or segments the locations come in."""
    bb = layers * layer_bytes
    locs = [(seg, slot * bb) for seg, slot in slots]
    all_runs = runs(locs, bb)
    covered = []
    for run in all_runs:
        for li in range(layers):
            rows = [(run.segment, run.offset + j * bb + li * layer_bytes) for j in range(run.count)]
            own = [(seg, off + li * layer_bytes) for seg, off in locs[run.first : run.first + run.count]]
            assert rows == own, "a row outside its own block"
        covered += range(run.first, run.first + run.count)
    assert covered == list(range(len(locs))), "each block in one run, once, in order"
    seen = []
    for start, end in groups(len(locs), bb, group_blocks * bb):
        for run in runs_in(all_runs, start, end):
            lo, hi = max(run.first, start), min(run.first + run.count, end)
            assert lo < hi
            seen += range(lo, hi)
    assert seen == list(range(len(locs))), "groups cover every block once"


@pytest.mark.torch
@pytest.mark.parametrize("layerwise", [False, True], ids=["whole", "layer-wise"])
def test_the_vllm_worker_refuses_page_ids_outside_the_cache(agent, tmp_path, layerwise):
    """The vLLM worker on the CPU, against a real agent: blocks saved from pages 0-7 are loaded with
    page ids an engine could hand it. Bad ids are a miss (reported for recompute) and no page is
    written; a save naming page -1 stores nothing; a load capped by vLLM (pages past `limit` padded
    with page 0, never written) still lands."""
    torch = pytest.importorskip("torch")
    from kvtier.agent.client import Client
    from kvtier.agent.connectors.gpu import ArenaConnection
    from kvtier.agent.connectors.vllm.plan import Transfer
    from kvtier.agent.connectors.vllm.worker import Worker
    from tests.support import agent_config

    pages, page, block = 16, 16, 64  # 4 pages a block
    a = agent(agent_config(tmp_path, nvme=None))
    client = Client(a.tenant("team-a"))
    g = torch.Generator().manual_seed(3)
    kv = {f"layer{i}": torch.randn(pages, 2, page, 32, generator=g) for i in range(2)}
    worker = Worker(ArenaConnection(client=client, pin=False), "fp", page, block, layerwise)
    worker.register(kv, pages)
    keys = [bytes([i]) * 32 for i in range(2)]
    worker.submit_saves([Transfer("saved", keys, list(range(8)))], sync=True)
    assert client.lookup("fp", keys) == 2
    saved = {name: t[:8].clone() for name, t in kv.items()}

    def load(*transfers: Transfer) -> dict[str, torch.Tensor]:
        for t in kv.values():
            t.zero_()
        worker.start_loads(list(transfers))
        worker.finish_loads()
        return kv

    good = list(range(8, 16))
    for bad in ([-1, *good[1:]], [*good[:7], pages], [8, 8, *good[2:]], [*good[:7], 2**40]):
        load(Transfer("hostile", keys, bad))
        assert not any(t.any() for t in kv.values()), f"{bad}: a page was written"
        assert "hostile" in worker.failed_reqs
        worker.failed_reqs.clear()
    # two loads of one step writing the same page: the second is a miss, the first lands
    load(Transfer("first", keys, good), Transfer("second", keys, [0, 1, 2, 3, 4, 5, 6, 15]))
    assert worker.failed_reqs == {"second"}
    assert all(torch.equal(kv[n][8:], saved[n]) for n in kv) and not any(t[:8].any() for t in kv.values())
    worker.failed_reqs.clear()
    # vLLM capped the load at 6 pages: the last 2 are padding (page 0 twice), never written
    load(Transfer("capped", keys, [8, 9, 10, 11, 12, 13, 0, 0], limit=6))
    assert not worker.failed_reqs
    assert all(torch.equal(kv[n][8:14], saved[n][:6]) for n in kv)
    # a save that names page -1 would store another request's page under these keys
    other = [bytes([9]) * 32, bytes([10]) * 32]
    worker.submit_saves([Transfer("poison", other, [0, 1, 2, -1, 4, 5, 6, 7])], sync=True)
    assert client.lookup("fp", other) == 0
    worker.close()
