"""`kvtier bench serve` without a GPU or torch: the workload is reproducible, the HBM cache evicts the
least recently used idle context, the scheduler keeps every request's KV positions consistent with
what its slot holds, and the metrics (percentiles, GPU-time split, $/M tokens, ratios) add up.

The engine here costs time on a clock the test owns (prefill grows with the tokens computed, a
restore is cheap, a decode step is fixed), so a whole run takes milliseconds and is deterministic;
the real engine's --small run is in tests/torch."""

from __future__ import annotations

import pytest

from kvtier.bench.serveloop import (
    HbmCache,
    Scheduler,
    Workload,
    percentile,
    ratios,
    scripts,
    summarize,
)

pytestmark = pytest.mark.unit
B = 16  # block tokens of the modelled pool


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += max(0.0, seconds)


class ModelledEngine:
    """Costs time on the clock; checks that every call matches what the slot holds."""

    PREFILL_PER_TOKEN = 1e-3
    RESTORE_PER_TOKEN = 1e-5
    DECODE_STEP = 0.01

    def __init__(self, clock: Clock, w: Workload, user_scripts) -> None:
        self.clock, self.w = clock, w
        self.held: dict[int, int] = {}  # slot -> tokens of KV it holds
        self.pool: set[tuple[int, ...]] = set()  # saved block-aligned prefixes
        self.hinted: list[int] = []
        if w.returning:
            for u, s in enumerate(user_scripts):
                self.pool.add(tuple(s.history[: len(s.history) // B * B]))
                if u < w.hbm_contexts:
                    self.held[u] = len(s.history)

    def prefill(self, slot, tokens, start):
        assert self.held.get(slot, 0) >= start, "prefill after more tokens than the slot holds"
        self.clock.t += self.PREFILL_PER_TOKEN * (len(tokens) - start) * (1 + (len(tokens) + start) / 4096)
        self.held[slot] = len(tokens)
        return 7

    def restore(self, slot, tokens):
        usable = (len(tokens) - 1) // B * B
        n = max((len(p) for p in self.pool if len(p) <= usable and tuple(tokens[: len(p)]) == p), default=0)
        self.clock.t += self.RESTORE_PER_TOKEN * n
        self.held[slot] = n
        return n

    def save(self, slot, tokens, kv_tokens):
        assert self.held[slot] == kv_tokens, "save of tokens the slot does not hold"
        self.pool.add(tuple(tokens[: kv_tokens // B * B]))

    def decode(self, batch):
        for slot, position, _ in batch:
            assert self.held[slot] == position, "decode at a position other than the slot's end"
            self.held[slot] = position + 1
        self.clock.t += self.DECODE_STEP
        return [3] * len(batch)

    def hint(self, tokens):
        self.hinted.append(len(tokens))


def run(policy: str, **knobs):
    w = Workload(
        **{
            "users": 6,
            "contexts": (1024, 2048, 4096),
            "turns": 4,
            "new_tokens": 32,
            "output_tokens": 8,
            "think_s": 0.5,
            "hbm_contexts": 2,
            "duration_s": 1000.0,
            "vocab": 1000,
            **knobs,
        }
    )
    clock = Clock()
    user_scripts = scripts(w)
    engine = ModelledEngine(clock, w, user_scripts)
    result = Scheduler(w, policy, engine, clock, user_scripts).run()
    return w, engine, result


def test_the_same_seed_gives_every_policy_the_same_users():
    w = Workload(users=5, contexts=(100, 200), turns=3, new_tokens=4, output_tokens=2, think_s=2.0, vocab=50)
    a, b = scripts(w), scripts(w)
    assert [s.history for s in a] == [s.history for s in b]
    assert [s.messages for s in a] == [s.messages for s in b] and [s.think_s for s in a] == [
        s.think_s for s in b
    ]
    assert {s.history_tokens for s in a} <= {100, 200}
    for s in a:
        assert len(s.messages) == 3 and all(len(m) == 4 for m in s.messages)
        assert 0 <= s.think_s[0] <= 2.0 and len(s.think_s) == 3
    assert scripts(Workload(**{**w.__dict__, "seed": 1}))[0].history != a[0].history


def test_hbm_cache_evicts_the_least_recently_used_idle_context():
    hbm = HbmCache(2)
    assert hbm.place(10, set()) == (0, None)
    assert hbm.place(11, set()) == (1, None)
    assert hbm.get(10) == 0  # 10 is now the most recent
    assert hbm.place(12, set()) == (1, 11)
    assert hbm.place(13, busy={10}) == (1, 12), "an active request's context is never evicted"
    assert hbm.get(12) is None
    with pytest.raises(RuntimeError):
        hbm.place(14, busy={10, 13})


def test_every_turn_completes_with_consistent_kv_positions_under_every_policy():
    for policy in ("recompute", "kvtier", "kvtier+prefetch"):
        w, _engine, result = run(policy)
        done = [t for t in result.turns if t.finish is not None]
        assert len(done) == w.users * w.turns, policy
        for t in done:
            assert t.produced == w.output_tokens and t.arrival <= t.first_token <= t.finish
        s = summarize(result, gpu_hour_usd=4.0)
        gpu = s["gpu_time_s"]
        assert sum(gpu.values()) == pytest.approx(result.elapsed_s, abs=0.01), "busy + idle = elapsed"
        assert s["output_tokens"] == w.users * w.turns * w.output_tokens


def test_returning_contexts_restore_instead_of_recompute_and_serve_more_turns():
    _, _, rec = run("recompute", duration_s=20.0, turns=50)
    _, _, kvt = run("kvtier", duration_s=20.0, turns=50)
    rec_s, kvt_s = summarize(rec, 4.0), summarize(kvt, 4.0)
    assert set(rec_s["turn_sources"]) <= {"hbm", "recomputed"}
    assert set(kvt_s["turn_sources"]) <= {"hbm", "restored"} and kvt_s["turn_sources"]["restored"] > 0
    assert rec_s["gpu_time_s"]["restore"] == 0 and kvt_s["gpu_time_s"]["restore"] > 0
    r = ratios({"recompute": rec_s, "kvtier": kvt_s})["kvtier/recompute"]
    assert r["turns_per_gpu_hour"] > 1.5 and r["usd_per_m_output_tokens_lower_by"] > 0.3
    assert r["ttft_p50_lower_by_x"] > 1


def test_nobody_returning_means_nothing_to_restore():
    _, _, rec = run("recompute", returning=False, turns=1)
    _, _, kvt = run("kvtier", returning=False, turns=1)
    for s in (summarize(rec, 4.0), summarize(kvt, 4.0)):
        assert s["turn_sources"] == {"cold": 6}
    assert kvt.busy_s["prefill"] == pytest.approx(rec.busy_s["prefill"])


def test_prefetch_hints_go_out_before_each_return():
    w, engine, result = run("kvtier+prefetch", prefetch_lead_s=0.2)
    returns = w.users * w.turns  # the first message returns to the history too
    assert result.hints == returns == len(engine.hinted)
    _, plain, _ = run("kvtier")
    assert plain.hinted == []


def test_percentiles_and_dollars_per_million_tokens():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)
    assert percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    _, _, result = run("recompute")
    s = summarize(result, gpu_hour_usd=3.6)
    per_hour = s["output_tokens"] / (result.elapsed_s / 3600)
    assert s["usd_per_m_output_tokens"] == pytest.approx(3.6 / (per_hour / 1e6), rel=1e-3)
    assert s["turns_per_gpu_hour"] == pytest.approx(
        s["turns_completed"] / (result.elapsed_s / 3600), rel=1e-3
    )


def test_a_turn_still_waiting_at_the_end_counts_with_its_wait_so_far():
    _, _, result = run("recompute", duration_s=1.0, users=6, contexts=(8192,))
    s = summarize(result, 4.0)
    assert s["turns_waiting_at_end"] > 0
    waits = [result.elapsed_s - t.arrival for t in result.turns if t.first_token is None]
    assert s["ttft_s"]["p99"] >= percentile(waits, 50) - 1e-3


def test_bad_knobs_are_refused():
    with pytest.raises(ValueError):
        Workload(users=0).check()
    with pytest.raises(ValueError):
        Scheduler(Workload(), "lru-only", ModelledEngine(Clock(), Workload(users=1), []))


def test_the_committed_gpu_runs_add_up():
    """The H200 files under docs/benchmarks: ratios follow from the per-policy numbers, the GPU
    time split covers the wall time, and $/M follows from tokens and the stated price."""
    import json
    from pathlib import Path

    results = Path(__file__).resolve().parents[2] / "docs" / "benchmarks"
    files = sorted(results.glob("serve-h200*.json"))
    assert files
    for f in files:
        run = json.loads(f.read_text())
        assert run["command"].startswith("kvtier bench serve") and "H200" in run["device"]
        assert run["ratios"] == ratios(run["policies"]), f.name
        for s in run["policies"].values():
            assert sum(s["gpu_time_s"].values()) == pytest.approx(s["elapsed_s"], abs=0.01)
            per_hour = s["output_tokens"] / (s["elapsed_s"] / 3600)
            assert s["usd_per_m_output_tokens"] == pytest.approx(
                run["gpu_hour_usd"] / (per_hour / 1e6), rel=1e-3
            )
