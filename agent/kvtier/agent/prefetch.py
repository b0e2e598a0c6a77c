"""Prefetch: make a chain's blocks hit DRAM before the engine asks — promote what this node has on
NVMe, fetch what peer agents hold — and give up at the deadline (counted late, never waited on).

Peers are found through Kubernetes (the pool's KVCacheNodes carry each agent's peer address) or a
static list; blocks move agent to agent by NIXL READs (`transports.nixl`), asked for over the
authenticated control channel, so the pool secret never leaves the agents.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

from kvtier.agent.store.index import Store

log = logging.getLogger("kvtier.agent.prefetch")


class PeerDirectory:
    def __init__(
        self, pool: str, own_address: str, static: list[str], api_client: Any = None, ttl: float = 10.0
    ):
        self.pool, self.own, self.static = pool, own_address, list(static)
        self.api, self.ttl = api_client, ttl
        self._cached: tuple[float, list[str]] = (0.0, [])

    def peers(self) -> list[str]:
        found = list(self.static)
        if self.api is not None:
            stamp, cached = self._cached
            if time.monotonic() - stamp > self.ttl:
                cached = self._from_kvcachenodes()
                self._cached = (time.monotonic(), cached)
            found += cached
        return [p for p in dict.fromkeys(found) if p and p != self.own]

    def _from_kvcachenodes(self) -> list[str]:
        from kubernetes import client

        from kvtier.api import v1alpha1 as api

        try:
            items = client.CustomObjectsApi(self.api).list_cluster_custom_object(
                api.GROUP, api.VERSION, "kvcachenodes", label_selector=f"kvtier.io/pool={self.pool}"
            )["items"]
        except Exception as exc:  # the API being down only costs remote hits
            log.warning("cannot list peers: %s", exc)
            return []
        return [
            i.get("status", {}).get("peerAddress", "")
            for i in items
            if i.get("status", {}).get("health") == "Healthy"
        ]


class Transport(Protocol):
    def fetch(self, peer: str, tenant: str, ikeys: list[bytes], deadline: float) -> list[Any]:
        """The leading blocks of `ikeys` that `peer` holds for `tenant`, now indexed here (`Landed`)."""
        ...


class Prefetcher:
    def __init__(self, store: Store, transport: Transport, directory: PeerDirectory) -> None:
        self.store, self.transport, self.directory = store, transport, directory

    def run(self, tenant: str, fingerprint: str, keys: list[bytes], deadline_s: float) -> dict[str, int]:
        deadline = time.monotonic() + deadline_s
        local = self.store.prefetch_local(tenant, fingerprint, keys, deadline)
        missing = [self.store.index_key(tenant, fingerprint, k) for k in keys[local["first_missing"] :]]
        fetched = fetched_bytes = 0
        late = bool(local["late"])
        for peer in self.directory.peers() if missing and not late else []:
            if time.monotonic() > deadline:
                late = True
                break
            try:
                landed = self.transport.fetch(peer, tenant, missing, deadline)
            except OSError as exc:  # refused, unreachable, killed mid-transfer, late: a miss
                log.info("peer %s: %s", peer, exc)
                late = time.monotonic() > deadline
                continue
            fetched += sum(1 for b in landed if b.new)
            fetched_bytes += sum(b.size for b in landed if b.new)
            del missing[: len(landed)]
            if not missing:
                break
        if late:
            self.store.metrics.prefetch_late.inc()
        return {
            "dram": local["dram"],
            "promoted": local["promoted"],
            "fetched": fetched,
            "fetchedBytes": fetched_bytes,
            "missing": len(missing),
            "late": int(late),
        }
