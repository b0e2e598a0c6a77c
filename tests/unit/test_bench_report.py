"""`kvtier bench report` merges runs made one lease at a time into the README's table."""

from __future__ import annotations

import argparse
import json

from kvtier.bench.ttft import report, row


def _run(rows: list[tuple[str, int, float]], prefill: dict[str, float]) -> dict:
    return {
        "model": "m",
        "device": "d",
        "prefill": {str(k): {"fastest": "one-shot", "modes_s": {"one-shot": v}} for k, v in prefill.items()},
        "results": [row(n, t, 1e9, 0.5, s, 0.04, 0.0) for t, n, s in rows],
    }


def test_a_later_run_adds_a_peer_without_replacing_the_table(tmp_path, capsys):
    table = _run([("dram", 16384, 0.044), ("nvme", 16384, 0.5)], {16384: 0.54})
    peer = _run([("dram", 16384, 0.078), ("lmcache:cpu", 16384, 0.064)], {16384: 0.53})
    paths = []
    for name, run in (("table", table), ("peer", peer)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(run))
    out = tmp_path / "merged.json"
    report(argparse.Namespace(inputs=[str(p) for p in paths], out=str(out), plot=None))
    merged = json.loads(out.read_text())
    got = {(r["tier"], r["tokens"]): r["restore_s"] for r in merged["results"]}
    assert got == {("dram", 16384): 0.044, ("nvme", 16384): 0.5, ("lmcache:cpu", 16384): 0.064}
    assert merged["prefill"]["16384"]["modes_s"]["one-shot"] == 0.54
