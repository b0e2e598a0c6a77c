"""The CSI node plugin as an attacker drives it, through its real gRPC socket, with real bind mounts
(root) and the real API server: it fails closed, mounts only at the kubelet's inline-volume targets
reached without symlinks, unmounts and deletes only what it made, and answers in CSI codes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import pytest

from kvtier.agent.csi._generated import csi_pb2, csi_pb2_grpc
from kvtier.agent.csi.mounts import decode, mounts_at
from tests.integration.test_csi import _ns, _pool, unmount_below
from tests.support import agent_config

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root"),
]
CODE = grpc.StatusCode


class Plugin:
    """A real `kvtier csi` process, its pods folder, state folder and log."""

    def __init__(self, root: Path, env: dict[str, str] | None) -> None:
        self.root = root
        self.pods = root / "pods dir"  # a space: the mount table escapes it
        self.sockets = root / "s"
        self.state = root / "state"
        self.log = root / "csi.log"
        self.pods.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.start()

    def start(self) -> None:
        endpoint = self.root / "csi.sock"
        ready = self.log.read_text().count("kvtier csi ready") if self.log.exists() else 0
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvtier.cli", "csi", "--endpoint", f"unix://{endpoint}",
             "--sockets", str(self.sockets), "--node-id", "node-a", "--pods-dir", str(self.pods),
             "--state-dir", str(self.state)],
            env=self.env, stdout=open(self.log, "a"), stderr=subprocess.STDOUT,  # noqa: SIM115
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while self.log.read_text().count("kvtier csi ready") == ready:
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()[-2000:]
            time.sleep(0.05)
        self.channel = grpc.insecure_channel(f"unix://{endpoint}")
        self.node = csi_pb2_grpc.NodeStub(self.channel)

    def stop(self) -> None:
        self.channel.close()
        self.proc.terminate()
        self.proc.wait(timeout=10)

    def target(self, uid: str | None = None, volume: str = "kvtier-socket") -> Path:
        """What the kubelet asks for, with the parent folder the kubelet makes."""
        parent = self.pods / (uid or uuid.uuid4().hex) / "volumes" / "kubernetes.io~csi" / volume
        parent.mkdir(parents=True, exist_ok=True)
        return parent / "mount"

    def publish(self, pool: str, namespace: str, target: Path | str, volume_id: str = "csi-vol", **kw):
        capability = kw.pop(
            "capability",
            csi_pb2.VolumeCapability(
                mount=csi_pb2.VolumeCapability.MountVolume(),
                access_mode=csi_pb2.VolumeCapability.AccessMode(
                    mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
                ),
            ),
        )
        return self.node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=volume_id,
                target_path=str(target),
                volume_capability=capability,
                readonly=True,
                volume_context={
                    "pool": pool,
                    "csi.storage.k8s.io/pod.namespace": namespace,
                    "csi.storage.k8s.io/ephemeral": "true",
                },
            )
        )

    def unpublish(self, target: Path | str, volume_id: str = "csi-vol"):
        return self.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target))
        )


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def mounts(path: Path) -> int:
    return mounts_at(os.path.realpath(path))


@pytest.fixture
def plugin(control_plane, crds_installed):
    root = Path(tempfile.mkdtemp(prefix="kv-", dir="/tmp"))  # Unix socket paths stay under 108 bytes
    started = [Plugin(root, control_plane.env())]
    yield started[0]
    started[0].stop()
    unmount_below(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def served(kube, plugin, agent, tmp_path):
    """A pool with a running agent and an admitted namespace."""
    pool = _pool(kube, "namespace")
    cfg = agent_config(tmp_path / "agent", pool=pool, nvme=None)
    agent(cfg.model_copy(update={"socketDir": str(plugin.sockets / pool)}))
    return pool, _ns(kube)


def test_mountinfo_escapes_are_decoded():
    assert decode(r"/var/lib/kubelet/pods/a\040b/c\011d\134e\012") == "/var/lib/kubelet/pods/a b/c\td\\e\n"


def test_no_api_or_an_unreachable_api_means_no_mount(tmp_path):
    root = Path(tempfile.mkdtemp(prefix="kv-", dir="/tmp"))
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\n"
        "users: [{name: u, user: {token: x}}]\ncontexts: [{name: c, context: {cluster: c, user: u}}]\n"
        "current-context: c\n"
    )
    bare = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
    for env in (bare, {**bare, "KUBECONFIG": str(kubeconfig)}):
        p = Plugin(root, env)
        try:
            target = p.target()
            err = refused(lambda p=p, target=target: p.publish("any-pool", "team-a", target))
            assert err.code() == CODE.UNAVAILABLE, err.details()
            assert "tenancy" in err.details() and len(err.details()) < 300
            assert not target.exists() and mounts(target.parent) == 0
        finally:
            p.stop()
    shutil.rmtree(root, ignore_errors=True)


def test_targets_outside_the_pods_folder_or_through_symlinks_are_refused(plugin, served, tmp_path):
    pool, ns = served
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    uid = uuid.uuid4().hex
    good = plugin.target(uid)
    bad_targets = [
        other,  # outside the pods folder
        plugin.pods / uid / "volumes" / "kubernetes.io~csi" / "kvtier-socket" / ".." / "mount",
        plugin.pods / uid / "volumes" / "kubernetes.io~csi" / ".." / ".." / ".." / ".." / "elsewhere",
        plugin.pods / uid / "etc-hosts",  # the wrong shape
        str(good) + "/" + "x" * 5000,
        str(plugin.pods) + "//" + uid + "/volumes/kubernetes.io~csi/kvtier-socket/mount",
    ]
    for target in bad_targets:
        err = refused(lambda t=target: plugin.publish(pool, ns, t))
        assert err.code() == CODE.INVALID_ARGUMENT, (target, err.details())
        assert len(err.details()) < 400
    # a symlink planted at the target, and one in place of the pod's folder
    planted = plugin.target()
    planted.symlink_to(other)
    err = refused(lambda: plugin.publish(pool, ns, planted))
    assert err.code() == CODE.INVALID_ARGUMENT and "symlink" in err.details()
    linked_pod = uuid.uuid4().hex
    (plugin.pods / linked_pod).symlink_to(tmp_path)
    (tmp_path / "volumes" / "kubernetes.io~csi" / "v").mkdir(parents=True)
    err = refused(
        lambda: plugin.publish(pool, ns, plugin.pods / linked_pod / "volumes/kubernetes.io~csi/v/mount")
    )
    assert err.code() == CODE.INVALID_ARGUMENT and "symlink" in err.details()
    assert mounts(other) == 0 and os.listdir(other) == ["keep.txt"], "nothing mounted over it"
    assert not (tmp_path / "volumes/kubernetes.io~csi/v/mount").exists()
    # a target folder that is not empty keeps its files visible
    full = plugin.target()
    full.mkdir()
    (full / "data").write_text("x")
    err = refused(lambda: plugin.publish(pool, ns, full))
    assert err.code() == CODE.FAILED_PRECONDITION and mounts(full) == 0 and (full / "data").read_text() == "x"


def test_unpublish_touches_only_what_it_published(plugin, served, tmp_path):
    pool, ns = served
    # a mount kvtier never made, at a target of the right shape, over a folder with files
    foreign = plugin.target()
    foreign.mkdir()
    (foreign / "theirs").write_text("x")
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(foreign)], check=True)
    empty = plugin.target()
    empty.mkdir()
    try:
        for target in (foreign, empty):
            plugin.unpublish(target)  # success: nothing of kvtier's there, so nothing to do
        assert mounts(foreign) == 1 and empty.is_dir(), "the foreign mount and the empty folder stay"
        err = refused(lambda: plugin.unpublish(str(foreign.parent) + "/../kvtier-socket/mount"))
        assert err.code() == CODE.INVALID_ARGUMENT and mounts(foreign) == 1
        err = refused(lambda: plugin.publish(pool, ns, foreign))
        assert err.code() == CODE.ALREADY_EXISTS and "did not make" in err.details()
    finally:
        subprocess.run(["umount", str(foreign)], check=True)
    assert (foreign / "theirs").read_text() == "x"

    # its own publish: another volume id may not unpublish it; a mount stacked over it is left alone
    mine = plugin.target()
    plugin.publish(pool, ns, mine, volume_id="csi-mine")
    assert refused(lambda: plugin.unpublish(mine, volume_id="csi-other")).code() == CODE.NOT_FOUND
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mine)], check=True)
    err = refused(lambda: plugin.unpublish(mine, volume_id="csi-mine"))
    assert err.code() == CODE.FAILED_PRECONDITION and mounts(mine) == 2
    subprocess.run(["umount", str(mine)], check=True)
    plugin.unpublish(mine, volume_id="csi-mine")
    assert mounts(mine) == 0 and not mine.exists(), "it made the folder, so it removes it"


def test_paths_with_spaces_publish_once_and_the_record_survives_a_restart(plugin, served):
    pool, ns = served
    target = plugin.target()
    assert " " in str(target)
    for _ in range(3):
        plugin.publish(pool, ns, target)
    assert mounts(target) == 1, "repeat publishes of a path with a space are one mount"
    assert os.listdir(target) == ["kvtier.sock"]
    with pytest.raises(OSError):
        (target / "x").write_text("read-only")
    plugin.stop()
    plugin.start()
    plugin.publish(pool, ns, target)
    assert mounts(target) == 1
    plugin.unpublish(target)
    plugin.unpublish(target)
    assert mounts(target) == 0 and not target.exists()


def test_malformed_requests_get_csi_codes_and_bounded_logs(plugin, served, kube):
    pool, ns = served
    target = plugin.target()
    no_type = csi_pb2.VolumeCapability(
        access_mode=csi_pb2.VolumeCapability.AccessMode(
            mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
        )
    )
    cases = {
        "no access type": (lambda: plugin.publish(pool, ns, target, capability=no_type), CODE.INVALID_ARGUMENT),
        "pool ..": (lambda: plugin.publish("..", ns, target), CODE.INVALID_ARGUMENT),
        "pool x%2F": (lambda: plugin.publish("x%2F", ns, target), CODE.INVALID_ARGUMENT),
        "pool fast/status": (lambda: plugin.publish("fast/status", ns, target), CODE.INVALID_ARGUMENT),
        "unknown pool": (lambda: plugin.publish("no-such-pool", ns, target), CODE.INVALID_ARGUMENT),
        "namespace A/B": (lambda: plugin.publish(pool, "a/b", target), CODE.INVALID_ARGUMENT),
        "no such namespace": (lambda: plugin.publish(pool, "never-made", target), CODE.PERMISSION_DENIED),
        "3 MB volume_id": (lambda: plugin.publish(pool, ns, target, volume_id="v" * (3 << 20)), CODE.INVALID_ARGUMENT),
        "not admitted": (lambda: plugin.publish(pool, _ns(kube, admitted=False), target), CODE.PERMISSION_DENIED),
    }  # fmt: skip
    for name, (call, code) in cases.items():
        err = refused(call)
        assert err.code() == code, (name, err.code(), err.details()[:300])
        details = err.details()
        assert len(details) < 400 and "validation error" not in details and "HTTP" not in details, name
    assert "KVCachePool 'no-such-pool' does not exist" in refused(cases["unknown pool"][0]).details()
    assert not target.exists() and mounts(target) == 0
    plugin.publish(pool, ns, target, volume_id="csi-" + "a" * 200)
    plugin.unpublish(target, volume_id="csi-" + "a" * 200)
    assert max(len(line) for line in plugin.log.read_text().splitlines()) < 1000, "log lines stay short"
    assert "Traceback" not in plugin.log.read_text()
