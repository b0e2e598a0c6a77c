"""Blocks between agents: NIXL (UCX) for the bytes, an authenticated control channel for the asking.

`select` maps the pool's `prefetch.transport` (auto/rdma/tcp) and the node's RDMA ports to UCX
transports (pure); `open_transport` starts NIXL with them. Without an importable NIXL the agent
still serves its own tiers and says so: there is one data path between agents, not a fallback one.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from kvtier.api.v1alpha1 import NodeTransport, RdmaPort

log = logging.getLogger("kvtier.agent.transports")

# UCX transport names: rc/ud are InfiniBand and RoCE (verbs or mlx5 accelerated), tcp is sockets.
# Shared memory and CMA are left out on purpose: peers are other nodes, and two agents of one node
# belong to different pools.
UCX_RDMA = "rc,ud"
UCX_TCP = "tcp"


@dataclass(frozen=True)
class Selection:
    ucx_tls: str
    rdma: bool
    reason: str


def select(requested: str, ports: list[RdmaPort], rdma_reason: str | None, env: dict[str, str]) -> Selection:
    if env.get("UCX_TLS"):
        tls = env["UCX_TLS"]
        return Selection(
            tls, any(t in tls for t in ("rc", "ud", "dc", "ib")), "UCX_TLS set in the environment"
        )
    active = [p for p in ports if p.state == "ACTIVE"]
    names = ", ".join(
        f"{p.device}/{p.port} ({'RoCE' if p.linkLayer == 'Ethernet' else p.linkLayer})" for p in active
    )
    if requested == "tcp":
        return Selection(UCX_TCP, False, "tcp asked for")
    if active and requested == "rdma":
        return Selection(UCX_RDMA, True, f"rdma asked for; active RDMA ports: {names}")
    if active:
        return Selection(f"{UCX_RDMA},{UCX_TCP}", True, f"active RDMA ports: {names}; tcp for peers without")
    why = rdma_reason or "no RDMA port is active"
    if requested == "rdma":
        return Selection(UCX_TCP, False, f"rdma asked for but {why}: blocks move over tcp")
    return Selection(UCX_TCP, False, f"{why}: tcp")


class NoTransport:
    """What an agent without NIXL has: its peers get a refusal and its fetches find nothing."""

    name = "none"

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def fetch(self, peer: str, tenant: str, ikeys: list[bytes], deadline: float) -> list[Any]:
        return []

    def new_session(self) -> Any:
        return _Refusal(self.reason)


class _Refusal:
    def __init__(self, reason: str) -> None:
        self.reason = reason

    def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        return {"ok": False, "error": f"this agent cannot serve blocks: {self.reason}"}

    def close(self) -> None:
        pass


def open_transport(
    store: Any, secret: bytes, agent_name: str, requested: str, ports: list[RdmaPort], rdma_reason: str | None
) -> tuple[Any, NodeTransport]:
    """The agent's transport and the KVCacheNode's account of it."""
    from kvtier.agent.transports.nixl import NixlTransport

    chosen = select(requested, ports, rdma_reason, dict(os.environ))
    status = NodeTransport(requested=requested, rdmaPorts=ports, rdmaReason=rdma_reason)  # type: ignore[arg-type]
    try:
        transport: Any = NixlTransport(store, secret, agent_name, chosen.ucx_tls)
    except Exception as exc:  # no wheel for this platform, no UCX plugin, UCX refusing the transports
        reason = f"peer fetches are off: {exc}"
        log.warning("NIXL unavailable, %s", reason)
        return NoTransport(reason), status.model_copy(update={"reason": reason})
    log.info("peer transport: NIXL %s over UCX_TLS=%s (%s)", transport.version, chosen.ucx_tls, chosen.reason)
    return transport, status.model_copy(
        update={
            "library": f"nixl {transport.version} (UCX)",
            "ucxTransports": chosen.ucx_tls,
            "rdma": chosen.rdma,
            "reason": chosen.reason,
        }
    )
