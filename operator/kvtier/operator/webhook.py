"""The pod webhook's decision and patch: (pod, pool, namespace) -> allow/deny + JSONPatch. Pure.

A pod opts in with the label `kvtier.io/inject: "true"` (the webhook's objectSelector) and names its
pool with the annotation `kvtier.io/pool`. The patch adds, and only adds:
- a `csi.kvtier.io` ephemeral volume that brings the agent socket of the pod's own namespace,
  mounted read-only in the sidecar and every engine container;
- an emptyDir, filled by an init container from the kvtier image, that puts the kvtier package on
  the engines' PYTHONPATH (so the connector loads in the user's unchanged engine image);
- the prefetch sidecar as a native sidecar (init container, restartPolicy Always, startup probe),
  meeting Pod Security "restricted";
- the client environment (KVTIER_POOL, KVTIER_SOCKET) and, for vLLM, `--kv-transfer-config`;
- a required node-affinity term for the pool's nodes, ANDed into every term the pod already has;
- the annotation `kvtier.io/injected`, which makes a second admission a no-op.
Nothing added needs hostPath, hostIPC, hostNetwork or privilege.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

from kvtier.api import v1alpha1 as api

INJECT_LABEL = "kvtier.io/inject"
POOL_ANNOTATION = "kvtier.io/pool"
ENGINE_ANNOTATION = "kvtier.io/engine"
INJECTED_ANNOTATION = "kvtier.io/injected"
SIDECAR = "kvtier-prefetch"
STAGER = "kvtier-stage"
SOCKET_VOLUME = "kvtier-socket"
LIB_VOLUME = "kvtier-lib"
SOCKET_DIR = "/var/run/kvtier"
LIB_DIR = "/opt/kvtier-lib"
SIDECAR_PORT = 8765
VLLM_CONNECTOR = {
    "kv_connector": "KVTierConnector",
    "kv_connector_module_path": "kvtier.agent.connectors.vllm",
    "kv_role": "kv_both",
    "kv_load_failure_policy": "recompute",  # a block that cannot be loaded is recomputed, never wrong
}


@dataclass(frozen=True)
class InjectSettings:
    image: str = api.DEFAULT_AGENT_IMAGE
    on_refusal: str = "deny"  # deny | warn (leave the pod alone and warn)
    sidecar_resources: dict[str, Any] = field(
        default_factory=lambda: {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}
    )


@dataclass
class Decision:
    allowed: bool
    patch: list[dict[str, Any]] = field(default_factory=list)
    message: str = ""
    warnings: list[str] = field(default_factory=list)


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def namespace_admitted(pool: api.KVCachePool, namespace_labels: dict[str, str]) -> bool:
    selector = pool.spec.tenancy.namespaceSelector
    return selector is None or selector.matches(namespace_labels)


def is_vllm(pod: dict[str, Any], container: dict[str, Any]) -> bool:
    if (pod.get("metadata", {}).get("annotations") or {}).get(ENGINE_ANNOTATION) == "vllm":
        return True
    words = " ".join(container.get("command", []) + container.get("args", []))
    return "vllm" in words.split() or "vllm.entrypoints" in words or words.startswith("vllm ")


RESTRICTED = {
    "runAsNonRoot": True,
    "runAsUser": 65532,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def sidecar_container(pool: str, settings: InjectSettings) -> dict[str, Any]:
    return {
        "name": SIDECAR,
        "image": settings.image,
        "args": [
            "sidecar",
            "--pool",
            pool,
            "--socket",
            f"{SOCKET_DIR}/kvtier.sock",
            "--host",
            "0.0.0.0",  # the kubelet's startup probe comes from outside the pod's loopback
            "--port",
            str(SIDECAR_PORT),
        ],
        "restartPolicy": "Always",  # a native sidecar: ready before the engine starts
        "ports": [{"name": "kvtier-hints", "containerPort": SIDECAR_PORT}],
        "startupProbe": {
            "httpGet": {"path": "/healthz", "port": SIDECAR_PORT},
            "periodSeconds": 1,
            "failureThreshold": 30,
        },
        "resources": copy.deepcopy(settings.sidecar_resources),
        "securityContext": copy.deepcopy(RESTRICTED),
        "volumeMounts": [{"name": SOCKET_VOLUME, "mountPath": SOCKET_DIR, "readOnly": True}],
    }


def stager_container(settings: InjectSettings) -> dict[str, Any]:
    return {
        "name": STAGER,
        "image": settings.image,
        "args": ["stage", LIB_DIR],  # copies the kvtier package (client + connectors) for the engine
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
        "securityContext": copy.deepcopy(RESTRICTED),
        "volumeMounts": [{"name": LIB_VOLUME, "mountPath": LIB_DIR}],
    }


def _engine_env(container: dict[str, Any], pool: str) -> list[dict[str, Any]]:
    env = [e for e in container.get("env", []) if e.get("name") not in ("KVTIER_POOL", "KVTIER_SOCKET")]
    existing = next((e for e in env if e.get("name") == "PYTHONPATH"), None)
    if existing and existing.get("value"):
        existing["value"] = f"{LIB_DIR}:{existing['value']}"
    elif existing is None:
        env.append({"name": "PYTHONPATH", "value": LIB_DIR})
    env += [
        {"name": "KVTIER_POOL", "value": pool},
        {"name": "KVTIER_SOCKET", "value": f"{SOCKET_DIR}/kvtier.sock"},
    ]
    return env


def _affinity(pod_spec: dict[str, Any], pool: api.KVCachePool) -> dict[str, Any] | None:
    """The pod's affinity with the pool's nodes required (ANDed into each existing term)."""
    selector = pool.spec.nodeSelector or {}
    if not selector:
        return None
    exprs = [{"key": k, "operator": "In", "values": [v]} for k, v in sorted(selector.items())]
    affinity = copy.deepcopy(pod_spec.get("affinity") or {})
    node = affinity.setdefault("nodeAffinity", {})
    required = node.setdefault("requiredDuringSchedulingIgnoredDuringExecution", {})
    terms = required.get("nodeSelectorTerms") or [{}]
    for term in terms:
        term["matchExpressions"] = (term.get("matchExpressions") or []) + copy.deepcopy(exprs)
    required["nodeSelectorTerms"] = terms
    return affinity


def decide(
    pod: dict[str, Any],
    pool: api.KVCachePool | None,
    pool_name: str | None,
    namespace: str,
    namespace_labels: dict[str, str],
    settings: InjectSettings = InjectSettings(),
) -> Decision:
    meta = pod.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    spec = pod.get("spec") or {}
    if INJECTED_ANNOTATION in annotations or any(
        c.get("name") == SIDECAR for c in spec.get("initContainers", [])
    ):
        return Decision(True, message="already injected")

    def refuse(message: str) -> Decision:
        if settings.on_refusal == "warn":
            return Decision(True, message=message, warnings=[f"kvtier: not injected: {message}"])
        return Decision(False, message=message)

    if not pool_name:
        return refuse(
            f"the pod is labelled {INJECT_LABEL}=true but has no {POOL_ANNOTATION} annotation naming a KVCachePool"
        )
    if pool is None:
        return refuse(f"KVCachePool {pool_name!r} does not exist (kubectl get kvp lists the pools)")
    if not namespace_admitted(pool, namespace_labels):
        return refuse(
            f"namespace {namespace!r} is not admitted by KVCachePool {pool_name!r} "
            f"(its spec.tenancy.namespaceSelector does not match the namespace's labels)"
        )

    new = copy.deepcopy(spec)
    volumes = new.setdefault("volumes", [])
    volumes.append(
        {
            "name": SOCKET_VOLUME,
            "csi": {"driver": "csi.kvtier.io", "readOnly": True, "volumeAttributes": {"pool": pool_name}},
        }
    )
    volumes.append({"name": LIB_VOLUME, "emptyDir": {"sizeLimit": "256Mi"}})
    new["initContainers"] = [
        stager_container(settings),
        sidecar_container(pool_name, settings),
        *new.get("initContainers", []),
    ]
    engines = []
    for c in new.get("containers", []):
        c.setdefault("volumeMounts", []).extend(
            [
                {"name": SOCKET_VOLUME, "mountPath": SOCKET_DIR, "readOnly": True},
                {"name": LIB_VOLUME, "mountPath": LIB_DIR, "readOnly": True},
            ]
        )
        c["env"] = _engine_env(c, pool_name)
        if is_vllm(pod, c) and "--kv-transfer-config" not in " ".join(
            c.get("args", []) + c.get("command", [])
        ):
            extra = {**VLLM_CONNECTOR, "kv_connector_extra_config": {"pool": pool_name}}
            c["args"] = [*c.get("args", []), "--kv-transfer-config", json.dumps(extra, separators=(",", ":"))]
            engines.append(f"{c['name']}:vllm")
    affinity = _affinity(new, pool)

    ops: list[dict[str, Any]] = []
    for key in ("volumes", "initContainers", "containers"):
        ops.append({"op": "add" if key not in spec else "replace", "path": f"/spec/{key}", "value": new[key]})
    if affinity is not None:
        ops.append(
            {
                "op": "add" if "affinity" not in spec else "replace",
                "path": "/spec/affinity",
                "value": affinity,
            }
        )
    record = f"pool={pool_name}" + (f",engines={'+'.join(engines)}" if engines else "")
    if not annotations:
        ops.append({"op": "add", "path": "/metadata/annotations", "value": {INJECTED_ANNOTATION: record}})
    else:
        ops.append(
            {"op": "add", "path": f"/metadata/annotations/{_escape(INJECTED_ANNOTATION)}", "value": record}
        )
    return Decision(True, patch=ops, message=f"injected kvtier ({record})")


def apply_patch(obj: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """Apply the add/replace operations `decide` produces (tests and the local webhook use it)."""
    out = copy.deepcopy(obj)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
        target = out
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = copy.deepcopy(op["value"])
    return out
