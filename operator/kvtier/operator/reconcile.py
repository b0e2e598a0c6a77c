"""The operator's kopf handlers: thin glue between events and the pure render/status functions.

Create/update/resume apply the pool's children (server-side apply); a timer aggregates the pool's
KVCacheNodes into its status and re-applies children that went missing; deletion removes the
children and the KVCacheNodes explicitly (finalizer), so the operator is correct with or without a
garbage collector.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from typing import Any

import kopf
from kvtier.operator import kube
from kvtier.operator.render import child_name, pool_secret, render_pool, secret_name, summary
from kvtier.operator.status import aggregate, conflicts, selected_nodes
from pydantic import ValidationError

from kvtier.api import v1alpha1 as api

NAMESPACE = os.environ.get("KVTIER_NAMESPACE", "kvtier-system")
STATUS_INTERVAL = float(os.environ.get("KVTIER_STATUS_INTERVAL", "10"))
RESYNC_SECONDS = float(os.environ.get("KVTIER_RESYNC_SECONDS", "60"))
POOLS = (api.GROUP, api.VERSION, "kvcachepools")

CHILD_KINDS = [  # what render_pool produces, to delete on pool deletion
    ("apps/v1", "DaemonSet", True),
    ("v1", "Service", True),
    ("v1", "ConfigMap", True),
    ("v1", "Secret", True),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding", False),
    ("rbac.authorization.k8s.io/v1", "ClusterRole", False),
    ("v1", "ServiceAccount", True),
]


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
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
    settings.execution.max_workers = 16
    kube.ensure_namespace(NAMESPACE)


def parse_pool(body: kopf.Body) -> api.KVCachePool:
    try:
        return api.KVCachePool.model_validate(dict(body))
    except ValidationError as exc:
        # The API server's schema refuses these first; this guards objects stored before a CRD change.
        raise kopf.PermanentError(f"invalid KVCachePool: {exc}") from None


def with_operator_image(pool: api.KVCachePool) -> api.KVCachePool:
    """A pool that keeps the default agent image runs the operator's own (the chart's image
    setting): the API server fills the default in, so the default value stands for "unset"."""
    image = os.environ.get("KVTIER_IMAGE")
    if not image or pool.spec.agent.image != api.DEFAULT_AGENT_IMAGE:
        return pool
    agent = pool.spec.agent.model_copy(update={"image": image})
    return pool.model_copy(update={"spec": pool.spec.model_copy(update={"agent": agent})})


def apply_children(body: kopf.Body, pool: api.KVCachePool, uid: str) -> list[dict[str, Any]]:
    pool = with_operator_image(pool)
    if kube.read_secret(secret_name(pool.metadata.name), NAMESPACE) is None:
        kube.apply(pool_secret(pool, uid, NAMESPACE, os.urandom(32)))  # once: salts must stay stable
    manifests = render_pool(pool, uid, NAMESPACE)
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
    manifests = apply_children(body, pool, uid)
    memo["applied_at"] = time.monotonic()
    patch.status["observedGeneration"] = meta.get("generation")
    kopf.info(body, reason="Applied", message=f"applied {summary(manifests)}")


@kopf.timer(*POOLS, interval=STATUS_INTERVAL, initial_delay=min(1.0, STATUS_INTERVAL), idle=None)
def refresh_status(
    body: kopf.Body, uid: str, name: str, status: kopf.Status, patch: kopf.Patch, memo: kopf.Memo, **_: Any
) -> None:
    if body.metadata.get("deletionTimestamp"):
        return  # being deleted: the delete handler owns the children now
    pool = parse_pool(body)
    if time.monotonic() - memo.get("applied_at", 0) > RESYNC_SECONDS or not kube.exists(
        "apps/v1", "DaemonSet", child_name(name), NAMESPACE
    ):
        apply_children(body, pool, uid)  # level-based: repair drift (a deleted DaemonSet comes back)
        memo["applied_at"] = time.monotonic()
    nodes = kube.snapshot("nodes", kube.list_nodes, STATUS_INTERVAL / 2)
    shared = conflicts(pool, kube.snapshot("pools", kube.list_pools, STATUS_INTERVAL / 2), nodes)
    was_degraded = any(
        c.get("type") == "Degraded" and c.get("status") == "True" for c in status.get("conditions") or []
    )
    new = aggregate(
        pool,
        status.get("observedGeneration"),
        kube.list_kvcachenodes(name),
        selected_nodes(pool, nodes),
        shared,
        list(status.get("conditions") or []),
        dt.datetime.now(dt.UTC),
    )
    degraded = next(c for c in new["conditions"] if c["type"] == "Degraded")
    if degraded["status"] == "True" and not was_degraded:
        kopf.warn(body, reason=degraded["reason"], message=degraded["message"])
    for key, value in new.items():
        patch.status[key] = value


@kopf.on.delete(*POOLS)
def cleanup(body: kopf.Body, name: str, **_: Any) -> None:
    deleted = []
    for api_version, kind, namespaced in CHILD_KINDS:
        child = secret_name(name) if kind == "Secret" else child_name(name)
        if kube.delete(api_version, kind, child, NAMESPACE if namespaced else None):
            deleted.append(f"{kind}/{child}")
    for kvn in kube.list_kvcachenodes(name):
        kube.delete(api.API_VERSION, "KVCacheNode", kvn.metadata.name)
        deleted.append(f"KVCacheNode/{kvn.metadata.name}")
    logging.getLogger("kvtier.operator").info(
        "pool %s deleted: removed %s", name, ", ".join(deleted) or "nothing"
    )
