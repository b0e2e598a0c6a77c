"""`kvtier agent --config FILE`: one pool's node agent.

Wires the tiers, the store, the sockets, the peer data port, metrics and the KVCacheNode reporter
together from the configuration the operator rendered, then serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
from pathlib import Path

from prometheus_client import start_http_server

from kvtier import __version__, logs
from kvtier.agent.api.server import AgentAPI, Gate, ServerLimits
from kvtier.agent.devices import gpu_inventory, numa_for_gpus, rdma
from kvtier.agent.drain import Drainer, NodeWatch
from kvtier.agent.metrics import Metrics
from kvtier.agent.store.index import Store, load_secret
from kvtier.agent.tiers.dram import DramTier
from kvtier.agent.tiers.nvme import NotOurs, NvmeTier
from kvtier.agent.transports import open_transport
from kvtier.agent.transports.control import ControlServer, Session
from kvtier.agent.transports.offers import OfferingSession, OfferTaker, offer_blocks
from kvtier.api.agentconfig import AgentConfig
from kvtier.api.quantity import parse_quantity
from kvtier.api.v1alpha1 import Drain, NvmeDevice, parse_duration
from kvtier.kubeapi import api_client_from_environment

log = logging.getLogger("kvtier.agent")
VERSION = __version__
DRAIN_GRACE_S = 20.0  # of the pod's 30 s termination grace period


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.node = os.environ.get("NODE_NAME") or config.nodeName or socket.gethostname()
        spec = config.spec
        self.metrics = Metrics()
        self.gpus, self.gpu_reason = gpu_inventory()
        self.nvme_devices: list[NvmeDevice] = []
        self.health_reason: str | None = None
        dram = spec.tiers.dram
        numa = dram.numa if isinstance(dram.numa, int) else numa_for_gpus(self.gpus)
        self.dram = DramTier(
            config.pool,
            config.dram_bytes,
            config.segmentBytes,
            hugepages=dram.hugepages,
            numa=numa,
            share=spec.tenancy.dramShare,
        )
        self.nvme = self._nvme_tier()
        state_dir = Path(config.stateDir)
        secret = Path(config.secretFile).read_bytes() if config.secretFile else load_secret(state_dir)
        self.store = Store(
            secret,
            self.dram,
            self.nvme,
            isolation=spec.tenancy.isolation,
            policy=spec.eviction.policy,
            high_watermark=spec.eviction.highWatermark,
            low_watermark=spec.eviction.lowWatermark,
            metrics=self.metrics,
            nvme_share=spec.tenancy.nvmeShare,
            sync_timeout=parse_duration(spec.limits.syncTimeout),
        )
        self.limits = ServerLimits.from_spec(spec.limits)
        # tenant sockets and the peer port share one connection cap (threads follow connections)
        gate = Gate(self.limits.connections, self.limits.connections_per_tenant)
        rdma_ports, rdma_reason = rdma.discover()
        self.transport, self.transport_status = open_transport(
            self.store,
            secret,
            f"kvtier-{config.pool}-{self.node}-{os.urandom(4).hex()}",  # a restart is a new NIXL agent
            spec.prefetch.transport,
            rdma_ports,
            rdma_reason,
        )
        self.metrics.report_transport(self.transport_status)
        self.secret = secret
        self.offers: OfferTaker | None = None  # drain offers from peers, taken once the API is up
        self.peer = ControlServer(
            secret,
            config.peerHost,
            config.peerPort,
            self._peer_session,
            self.limits,
            gate,
            self.metrics,
        )
        if spec.tiers.nvme is not None:
            self.metrics.nvme_available.set(1 if self.nvme else 0)
        self.drainer = Drainer(self.store, spec.drain, self.metrics)
        self.numa = numa
        self.api = AgentAPI(
            Path(config.socketDir),
            self.store,
            spec.blockTokens,
            extra_stats=lambda: {
                "node": self.node,
                "peer": self.peer.address,
                "numaNode": numa,
                "transport": self.transport_status.model_dump(exclude_none=True),
            },
            node=NodeService(self),
            limits=self.limits,
            gate=gate,
        )
        # one API client (or None off-cluster) for the KVCacheNode reporter and the peer directory
        self.api_client = api_client_from_environment()
        self.api.prefetcher = self._prefetcher()
        self._wire_offers(spec.drain)
        self.metrics_port = self._serve_metrics()
        self.reporter = None
        self._stop = threading.Event()

    def _nvme_tier(self) -> NvmeTier | None:
        """The NVMe tier, or None with the reason kept for the KVCacheNode (the agent then serves
        from DRAM alone rather than not at all)."""
        nvme = self.config.spec.tiers.nvme
        if nvme is None:
            return None
        adopt = nvme.allowInUse or nvme.mode != "file"  # devices: prepare() already judged them
        if nvme.mode == "file":
            path = Path(nvme.path)  # type: ignore[arg-type]
            self.nvme_devices = [NvmeDevice(path=str(path), sizeBytes=self.config.nvme_bytes, state="file")]
        else:
            from kvtier.agent.devices.nvme import NvmeError, prepare
            from kvtier.agent.devices.runner import CommandError, SubprocessRunner

            try:
                prepared = prepare(
                    SubprocessRunner(),
                    self.config.pool,
                    nvme.mode,
                    self.config.nvme_bytes,
                    nvme.deviceSelector,
                    nvme.allowInUse,
                    Path(self.config.stateDir),
                )
            except (NvmeError, CommandError) as exc:
                self.health_reason = f"NVMe tier unavailable: {exc}"
                log.error(self.health_reason)
                return None
            path, self.nvme_devices = Path(prepared.path), prepared.devices
        try:
            return NvmeTier(
                path,
                self.config.nvme_bytes,
                io_threads=self.config.ioThreads,
                pool=self.config.pool,
                adopt=adopt,
            )
        except (NotOurs, OSError) as exc:
            self.health_reason = f"NVMe tier unavailable: {exc}"
            log.error(self.health_reason)
            return None

    @property
    def peer_address(self) -> str:
        """host:port other agents reach this one at (the pod IP in a cluster)."""
        port = self.peer.server_address[1]
        host = os.environ.get("POD_IP") or (
            self.config.peerHost if self.config.peerHost != "0.0.0.0" else "127.0.0.1"
        )
        return f"{host}:{port}"

    def _prefetcher(self):
        from kvtier.agent.prefetch import PeerDirectory, Prefetcher

        directory = PeerDirectory(self.config.pool, self.peer_address, self.config.peers, self.api_client)
        return Prefetcher(self.store, self.transport, directory)

    def _peer_session(self) -> Session:
        session = self.transport.new_session()
        return OfferingSession(session, self.offers) if self.offers else session

    def _wire_offers(self, drain: Drain) -> None:
        """Drain offers both ways: this agent takes peers' hottest blocks for the tenants it serves
        (those with a socket here), and offers its own when its node drains."""
        offer_bytes = None if drain.offerBytes is None else parse_quantity(drain.offerBytes)
        directory = self.api.prefetcher.directory
        self.offers = OfferTaker(
            self.store,
            self.transport,
            directory,
            lambda: {self.store.tenant_of(ns) for ns in list(self.api.tenants)},
            offer_bytes,
        )
        if offer_bytes is not None and self.transport.name == "nixl":
            self.drainer.offer = lambda groups, progress, cancelled: offer_blocks(
                groups, self.peer_address, self.secret, directory.peers(), progress, cancelled
            )

    def _serve_metrics(self) -> int:
        # port 0: the server binds any free port itself (probing for one first races with other
        # listeners, UCX's among them, between the probe and the bind)
        server, _ = start_http_server(self.config.metricsPort, registry=self.metrics.registry)
        return int(server.server_port)

    def start_reporter(self) -> None:
        from kvtier.agent.report import NodeReporter

        if self.api_client is not None:
            self.reporter = NodeReporter(self, self.api_client)
            self.drainer.changed = self.reporter.poke.set
            threading.Thread(target=self.reporter.run, args=(self._stop,), daemon=True).start()
            watch = NodeWatch(self.api_client, self.node, self.config.spec.nodeSelector, self.drainer)
            threading.Thread(target=watch.run, args=(self._stop,), daemon=True).start()
        else:
            log.info("not writing a KVCacheNode (no Kubernetes API)")

    def stop(self) -> None:
        self._stop.set()
        self.api.close()
        self.peer.close()
        self.store.close()


def online_numa_nodes(sysfs: Path = Path("/sys/devices/system/node/online")) -> list[int]:
    """'0-1,3' -> [0, 1, 3]; [] where the kernel does not say."""
    try:
        text = sysfs.read_text().strip()
    except OSError:
        return []
    nodes: list[int] = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        nodes.extend(range(int(lo), int(hi or lo) + 1))
    return nodes


class NodeService:
    """CSI-style node semantics on the admin socket: who the agent is, whether it is ready, which
    node and topology it serves, and its capacity per tier. Every call is read-only, so idempotent."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def identity(self) -> dict[str, object]:
        return {"name": "csi.kvtier.io", "vendorVersion": VERSION, "pool": self.agent.config.pool}

    def probe(self) -> dict[str, object]:
        reason = self.agent.health_reason
        return {"ready": True, "health": "Degraded" if reason else "Healthy", "reason": reason}

    def node_info(self) -> dict[str, object]:
        a = self.agent
        return {
            "nodeId": a.node,
            "topology": {
                "kubernetes.io/hostname": a.node,
                "kvtier.io/numa-nodes": ",".join(map(str, online_numa_nodes())),
                "kvtier.io/arena-numa-node": "" if a.numa is None else str(a.numa),
                "kvtier.io/gpus": ",".join(g.pciBusId or "" for g in a.gpus),
            },
            "gpus": [g.model_dump(exclude_none=True) for g in a.gpus],
            "gpuReason": a.gpu_reason,
            "nvme": [d.model_dump(exclude_none=True) for d in a.nvme_devices],
        }

    def capacity(self) -> dict[str, object]:
        stats = self.agent.store.stats()
        return {
            tier: {
                "capacityBytes": stats[tier]["capacityBytes"],
                "availableBytes": stats[tier]["capacityBytes"] - stats[tier]["usedBytes"],
            }
            for tier in ("dram", "nvme")
        }


def main(args: argparse.Namespace) -> int:
    logs.setup(args)
    config = AgentConfig.from_file(args.config)
    agent = Agent(config)
    agent.start_reporter()
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    # One line that scripts and tests wait for.
    print(
        f"kvtier agent ready pool={config.pool} node={agent.node} sockets={config.socketDir} "
        f"peer={agent.peer.address} metrics=:{agent.metrics_port} numa={agent.numa} "
        f"nvme={'direct' if agent.nvme and agent.nvme.direct else 'buffered' if agent.nvme else 'none'} "
        f"transport={agent.transport_status.ucxTransports or 'none'}",
        flush=True,
    )
    done.wait()
    if not agent.drainer.wait(timeout=DRAIN_GRACE_S):  # a drain in progress gets to finish
        log.warning("stopping before the drain finished")
    agent.stop()
    return 0
