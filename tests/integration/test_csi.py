"""The CSI node plugin with real bind mounts: a pod's volume brings its own namespace's agent socket,
publishing is idempotent, a namespace the pool does not admit is refused."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import grpc
import pytest
from kubernetes import client

from kvtier.agent.client import Client
from kvtier.agent.csi._generated import csi_pb2, csi_pb2_grpc
from kvtier.agent.csi.mounts import mount_points
from kvtier.api import v1alpha1 as api
from tests.integration.test_agent import FP, blobs, chain
from tests.support import agent_config

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root"),
]


def start_csi(endpoint: Path, sockets: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A plugin whose pods folder and state folder sit beside its socket."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvtier.cli", "csi", "--endpoint", f"unix://{endpoint}", "--sockets", str(sockets),
         "--node-id", "node-a", "--pods-dir", str(endpoint.parent / "pods"), "--state-dir",
         str(endpoint.parent / "state")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    for line in proc.stdout:  # a warning may come first (no API: every publish refused)
        if line.startswith("kvtier csi ready"):
            return proc
    raise AssertionError("kvtier csi exited before it was ready")


def unmount_below(root: Path) -> None:
    """Whatever a failed test left mounted below `root`, deepest first."""
    points = [
        p for _, _, p in mount_points(Path("/proc/self/mountinfo").read_text()) if p.startswith(f"{root}/")
    ]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


@pytest.fixture
def csi(control_plane, crds_installed):
    short = Path(tempfile.mkdtemp(prefix="kv-", dir="/tmp"))  # Unix socket paths must stay under 108 bytes
    sockets = short / "s"
    endpoint = short / "csi.sock"
    proc = start_csi(endpoint, sockets, control_plane.env())
    channel = grpc.insecure_channel(f"unix://{endpoint}")
    yield sockets, csi_pb2_grpc.IdentityStub(channel), csi_pb2_grpc.NodeStub(channel)
    channel.close()
    unmount_below(short)
    proc.terminate()
    proc.wait(timeout=10)
    shutil.rmtree(short, ignore_errors=True)


def _pool(kube, isolation: str) -> str:
    name = f"csi-{uuid.uuid4().hex[:6]}"
    body = {
        "apiVersion": api.API_VERSION,
        "kind": "KVCachePool",
        "metadata": {"name": name},
        "spec": {
            # a nodeSelector no Node has: a pool selecting every node would conflict with other tests' pools
            "nodeSelector": {"kvtier.test/csi": name},
            "tiers": {"dram": {"size": "64Mi"}},
            "tenancy": {
                "isolation": isolation,
                "namespaceSelector": {"matchLabels": {"kvtier.io/tenant": "true"}},
            },
        },
    }
    client.CustomObjectsApi(kube).create_cluster_custom_object(api.GROUP, api.VERSION, "kvcachepools", body)
    return name


def _ns(kube, admitted: bool = True) -> str:
    name = f"ns-{uuid.uuid4().hex[:6]}"
    labels = {"kvtier.io/tenant": "true"} if admitted else {}
    client.CoreV1Api(kube).create_namespace({"metadata": {"name": name, "labels": labels}})
    return name


def pod_target(sockets: Path, pod: str) -> Path:
    """The kubelet's target for a pod's inline volume (its parent made, as the kubelet does)."""
    parent = sockets.parent / "pods" / pod / "volumes" / "kubernetes.io~csi" / "kvtier-socket"
    parent.mkdir(parents=True, exist_ok=True)
    return parent / "mount"


def _publish(node, pool: str, namespace: str, target: Path):
    return node.NodePublishVolume(
        csi_pb2.NodePublishVolumeRequest(
            volume_id="v",
            target_path=str(target),
            volume_capability=csi_pb2.VolumeCapability(
                mount=csi_pb2.VolumeCapability.MountVolume(),
                access_mode=csi_pb2.VolumeCapability.AccessMode(
                    mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
                ),
            ),
            readonly=True,
            volume_context={
                "pool": pool,
                "csi.storage.k8s.io/pod.namespace": namespace,
                "csi.storage.k8s.io/ephemeral": "true",
            },
        )
    )


def _mounts(target: Path) -> int:
    return sum(
        1 for line in Path("/proc/self/mountinfo").read_text().splitlines() if line.split()[4] == str(target)
    )


@pytest.mark.parametrize("isolation", ["namespace", "shared"])
def test_pods_get_their_namespace_socket_and_tenancy_holds(kube, csi, agent, tmp_path, isolation):
    sockets, identity, node = csi
    assert identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest()).name == "csi.kvtier.io"
    pool = _pool(kube, isolation)
    cfg = agent_config(tmp_path / "agent", pool=pool, nvme=None, tenancy={"isolation": isolation})
    agent(cfg.model_copy(update={"socketDir": str(sockets / pool)}))
    ns_a, ns_b = _ns(kube), _ns(kube)
    pod_a, pod_b = pod_target(sockets, "a"), pod_target(sockets, "b")
    try:
        _publish(node, pool, ns_a, pod_a)
        _publish(node, pool, ns_b, pod_b)
        assert sorted(os.listdir(pod_a)) == ["kvtier.sock"], "the pod sees one socket: its namespace's"
        with pytest.raises(OSError):
            (pod_a / "intruder").write_text("x")  # read-only mount
        keys, data = chain(3), blobs(3)
        with Client(pod_a / "kvtier.sock") as a, Client(pod_b / "kvtier.sock") as b:
            assert a.namespace == ns_a and b.namespace == ns_b
            a.put(FP, keys, data)
            if isolation == "namespace":
                assert b.lookup(FP, keys) == 0, "namespace B never hits A's blocks"
            else:
                assert b.get(FP, keys) == data, "a shared pool serves one key space"
    finally:
        for target in (pod_a, pod_b):
            node.NodeUnpublishVolume(
                csi_pb2.NodeUnpublishVolumeRequest(volume_id="v", target_path=str(target))
            )


def test_publish_and_unpublish_are_idempotent_and_refusals_say_why(kube, csi, agent, tmp_path):
    sockets, _, node = csi
    pool = _pool(kube, "namespace")
    cfg = agent_config(tmp_path / "agent", pool=pool, nvme=None)
    agent(cfg.model_copy(update={"socketDir": str(sockets / pool)}))
    ns = _ns(kube)
    target = pod_target(sockets, "x")
    _publish(node, pool, ns, target)
    _publish(node, pool, ns, target)
    assert _mounts(target) == 1, "the same call twice is a success and one mount"
    for _ in range(2):
        node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id="v", target_path=str(target)))
    assert _mounts(target) == 0 and not target.exists()

    outsider = _ns(kube, admitted=False)
    with pytest.raises(grpc.RpcError) as err:
        _publish(node, pool, outsider, pod_target(sockets, "y"))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert f"namespace '{outsider}' is not admitted by KVCachePool '{pool}'" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        _publish(node, "no-agent-here", ns, pod_target(sockets, "z"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, "an unknown pool is the pod's mistake"


def test_csi_sanity_passes_against_the_node_service(control_plane):
    """csi-sanity (kubernetes-csi/csi-test, built from its Go module). Skipped as the CSI spec allows
    for a node-only driver: the controller tests, and the one node test that needs CreateVolume."""
    short = Path(tempfile.mkdtemp(prefix="kv-", dir="/tmp"))
    endpoint = short / "csi.sock"
    proc = start_csi(endpoint, short / "s")
    try:
        out = subprocess.run(
            [
                str(control_plane.bin_dir / "csi-sanity"),
                "-csi.endpoint",
                str(endpoint),
                "-csi.mountdir",
                str(short / "mnt"),
                "-csi.stagingdir",
                str(short / "stg"),
                "--ginkgo.skip",
                "Controller Service|should remove target path",
                "--ginkgo.no-color",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        summary = next(line for line in out.stdout.splitlines() if "Passed" in line and "Failed" in line)
        assert out.returncode == 0, out.stdout[-3000:]
        assert "0 Failed" in summary and "10 Passed" in summary, summary
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(short, ignore_errors=True)
