"""What tests share besides fixtures: the checkout's root, polling with a deadline, kubectl against
the local control plane, agent configurations, an in-process store and an agent socket that lies. Tests import these from here
(fixtures stay in conftest.py, where pytest finds them)."""

from __future__ import annotations

import contextlib
import os
import socketserver
import subprocess
import threading
import time
from pathlib import Path

from kvtier.agent.metrics import Metrics
from kvtier.agent.store.index import Lease, Store
from kvtier.agent.tiers.dram import DramTier
from kvtier.agent.tiers.nvme import NvmeTier
from kvtier.api.agentconfig import AgentConfig

REPO = Path(__file__).resolve().parents[1]


def eventually(check, timeout: float = 20.0, interval: float = 0.2, message: str = ""):
    """Poll until `check()` returns something truthy (and return it), or fail with the last error."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
            last = result
        except Exception as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"{message or 'condition'} not met within {timeout}s (last: {last!r})")


def kubectl(
    control_plane, *args: str, check: bool = True, input: str | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(control_plane.bin_dir / "kubectl"), *args],
        env=control_plane.env(),
        capture_output=True,
        text=True,
        check=check,
        input=input,
    )


def agent_config(
    tmp: Path, pool: str = "test", dram: str = "64Mi", nvme: str | None = "256Mi", **spec_extra
) -> AgentConfig:
    tiers: dict = {"dram": {"size": dram}}
    if nvme:
        tiers["nvme"] = {"size": nvme, "mode": "file", "path": str(tmp / "nvme.img")}
    return AgentConfig.model_validate(
        {
            "pool": pool,
            "spec": {"tiers": tiers, **spec_extra},
            "socketDir": str(tmp / "sock"),
            "stateDir": str(tmp / "state"),
            "segmentBytes": 8 << 20,
            "peerPort": 0,
            "peerHost": "127.0.0.1",
            "metricsPort": 0,
        }
    )


def small_store(tmp: Path, **kw) -> Store:
    """An in-process store: 8 MiB of DRAM in two segments over an 8 MiB NVMe file."""
    nvme = NvmeTier(tmp / "nvme.img", 8 << 20, io_threads=2, pool="p")
    return Store(os.urandom(32), DramTier("p", 8 << 20, 4 << 20), nvme, metrics=Metrics(), **kw)


def put_blocks(
    store: Store, lease: Lease, fingerprint: str, keys: list[bytes], size: int = 64 << 10, sync: bool = False
) -> int:
    """Allocate, fill with random bytes and commit one block per key, as a client does."""
    got = store.allocate(lease, [size] * len(keys))
    for seg, ext in got:
        seg.view(ext, size)[:] = os.urandom(size)
    locations = [(seg.id, ext.offset) for seg, ext in got]
    return store.commit(lease, fingerprint, keys, locations, [size] * len(keys), sync=sync)


@contextlib.contextmanager
def lying_agent(path: Path, answer, block_tokens: int = 64, hello: dict | None = None):
    """A tenant socket at `path` whose replies are `answer(request)` (`hello` is answered truthfully,
    with no segments, unless `hello` is given): what a broken or hostile agent can tell a client."""
    from kvtier.agent.api import protocol

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            with contextlib.suppress(OSError, protocol.ProtocolError):
                while True:
                    msg, _ = protocol.recv(self.request)
                    if msg.get("op") == "hello":
                        reply = {"namespace": "team-a", "isolation": "namespace", "segmentBytes": 1 << 20}
                        reply["blockTokens"] = block_tokens
                        reply = reply if hello is None else hello
                    else:
                        reply = answer(msg)
                    protocol.send(self.request, {"id": msg.get("id"), "ok": True, **reply})

    server = socketserver.ThreadingUnixStreamServer(str(path), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield str(path)
    finally:
        server.shutdown()
        server.server_close()
