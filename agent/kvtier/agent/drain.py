"""Drain on cordon: when the agent's node is cordoned or leaves the pool's nodeSelector, the agent
stops taking new blocks and writes the blocks that exist only in DRAM to NVMe, hottest first, up to
the pool's `drain.maxBytes`, so the node's cache survives the maintenance that follows. Then, when
the pool sets `drain.offerBytes`, it offers its hottest blocks (any tier) up to that bound to the
pool's other agents, which pull the ones of tenants they serve (`transports/offers.py`), so engines
on other nodes keep hitting them while this node is away.

The agent learns of it through the API (a watch on its own Node object, `NodeWatch`); the
KVCacheNode shows a `Draining` condition and `status.drain` with the progress (report.py).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kvtier.agent.metrics import Metrics
from kvtier.agent.store.index import Block, Store
from kvtier.agent.transports.offers import OfferOutcome
from kvtier.api import v1alpha1 as api
from kvtier.api.quantity import parse_quantity
from kvtier.kubeapi import condition

log = logging.getLogger("kvtier.agent.drain")


def drain_reason(
    labels: Mapping[str, str], unschedulable: bool, selector: Mapping[str, str] | None
) -> str | None:
    """Why this node should drain, or None: cordoned, or no longer matched by the pool."""
    if unschedulable:
        return "Cordoned"
    if any(labels.get(k) != v for k, v in (selector or {}).items()):
        return "LeftSelector"
    return None


@dataclass(frozen=True)
class Plan:
    move: list[Block]  # hottest first
    skipped: list[Block]  # over the byte bound: stay in DRAM only

    @property
    def planned_bytes(self) -> int:
        return sum(b.size for b in self.move)

    @property
    def skipped_bytes(self) -> int:
        return sum(b.size for b in self.skipped)


def plan(dram_only: list[Block], max_bytes: int | None, granule_s: float = 0.0) -> Plan:
    """Hottest first (most recently used), as many as fit in `max_bytes` (None: all). With a
    granule, blocks last used within the same one keep the order they are given in."""

    def hotness(block: Block) -> float:
        return block.last_used // granule_s if granule_s else block.last_used

    move, skipped, total = [], [], 0
    for block in sorted(dram_only, key=hotness, reverse=True):
        if max_bytes is None or total + block.size <= max_bytes:
            move.append(block)
            total += block.size
        else:
            skipped.append(block)
    return Plan(move, skipped)


# Blocks used within the same second count as equally hot and keep the store's order, which is the
# order they were saved in: a chain's head before its tail. Engines look up prefixes, so a peer
# holding the tail of a chain without its head would hold blocks nobody can hit.
OFFER_GRANULE_S = 1.0


def offer_plan(blocks: list[Block], max_bytes: int) -> list[tuple[str, list[Block]]]:
    """The hottest blocks of any tier up to `max_bytes`, by tenant: tenants in the order of their
    hottest block, each tenant's blocks hottest first (the order peers pull them in). `blocks` in
    the store's (saved) order."""
    groups: dict[str, list[Block]] = {}
    for block in plan(blocks, max_bytes, OFFER_GRANULE_S).move:
        groups.setdefault(block.tenant, []).append(block)
    return list(groups.items())


# (tenant groups, progress callback, cancelled) -> outcome: transports.offers.offer_blocks, bound
# to this agent's address, secret and peers by main.py
Offer = Callable[
    [list[tuple[str, list[Block]]], Callable[[OfferOutcome], None], Callable[[], bool]], OfferOutcome
]


def _iso(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


class Drainer:
    """The drain state machine of one agent: `want(reason)` starts, updates or ends a drain."""

    def __init__(
        self, store: Store, spec: api.Drain, metrics: Metrics, changed: Callable[[], None] = lambda: None
    ) -> None:
        self.store, self.spec, self.metrics, self.changed = store, spec, metrics, changed
        self.offer: Offer | None = None  # set by the agent when it has peers to offer to
        self.reason: str | None = None
        self.progress: api.DrainProgress | None = None
        self._conditions: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------ control

    def want(self, reason: str | None) -> None:
        """Called with what the node looks like now (idempotent)."""
        with self._lock:
            if reason == self.reason:
                return
            previous, self.reason = self.reason, reason
            if reason is None:
                self._cancel.set()
                self.store.refusing = None
                self.progress = None
                self.metrics.draining.set(0)
                log.info("node schedulable and in the pool again: taking new blocks")
            elif previous is None and self.spec.enabled:
                self.store.refusing = f"node draining ({reason}): not taking new blocks"
                self.metrics.draining.set(1)
                self.progress = api.DrainProgress(reason=reason, startedAt=_iso(dt.datetime.now(dt.UTC)))
                self._cancel = threading.Event()
                self._thread = threading.Thread(
                    target=self._flush, args=(self._cancel,), name="kvtier-drain", daemon=True
                )
                self._thread.start()
                log.info("draining (%s): no new blocks; writing DRAM-only blocks to NVMe", reason)
            elif self.progress is not None:
                self.progress = self.progress.model_copy(update={"reason": reason})
        self.changed()

    def wait(self, timeout: float) -> bool:
        """Until the current flush ends (SIGTERM during a drain: finish it within the grace period)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return thread is None or not thread.is_alive()

    def conditions(self, now: dt.datetime) -> list[dict[str, Any]]:
        if self.reason is None:
            ok, why, message = False, "Schedulable", "node schedulable and selected by the pool"
        elif not self.spec.enabled:
            ok, why, message = False, "DrainDisabled", f"{self.reason}; the pool's drain.enabled is false"
        else:
            p = self.progress
            state = p.state if p else "Flushing"
            ok, why = True, self.reason
            message = f"{state}: {p.progress if p else '0%'} of DRAM-only blocks written to NVMe"
            if p is not None and p.offer is not None:
                message += f"; {p.offer.state}: {p.offer.progress} of the hottest blocks offered to peers"
        self._conditions = [condition("Draining", ok, why, message, self._conditions, _iso(now))]
        return self._conditions

    # ------------------------------------------------------------------------------- flush

    def _flush(self, cancel: threading.Event) -> None:
        store = self.store
        max_bytes = None if self.spec.maxBytes is None else parse_quantity(self.spec.maxBytes)
        with store.lock:
            dram_only = [b for b in store.blocks.values() if b.seg is not None and b.nvme is None]
            chosen = plan(dram_only if store.nvme else [], max_bytes)
            # queued, or given up on by write-behind (no room then): retried now; the others are
            # being written right now and need nothing
            todo = set(store.persist_queue) | {b.key for b in chosen.move if b.unpersistable}
            for block in chosen.move:
                block.unpersistable = False
            # hottest first at the head of write-behind; blocks over the bound leave the queue
            store.persist_queue[:] = [b.key for b in chosen.move if b.key in todo]
            for block in chosen.skipped:
                block.unpersistable = True  # DRAM may drop them: they are not going to NVMe
            store.work.notify_all()
        self.metrics.drain_skipped_bytes.inc(chosen.skipped_bytes)
        self._update(chosen, done=False)
        while not cancel.is_set():
            with store.lock:
                pending = [
                    b
                    for b in chosen.move
                    if store.blocks.get(b.key) is b and b.nvme is None and not b.unpersistable
                ]
                if pending:
                    store.work.notify_all()
                    store.persisted.wait(timeout=0.2)
            if not pending:
                break
            self._update(chosen, done=False)
        if not cancel.is_set():
            moved = self._update(chosen, done=True)
            self.metrics.drain_moved_bytes.inc(moved)
            log.info("drain flushed: %s", self.progress)
        if not cancel.is_set() and self.offer is not None and self.spec.offerBytes is not None:
            self._offer(self.offer, parse_quantity(self.spec.offerBytes), cancel)

    def _offer(self, offer: Offer, max_bytes: int, cancel: threading.Event) -> None:
        with self.store.lock:
            groups = offer_plan(list(self.store.blocks.values()), max_bytes)
        planned = sum(b.size for _, blocks in groups for b in blocks)
        self._offer_progress(OfferOutcome(planned), done=False)
        log.info(
            "offering the %d hottest blocks (%d bytes) to peers", sum(len(b) for _, b in groups), planned
        )
        outcome = offer(groups, lambda o: self._offer_progress(o, done=False), cancel.is_set)
        self.metrics.drain_offered_bytes.labels("taken").inc(outcome.taken)
        self.metrics.drain_offered_bytes.labels("declined").inc(outcome.declined)
        if not cancel.is_set():
            self._offer_progress(outcome, done=True)
            log.info("offer done: %s", self.progress.offer if self.progress else None)

    def _offer_progress(self, outcome: OfferOutcome, done: bool) -> None:
        settled = outcome.taken + outcome.declined
        with self._lock:
            if self.progress is None:
                return
            offer = api.DrainOffer(
                state="Offered" if done else "Offering",
                plannedBytes=outcome.planned,
                takenBytes=outcome.taken,
                declinedBytes=outcome.declined,
                peers=len(outcome.peers),
                progress=f"{100 * settled // outcome.planned if outcome.planned else 100}%",
            )
            self.progress = self.progress.model_copy(update={"offer": offer})
        self.changed()

    def _update(self, chosen: Plan, done: bool) -> int:
        with self.store.lock:
            moved = sum(b.size for b in chosen.move if b.nvme is not None)
            failed = sum(
                b.size
                for b in chosen.move
                if b.nvme is None and (b.unpersistable or self.store.blocks.get(b.key) is not b)
            )
        planned = chosen.planned_bytes
        with self._lock:
            if self.progress is None:
                return moved
            self.progress = self.progress.model_copy(
                update={
                    "state": "Flushed" if done else "Flushing",
                    "plannedBytes": planned,
                    "movedBytes": moved,
                    "failedBytes": failed,
                    "skippedBytes": chosen.skipped_bytes,
                    "progress": f"{100 * (moved + failed) // planned if planned else 100}%",
                }
            )
        self.changed()
        return moved


class NodeWatch:
    """A watch on the agent's own Node object; every change is turned into `drain.want(...)`.
    A Node that does not exist (the local control plane, a typo in NODE_NAME) never drains."""

    def __init__(
        self, api_client: Any, node: str, selector: Mapping[str, str] | None, drainer: Drainer
    ) -> None:
        self.api_client, self.node, self.selector, self.drainer = api_client, node, selector, drainer

    def run(self, stop: threading.Event) -> None:
        from kubernetes import client, watch

        core = client.CoreV1Api(self.api_client)
        backoff = 1.0
        while not stop.is_set():
            try:
                stream = watch.Watch().stream(
                    core.list_node, field_selector=f"metadata.name={self.node}", timeout_seconds=300
                )
                for event in stream:
                    if stop.is_set():
                        return
                    node, backoff = event["object"], 1.0
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self.drainer.want(
                            drain_reason(
                                node.metadata.labels or {}, bool(node.spec.unschedulable), self.selector
                            )
                        )
            except Exception as exc:  # the API being away (or RBAC) must never stop the data path
                log.warning("watching Node %s (retry in %.0fs): %s", self.node, backoff, exc)
                stop.wait(backoff)
                backoff = min(60.0, backoff * 2)
