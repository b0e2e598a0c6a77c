"""Prefetch: make a chain's blocks hit DRAM before the engine asks — promote what this node has on
NVMe, fetch what peer agents hold — and give up at the deadline (counted late, never waited on).

Peers are found through Kubernetes (the pool's KVCacheNodes carry each agent's peer address) or a
static list; blocks move agent to agent over a Transport, so the pool secret never leaves the agents.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from kvtier.agent.store.index import Store
from kvtier.agent.transports.base import Transport

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
                for block in self.transport.fetch(peer, missing):
                    if block.tenant != tenant or block.key != missing[0]:
                        break  # never store another tenant's bytes, nor out of order
                    if self.store.ingest(block.key, tenant, block.data, block.checksum):
                        fetched += 1
                        fetched_bytes += len(block.data)
                    missing.pop(0)
                    if not missing or time.monotonic() > deadline:
                        late = bool(missing)
                        break
            except (OSError, PermissionError) as exc:
                log.info("peer %s: %s", peer, exc)
            if not missing or late:
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
