"""The node agent's configuration: what the operator renders into the pool's ConfigMap and what
`kvtier agent --config FILE` loads. One model, so the two can never disagree."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field

from kvtier.api.quantity import parse_quantity
from kvtier.api.v1alpha1 import KVCachePoolSpec, Model

GiB = 1 << 30
SOCKET_ROOT = "/var/run/kvtier"
STATE_ROOT = "/var/lib/kvtier"


class AgentConfig(Model):
    pool: str = Field(description="The KVCachePool this agent serves.")
    poolUid: str | None = Field(None, description="Owner of the KVCacheNode the agent writes.")
    spec: KVCachePoolSpec
    socketDir: str = Field(description="Per-tenant sockets live in subfolders; admin.sock at the top.")
    stateDir: str = Field(
        description="The pool secret and, in file mode, nothing else: the NVMe manifest sits by its data."
    )
    secretFile: str | None = Field(
        None, description="The pool's shared secret (a mounted Secret); tenant salts derive from it."
    )
    segmentBytes: int = Field(
        GiB, gt=0, description="DRAM arena segment size (a tenant owns whole segments)."
    )
    peerPort: int = Field(
        7070, ge=0, lt=65536, description="TCP data port for peer agents (0: any free port)."
    )
    peerHost: str = "0.0.0.0"
    peers: list[str] = Field(
        default_factory=list,
        description="Static peer agents (host:port); in a cluster they come from KVCacheNodes.",
    )
    metricsPort: int = Field(9400, ge=0, lt=65536, description="Prometheus metrics (0: any free port).")
    nodeName: str | None = Field(None, description="Overridden by $NODE_NAME (the downward API sets it).")
    ioThreads: int = Field(8, ge=1, le=128, description="Parallel direct-I/O requests to the NVMe tier.")
    heartbeatSeconds: float = Field(
        60.0, gt=0, description="KVCacheNode heartbeat (+-10 % jitter); changes are written when they happen."
    )

    @property
    def dram_bytes(self) -> int:
        return parse_quantity(self.spec.tiers.dram.size)

    @property
    def nvme_bytes(self) -> int:
        nvme = self.spec.tiers.nvme
        return parse_quantity(nvme.size) if nvme else 0

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)

    @classmethod
    def from_file(cls, path: str | Path) -> AgentConfig:
        return cls.model_validate(yaml.safe_load(Path(path).read_text()))


def default_agent_config(pool: str, spec: KVCachePoolSpec, uid: str | None = None) -> AgentConfig:
    """The configuration an agent of `pool` runs with on a cluster node."""
    dram = parse_quantity(spec.tiers.dram.size)
    return AgentConfig(
        pool=pool,
        poolUid=uid,
        spec=spec,
        socketDir=f"{SOCKET_ROOT}/{pool}",
        stateDir=f"{STATE_ROOT}/{pool}",
        segmentBytes=min(GiB, dram),
    )
