"""Prometheus metrics of one agent (own registry, so several agents can live in one test process).

Names follow Prometheus conventions (a test checks them): the unit at the end of the name
(`_bytes`, `_seconds`, `_blocks`), counters exposed with `_total`, and labels drawn from small fixed
sets (tier, direction, result, source, op), never keys, tenants or addresses.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kvtier import __version__

# Every label value the agent uses, by label name: bounded sets (the naming test checks the registry).
LABEL_VALUES = {
    "tier": {"dram", "nvme"},
    "result": {"dram", "nvme", "miss"},
    "direction": {"dram_to_nvme", "nvme_to_dram", "served", "fetched"},
    "source": {"commit", "nvme", "peer"},
    # the tenant socket's operations (api/server.py) and the store's own steps
    "op": {"hello", "ping", "stats", "lookup", "allocate", "commit", "read", "prefetch", "release"}
    | {"read_blocks", "promote", "persist"},
    "outcome": {"taken", "declined"},  # a drain's offer of its hottest blocks to peers
    "version": {__version__},  # one value per build: kvtier_build_info
}


class LogThrottle:
    """At most one log line per kind of trouble per interval, with how many were held back: a
    failing disk or a hostile client is counted in metrics, not written to the log a million times."""

    def __init__(self, logger: logging.Logger, interval: float = 30.0) -> None:
        self.logger = logger
        self.interval = interval
        self._next: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def _emit(self, log, kind: str, msg: str, args: tuple[object, ...]) -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._next.get(kind, 0.0):
                self._held[kind] = self._held.get(kind, 0) + 1
                return
            self._next[kind] = now + self.interval
            held = self._held.pop(kind, 0)
        log(msg + (f" (and {held} more like it)" if held else ""), *args)

    def warning(self, kind: str, msg: str, *args: object) -> None:
        self._emit(self.logger.warning, kind, msg, args)

    def exception(self, kind: str, msg: str, *args: object) -> None:
        self._emit(self.logger.exception, kind, msg, args)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.tier_bytes = Gauge("kvtier_tier_used_bytes", "Bytes held per tier", ["tier"], registry=r)
        self.tier_capacity = Gauge("kvtier_tier_capacity_bytes", "Capacity per tier", ["tier"], registry=r)
        self.nvme_available = Gauge(
            "kvtier_nvme_tier_available",
            "1 when the pool's NVMe tier is serving, 0 when it could not start",
            registry=r,
        )
        self.lookups = Counter(
            "kvtier_block_reads", "Blocks asked for, by serving tier or miss", ["result"], registry=r
        )
        self.committed_blocks = Counter("kvtier_committed_blocks", "Blocks committed by clients", registry=r)
        self.committed_bytes = Counter("kvtier_committed_bytes", "Bytes committed by clients", registry=r)
        self.evictions = Counter("kvtier_evicted_blocks", "Blocks dropped from a tier", ["tier"], registry=r)
        self.demotions = Counter(
            "kvtier_demoted_blocks", "DRAM copies dropped with an NVMe copy kept", registry=r
        )
        self.promotions = Counter("kvtier_promoted_blocks", "NVMe blocks brought back to DRAM", registry=r)
        self.bytes_moved = Counter(
            "kvtier_tier_moved_bytes", "Bytes moved between tiers", ["direction"], registry=r
        )
        self.checksum_failures = Counter(
            "kvtier_checksum_failures",
            "Blocks that failed their checksum (served as misses)",
            ["source"],
            registry=r,
        )
        self.alloc_failures = Counter(
            "kvtier_alloc_failures", "Saves refused because the arena was full", registry=r
        )
        self.persist_failures = Counter(
            "kvtier_persist_failures", "Blocks not written to NVMe (no room or an I/O error)", registry=r
        )
        self.protocol_errors = Counter("kvtier_protocol_errors", "Malformed requests", registry=r)
        self.io_errors = Counter(
            "kvtier_nvme_io_errors",
            "NVMe reads and writes that failed (reads served as misses)",
            ["op"],
            registry=r,
        )
        self.refused_connections = Counter(
            "kvtier_refused_connections", "Connections refused at a limit", ["socket"], registry=r
        )
        self.connections = Gauge("kvtier_connections", "Open connections", ["socket"], registry=r)
        self.peer_bytes = Counter(
            "kvtier_peer_bytes", "Bytes served to or fetched from peers", ["direction"], registry=r
        )
        self.prefetch_used = Counter(
            "kvtier_prefetch_used_blocks", "Prefetched blocks later read", registry=r
        )
        self.prefetch_unused = Counter(
            "kvtier_prefetch_unused_blocks", "Prefetched blocks evicted before anyone read them", registry=r
        )
        self.prefetch_late = Counter(
            "kvtier_late_prefetches", "Prefetches stopped at their deadline", registry=r
        )
        self.draining = Gauge(
            "kvtier_draining", "1 while the node is cordoned or leaving the pool (no new blocks)", registry=r
        )
        self.drain_moved_bytes = Counter(
            "kvtier_drain_moved_bytes", "DRAM-only bytes written to NVMe by drains", registry=r
        )
        self.drain_skipped_bytes = Counter(
            "kvtier_drain_skipped_bytes", "DRAM-only bytes a drain left out (over drain.maxBytes)", registry=r
        )
        self.drain_offered_bytes = Counter(
            "kvtier_drain_offered_bytes",
            "Hottest bytes a drain offered to peers, by outcome (taken by a peer or declined by all)",
            ["outcome"],
            registry=r,
        )
        self.latency = Histogram(
            "kvtier_op_duration_seconds",
            "Latency of agent operations",
            ["op"],
            buckets=(1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1, 3),
            registry=r,
        )
        self.transport = Gauge(
            "kvtier_peer_transport_info",
            "The peer data path in use (1): library, UCX transports, whether RDMA was selected",
            ["library", "ucx_tls", "rdma"],
            registry=r,
        )
        self.rdma_port_mtu = Gauge(
            "kvtier_rdma_port_active_mtu_bytes",
            "Active MTU of each RDMA port found on the node",
            ["device", "port", "link_layer", "state"],
            registry=r,
        )
        self.rdma_port_gids = Gauge(
            "kvtier_rdma_port_gids", "Populated GID entries per RDMA port", ["device", "port"], registry=r
        )
        # the convention for "which build is this": a constant 1, the version in its label
        self.build_info = Gauge(
            "kvtier_build_info", "The agent's kvtier version (1)", ["version"], registry=r
        )
        self.build_info.labels(__version__).set(1)

    def report_transport(self, status: Any) -> None:
        """The agent's NodeTransport (see kvtier.api.v1alpha1) as info gauges."""
        self.transport.labels(
            status.library or "none", status.ucxTransports or "", str(status.rdma).lower()
        ).set(1)
        for p in status.rdmaPorts:
            self.rdma_port_mtu.labels(p.device, str(p.port), p.linkLayer, p.state).set(p.activeMtu or 0)
            self.rdma_port_gids.labels(p.device, str(p.port)).set(len(p.gids))
