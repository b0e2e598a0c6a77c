"""One way to reach the Kubernetes API: in-cluster credentials in a pod, $KUBECONFIG elsewhere."""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger("kvtier.kubeapi")


def api_client_from_environment(required: bool = False) -> Any:
    """A kubernetes ApiClient, or None when no API is configured, the client library is missing or
    the configuration is unusable (node components then run without the API). `required` (the
    operator) also tries ~/.kube/config and lets errors propagate."""
    in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    if not (in_cluster or os.environ.get("KUBECONFIG") or required):
        log.debug("no Kubernetes API configured")
        return None
    try:
        from kubernetes import client, config
    except ImportError:
        if required:
            raise
        log.warning("the kubernetes client is not installed: running without the API")
        return None
    try:
        config.load_incluster_config() if in_cluster else config.load_kube_config()
    except Exception as exc:
        if required:
            raise
        log.warning("Kubernetes API not usable (%s): running without it", exc)
        return None
    return client.ApiClient()


def merge_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns `old` into `new`: changed fields only, nested
    objects descended into, removed fields as null, lists sent whole. Empty when nothing changed."""
    patch: dict[str, Any] = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            sub = merge_patch(before, value)
            if sub:
                patch[key] = sub
        elif key not in old or before != value:
            patch[key] = value
    return patch


def condition(
    type_: str,
    ok: bool,
    reason: str,
    message: str,
    previous: list[dict[str, Any]],
    now: str,
    generation: int | None = None,
) -> dict[str, Any]:
    """A metav1.Condition whose lastTransitionTime moves only when its status changes."""
    status = "True" if ok else "False"
    old = next((c for c in previous if c.get("type") == type_), None)
    since = old["lastTransitionTime"] if old and old.get("status") == status else now
    out = {"type": type_, "status": status, "reason": reason, "message": message}
    if generation is not None:
        out["observedGeneration"] = generation
    return {**out, "lastTransitionTime": since}
