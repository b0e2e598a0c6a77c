"""`kvtier demo` (the README's first command, after setup) runs the whole path and says so."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_demo_saves_and_restores_kv_through_the_operator_rendered_agent():
    out = subprocess.run(
        [sys.executable, "-m", "kvtier.cli", "demo", "--processes"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert "kvcachepool.kvtier.io/demo created" in text
    assert "kvtier agent ready pool=demo" in text
    row = next(
        line
        for line in text.splitlines()
        if line.startswith("kvcachepool.kvtier.io/demo") and "created" not in line
    )
    assert row.split()[1:3] == ["True", "1/1"], row
    assert "logits diff 0.0" in text and "0 hits on the same prompt" in text
