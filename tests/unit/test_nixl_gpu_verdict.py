"""The GPU benchmark's verdict: which of the connectors' copy and NIXL moved the same blocks faster,
counting only paths whose bytes arrived exact."""

from __future__ import annotations

import pytest

from kvtier.bench.nixlgpu import _verdict

pytestmark = pytest.mark.unit


def row(path: str, layout: str, gbps: float, ok: bool = True) -> dict:
    return {"path": path, "layout": layout, "gbps": gbps, "bytes_ok": ok}


def test_the_faster_exact_path_wins_per_layout():
    rows = [
        row("connector", "adjacent", 50.0),
        row("nixl_write", "adjacent", 40.0),
        row("nixl_read", "adjacent", 45.0),
        row("connector", "shuffled", 20.0),
        row("nixl_write", "shuffled", 30.0),
        row("nixl_read", "shuffled", 99.0, ok=False),  # wrong bytes never count
    ]
    verdict = _verdict(rows)
    assert "adjacent: connector faster (NIXL nixl_read 45.0 GB/s vs connector 50.0 GB/s, x0.90)" in verdict
    assert "shuffled: nixl_write faster (NIXL nixl_write 30.0 GB/s vs connector 20.0 GB/s, x1.50)" in verdict


def test_nixl_failing_is_said_with_the_copy_path_number():
    rows = [row("connector", "adjacent", 50.0), {"path": "nixl_read", "layout": "adjacent", "error": "boom"}]
    assert "adjacent: NIXL did not complete (connector 50.0 GB/s)" in _verdict(rows)
