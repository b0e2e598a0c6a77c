"""The operator's kopf handlers: thin glue between events and the pure render/status functions.

Create/update/resume apply the pool's children (server-side apply). KVCacheNodes, Nodes and pools
live in watch-fed indexes; an event marks the pools it concerns (fleet.py) and each pool's daemon
recomputes its status from the indexes, a short debounce after the last event, and writes only what
changed (usage numbers at most every `status_interval` s; node counts and conditions at once).
Nothing is listed on a timer except one DaemonSet list every `resync_seconds` that repairs drift. Deletion removes the children and the KVCacheNodes explicitly (finalizer), so the operator is
correct with or without a garbage collector.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import random
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf
from prometheus_client import Counter, Gauge, Histogram, start_http_server
from pydantic import ValidationError

from kvtier.api import v1alpha1 as api
from kvtier.operator import kube
from kvtier.operator.fleet import Fleet, NodeView
from kvtier.operator.render import child_name, pool_secret, render_pool, secret_name, summary
from kvtier.operator.settings import OperatorSettings
from kvtier.operator.status import aggregate, next_expiry, status_delta, usage_only

POOLS = (api.GROUP, api.VERSION, "kvcachepools")
KVCACHENODES = (api.GROUP, api.VERSION, "kvcachenodes")
NODES = ("v1", "nodes")

# The operator's own metrics: what Prometheus alerts on (KvtierPoolDegraded) and what a status
# write costs the API server.
POOL_CONDITION = Gauge("kvtier_pool_condition", "1 when the pool's condition is True", ["pool", "condition"])
POOL_NODES = Gauge("kvtier_pool_nodes", "Agents of the pool by state", ["pool", "state"])
STATUS_WRITES = Counter("kvtier_operator_status_writes", "Pool status writes, by what changed", ["change"])
STATUS_DELAY = Histogram(
    "kvtier_operator_status_delay_seconds",
    "From an event that changed a pool's node counts or conditions to its status write returning",
    buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10),
)

# What each pool's status was computed from, and one wake-up per pool; touched only from the event
# loop (async handlers), so no lock.
FLEET = Fleet()
WAKE: dict[str, asyncio.Event] = {}
WOKEN: dict[str, float] = {}  # pool -> when the first event not yet acted on arrived (loop time)
STATUS_WRITERS = ThreadPoolExecutor(32, thread_name_prefix="kvtier-status")  # a burst of pools at once


class _QuietEventHandlers(logging.Filter):
    """kopf logs every handler run; the event handlers run for every heartbeat of every agent."""

    NOISY = ("'kvcachenode_changed' succeeded", "'node_changed' succeeded", "'pool_changed' succeeded")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in self.NOISY)


logging.getLogger("kopf.objects").addFilter(_QuietEventHandlers())


def _wake(pools: set[str]) -> None:
    now = asyncio.get_running_loop().time()
    for pool in pools:
        WOKEN.setdefault(pool, now)
        WAKE.setdefault(pool, asyncio.Event()).set()


CHILD_KINDS = [  # what render_pool produces, to delete on pool deletion
    ("apps/v1", "DaemonSet", True),
    ("networking.k8s.io/v1", "NetworkPolicy", True),
    ("v1", "Service", True),
    ("v1", "ConfigMap", True),
    ("v1", "Secret", True),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding", False),
    ("rbac.authorization.k8s.io/v1", "ClusterRole", False),
    ("v1", "ServiceAccount", True),
]


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.finalizer = "kvtier.io/finalizer"
    # progress and diff-base in annotations: the pool's status holds only declared fields
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kvtier.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kvtier.io", key="last-handled-configuration"
    )
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = 30
    settings.posting.level = logging.INFO
    settings.execution.max_workers = 32
    settings.watching.reconnect_backoff = 1.0
    ours: OperatorSettings = memo.settings
    kube.ensure_namespace(ours.namespace)
    kube.warm_up([(api_version, kind) for api_version, kind, _ in CHILD_KINDS])
    if ours.metrics_port:
        start_http_server(ours.metrics_port)


def parse_pool(body: kopf.Body) -> api.KVCachePool:
    try:
        return api.KVCachePool.model_validate(dict(body))
    except ValidationError as exc:
        # The API server's schema refuses these first; this guards objects stored before a CRD change.
        raise kopf.PermanentError(f"invalid KVCachePool: {exc}") from None


def with_operator_image(pool: api.KVCachePool, image: str | None) -> api.KVCachePool:
    """A pool that keeps the default agent image runs the operator's own (the chart's image
    setting): the API server fills the default in, so the default value stands for "unset"."""
    if not image or pool.spec.agent.image != api.DEFAULT_AGENT_IMAGE:
        return pool
    agent = pool.spec.agent.model_copy(update={"image": image})
    return pool.model_copy(update={"spec": pool.spec.model_copy(update={"agent": agent})})


def apply_children(pool: api.KVCachePool, uid: str, ours: OperatorSettings) -> list[dict[str, Any]]:
    pool = with_operator_image(pool, ours.image)
    namespace = ours.namespace
    if kube.read_secret(secret_name(pool.metadata.name), namespace) is None:
        kube.apply(pool_secret(pool, uid, namespace, os.urandom(32)))  # once: salts must stay stable
    manifests = render_pool(pool, uid, namespace)
    for manifest in manifests:
        kube.apply(manifest)
    return manifests


@kopf.on.resume(*POOLS)
@kopf.on.create(*POOLS)
@kopf.on.update(*POOLS, field="spec")
def reconcile(
    body: kopf.Body, uid: str, meta: kopf.Meta, patch: kopf.Patch, memo: kopf.Memo, **_: Any
) -> None:
    pool = parse_pool(body)
    manifests = apply_children(pool, uid, memo.settings)
    patch.status["observedGeneration"] = meta.get("generation")
    kopf.info(body, reason="Applied", message=f"applied {summary(manifests)}")


# ---------------------------------------------------------------- indexes (watch-fed, in memory)
# async: each runs for every event of its kind, and is too small to be worth a thread hop


@kopf.index(*KVCACHENODES)
async def kvcachenodes_by_pool(body: kopf.Body, **_: Any) -> dict[str, api.KVCacheNode]:
    try:
        kvn = api.KVCacheNode.model_validate(dict(body))
    except ValidationError:
        return {}  # not written by an agent of this version: ignored, never fatal
    return {kvn.spec.pool: kvn}


@kopf.index(*NODES)
async def node_views(name: str, labels: kopf.Labels, spec: kopf.Spec, **_: Any) -> dict[str, NodeView]:
    return {name: NodeView(dict(labels), bool(spec.get("unschedulable")))}


@kopf.index(*POOLS)
async def pool_specs(body: kopf.Body, name: str, **_: Any) -> dict[str, api.KVCachePool]:
    try:
        return {name: api.KVCachePool.model_validate(dict(body))}
    except ValidationError:
        return {}


def _one(index: kopf.Index, key: str) -> Any:
    return next(iter(index.get(key, [])), None)


# ------------------------------------------------------- events -> which pools must recompute


@kopf.on.event(*KVCACHENODES)
async def kvcachenode_changed(spec: kopf.Spec, **_: Any) -> None:
    if spec.get("pool"):
        _wake({spec["pool"]})


@kopf.on.event(*NODES)
async def node_changed(type: str | None, name: str, labels: kopf.Labels, spec: kopf.Spec, **_: Any) -> None:
    view = None if type == "DELETED" else NodeView(dict(labels), bool(spec.get("unschedulable")))
    _wake(FLEET.set_node(name, view))


@kopf.on.event(*POOLS)
async def pool_changed(
    type: str | None, name: str, body: kopf.Body, spec: kopf.Spec, node_views: kopf.Index, **_: Any
) -> None:
    if type == "DELETED" or body.metadata.get("deletionTimestamp"):
        _wake(FLEET.remove_pool(name))
        WAKE.pop(name, None)
        _forget_metrics(name)
        return
    _wake(_track_pool(name, spec.get("nodeSelector"), node_views))


def _track_pool(name: str, selector: dict[str, str] | None, node_views: kopf.Index) -> set[str]:
    if name in FLEET.selectors and FLEET.selectors[name] == dict(selector or {}):
        return set()  # most pool events are its own status writes
    return FLEET.set_pool(name, selector, {n: _one(node_views, n) for n in node_views})


# ------------------------------------------------------------------------------ pool status


@kopf.daemon(*POOLS, cancellation_timeout=1.0)
async def keep_status(
    name: str,
    body: kopf.Body,
    stopped: kopf.DaemonStopped,
    kvcachenodes_by_pool: kopf.Index,
    pool_specs: kopf.Index,
    node_views: kopf.Index,
    logger: kopf.Logger,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    """Recompute the pool's status when woken (debounced), when a heartbeat is due to go stale, or
    when postponed usage numbers are due; write the changed fields through the status subresource."""
    usage_interval, debounce = memo.settings.status_interval, memo.settings.status_debounce
    wake = WAKE.setdefault(name, asyncio.Event())
    wake.set()  # once at start (operator restart, new pool)
    loop = asyncio.get_running_loop()
    # pools started together (an operator restart) must not write their usage numbers in step
    usage_written = loop.time() - random.uniform(0, usage_interval)
    due: float | None = None
    while not stopped:
        timeout = None if due is None else max(0.0, due - loop.time())
        try:
            await asyncio.wait_for(wake.wait(), timeout)
            await asyncio.sleep(debounce)  # a burst of events becomes one computation
        except TimeoutError:
            pass
        wake.clear()
        woken = WOKEN.pop(name, None)
        pool = _one(pool_specs, name)
        if pool is None or body.metadata.get("deletionTimestamp"):
            due = None
            continue
        if name not in FLEET.selectors:  # the daemon ran before the pool's event handler
            _track_pool(name, pool.spec.nodeSelector, node_views)
        written = dict(body.get("status") or {})
        kvnodes = list(kvcachenodes_by_pool.get(name, []))
        now = dt.datetime.now(dt.UTC)
        new = aggregate(
            pool,
            written.get("observedGeneration"),
            kvnodes,
            FLEET.selected(name),
            FLEET.conflicts(name),
            list(written.get("conditions") or []),
            now,
        )
        _export(name, new)
        expiry = next_expiry(kvnodes, now)
        due = None if expiry is None else loop.time() + (expiry - now).total_seconds()
        delta = status_delta(written, new)
        if not delta:
            continue
        if usage_only(delta) and loop.time() - usage_written < usage_interval:
            later = usage_written + usage_interval
            due = later if due is None else min(due, later)
            continue
        try:
            await loop.run_in_executor(STATUS_WRITERS, kube.patch_pool_status, name, delta)
        except Exception as exc:  # the API hiccuped: keep the daemon, try again shortly
            logger.warning("could not write the pool's status (retrying in 2 s): %s", exc)
            due = loop.time() + 2.0
            continue
        if "tiers" in delta or "hitRatio" in delta:
            usage_written = loop.time()
        if usage_only(delta):
            STATUS_WRITES.labels("usage").inc()
        else:
            STATUS_WRITES.labels("state").inc()
            if woken is not None:
                STATUS_DELAY.observe(loop.time() - woken)
        _warn_if_degraded(body, written, new)


def _export(pool: str, status: dict[str, Any]) -> None:
    for cond in status.get("conditions") or []:
        POOL_CONDITION.labels(pool, cond["type"]).set(1 if cond["status"] == "True" else 0)
    for state, count in (status.get("nodes") or {}).items():
        POOL_NODES.labels(pool, state).set(count)


def _forget_metrics(pool: str) -> None:
    for gauge, labels in (
        (POOL_CONDITION, ("Ready", "Progressing", "Degraded")),
        (POOL_NODES, ("desired", "ready", "draining")),
    ):
        for label in labels:
            try:
                gauge.remove(pool, label)
            except KeyError:
                pass


def _warn_if_degraded(body: kopf.Body, written: dict[str, Any], new: dict[str, Any]) -> None:
    def degraded(status: dict[str, Any]) -> dict[str, Any] | None:
        return next(
            (c for c in status.get("conditions") or [] if c["type"] == "Degraded" and c["status"] == "True"),
            None,
        )

    now = degraded(new)
    if now and not degraded(written):
        kopf.warn(body, reason=now["reason"], message=now["message"])


# ------------------------------------------------------------------------------- drift repair


def repair_drift(body: kopf.Body, uid: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    """Level-based: re-apply the children when the pool's DaemonSet is missing or renders
    differently (one shared DaemonSet list per interval for all pools, not a read per pool)."""
    if body.metadata.get("deletionTimestamp"):
        return  # being deleted: the delete handler owns the children now
    ours: OperatorSettings = memo.settings
    pool = parse_pool(body)
    hashes = kube.snapshot(
        "daemonsets", lambda: kube.daemonset_hashes(ours.namespace), ours.resync_seconds / 2
    )
    wanted = next(
        m["spec"]["template"]["metadata"]["annotations"]["kvtier.io/config-hash"]
        for m in render_pool(pool, uid, ours.namespace)
        if m["kind"] == "DaemonSet"
    )
    if hashes.get(child_name(name)) != wanted:
        apply_children(pool, uid, ours)
        kube.forget_snapshot("daemonsets")
        kopf.info(body, reason="Repaired", message="re-applied the pool's children (DaemonSet drifted)")


@kopf.on.delete(*POOLS)
def cleanup(name: str, logger: kopf.Logger, memo: kopf.Memo, **_: Any) -> None:
    deleted = []
    for api_version, kind, namespaced in CHILD_KINDS:
        child = secret_name(name) if kind == "Secret" else child_name(name)
        if kube.delete(api_version, kind, child, memo.settings.namespace if namespaced else None):
            deleted.append(f"{kind}/{child}")
    for kvn in kube.list_kvcachenodes(name):
        kube.delete(api.API_VERSION, "KVCacheNode", kvn.metadata.name)
        deleted.append(f"KVCacheNode/{kvn.metadata.name}")
    logger.info("pool deleted: removed %s", ", ".join(deleted) or "nothing")


def register(ours: OperatorSettings) -> None:
    """The one handler whose registration needs a setting: drift repair every `resync_seconds`.
    The operator's entry point calls this once with the settings it read at start."""
    kopf.timer(*POOLS, interval=ours.resync_seconds, initial_delay=ours.resync_seconds, idle=None)(
        repair_drift
    )
