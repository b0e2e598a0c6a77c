"""`kvtier csi`: the CSI node plugin behind `csi.kvtier.io` (ephemeral inline volumes only).

NodePublishVolume reads the pod's namespace from the volume context (the CSIDriver sets
podInfoOnMount), checks it against the pool's tenancy, asks that pool's agent for the namespace's
socket folder (created on demand through the agent's admin socket), and bind-mounts it read-only at
the target path. So a pod receives exactly one socket, its own namespace's, and no hostPath: the
pattern of SPIFFE's CSI driver. Identity and Node services only (a node-only driver).

It fails closed: no tenancy answer, no mount. It mounts only at the kubelet's inline-volume targets
below the pods folder, reached without following symlinks, and unmounts only what its own record
(in its state folder) says it mounted.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import time
from concurrent import futures
from pathlib import Path

import grpc

from kvtier import __version__, logs
from kvtier.agent.api.protocol import AgentError, ProtocolError
from kvtier.agent.client import admin_call
from kvtier.agent.csi._generated import csi_pb2, csi_pb2_grpc
from kvtier.agent.csi.mounts import (
    UnsafePath,
    bind_read_only,
    check_name,
    mounts_at,
    open_beneath,
    unmount,
)
from kvtier.agent.csi.publishes import Publish, Publishes
from kvtier.names import is_label, is_subdomain

log = logging.getLogger("kvtier.csi")
DRIVER = "csi.kvtier.io"
VERSION = __version__
POD_NAMESPACE = "csi.storage.k8s.io/pod.namespace"
EPHEMERAL = "csi.storage.k8s.io/ephemeral"


# ----------------------------------------------------------------------------------- refusals

MAX_VOLUME_ID = 256
MAX_TARGET = 4096
# What the kubelet asks for an inline CSI volume: <pods>/<pod uid>/volumes/kubernetes.io~csi/<volume>/mount
TARGET_SHAPE = ("*", "volumes", "kubernetes.io~csi", "*", "mount")


class Refusal(Exception):
    """An answer with a CSI status code and a short message (never a traceback)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def short(text: str, limit: int = 80) -> str:
    """A bounded rendering of untrusted text for messages and logs."""
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def answering(method):
    """Every request gets a CSI code: Refusals as they are, anything unexpected as INTERNAL."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Refusal as exc:
            context.abort(exc.code, exc.message)
        except Exception as exc:
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {str(exc)[:200]}")

    return wrapper


# ----------------------------------------------------------------------------------- tenancy


class Tenancy:
    """Whether a pool admits a namespace: the pool's spec.tenancy.namespaceSelector against the
    namespace's labels, read from the API (answers cached briefly). Fails closed: without the API,
    or when it cannot answer, nothing is admitted (UNAVAILABLE, which the kubelet retries)."""

    def __init__(self, api_client=None, ttl: float = 5.0) -> None:
        self.api = api_client
        self.ttl = ttl
        self._cache: dict[tuple[str, str], tuple[float, Refusal | None]] = {}

    def check(self, pool: str, namespace: str) -> None:
        if self.api is None:
            raise Refusal(
                grpc.StatusCode.UNAVAILABLE,
                "no Kubernetes API configured: tenancy cannot be checked, so nothing is published",
            )
        key = (pool, namespace)
        hit = self._cache.get(key)
        if hit and time.monotonic() - hit[0] < self.ttl:
            answer = hit[1]
        else:
            answer = self._ask(pool, namespace)  # raises UNAVAILABLE without caching it
            self._cache[key] = (time.monotonic(), answer)
        if answer is not None:
            raise answer

    def _ask(self, pool: str, namespace: str) -> Refusal | None:
        import pydantic
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        from kvtier.api import v1alpha1 as api

        def read(what: str, call):
            try:
                return call()
            except ApiException as exc:
                if exc.status == 404:
                    return None
                raise Refusal(
                    grpc.StatusCode.UNAVAILABLE,
                    f"could not read {what} to check tenancy: {exc.status} {exc.reason}",
                ) from None
            except Exception as exc:  # the API cannot be reached: retry later
                raise Refusal(
                    grpc.StatusCode.UNAVAILABLE,
                    f"could not read {what} to check tenancy: {type(exc).__name__}: {str(exc)[:120]}",
                ) from None

        body = read(
            f"KVCachePool {pool!r}",
            lambda: client.CustomObjectsApi(self.api).get_cluster_custom_object(
                api.GROUP, api.VERSION, "kvcachepools", pool
            ),
        )
        if body is None:
            return Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"KVCachePool {pool!r} does not exist")
        ns = read(f"namespace {namespace!r}", lambda: client.CoreV1Api(self.api).read_namespace(namespace))
        if ns is None:
            return Refusal(grpc.StatusCode.PERMISSION_DENIED, f"namespace {namespace!r} does not exist")
        try:
            selector = api.KVCachePool.model_validate(body).spec.tenancy.namespaceSelector
        except pydantic.ValidationError as exc:
            return Refusal(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"KVCachePool {pool!r} is not valid ({exc.error_count()} errors): tenancy cannot be checked",
            )
        if selector is not None and not selector.matches(ns.metadata.labels or {}):
            return Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"namespace {namespace!r} is not admitted by KVCachePool {pool!r} (spec.tenancy.namespaceSelector)",
            )
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
    """Publishes only below the kubelet's pods folder, in the shape the kubelet uses for inline CSI
    volumes, opening every component without following symlinks; unpublishes only what its record
    says it published."""

    def __init__(
        self, node_id: str, sockets_root: Path, tenancy: Tenancy, pods_dir: Path, state_dir: Path
    ) -> None:
        self.node_id = node_id
        self.sockets_root = sockets_root
        self.tenancy = tenancy
        self.pods_dir = str(pods_dir)
        self.pods_real = os.path.realpath(pods_dir)  # as the mount table shows it
        self.publishes = Publishes(state_dir / "publishes.json")

    def NodeGetInfo(self, request, context):
        return csi_pb2.NodeGetInfoResponse(
            node_id=self.node_id,
            accessible_topology=csi_pb2.Topology(segments={"kubernetes.io/hostname": self.node_id}),
        )

    def NodeGetCapabilities(self, request, context):
        unknown = csi_pb2.NodeServiceCapability.RPC(type=csi_pb2.NodeServiceCapability.RPC.UNKNOWN)
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=[csi_pb2.NodeServiceCapability(rpc=unknown)])

    # -- checks

    def _ids(self, request) -> list[str]:
        if not request.volume_id:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "volume_id is required")
        if len(request.volume_id) > MAX_VOLUME_ID:
            raise Refusal(
                grpc.StatusCode.INVALID_ARGUMENT, f"volume_id is longer than {MAX_VOLUME_ID} characters"
            )
        if not request.target_path:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "target_path is required")
        return self._target_names(request.target_path)

    def _target_names(self, target: str) -> list[str]:
        """The target's components below the pods folder, refused unless it has the kubelet's shape."""
        if len(target) > MAX_TARGET:
            raise Refusal(
                grpc.StatusCode.INVALID_ARGUMENT, f"target_path is longer than {MAX_TARGET} characters"
            )
        prefix = self.pods_dir.rstrip("/") + "/"
        names = target[len(prefix) :].split("/") if target.startswith(prefix) else []
        shaped = len(names) == len(TARGET_SHAPE) and all(
            want in ("*", got) for want, got in zip(TARGET_SHAPE, names, strict=True)
        )
        try:
            if shaped:
                for name in names:
                    check_name(name)
        except UnsafePath:
            shaped = False
        if not shaped:
            raise Refusal(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"target_path {short(target)} is not <{self.pods_dir}>/<pod uid>/volumes/kubernetes.io~csi/<volume>/mount",
            )
        return names

    @staticmethod
    def _context(request) -> tuple[str, str]:
        ctx = request.volume_context
        pool, namespace = ctx.get("pool", ""), ctx.get(POD_NAMESPACE, "")
        if not pool or not namespace:
            raise Refusal(
                grpc.StatusCode.INVALID_ARGUMENT,
                "volumeAttributes.pool and the pod's namespace (CSIDriver podInfoOnMount) are required",
            )
        if not is_subdomain(pool):
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"pool {short(pool)} is not a KVCachePool name")
        if not is_label(namespace):
            raise Refusal(
                grpc.StatusCode.INVALID_ARGUMENT, f"namespace {short(namespace)} is not a namespace name"
            )
        return pool, namespace

    @staticmethod
    def _capability(request) -> None:
        if not request.HasField("volume_capability"):
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "volume_capability is required")
        kind = request.volume_capability.WhichOneof("access_type")
        if kind == "block":
            raise Refusal(
                grpc.StatusCode.INVALID_ARGUMENT, "csi.kvtier.io serves a socket folder, not a block device"
            )
        if kind != "mount":
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "volume_capability needs the mount access type")

    @staticmethod
    def _open(root: str | Path | int, names: list[str]) -> int:
        try:
            return open_beneath(root, names)
        except UnsafePath as exc:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"target_path refused: {exc}") from None

    def _mounted(self, names: list[str]) -> bool:
        return mounts_at(os.path.join(self.pods_real, *names)) > 0

    def _agent_folder(self, pool: str, namespace: str) -> tuple[int, str]:
        """The namespace's socket folder from the pool's agent, opened beneath that pool's folder."""
        pool_dir = self.sockets_root / pool
        try:
            folder = admin_call(pool_dir, "ensure_tenant", namespace=namespace)["folder"]
        except AgentError as exc:
            raise Refusal(
                grpc.StatusCode.FAILED_PRECONDITION, f"the agent of pool {pool!r} refused: {str(exc)[:200]}"
            ) from None
        except (OSError, ProtocolError) as exc:
            raise Refusal(
                grpc.StatusCode.UNAVAILABLE,
                f"the kvtier agent of pool {pool!r} is not reachable on this node: {exc}",
            ) from None
        rel = os.path.relpath(str(folder), pool_dir)
        try:
            fd = open_beneath(pool_dir, rel.split("/"))
        except (UnsafePath, OSError) as exc:
            raise Refusal(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the agent of pool {pool!r} named a folder outside its own: {exc}",
            ) from None
        return fd, str(folder)

    # -- publish

    @answering
    def NodePublishVolume(self, request, context):
        names = self._ids(request)
        self._capability(request)
        pool, namespace = self._context(request)
        self.tenancy.check(pool, namespace)
        target = request.target_path
        with self.publishes.lock:
            done = self.publishes.get(target)
            if done is not None:
                if (done.volume_id, done.pool, done.namespace) != (request.volume_id, pool, namespace):
                    raise Refusal(
                        grpc.StatusCode.ALREADY_EXISTS, f"{short(target)} holds another kvtier volume"
                    )
                if self._shows(names, done.source_id):
                    return csi_pb2.NodePublishVolumeResponse()  # already published: idempotent
            elif self._mounted(names):
                raise Refusal(
                    grpc.StatusCode.ALREADY_EXISTS, f"{short(target)} holds a mount kvtier did not make"
                )
            parent = self._open(self.pods_dir, names[:-1])
            source = None
            try:
                source, folder = self._agent_folder(pool, namespace)
                st = os.fstat(source)
                fd, created = self._open_target(parent, names[-1])
                try:
                    if os.listdir(fd):
                        raise Refusal(
                            grpc.StatusCode.FAILED_PRECONDITION, f"{short(target)} is not an empty folder"
                        )
                    record = Publish(
                        request.volume_id, pool, namespace, folder, (st.st_dev, st.st_ino),
                        created or (done is not None and done.created_folder),
                    )  # fmt: skip
                    self.publishes.put(target, record)  # before mounting: a crash leaves it findable
                    try:
                        bind_read_only(source, fd, lambda: self._reopen(parent, names[-1]))
                    except OSError:
                        self.publishes.drop(target)
                        if record.created_folder:
                            os.rmdir(names[-1], dir_fd=parent)
                        raise
                finally:
                    os.close(fd)
            finally:
                os.close(parent)
                if source is not None:
                    os.close(source)
        log.info(
            "published volume %s (pool %s, namespace %s) at %s",
            short(request.volume_id, 72),
            pool,
            namespace,
            short(target, 200),
        )
        return csi_pb2.NodePublishVolumeResponse()

    def _open_target(self, parent: int, name: str) -> tuple[int, bool]:
        created = False
        try:
            os.mkdir(name, 0o750, dir_fd=parent)
            created = True
        except FileExistsError:
            pass
        return self._reopen(parent, name), created

    @classmethod
    def _reopen(cls, parent: int, name: str) -> int:
        """The target, opened again from its parent's fd (crossing into whatever is mounted there)."""
        return cls._open(parent, [name])

    def _shows(self, names: list[str], source_id: tuple[int, int]) -> bool:
        """Whether the top mount at the target is a bind of the recorded source folder."""
        if not self._mounted(names):
            return False
        try:
            fd = open_beneath(self.pods_dir, names)
        except (UnsafePath, OSError):
            return False
        try:
            st = os.fstat(fd)
            return (st.st_dev, st.st_ino) == tuple(source_id)
        finally:
            os.close(fd)

    # -- unpublish

    @answering
    def NodeUnpublishVolume(self, request, context):
        names = self._ids(request)
        target = request.target_path
        with self.publishes.lock:
            done = self.publishes.get(target)
            if done is None:
                log.info("unpublish of %s: not published by kvtier, nothing touched", short(target, 200))
                return csi_pb2.NodeUnpublishVolumeResponse()
            if done.volume_id != request.volume_id:
                raise Refusal(
                    grpc.StatusCode.NOT_FOUND,
                    f"volume {short(request.volume_id)} is not published at {short(target)}",
                )
            try:
                parent = open_beneath(self.pods_dir, names[:-1])
            except FileNotFoundError:
                self.publishes.drop(target)  # the pod's folder is gone, and the mount with it
                return csi_pb2.NodeUnpublishVolumeResponse()
            except UnsafePath as exc:
                raise Refusal(grpc.StatusCode.FAILED_PRECONDITION, f"target_path refused: {exc}") from None
            try:
                while self._mounted(names):
                    if not self._shows(names, done.source_id):
                        raise Refusal(
                            grpc.StatusCode.FAILED_PRECONDITION,
                            f"{short(target)} is covered by a mount kvtier did not make: left alone",
                        )
                    fd = self._reopen(parent, names[-1])
                    try:
                        unmount(fd)
                    finally:
                        os.close(fd)
                if done.created_folder:
                    try:
                        os.rmdir(names[-1], dir_fd=parent)
                    except FileNotFoundError:
                        pass
                    except OSError as exc:  # something was put there since: keep it
                        log.warning("kept %s: %s", short(target, 200), exc.strerror)
                self.publishes.drop(target)
            finally:
                os.close(parent)
        log.info("unpublished volume %s at %s", short(request.volume_id, 72), short(target, 200))
        return csi_pb2.NodeUnpublishVolumeResponse()


def serve(
    endpoint: str, node_id: str, sockets_root: Path, tenancy: Tenancy, pods_dir: Path, state_dir: Path
) -> grpc.Server:
    path = endpoint.removeprefix("unix://")
    if os.path.exists(path):
        os.unlink(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    csi_pb2_grpc.add_IdentityServicer_to_server(Identity(), server)
    csi_pb2_grpc.add_NodeServicer_to_server(Node(node_id, sockets_root, tenancy, pods_dir, state_dir), server)
    csi_pb2_grpc.add_ControllerServicer_to_server(Controller(), server)
    server.add_insecure_port(f"unix://{path}")
    server.start()
    return server


def main(args: argparse.Namespace) -> int:
    logs.setup(args)
    from kvtier.kubeapi import api_client_from_environment

    api_client = api_client_from_environment()
    node_id = args.node_id or os.environ.get("NODE_NAME") or os.uname().nodename
    tenancy = Tenancy(api_client)
    if api_client is None:
        log.warning("no Kubernetes API: every publish is refused (UNAVAILABLE) until one is configured")
    server = serve(
        args.endpoint, node_id, Path(args.sockets), tenancy, Path(args.pods_dir), Path(args.state_dir)
    )
    print(f"kvtier csi ready endpoint={args.endpoint} node={node_id}", flush=True)
    server.wait_for_termination()
    return 0
