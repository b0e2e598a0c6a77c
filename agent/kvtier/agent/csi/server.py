"""`kvtier csi`: the CSI node plugin behind `csi.kvtier.io` (ephemeral inline volumes only).

NodePublishVolume reads the pod's namespace from the volume context (the CSIDriver sets
podInfoOnMount), checks it against the pool's tenancy, asks that pool's agent for the namespace's
socket folder (created on demand through the agent's admin socket), and bind-mounts it read-only at
the target path. So a pod receives exactly one socket, its own namespace's, and no hostPath: the
pattern of SPIFFE's CSI driver. Identity and Node services only (a node-only driver).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc
from kvtier.agent.client import admin_call
from kvtier.agent.csi._generated import csi_pb2, csi_pb2_grpc

log = logging.getLogger("kvtier.csi")
DRIVER = "csi.kvtier.io"
VERSION = "0.1.0"
POD_NAMESPACE = "csi.storage.k8s.io/pod.namespace"
EPHEMERAL = "csi.storage.k8s.io/ephemeral"


# ----------------------------------------------------------------------------- mounts (the seam)


def mount_source(target: str, mountinfo: Path = Path("/proc/self/mountinfo")) -> str | None:
    """The root of what is mounted at `target`, or None when nothing is."""
    target = os.path.realpath(target)
    found = None
    for line in mountinfo.read_text().splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[4] == target:
            found = fields[3]  # the last one wins: mounts stack
    return found


def bind_read_only(source: str, target: str) -> None:
    os.makedirs(target, exist_ok=True)
    subprocess.run(["mount", "--bind", source, target], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", target], check=True, capture_output=True)


def unmount(target: str) -> None:
    subprocess.run(["umount", target], check=True, capture_output=True)


# ----------------------------------------------------------------------------------- tenancy


class Tenancy:
    """Whether a pool admits a namespace: the pool's spec.tenancy.namespaceSelector against the
    namespace's labels, read from the API (cached briefly). Without an API (a bare node) it admits."""

    def __init__(self, api_client=None, ttl: float = 5.0) -> None:
        self.api = api_client
        self.ttl = ttl
        self._cache: dict[tuple[str, str], tuple[float, str | None]] = {}

    def refusal(self, pool: str, namespace: str) -> str | None:
        if self.api is None:
            return None
        key = (pool, namespace)
        hit = self._cache.get(key)
        if hit and time.monotonic() - hit[0] < self.ttl:
            return hit[1]
        answer = self._ask(pool, namespace)
        self._cache[key] = (time.monotonic(), answer)
        return answer

    def _ask(self, pool: str, namespace: str) -> str | None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        from kvtier.api import v1alpha1 as api

        try:
            body = client.CustomObjectsApi(self.api).get_cluster_custom_object(
                api.GROUP, api.VERSION, "kvcachepools", pool
            )
            labels = client.CoreV1Api(self.api).read_namespace(namespace).metadata.labels or {}
        except ApiException as exc:
            if exc.status == 404:
                return f"KVCachePool {pool!r} or namespace {namespace!r} does not exist"
            raise
        selector = api.KVCachePool.model_validate(body).spec.tenancy.namespaceSelector
        if selector is not None and not selector.matches(labels):
            return f"namespace {namespace!r} is not admitted by KVCachePool {pool!r} (spec.tenancy.namespaceSelector)"
        return None


# ---------------------------------------------------------------------------------- services


class Identity(csi_pb2_grpc.IdentityServicer):
    def GetPluginInfo(self, request, context):
        return csi_pb2.GetPluginInfoResponse(name=DRIVER, vendor_version=VERSION)

    def GetPluginCapabilities(self, request, context):
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=[])  # node only: no controller service

    def Probe(self, request, context):
        return csi_pb2.ProbeResponse()


class Controller(csi_pb2_grpc.ControllerServicer):
    """Node-only driver: no controller capabilities (the spec lets conformance tools ask anyway)."""

    def ControllerGetCapabilities(self, request, context):
        # An empty list reaches Go clients as nil, which csi-sanity rejects; UNKNOWN grants nothing.
        unknown = csi_pb2.ControllerServiceCapability.RPC(
            type=csi_pb2.ControllerServiceCapability.RPC.UNKNOWN
        )
        return csi_pb2.ControllerGetCapabilitiesResponse(
            capabilities=[csi_pb2.ControllerServiceCapability(rpc=unknown)]
        )


class Node(csi_pb2_grpc.NodeServicer):
    def __init__(
        self,
        node_id: str,
        sockets_root: Path,
        tenancy: Tenancy,
        bind: Callable[[str, str], None] = bind_read_only,
        unbind: Callable[[str], None] = unmount,
        mounted: Callable[[str], str | None] = mount_source,
    ) -> None:
        self.node_id = node_id
        self.sockets_root = sockets_root
        self.tenancy = tenancy
        self.bind, self.unbind, self.mounted = bind, unbind, mounted

    def NodeGetInfo(self, request, context):
        return csi_pb2.NodeGetInfoResponse(
            node_id=self.node_id,
            accessible_topology=csi_pb2.Topology(segments={"kubernetes.io/hostname": self.node_id}),
        )

    def NodeGetCapabilities(self, request, context):
        unknown = csi_pb2.NodeServiceCapability.RPC(type=csi_pb2.NodeServiceCapability.RPC.UNKNOWN)
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=[csi_pb2.NodeServiceCapability(rpc=unknown)])

    def NodePublishVolume(self, request, context):
        if not request.volume_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "volume_id is required")
        if not request.target_path:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "target_path is required")
        if not request.HasField("volume_capability"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "volume_capability is required")
        if request.volume_capability.HasField("block"):
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "csi.kvtier.io serves a socket folder, not a block device"
            )
        ctx = dict(request.volume_context)
        pool, namespace = ctx.get("pool"), ctx.get(POD_NAMESPACE)
        if not pool or not namespace:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "volumeAttributes.pool and the pod's namespace (CSIDriver podInfoOnMount) are required",
            )
        refusal = self.tenancy.refusal(pool, namespace)
        if refusal:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, refusal)
        try:
            folder = admin_call(self.sockets_root / pool, "ensure_tenant", namespace=namespace)["folder"]
        except OSError as exc:
            context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"the kvtier agent of pool {pool!r} is not reachable on this node: {exc}",
            )
        if self.mounted(request.target_path) is not None:
            if os.path.samefile(request.target_path, folder):  # a bind mount shows the source's inode
                return csi_pb2.NodePublishVolumeResponse()  # already published: idempotent
            context.abort(
                grpc.StatusCode.ALREADY_EXISTS, f"{request.target_path} already holds another mount"
            )
        self.bind(folder, request.target_path)
        log.info(
            "published %s (pool %s, namespace %s) at %s",
            request.volume_id,
            pool,
            namespace,
            request.target_path,
        )
        return csi_pb2.NodePublishVolumeResponse()

    def NodeUnpublishVolume(self, request, context):
        if not request.volume_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "volume_id is required")
        if not request.target_path:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "target_path is required")
        while self.mounted(request.target_path) is not None:
            self.unbind(request.target_path)
        if os.path.isdir(request.target_path):
            os.rmdir(request.target_path)
        return csi_pb2.NodeUnpublishVolumeResponse()


def serve(endpoint: str, node_id: str, sockets_root: Path, tenancy: Tenancy) -> grpc.Server:
    path = endpoint.removeprefix("unix://")
    if os.path.exists(path):
        os.unlink(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    csi_pb2_grpc.add_IdentityServicer_to_server(Identity(), server)
    csi_pb2_grpc.add_NodeServicer_to_server(Node(node_id, sockets_root, tenancy), server)
    csi_pb2_grpc.add_ControllerServicer_to_server(Controller(), server)
    server.add_insecure_port(f"unix://{path}")
    server.start()
    return server


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=os.environ.get("KVTIER_LOG", "INFO"), format="%(asctime)s %(name)s %(message)s")
    from kvtier.kubeapi import api_client_from_environment

    api_client = api_client_from_environment()
    node_id = args.node_id or os.environ.get("NODE_NAME") or os.uname().nodename
    server = serve(args.endpoint, node_id, Path(args.sockets), Tenancy(api_client))
    print(f"kvtier csi ready endpoint={args.endpoint} node={node_id}", flush=True)
    server.wait_for_termination()
    return 0
