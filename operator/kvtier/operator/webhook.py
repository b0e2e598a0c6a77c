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

Refusals name the problem: a pool name that is not a Kubernetes name (checked before any API
call), a pool that does not exist or does not admit the namespace, names in the pod that clash
with the injected ones, a `kvtier.io/injected` the pod set itself. The sidecar answers hints on the
pod's loopback only; a cross-pod endpoint opens only when the pod names a Secret of its namespace
holding a token (`kvtier.io/hints-secret`), mounted into the sidecar alone.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

from kvtier.api import v1alpha1 as api
from kvtier.names import is_subdomain

INJECT_LABEL = "kvtier.io/inject"
POOL_ANNOTATION = "kvtier.io/pool"
ENGINE_ANNOTATION = "kvtier.io/engine"
INJECTED_ANNOTATION = "kvtier.io/injected"
HINTS_SECRET_ANNOTATION = "kvtier.io/hints-secret"
SIDECAR = "kvtier-prefetch"
STAGER = "kvtier-stage"
SOCKET_VOLUME = "kvtier-socket"
LIB_VOLUME = "kvtier-lib"
TOKEN_VOLUME = "kvtier-hints-token"
SOCKET_DIR = "/var/run/kvtier"
LIB_DIR = "/opt/kvtier-lib"
TOKEN_DIR = "/var/run/kvtier-hints"
SIDECAR_PORT = 8765  # hints, on the pod's loopback
PROBE_PORT = 8766  # healthz and metrics, for the kubelet and Prometheus
PUBLIC_PORT = 8767  # token-authenticated hints across pods (only with kvtier.io/hints-secret)
INJECTED_CONTAINERS = (STAGER, SIDECAR)
INJECTED_VOLUMES = (SOCKET_VOLUME, LIB_VOLUME, TOKEN_VOLUME)
INJECTED_MOUNT_PATHS = (SOCKET_DIR, LIB_DIR)
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
    code: int = 403  # of a refusal: 400 for a malformed request, 403 for one kvtier will not serve


def name_problem(what: str, name: str) -> str | None:
    """Why `name` is not a Kubernetes object name (DNS-1123 subdomain), or None."""
    if is_subdomain(name):
        return None
    return (
        f"{what} {name[:80]!r} is not a Kubernetes name (lowercase letters, digits, '-' and '.', at most 253)"
    )


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


def sidecar_container(pool: str, settings: InjectSettings, hints_secret: str | None = None) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": SIDECAR,
        "image": settings.image,
        "args": [
            "sidecar",
            "--pool",
            pool,
            "--socket",
            f"{SOCKET_DIR}/kvtier.sock",
            "--host",
            "127.0.0.1",  # hints from the pod's own containers only
            "--port",
            str(SIDECAR_PORT),
            "--probe-port",  # the kubelet's startup probe comes from outside the pod's loopback
            str(PROBE_PORT),
        ],
        "restartPolicy": "Always",  # a native sidecar: ready before the engine starts
        "ports": [{"name": "kvtier-probes", "containerPort": PROBE_PORT}],
        "startupProbe": {
            "httpGet": {"path": "/healthz", "port": PROBE_PORT},
            "periodSeconds": 1,
            "failureThreshold": 30,
        },
        "resources": copy.deepcopy(settings.sidecar_resources),
        "securityContext": copy.deepcopy(RESTRICTED),
        "volumeMounts": [{"name": SOCKET_VOLUME, "mountPath": SOCKET_DIR, "readOnly": True}],
    }
    if hints_secret:
        container["args"] += ["--public-port", str(PUBLIC_PORT), "--token-file", f"{TOKEN_DIR}/token"]
        container["ports"].append({"name": "kvtier-hints", "containerPort": PUBLIC_PORT})
        container["volumeMounts"].append({"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True})
    return container


def stager_container(settings: InjectSettings) -> dict[str, Any]:
    return {
        "name": STAGER,
        "image": settings.image,
        "args": ["stage", LIB_DIR],  # copies the kvtier package (client + connectors) for the engine
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
        "securityContext": copy.deepcopy(RESTRICTED),
        "volumeMounts": [{"name": LIB_VOLUME, "mountPath": LIB_DIR}],
    }


USER_PYTHONPATH = "KVTIER_USER_PYTHONPATH"


def _engine_env(container: dict[str, Any], pool: str) -> list[dict[str, Any]]:
    """The container's env with kvtier's library first on PYTHONPATH, whatever the path's source:
    a value is prefixed; an empty value is replaced; a valueFrom moves to KVTIER_USER_PYTHONPATH,
    which PYTHONPATH then names (the kubelet expands $(VAR) of variables defined before it)."""
    drop = ("KVTIER_POOL", "KVTIER_SOCKET", USER_PYTHONPATH)
    env = [copy.deepcopy(e) for e in container.get("env", []) if e.get("name") not in drop]
    at = next((i for i, e in enumerate(env) if e.get("name") == "PYTHONPATH"), None)
    if at is None:
        env.append({"name": "PYTHONPATH", "value": LIB_DIR})
    elif "valueFrom" in env[at]:
        moved = {"name": USER_PYTHONPATH, "valueFrom": env[at]["valueFrom"]}
        env[at : at + 1] = [moved, {"name": "PYTHONPATH", "value": f"{LIB_DIR}:$({USER_PYTHONPATH})"}]
    elif env[at].get("value"):
        env[at]["value"] = f"{LIB_DIR}:{env[at]['value']}"
    else:
        env[at]["value"] = LIB_DIR
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


def clashes(spec: dict[str, Any]) -> list[str]:
    """Names and mount paths in the pod that the injection would add a second time."""
    found = []
    for key in ("initContainers", "containers"):
        for c in spec.get(key) or []:
            if c.get("name") in INJECTED_CONTAINERS:
                found.append(f"container {c['name']!r}")
            for m in c.get("volumeMounts") or []:
                if key == "containers" and m.get("mountPath", "").rstrip("/") in INJECTED_MOUNT_PATHS:
                    found.append(f"mountPath {m['mountPath']!r} in container {c.get('name')!r}")
    found += [f"volume {v['name']!r}" for v in spec.get("volumes") or [] if v.get("name") in INJECTED_VOLUMES]
    return found


def injected_record(pod: dict[str, Any]) -> str | None:
    return ((pod.get("metadata") or {}).get("annotations") or {}).get(INJECTED_ANNOTATION)


def _self_declared(pod: dict[str, Any], pool_name: str | None) -> str | None:
    """Why a pod that looks injected was not injected by kvtier, or None when it was (a
    reinvocation: the record, the sidecar and the socket volume agree on the pool)."""
    spec = pod.get("spec") or {}
    record = injected_record(pod)
    sidecar = next((c for c in spec.get("initContainers") or [] if c.get("name") == SIDECAR), None)
    volume = next((v for v in spec.get("volumes") or [] if v.get("name") == SOCKET_VOLUME), None)
    args = (sidecar or {}).get("args") or []
    pools = {
        (record or "").split(",")[0].removeprefix("pool="),
        (((volume or {}).get("csi") or {}).get("volumeAttributes") or {}).get("pool"),
        args[args.index("--pool") + 1] if "--pool" in args[:-1] else None,
    }
    if record is None or sidecar is None or volume is None or pools != {pool_name}:
        return (
            f"the pod carries kvtier's {INJECTED_ANNOTATION} annotation or injected parts without "
            f"having been injected for pool {pool_name!r}: only the webhook sets them"
        )
    return None


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

    def refuse(message: str, code: int = 403) -> Decision:
        if settings.on_refusal == "warn":
            return Decision(True, message=message, warnings=[f"kvtier: not injected: {message}"])
        return Decision(False, message=message, code=code)

    if not pool_name:
        return refuse(
            f"the pod is labelled {INJECT_LABEL}=true but has no {POOL_ANNOTATION} annotation naming a KVCachePool",
            400,
        )
    problem = name_problem(f"the {POOL_ANNOTATION} annotation", pool_name)
    hints_secret = annotations.get(HINTS_SECRET_ANNOTATION)
    if problem is None and hints_secret is not None:
        problem = name_problem(f"the {HINTS_SECRET_ANNOTATION} annotation", hints_secret)
    if problem:
        return refuse(problem, 400)
    if pool is None:
        return refuse(f"KVCachePool {pool_name!r} does not exist (kubectl get kvp lists the pools)")
    if not namespace_admitted(pool, namespace_labels):
        return refuse(
            f"namespace {namespace!r} is not admitted by KVCachePool {pool_name!r} "
            f"(its spec.tenancy.namespaceSelector does not match the namespace's labels)"
        )
    looks_injected = injected_record(pod) is not None or any(
        c.get("name") == SIDECAR for c in spec.get("initContainers") or []
    )
    if looks_injected:
        forged = _self_declared(pod, pool_name)
        return refuse(forged, 400) if forged else Decision(True, message="already injected")
    clash = clashes(spec)
    if clash:
        return refuse(f"the pod already has {', '.join(clash)}, which kvtier injects: rename them", 400)
    warnings = [
        f"kvtier: container {c.get('name')!r} takes variables from envFrom: a PYTHONPATH there is "
        f"overridden by kvtier's ({LIB_DIR}); set it in env to keep it"
        for c in spec.get("containers") or []
        if c.get("envFrom")
    ]

    new = copy.deepcopy(spec)
    volumes = new.setdefault("volumes", [])
    volumes.append(
        {
            "name": SOCKET_VOLUME,
            "csi": {"driver": "csi.kvtier.io", "readOnly": True, "volumeAttributes": {"pool": pool_name}},
        }
    )
    volumes.append({"name": LIB_VOLUME, "emptyDir": {"sizeLimit": "256Mi"}})
    if hints_secret:
        token = {
            "secretName": hints_secret,
            "items": [{"key": "token", "path": "token"}],
            "defaultMode": 0o444,  # only the sidecar mounts it
        }
        volumes.append({"name": TOKEN_VOLUME, "secret": token})
    new["initContainers"] = [
        stager_container(settings),
        sidecar_container(pool_name, settings, hints_secret),
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
    return Decision(True, patch=ops, message=f"injected kvtier ({record})", warnings=warnings)


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
