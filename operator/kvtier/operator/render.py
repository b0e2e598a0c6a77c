"""KVCachePool -> the Kubernetes objects that run it. Pure functions: spec in, manifests out.

Per pool, in the operator's namespace: a ServiceAccount of its own and the RBAC its agents need to
write their KVCacheNodes (nothing else: `agent_rules`), a ConfigMap with the agent configuration (the very AgentConfig model
`kvtier agent --config` loads), a headless Service for peers, a NetworkPolicy that admits only the
pool's own agents (and metrics scrapes), and the agent DaemonSet. The pool's
shared secret (tenant salts, peer authentication) is a Secret the operator creates once and never
renders again, so it survives every re-render.
"""

from __future__ import annotations

import hashlib
import posixpath
from typing import Any

from kvtier import __version__
from kvtier.api import v1alpha1 as api
from kvtier.api.agentconfig import AgentConfig, default_agent_config
from kvtier.api.quantity import format_bytes, parse_quantity

Manifest = dict[str, Any]

AGENT_OVERHEAD = 256 << 20  # agent process memory on top of the arena
PEER_PORT = 7070
METRICS_PORT = 9400
CONFIG_PATH = "/etc/kvtier/agent.yaml"
SECRET_PATH = "/etc/kvtier/secret"
AGENT_UID = 65532  # the image's non-root user (kvtier)


def child_name(pool: str) -> str:
    return f"kvtier-agent-{pool}"


def secret_name(pool: str) -> str:
    return f"kvtier-pool-{pool}"


def labels(pool: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kvtier-agent",
        "app.kubernetes.io/instance": pool,
        "app.kubernetes.io/component": "agent",
        "app.kubernetes.io/part-of": "kvtier",
        "app.kubernetes.io/version": __version__,  # not in any selector: an upgrade keeps them valid
        "app.kubernetes.io/managed-by": "kvtier-operator",
        "kvtier.io/pool": pool,
    }


def agent_selector(pool: str) -> dict[str, str]:
    """The labels that pick a pool's agent pods (its Service and NetworkPolicy)."""
    return {"kvtier.io/pool": pool, "app.kubernetes.io/name": "kvtier-agent"}


def owner_reference(pool: api.KVCachePool, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": "KVCachePool",
        "name": pool.metadata.name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _meta(name: str, pool: str, namespace: str | None, owner: dict[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": labels(pool), "ownerReferences": [owner]}
    if namespace:
        meta["namespace"] = namespace
    return meta


def agent_config(pool: api.KVCachePool, uid: str) -> AgentConfig:
    cfg = default_agent_config(pool.metadata.name, pool.spec, uid)
    return cfg.model_copy(
        update={"secretFile": f"{SECRET_PATH}/secret", "peerPort": PEER_PORT, "metricsPort": METRICS_PORT}
    )


def config_hash(config_yaml: str) -> str:
    return hashlib.sha256(config_yaml.encode()).hexdigest()[:16]


def agent_resources(spec: api.KVCachePoolSpec) -> dict[str, Any]:
    """The arena is the agent pod's own memory, so the kubelet accounts for it honestly."""
    dram = parse_quantity(spec.tiers.dram.size)
    requests: dict[str, Any] = {"cpu": "500m"}
    limits: dict[str, Any] = {}
    if spec.tiers.dram.hugepages == "none":
        requests["memory"] = limits["memory"] = str(dram + AGENT_OVERHEAD)
    else:
        huge = f"hugepages-{spec.tiers.dram.hugepages}"
        requests[huge] = limits[huge] = str(dram)  # hugepages: requests == limits
        requests["memory"] = limits["memory"] = str(AGENT_OVERHEAD)
    extra = spec.agent.resources
    if extra:
        requests.update({k: str(v) for k, v in (extra.requests or {}).items()})
        limits.update({k: str(v) for k, v in (extra.limits or {}).items()})
    return {"requests": requests, "limits": limits}


def _host_path(name: str, path: str, type_: str = "DirectoryOrCreate") -> dict[str, Any]:
    return {"name": name, "hostPath": {"path": path, "type": type_}}


def host_folders_owner(image: str, folders: list[str], mounts: list[dict[str, Any]]) -> dict[str, Any]:
    """An init container that hands the agent's host folders (created root-owned by the kubelet)
    to the agent's user: root with CAP_CHOWN only, top-level folders only."""
    return {
        "name": "own-host-folders",
        "image": image,
        "command": ["chown", f"{AGENT_UID}:{AGENT_UID}", *folders],
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"], "add": ["CHOWN"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [m for m in mounts if m["mountPath"] in folders],
    }


def daemonset(
    pool: api.KVCachePool, namespace: str, owner: dict[str, Any], cfg: AgentConfig, digest: str
) -> Manifest:
    name, spec = pool.metadata.name, pool.spec
    volumes = [
        {"name": "config", "configMap": {"name": child_name(name)}},
        {"name": "secret", "secret": {"secretName": secret_name(name), "defaultMode": 0o400}},
        _host_path("sockets", cfg.socketDir),
        _host_path("state", cfg.stateDir),
    ]
    mounts = [
        {"name": "config", "mountPath": posixpath.dirname(CONFIG_PATH), "readOnly": True},
        {"name": "secret", "mountPath": SECRET_PATH, "readOnly": True},
        {"name": "sockets", "mountPath": cfg.socketDir},
        {"name": "state", "mountPath": cfg.stateDir},
    ]
    # The agent runs as the image's non-root user; its host folders are made its own first.
    security: dict[str, Any] = {
        "runAsNonRoot": True,
        "runAsUser": AGENT_UID,
        "runAsGroup": AGENT_UID,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    host_folders = [cfg.socketDir, cfg.stateDir]
    nvme = spec.tiers.nvme
    if nvme and nvme.mode == "file":
        folder = posixpath.dirname(nvme.path or "/")
        if folder not in host_folders:  # the file may live in the state folder itself
            volumes.append(_host_path("nvme", folder))
            mounts.append({"name": "nvme", "mountPath": folder})
            host_folders.append(folder)
    elif nvme:
        # Namespace and partition modes manage block devices: the one case that needs privilege.
        volumes.append(_host_path("dev", "/dev", "Directory"))
        mounts.append({"name": "dev", "mountPath": "/dev"})
        security = {"privileged": True}
    if spec.tiers.dram.hugepages != "none":
        volumes.append(
            {"name": "hugepages", "emptyDir": {"medium": f"HugePages-{spec.tiers.dram.hugepages}"}}
        )
        mounts.append({"name": "hugepages", "mountPath": "/dev/hugepages"})
    container = {
        "name": "agent",
        "image": spec.agent.image,
        "args": ["agent", "--config", CONFIG_PATH],
        "env": [
            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        ],
        "ports": [
            {"name": "peer", "containerPort": PEER_PORT},
            {"name": "metrics", "containerPort": METRICS_PORT},
        ],
        "resources": agent_resources(spec),
        "volumeMounts": mounts,
        "readinessProbe": {"tcpSocket": {"port": "peer"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/metrics", "port": "metrics"}, "periodSeconds": 20},
        "securityContext": security,
    }
    pod_spec: dict[str, Any] = {
        "serviceAccountName": child_name(name),
        "containers": [container],
        "initContainers": [host_folders_owner(spec.agent.image, host_folders, mounts)],
        # the pool's Secret (mode 0400) becomes readable by the agent's group, no one else's
        "securityContext": {"fsGroup": AGENT_UID},
        "volumes": volumes,
        "terminationGracePeriodSeconds": 30,
    }
    if spec.nodeSelector:
        pod_spec["nodeSelector"] = dict(spec.nodeSelector)
    if spec.tolerations:
        pod_spec["tolerations"] = [t.model_dump(exclude_none=True) for t in spec.tolerations]
    if spec.agent.priorityClassName:
        pod_spec["priorityClassName"] = spec.agent.priorityClassName
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": _meta(child_name(name), name, namespace, owner),
        "spec": {
            "selector": {"matchLabels": {"kvtier.io/pool": name, "app.kubernetes.io/name": "kvtier-agent"}},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                # The digest rolls the pods whenever the rendered agent configuration changes.
                "metadata": {"labels": labels(name), "annotations": {"kvtier.io/config-hash": digest}},
                "spec": pod_spec,
            },
        },
    }


def agent_rules() -> list[dict[str, Any]]:
    """What an agent does with the API: report its node (create, read, patch the status of its
    KVCacheNode), find its peers (list the pool's KVCacheNodes) and watch its own Node for a cordon
    (drain; RBAC cannot narrow a DaemonSet's watch to one node, the agent's field selector does). Its
    pool Secret reaches it as a mounted volume, so the account reads no Secret at all."""
    return [
        {"apiGroups": [api.GROUP], "resources": ["kvcachenodes"], "verbs": ["get", "list", "create"]},
        {"apiGroups": [api.GROUP], "resources": ["kvcachenodes/status"], "verbs": ["patch"]},
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
    ]


def render_pool(pool: api.KVCachePool, uid: str, namespace: str) -> list[Manifest]:
    """Everything a pool needs, in apply order."""
    name = pool.metadata.name
    owner = owner_reference(pool, uid)
    cfg = agent_config(pool, uid)
    config_yaml = cfg.to_yaml()
    digest = config_hash(config_yaml)
    sa = child_name(name)
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(sa, name, namespace, owner)},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": _meta(sa, name, None, owner),
            "rules": agent_rules(),
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": _meta(sa, name, None, owner),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": sa},
            "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": namespace}],
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta(child_name(name), name, namespace, owner),
            "data": {"agent.yaml": config_yaml},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(child_name(name), name, namespace, owner),
            "spec": {
                "clusterIP": "None",
                "publishNotReadyAddresses": False,
                "selector": agent_selector(name),
                "ports": [
                    {"name": "peer", "port": PEER_PORT, "targetPort": "peer"},
                    {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics"},
                ],
            },
        },
        network_policy(name, namespace, owner),
        daemonset(pool, namespace, owner, cfg, digest),
    ]


def network_policy(pool: str, namespace: str, owner: dict[str, Any]) -> Manifest:
    """Who reaches a pool's agents over the network: the pool's own agents on every port (the
    control channel, and the ports UCX opens for block data) and anyone on the metrics port. The
    peer port answers pool members only, and before authentication one address holds a few of its
    slots: a host kept out here cannot hold any (where the CNI enforces NetworkPolicy)."""
    agents = agent_selector(pool)
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(child_name(pool), pool, namespace, owner),
        "spec": {
            "podSelector": {"matchLabels": agents},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": agents}}]},
                {"ports": [{"protocol": "TCP", "port": "metrics"}]},
            ],
        },
    }


def pool_secret(pool: api.KVCachePool, uid: str, namespace: str, secret: bytes) -> Manifest:
    import base64

    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(
            secret_name(pool.metadata.name), pool.metadata.name, namespace, owner_reference(pool, uid)
        ),
        "type": "Opaque",
        "data": {"secret": base64.b64encode(secret).decode()},
    }


def summary(manifests: list[Manifest]) -> str:
    return ", ".join(f"{m['kind']}/{m['metadata']['name']}" for m in manifests)


__all__ = ["agent_config", "config_hash", "format_bytes", "pool_secret", "render_pool", "summary"]
