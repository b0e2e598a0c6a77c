"""`kvtier demo` (the README's first command, after setup) runs the whole path and says so."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

pytestmark = pytest.mark.integration


def test_demo_saves_and_restores_kv_through_the_operator_rendered_agent():
    # its folder (a 1 GiB NVMe file) in one the test removes, and its whole process group ended on
    # a timeout: a killed demo cannot clean up after itself (short path: sockets live there)
    scratch = tempfile.mkdtemp(prefix="kvd-", dir="/tmp")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvtier.cli", "demo", "--processes"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": scratch},
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
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
