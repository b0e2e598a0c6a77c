"""Shared fixtures: a real local control plane (session), a namespace per test, real agent processes."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier.api.agentconfig import AgentConfig
from kvtier.dev.agents import AgentProcess, spawn_agent

# Tests import these from tests.support; the names stay reachable here for tests written before.
from tests.support import REPO as REPO
from tests.support import agent_config as agent_config
from tests.support import eventually as eventually
from tests.support import kubectl as kubectl


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu = _has_cuda()
    docker = _has_docker()
    for item in items:
        if "gpu" in item.keywords and not gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine)"))
        if "kind" in item.keywords and not docker:
            item.add_marker(pytest.mark.skip(reason="needs a running Docker daemon for kind"))


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def _has_docker() -> bool:
    if not shutil.which("docker") or not shutil.which("kind"):
        return False
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


# ------------------------------------------------------------------------------ control plane


@pytest.fixture(scope="session")
def control_plane() -> Iterator[object]:
    from kvtier.dev.controlplane import LocalControlPlane
    from kvtier.dev.tools import ensure_tools

    bin_dir = ensure_tools(quiet=True)
    state = Path(tempfile.mkdtemp(prefix="kvtier-cp-"))
    cp = LocalControlPlane(state_dir=state, bin_dir=bin_dir).start(log=lambda *_: None)
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def kube(control_plane):
    from kubernetes import config

    return config.new_client_from_config(str(control_plane.kubeconfig))


@pytest.fixture(scope="session")
def crds_installed(control_plane, kube):
    from kvtier.operator.kube import apply_crds

    apply_crds(kube)
    return True


@pytest.fixture
def namespace(kube) -> Iterator[str]:
    from kubernetes import client

    name = f"t-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api(kube).create_namespace({"metadata": {"name": name}})
    yield name
    # No controller-manager: the namespace stays Terminating, which is fine for a throwaway etcd.
    client.CoreV1Api(kube).delete_namespace(name)


# ------------------------------------------------------------------------------ agent processes


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[callable]:
    """Factory: start real `kvtier agent` processes; all are killed at the end of the test."""
    started: list[AgentProcess] = []

    def start(config: AgentConfig | None = None, name: str = "agent", **kw) -> AgentProcess:
        cfg = config or agent_config(tmp_path, **kw)
        proc = spawn_agent(cfg, tmp_path / f"{name}.yaml")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill(signal.SIGTERM)


@pytest.fixture
def sidecar():
    """Factory: start real `kvtier sidecar` processes on an agent's tenant socket; returns its URL."""
    procs = []

    def start(socket_path: str) -> str:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kvtier.cli",
                "sidecar",
                "--pool",
                "p",
                "--socket",
                socket_path,
                "--port",
                "0",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        procs.append(proc)
        line = proc.stdout.readline()
        assert line.startswith("kvtier sidecar ready"), line
        return "http://" + line.split("http=")[1].strip()

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def operator_process(control_plane, crds_installed, tmp_path_factory) -> Iterator[subprocess.Popen]:
    """A real `kvtier operator` process against the local control plane (status every second).
    Its log stays in pytest's temporary folder (operator0/operator.log)."""
    from kvtier import certs
    from kvtier.dev.local_operator import operator_argv
    from kvtier.dev.ports import free_port

    folder = tmp_path_factory.mktemp("operator")
    log = open(folder / "operator.log", "w")  # noqa: SIM115
    ca = certs.new_ca("kvtier-webhook-test-ca")
    serving = certs.issue(ca, "kvtier-webhook", dns_names=("localhost",), ips=("127.0.0.1",))
    (folder / "tls.crt").write_bytes(serving.cert_pem)
    (folder / "tls.key").write_bytes(serving.key_pem)
    port = free_port()
    env = {**control_plane.env(), "KVTIER_STATUS_INTERVAL": "1", "KVTIER_RESYNC_SECONDS": "5"}
    proc = subprocess.Popen(
        operator_argv(webhook_port=port, cert=str(folder / "tls.crt"), key=str(folder / "tls.key")),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    proc.webhook = {"url": f"https://127.0.0.1:{port}/kvtier-inject", "ca": ca.cert_pem}  # type: ignore[attr-defined]
    yield proc
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
