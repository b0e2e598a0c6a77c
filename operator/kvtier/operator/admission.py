"""Serving the pod webhook from the operator process (kopf's WebhookServer); the decision itself is
the pure `webhook.decide`. Imported only when the operator runs with --webhook-port."""

from __future__ import annotations

import logging
from typing import Any

import kopf
import pydantic
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kvtier.api import v1alpha1 as api
from kvtier.operator import kube
from kvtier.operator.settings import OperatorSettings
from kvtier.operator.webhook import (
    POOL_ANNOTATION,
    Decision,
    InjectSettings,
    apply_patch,
    decide,
    name_problem,
)

log = logging.getLogger("kvtier.webhook")
HANDLER_ID = "kvtier-inject"  # kopf serves it at <root>/kvtier-inject


def inject_settings(ours: OperatorSettings) -> InjectSettings:
    """What the pure decision needs from the operator's settings."""
    return InjectSettings(image=ours.image or api.DEFAULT_AGENT_IMAGE, on_refusal=ours.webhook_on_refusal)


class LookupFailed(Exception):
    """The API could not answer a lookup the decision needs (said in the refusal, briefly)."""


def _pool(name: str) -> api.KVCachePool | None:
    try:
        body = client.CustomObjectsApi(kube.api_client()).get_cluster_custom_object(
            api.GROUP, api.VERSION, "kvcachepools", name
        )
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise LookupFailed(f"could not read KVCachePool {name!r}: {exc.status} {exc.reason}") from None
    try:
        return api.KVCachePool.model_validate(body)
    except pydantic.ValidationError as exc:
        raise LookupFailed(f"KVCachePool {name!r} is not valid ({exc.error_count()} errors)") from None


def _namespace_labels(name: str) -> dict[str, str]:
    try:
        return kube.snapshot(
            f"ns/{name}",
            lambda: client.CoreV1Api(kube.api_client()).read_namespace(name).metadata.labels or {},
            5.0,
        )
    except ApiException as exc:
        raise LookupFailed(f"could not read namespace {name!r}: {exc.status} {exc.reason}") from None


@kopf.on.mutate("v1", "pods", id=HANDLER_ID, operations={"CREATE"}, side_effects=False)
def inject(body: kopf.Body, patch: kopf.Patch, warnings: list[str], memo: kopf.Memo, **_: Any) -> None:
    settings = inject_settings(memo.settings)
    pod = dict(body)
    namespace = body.metadata.namespace or (body.get("metadata") or {}).get("namespace") or "default"
    pool_name = (body.metadata.annotations or {}).get(POOL_ANNOTATION)
    try:
        # a name that is not a Kubernetes name never reaches the API (`..`, `fast/status`)
        lookup = pool_name and name_problem("pool", pool_name) is None
        decision = decide(
            pod,
            _pool(pool_name) if lookup else None,
            pool_name,
            namespace,
            _namespace_labels(namespace),
            settings,
        )
    except LookupFailed as exc:
        decision = Decision(False, message=str(exc), code=403)
        if settings.on_refusal == "warn":
            decision = Decision(True, message=str(exc), warnings=[f"kvtier: not injected: {exc}"])
    except Exception as exc:  # never a 500 with a traceback: a short reason
        # the module's logger, not kopf's per-object one: the pod being admitted does not exist yet
        log.exception("admission of a pod in %s failed", namespace)
        raise kopf.AdmissionError(f"kvtier: the webhook failed: {type(exc).__name__}", code=400) from None
    if not decision.allowed:
        raise kopf.AdmissionError(f"kvtier: {decision.message}", code=decision.code)
    warnings.extend(decision.warnings)
    if decision.patch:
        ops = decision.patch
        patch.fns.append(lambda raw: raw.update(apply_patch(raw, ops)))
