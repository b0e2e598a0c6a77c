"""Kubernetes I/O for the operator: server-side apply, deletes, lists. Everything else is pure."""

from __future__ import annotations

import functools
import threading
import time
from typing import Any

from kubernetes import client, dynamic
from kubernetes.client.exceptions import ApiException

from kvtier.api import v1alpha1 as api
from kvtier.kubeapi import api_client_from_environment

FIELD_MANAGER = "kvtier-operator"


@functools.cache
def api_client() -> client.ApiClient:
    # as many connections as handlers and status writers run at once (urllib3 discards the rest)
    configuration = api_client_from_environment(required=True).configuration
    configuration.connection_pool_maxsize = 80
    return client.ApiClient(configuration)


def warm_up(kinds: list[tuple[str, str]]) -> None:
    """Resolve the kinds server-side apply will need, once, before handlers run: otherwise the first
    burst of pools makes every worker thread run API discovery at the same time."""
    for api_version, kind in kinds:
        dynamic_client().resources.get(api_version=api_version, kind=kind)


@functools.cache
def dynamic_client() -> dynamic.DynamicClient:
    return dynamic.DynamicClient(api_client())


def _resource(manifest: dict[str, Any]):
    return dynamic_client().resources.get(api_version=manifest["apiVersion"], kind=manifest["kind"])


def apply(manifest: dict[str, Any]) -> None:
    """Server-side apply with kvtier's field manager: idempotent, and it owns only its fields."""
    dynamic_client().server_side_apply(
        _resource(manifest),
        body=manifest,
        namespace=manifest["metadata"].get("namespace"),
        field_manager=FIELD_MANAGER,
        force_conflicts=True,
    )


def _by_name(verb: str, api_version: str, kind: str, name: str, namespace: str | None) -> bool:
    """get or delete one object; False when it does not exist."""
    res = dynamic_client().resources.get(api_version=api_version, kind=kind)
    try:
        getattr(res, verb)(name=name, namespace=namespace if res.namespaced else None)
        return True
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise


def delete(api_version: str, kind: str, name: str, namespace: str | None = None) -> bool:
    return _by_name("delete", api_version, kind, name, namespace)


def exists(api_version: str, kind: str, name: str, namespace: str | None = None) -> bool:
    return _by_name("get", api_version, kind, name, namespace)


def list_kvcachenodes(pool: str) -> list[api.KVCacheNode]:
    items = client.CustomObjectsApi(api_client()).list_cluster_custom_object(
        api.GROUP, api.VERSION, "kvcachenodes", label_selector=f"kvtier.io/pool={pool}"
    )["items"]
    return [api.KVCacheNode.model_validate(i) for i in items]


_SNAPSHOTS: dict[str, tuple[float, Any]] = {}
_SNAPSHOT_LOCK = threading.Lock()


def snapshot(name: str, fetch, max_age: float) -> Any:
    """A read that many handlers need (the agents' DaemonSets for every pool's drift check, a
    namespace's labels for the webhook), fetched at most once per `max_age` seconds and shared."""
    with _SNAPSHOT_LOCK:
        stamp, value = _SNAPSHOTS.get(name, (0.0, None))
        if time.monotonic() - stamp > max_age:
            value = fetch()
            _SNAPSHOTS[name] = (time.monotonic(), value)
        return value


def read_secret(name: str, namespace: str) -> dict[str, Any] | None:
    try:
        return client.CoreV1Api(api_client()).read_namespaced_secret(name, namespace).to_dict()
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def ensure_namespace(name: str) -> None:
    """Create the namespace unless it exists. In a cluster it always does (Helm installed the
    operator there) and the operator's RBAC only reads namespaces, so look before creating."""
    core = client.CoreV1Api(api_client())
    try:
        core.read_namespace(name)
        return
    except ApiException as exc:
        if exc.status != 404:
            raise
    try:
        core.create_namespace({"metadata": {"name": name}})
    except ApiException as exc:
        if exc.status != 409:
            raise


def apply_crds(api_client_: client.ApiClient | None = None, timeout: float = 30) -> None:
    """Install or update kvtier's CRDs and wait until they are served (dev cluster, tests, demo)."""
    from kvtier.api.crds import all_crds

    ext = client.ApiextensionsV1Api(api_client_ or api_client())
    for crd in all_crds():
        name = crd["metadata"]["name"]
        try:
            current = ext.read_custom_resource_definition(name)
            crd["metadata"]["resourceVersion"] = current.metadata.resource_version
            ext.replace_custom_resource_definition(name, crd)
        except ApiException as exc:
            if exc.status != 404:
                raise
            ext.create_custom_resource_definition(crd)
        deadline = time.monotonic() + timeout
        while True:
            conds = ext.read_custom_resource_definition(name).status.conditions or []
            if any(c.type == "Established" and c.status == "True" for c in conds):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"CRD {name} not established")
            time.sleep(0.1)


def forget_snapshot(name: str) -> None:
    with _SNAPSHOT_LOCK:
        _SNAPSHOTS.pop(name, None)


def daemonset_hashes(namespace: str) -> dict[str, str]:
    """{DaemonSet name: its pod template's config hash} for kvtier's agents in `namespace`."""
    items = (
        client.AppsV1Api(api_client())
        .list_namespaced_daemon_set(namespace, label_selector="app.kubernetes.io/name=kvtier-agent")
        .items
    )
    return {
        ds.metadata.name: (ds.spec.template.metadata.annotations or {}).get("kvtier.io/config-hash", "")
        for ds in items
    }


def patch_pool_status(name: str, delta: dict[str, Any]) -> None:
    """A merge patch of the pool's status subresource with only the fields that changed."""
    try:
        client.CustomObjectsApi(api_client()).patch_cluster_custom_object_status(
            api.GROUP, api.VERSION, "kvcachepools", name, {"status": delta}
        )
    except ApiException as exc:
        if exc.status != 404:  # deleted meanwhile: nothing to report on
            raise
