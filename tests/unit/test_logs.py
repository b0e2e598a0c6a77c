"""Every kvtier process logs through one setup: the level from --log-level or KVTIER_LOG, shown on
every line, and one JSON object a line with --log-format json. Checked on a real process (the CSI
plugin, which starts without a cluster) and on the formatter kopf's object loggers feed."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from kvtier import logs

pytestmark = pytest.mark.unit
LEVELS = set(logs.LEVELS)


def _csi_log(*args: str, **env: str) -> list[str]:
    """The stderr lines of `kvtier csi` from start until it is ready."""
    folder = Path(tempfile.mkdtemp(prefix="kv-", dir="/tmp"))  # Unix socket paths stay short
    environ = {
        k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KVTIER_LOG", "KVTIER_LOG_FORMAT")
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvtier.cli", "csi", "--endpoint", f"unix://{folder}/csi.sock",
         "--sockets", str(folder / "s"), "--node-id", "node-a", "--pods-dir", str(folder / "pods"),
         "--state-dir", str(folder / "state"), *args],
        env={**environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout and proc.stdout.readline().startswith("kvtier csi ready")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)
    return err.splitlines()


def test_kvtier_log_debug_shows_debug_lines_with_their_level():
    lines = _csi_log(KVTIER_LOG="DEBUG")
    assert any(" DEBUG kvtier.kubeapi no Kubernetes API configured" in line for line in lines), lines
    assert any(" WARNING kvtier.csi no Kubernetes API" in line for line in lines), lines
    for line in lines:
        assert line.split(" ")[2] in LEVELS, f"no level shown: {line!r}"


def test_the_flag_wins_over_the_environment():
    lines = _csi_log("--log-level", "warning", KVTIER_LOG="DEBUG")
    assert lines and not any(" DEBUG " in line for line in lines), lines


def test_json_format_is_one_object_a_line():
    lines = _csi_log("--log-format", "json", KVTIER_LOG="DEBUG")
    records = [json.loads(line) for line in lines]
    assert {"level": "DEBUG", "logger": "kvtier.kubeapi"}.items() <= next(
        r for r in records if r["message"] == "no Kubernetes API configured"
    ).items()
    assert all(r["level"] in LEVELS and r["time"] for r in records)


def test_kopf_object_loggers_name_their_object():
    record = logging.LogRecord("kopf.objects", logging.INFO, __file__, 1, "pool deleted", (), None)
    record.k8s_ref = {"kind": "KVCachePool", "name": "fast", "namespace": None}
    assert "INFO kopf.objects [fast] pool deleted" in logs.TextFormatter().format(record)
    out = json.loads(logs.JsonFormatter().format(record))
    assert (out["object"], out["kind"], out["message"]) == ("fast", "KVCachePool", "pool deleted")


def test_settings_come_from_arguments_then_environment_and_bad_values_are_refused():
    assert logs.resolve(environ={}) == ("INFO", "text")
    assert logs.resolve(environ={"KVTIER_LOG": "debug", "KVTIER_LOG_FORMAT": "json"}) == ("DEBUG", "json")
    assert logs.resolve("ERROR", None, environ={"KVTIER_LOG": "debug"}) == ("ERROR", "text")
    with pytest.raises(SystemExit, match="KVTIER_LOG"):
        logs.resolve(environ={"KVTIER_LOG": "verbose"})
