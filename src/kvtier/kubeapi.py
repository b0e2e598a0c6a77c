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
