"""Start real `kvtier agent` processes from an AgentConfig (tests, the demo, benchmarks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvtier.api.agentconfig import AgentConfig


@dataclass
class AgentProcess:
    config: AgentConfig
    config_path: Path
    proc: subprocess.Popen
    ready_line: str
    output: deque[str] = field(default_factory=deque)  # the agent's latest output lines

    @property
    def socket_dir(self) -> Path:
        return Path(self.config.socketDir)

    def _field(self, name: str) -> str:
        return self.ready_line.split(f"{name}=")[1].split()[0]

    @property
    def peer(self) -> str:
        host = self.config.peerHost if self.config.peerHost not in ("", "0.0.0.0") else "127.0.0.1"
        return f"{host}:" + self._field("peer").rsplit(":", 1)[1]

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self._field('metrics').lstrip(':')}/metrics"

    def admin(self, op: str, timeout: float | None = 10.0, **fields: Any) -> dict[str, Any]:
        from kvtier.agent.client import admin_call

        return admin_call(self.socket_dir, op, timeout=timeout, **fields)

    def tenant(self, namespace: str) -> str:
        """Socket path of a namespace (created on demand, as the CSI plugin asks for it)."""
        return self.admin("ensure_tenant", namespace=namespace)["socket"]

    def stats(self) -> dict[str, Any]:
        return self.admin("stats")["stats"]

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 20) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def spawn_agent(
    config: AgentConfig,
    config_path: Path,
    env: dict[str, str] | None = None,
    log: Path | None = None,
    argv_prefix: list[str] | None = None,
) -> AgentProcess:
    """Write the configuration, start the agent (under `argv_prefix`, e.g. in a network namespace),
    and wait for its ready line."""
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(config.to_yaml())
    proc = subprocess.Popen(
        [*(argv_prefix or []), sys.executable, "-m", "kvtier.cli", "agent", "--config", str(config_path)],
        stdout=subprocess.PIPE,
        stderr=open(log, "ab") if log else subprocess.STDOUT,  # noqa: SIM115 - owned by the child
        text=True,
        env={**os.environ, "KVTIER_LOG": os.environ.get("KVTIER_LOG", "WARNING"), **(env or {})},
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith("kvtier agent ready"):
            # keep reading what the agent prints, so a chatty agent never blocks on a full pipe
            tail: deque[str] = deque(maxlen=200)
            threading.Thread(target=tail.extend, args=(proc.stdout,), daemon=True).start()
            return AgentProcess(config, config_path, proc, line, tail)
    proc.kill()
    if log and log.exists():
        seen.append(log.read_text(errors="replace")[-4000:])
    raise RuntimeError("agent did not start:\n" + "".join(seen))


def local_agent_config(
    folder: Path,
    pool: str,
    spec: dict[str, Any],
    segment_bytes: int = 1 << 30,
    **extra: Any,
) -> AgentConfig:
    """An agent configuration for this machine: sockets and state under `folder`, any free ports."""
    return AgentConfig.model_validate(
        {
            "pool": pool,
            "spec": spec,
            "socketDir": str(folder / "sock"),
            "stateDir": str(folder / "state"),
            "segmentBytes": segment_bytes,
            "peerPort": 0,
            "peerHost": "127.0.0.1",
            "metricsPort": 0,
            **extra,
        }
    )
