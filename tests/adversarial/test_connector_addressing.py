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
