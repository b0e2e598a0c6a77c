"""Serving the pod webhook from the operator process (kopf's WebhookServer); the decision itself is
the pure `webhook.decide`. Imported only when the operator runs with --webhook-port."""

from __future__ import annotations

import os
from typing import Any

import kopf
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kvtier.operator import kube
from kvtier.operator.webhook import POOL_ANNOTATION, InjectSettings, apply_patch, decide

from kvtier.api import v1alpha1 as api

HANDLER_ID = "kvtier-inject"  # kopf serves it at <root>/kvtier-inject
SETTINGS = InjectSettings(
    image=os.environ.get("KVTIER_IMAGE", api.DEFAULT_AGENT_IMAGE),
    on_refusal=os.environ.get("KVTIER_WEBHOOK_ON_REFUSAL", "deny"),
)


def _pool(name: str) -> api.KVCachePool | None:
    try:
        body = client.CustomObjectsApi(kube.api_client()).get_cluster_custom_object(
            api.GROUP, api.VERSION, "kvcachepools", name
        )
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return api.KVCachePool.model_validate(body)


def _namespace_labels(name: str) -> dict[str, str]:
    return kube.snapshot(
        f"ns/{name}",
        lambda: client.CoreV1Api(kube.api_client()).read_namespace(name).metadata.labels or {},
        5.0,
    )


@kopf.on.mutate("v1", "pods", id=HANDLER_ID, operation="CREATE", side_effects=False)
def inject(body: kopf.Body, patch: kopf.Patch, warnings: list[str], **_: Any) -> None:
    pod = dict(body)
    namespace = body.metadata.namespace or (body.get("metadata") or {}).get("namespace") or "default"
    pool_name = (body.metadata.annotations or {}).get(POOL_ANNOTATION)
    decision = decide(
        pod,
        _pool(pool_name) if pool_name else None,
        pool_name,
        namespace,
        _namespace_labels(namespace),
        SETTINGS,
    )
    if not decision.allowed:
        raise kopf.AdmissionError(f"kvtier: {decision.message}", code=403)
    warnings.extend(decision.warnings)
    if decision.patch:
        ops = decision.patch
        patch.fns.append(lambda raw: raw.update(apply_patch(raw, ops)))
