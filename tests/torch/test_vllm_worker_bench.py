"""`kvtier bench vllm-worker --small` on the CPU: the vLLM connector's worker restores a context saved
in a real agent into vLLM-allocated paged caches (two layouts), whole and layer by layer, with and
without a forward between layers, and the HF path restores the same KV; every restore is byte-exact
and judged against a floor measured in the same run. (CPU times say nothing; the GPU run's numbers
are in docs/benchmarks.)"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def test_small_run_restores_every_mode_byte_exact(tmp_path):
    from kvtier.cli import main

    assert main(["bench", "vllm-worker", "--small", str(tmp_path), "--repeats", "1"]) == 0
    report = json.loads((tmp_path / "vllm-worker.json").read_text())
    assert report["command"].startswith("kvtier bench vllm-worker --small")
    assert "errors" not in report
    rows = report["rows"]
    layers = 4  # the tiny shape
    for tokens in (1024, 4096):
        mine = [r for r in rows if r["tokens"] == tokens]
        modes = {(r["mode"], r.get("layout"), r.get("new_tokens")) for r in mine}
        for layout in ("LBNHC", "BLNHC"):
            assert {("whole", layout, None), ("layerwise", layout, None)} <= modes
            for n in (1, 16):
                assert {
                    ("forward", layout, n),
                    ("whole+fwd", layout, n),
                    ("layerwise+fwd", layout, n),
                } <= modes
        assert {"save", "floor", "hf"} <= {r["mode"] for r in mine}
        for r in mine:
            if r["mode"] in ("hf", "whole", "layerwise", "whole+fwd", "layerwise+fwd"):
                assert r["equal"] is True, r
                assert r["x_floor"] > 0
            if r["mode"] == "layerwise+fwd":
                landed = r["layers_landed_s"]
                assert len(landed) == layers + 1 and landed == sorted(landed), "each layer lands in order"
        floor = next(r for r in mine if r["mode"] == "floor")
        assert floor["kv_bytes"] == tokens * 4 * 2 * 2 * 32 * 2  # layers x K,V x heads x dim x bf16
