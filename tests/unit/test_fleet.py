"""Event-driven status, pure parts: which pools an event concerns, what a status write carries,
when an agent writes its KVCacheNode, and what a drain moves."""

from __future__ import annotations

import datetime as dt
import random
from types import SimpleNamespace

import pytest
import yaml

from kvtier.agent.drain import drain_reason, plan
from kvtier.agent.report import ReportPolicy
from kvtier.api import v1alpha1 as api
from kvtier.kubeapi import merge_patch
from kvtier.operator.fleet import Fleet, NodeView
from kvtier.operator.status import aggregate, next_expiry, status_delta, usage_only
from tests.support import REPO

pytestmark = pytest.mark.unit
T0 = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)


def _pool(name: str = "fast", **spec) -> api.KVCachePool:
    body = yaml.safe_load((REPO / "examples" / "pool.yaml").read_text())
    body["metadata"] = {"name": name}
    body["spec"].update(spec)
    return api.KVCachePool.model_validate(body)


def _kvn(node: str, beat: dt.datetime, draining: bool = False, every: float | None = None) -> api.KVCacheNode:
    status: dict = {
        "tiers": {"dram": {"capacityBytes": 100, "usedBytes": 40}},
        "hits": 9,
        "misses": 1,
        "health": "Healthy",
        "heartbeat": beat.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "heartbeatSeconds": every,
    }
    if draining:
        status["conditions"] = [
            {
                "type": "Draining",
                "status": "True",
                "reason": "Cordoned",
                "lastTransitionTime": "2026-11-29T12:00:00Z",
            }
        ]
    return api.KVCacheNode.model_validate(
        {"metadata": {"name": f"fast.{node}"}, "spec": {"pool": "fast", "node": node}, "status": status}
    )


def _fleet() -> Fleet:
    nodes = {f"n{i}": NodeView({"group": "a" if i < 3 else "b"}) for i in range(6)}
    fleet = Fleet()
    assert fleet.set_pool("pa", {"group": "a"}, nodes) == {"pa"}
    assert fleet.set_pool("pb", {"group": "b"}, nodes) == {"pb"}
    return fleet


def test_a_node_event_concerns_only_the_pools_that_select_it():
    fleet = _fleet()
    assert fleet.selected("pa") == ["n0", "n1", "n2"]
    # an unrelated label or a status heartbeat changes nothing a pool depends on
    assert fleet.set_node("n0", NodeView({"group": "a", "zone": "z1"})) == set()
    assert fleet.set_node("n0", NodeView({"group": "a"}, unschedulable=True)) == {"pa"}
    assert fleet.cordoned("pa") == ["n0"]
    # a node moving from one pool to the other concerns both
    assert fleet.set_node("n1", NodeView({"group": "b"})) == {"pa", "pb"}
    assert fleet.selected("pa") == ["n0", "n2"] and "n1" in fleet.selected("pb")
    assert fleet.set_node("n2", None) == {"pa"}, "a deleted Node leaves its pools"
    assert fleet.set_node("new", NodeView({"group": "b"})) == {"pb"}


def test_conflicts_name_the_shared_nodes_and_reach_both_pools():
    fleet = _fleet()
    nodes = {
        f"n{i}": NodeView({"group": "a" if i < 3 else "b", "gpu": "h200" if i == 0 else "x"})
        for i in range(6)
    }
    for name, view in nodes.items():
        fleet.set_node(name, view)
    assert fleet.set_pool("other", {"gpu": "h200"}, nodes) == {"other", "pa"}
    assert fleet.conflicts("pa") == {"n0": ["other"]}
    assert fleet.conflicts("other") == {"n0": ["pa"]}
    assert fleet.set_pool("other", {"gpu": "h200"}, nodes) == set(), "same selector: nothing to do"
    assert fleet.remove_pool("other") == {"pa"}
    assert fleet.conflicts("pa") == {}


def test_status_writes_carry_only_what_changed():
    old = {
        "nodes": {"desired": 2, "ready": 2},
        "tiers": {"dram": {"capacityBytes": 1, "usedBytes": 1}},
        "lastUpdated": "a",
        "hitRatio": 0.5,
    }
    new = {
        "nodes": {"desired": 2, "ready": 1},
        "tiers": {"dram": {"capacityBytes": 1, "usedBytes": 1}},
        "lastUpdated": "b",
    }
    assert status_delta(old, new) == {"nodes": {"ready": 1}, "hitRatio": None, "lastUpdated": "b"}
    assert status_delta(old, {**old, "lastUpdated": "c"}) == {}, "a new timestamp alone is no change"
    assert merge_patch({"a": {"b": 1, "c": 2}}, {"a": {"b": 1}}) == {"a": {"c": None}}
    assert usage_only({"tiers": {"dram": {"usedBytes": 3}}, "display": {"dram": "3/4"}, "lastUpdated": "x"})
    assert not usage_only({"display": {"nodes": "1/2"}, "lastUpdated": "x"})
    assert not usage_only({"nodes": {"ready": 1}, "tiers": {}})


def test_draining_nodes_are_counted_and_nodes_that_left_are_not_missing():
    kvns = [_kvn("a", T0), _kvn("b", T0, draining=True), _kvn("gone", T0 - dt.timedelta(hours=1))]
    st = aggregate(_pool(), 1, kvns, ["a", "b"], {}, [], T0)
    assert st["nodes"] == {"desired": 2, "ready": 2, "draining": 1}
    assert st["display"]["nodes"] == "2/2 (1 draining)"
    degraded = next(c for c in st["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "False", "a node that left the selector is not a missing agent"


def test_staleness_follows_each_agents_own_heartbeat():
    slow = _kvn("a", T0 - dt.timedelta(seconds=120), every=60)  # 2.5 x 60 s allowed
    st = aggregate(_pool(), 1, [slow], ["a"], {}, [], T0)
    assert st["nodes"]["ready"] == 1
    assert next_expiry([slow], T0) == T0 + dt.timedelta(seconds=31)
    old = _kvn("b", T0 - dt.timedelta(seconds=50))  # no interval reported: 45 s
    assert aggregate(_pool(), 1, [old], ["b"], {}, [], T0)["nodes"]["ready"] == 0
    assert next_expiry([old], T0) is None, "already stale: no deadline to wait for"


def test_agents_write_on_change_usage_steps_and_a_jittered_heartbeat():
    policy = ReportPolicy(heartbeat_s=60, jitter=0.1, min_gap_s=1, usage_gap_s=15, usage_step=0.05)
    sent = {"health": "Healthy", "tiers": {"dram": {"capacityBytes": 1000, "usedBytes": 500}}, "hits": 1}
    assert policy.due(None, sent, 0, 0, 60) == "first"
    assert policy.due(sent, {**sent, "hits": 99}, 30, 0, 60) is None, "counters wait for the heartbeat"
    assert policy.due(sent, {**sent, "hits": 99}, 61, 0, 60) == "heartbeat"
    assert policy.due(sent, {**sent, "health": "Degraded"}, 5, 0, 60) == "changed"
    assert policy.due(sent, {**sent, "health": "Degraded"}, 0.5, 0, 60) is None, "at most one write a second"
    moved = {**sent, "tiers": {"dram": {"capacityBytes": 1000, "usedBytes": 560}}}
    assert policy.due(sent, moved, 10, 0, 60) is None
    assert policy.due(sent, moved, 16, 0, 60) == "usage"
    small = {**sent, "tiers": {"dram": {"capacityBytes": 1000, "usedBytes": 520}}}
    assert policy.due(sent, small, 16, 0, 60) is None
    beats = [policy.next_beat(0, random.Random(i)) for i in range(200)]
    assert 54 <= min(beats) < 57 and 63 < max(beats) <= 66, "fleets restarted together spread out"


def test_drain_reason_and_plan():
    assert drain_reason({"g": "a"}, True, {"g": "a"}) == "Cordoned"
    assert drain_reason({"g": "b"}, False, {"g": "a"}) == "LeftSelector"
    assert drain_reason({"g": "a", "x": "y"}, False, {"g": "a"}) is None
    blocks = [SimpleNamespace(key=i, size=10, last_used=float(i)) for i in range(10)]
    chosen = plan(blocks, 35)  # type: ignore[arg-type]
    assert [b.key for b in chosen.move] == [9, 8, 7], "hottest first, within the bound"
    assert chosen.planned_bytes == 30 and chosen.skipped_bytes == 70
    assert len(plan(blocks, None).move) == 10  # type: ignore[arg-type]
