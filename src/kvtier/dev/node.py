"""A real one-node Kubernetes on the development machine, beside the local control plane.

`kvtier dev up --node` runs containerd and runc (Debian), a CNI bridge of Debian's plugins on a
private subnet, and kubelet, kube-proxy, kube-controller-manager and kube-scheduler built like the
API server. Pods run for real: the kubelet pulls nothing, the images (pause, the CSI registrar, the
kvtier image) are built locally and imported into containerd.

Host changes are recorded when the node starts and undone by `stop` (also from another process:
`kvtier dev down`): processes, mounts (the shared propagation kubelet and the CSI plugin need,
pod volumes, network namespaces), iptables chains, the bridge, cgroups and changed sysctls.
Containerd's image store is a cache under ~/.cache/kvtier/node and survives, so a warm start is
quick; it holds no mount once containerd has stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kvtier import certs
from kvtier.dev.controlplane import LocalControlPlane, _alive, _terminate, write_kubeconfig
from kvtier.dev.ports import free_port

BRIDGE = "kvtier0"
POD_SUBNET = "10.244.0.0/24"
SERVICE_SUBNET = "10.0.0.0/24"  # the control plane's --service-cluster-ip-range
NODE_ADDRESS = "10.244.0.1"  # the bridge's gateway: the node's InternalIP and the API server's address
KUBELET_DIR = Path("/var/lib/kubelet")
PAUSE_REF = "kvtier.local/pause:1"
REGISTRAR_REF = "kvtier.local/csi-node-driver-registrar:3482d44"
STATE_FILE = "node.json"
# host folders the chart and kvtier's pools create on the node (hostPath DirectoryOrCreate)
HOST_FOLDERS = (KUBELET_DIR, Path("/var/run/kvtier"), Path("/var/lib/kvtier"))
NETNS = Path("/run/netns")  # containerd's pod network namespaces: cni-* (others' are left alone)
# sysctls the kubelet, kube-proxy and the CNI plugins may change; restored on stop
SYSCTL_PREFIXES = (
    "vm/",
    "kernel/panic",
    "kernel/keys/",
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/",
    "net/ipv4/conf/default/",
    "net/ipv6/conf/all/",
    "net/ipv6/conf/default/",
    "net/bridge/",
    "net/netfilter/nf_conntrack_max",
    "net/netfilter/nf_conntrack_tcp_timeout",
)
NODE_PROCESSES = ("kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy", "containerd")


def say(msg: str) -> None:
    print(f"==> node: {msg}", flush=True)


def node_cache_dir() -> Path:
    return Path(os.environ.get("KVTIER_CACHE_DIR", Path.home() / ".cache" / "kvtier")) / "node"


def node_name() -> str:
    return socket.gethostname().lower()


def cannot_run_containers() -> str | None:
    """Why this machine cannot run the real node, or None when it can."""
    if os.geteuid() != 0:
        return "a real node needs root (containerd, kubelet, mounts, iptables)"
    for tool in ("containerd", "runc", "ctr", "iptables", "mmdebstrap"):
        if not shutil.which(tool):
            return f"{tool} is missing (hack/setup.sh installs it with apt-get on Debian)"
    if not Path("/usr/lib/cni/bridge").exists():
        return "the CNI plugins are missing (apt-get install containernetworking-plugins)"
    if not Path("/sys/fs/cgroup").is_dir():
        return "no cgroup filesystem"
    if os.environ.get("KVTIER_NO_NODE"):
        return "KVTIER_NO_NODE is set"
    return None


def run(argv: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True, **kw)


# ---------------------------------------------------------------------------- host state


def read_sysctls() -> dict[str, str]:
    values: dict[str, str] = {}
    root = Path("/proc/sys")
    for prefix in SYSCTL_PREFIXES:
        base = root / prefix
        # a folder prefix ("vm/") takes everything below it; a name prefix ("kernel/panic") every
        # entry that starts with it (kernel/panic, kernel/panic_on_oops, ...)
        paths = sorted(base.rglob("*")) if prefix.endswith("/") else sorted(base.parent.glob(base.name + "*"))
        for p in paths:
            if p.is_file() and os.access(p, os.W_OK):
                try:
                    values[str(p.relative_to(root))] = p.read_text().strip()
                except OSError:
                    pass
    return values


def restore_sysctls(before: dict[str, str]) -> list[str]:
    changed = []
    for key, value in read_sysctls().items():
        if key in before and before[key] != value:
            try:
                (Path("/proc/sys") / key).write_text(before[key])
                changed.append(key)
            except OSError:
                pass
    return changed


def mounts_under(*folders: Path) -> list[str]:
    """Mount points at or below any of `folders`, deepest first."""
    roots = [os.path.realpath(f).rstrip("/") for f in folders]
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if any(point == r or point.startswith(r + "/") for r in roots):
            found.append(point)
    return sorted(set(found), key=lambda p: (-p.count("/"), p))


def unmount_all(*folders: Path) -> int:
    count = 0
    for _ in range(5):  # stacked mounts come off one at a time
        points = mounts_under(*folders)
        if not points:
            break
        for point in points:
            if run(["umount", point], check=False).returncode != 0:
                run(["umount", "-l", point], check=False)
            count += 1
    return count


def root_is_shared() -> bool:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == "/":
            return any(f.startswith("shared:") for f in fields[6 : fields.index("-")])
    return False


def iptables_sweep() -> int:
    """Delete every KUBE-* and CNI-* chain (and the jumps to them) from iptables and ip6tables."""
    removed = 0
    for tool in ("iptables", "ip6tables"):
        if not shutil.which(tool):
            continue
        for table in ("filter", "nat", "mangle"):
            dump = run([f"{tool}-save", "-t", table], check=False).stdout
            ours = re.compile(r"-j (KUBE-|CNI-)|^-A (KUBE-|CNI-)")
            for line in dump.splitlines():
                if line.startswith("-A ") and ours.search(line) and not re.match(r"-A (KUBE-|CNI-)", line):
                    run([tool, "-t", table, *shlex.split("-D" + line[2:])], check=False)
                    removed += 1
            chains = [ln[1:].split()[0] for ln in dump.splitlines() if re.match(r":(KUBE-|CNI-)", ln)]
            for chain in chains:
                run([tool, "-t", table, "-F", chain], check=False)
            for chain in chains:
                if run([tool, "-t", table, "-X", chain], check=False).returncode == 0:
                    removed += 1
    return removed


def remove_cgroups(name: str = "kubepods") -> None:
    """The kubelet's cgroup trees (cgroupfs driver), deepest first, once no process is in them."""
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        top = hierarchy / name
        if not top.is_dir():
            continue
        for folder in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                folder.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()


# ---------------------------------------------------------------------------- containerd


@dataclass
class Containerd:
    """containerd with its own socket and state; the image store (root) is a persistent cache."""

    state_dir: Path
    root_dir: Path = field(default_factory=lambda: node_cache_dir() / "containerd")
    cni_conf_dir: Path | None = None
    pid: int | None = None

    @property
    def socket(self) -> Path:
        return self.state_dir / "containerd.sock"

    @property
    def runc_root(self) -> Path:
        return self.state_dir / "runc"

    def config(self) -> str:
        cni = ""
        if self.cni_conf_dir:
            cni = f"""
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{self.cni_conf_dir}"
"""
        return f"""version = 2
root = "{self.root_dir}"
state = "{self.state_dir / "state"}"
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[debug]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_REF}"
  # root here lacks CAP_SYS_RESOURCE: runc must not lower oom_score_adj below its own
  restrict_oom_score_adj = true
  enable_cdi = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{self.runc_root}"
{cni}"""

    def start(self, timeout: float = 30) -> Containerd:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.root_dir.mkdir(parents=True, exist_ok=True)
        conf = self.state_dir / "containerd.toml"
        conf.write_text(self.config())
        log = open(self.state_dir / "containerd.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            ["containerd", "--config", str(conf)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = proc.pid
        deadline = time.monotonic() + timeout
        while self.ctr("version", check=False).returncode != 0:
            if not _alive(proc.pid) or time.monotonic() > deadline:
                tail = (self.state_dir / "containerd.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"containerd did not start; its log ends:\n{tail}")
            time.sleep(0.2)
        return self

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run(["ctr", "--address", str(self.socket), "--namespace", "k8s.io", *args], check=check)

    def has_image(self, ref: str) -> bool:
        return bool(self.ctr("images", "ls", "-q", f"name=={ref}", check=False).stdout.strip())

    def import_image(self, image) -> bool:
        """Import a docker-archive (kvtier.dev.image.BuiltImage) unless that reference is present."""
        if self.has_image(image.ref):
            return False
        self.ctr("images", "import", str(image.archive))
        return True

    def prune(self, keep: set[str], prefix: str = "kvtier.local/") -> None:
        """Remove locally built images of earlier builds (nothing runs yet: called before the kubelet)."""
        for ref in self.ctr("images", "ls", "-q", check=False).stdout.split():
            if ref.startswith(prefix) and ref not in keep:
                self.ctr("images", "rm", ref, check=False)

    def image_size(self, ref: str) -> int:
        """Bytes of the image's unpacked layers (its snapshots)."""
        out = self.ctr("images", "ls", f"name=={ref}").stdout.splitlines()
        if len(out) < 2:
            return 0
        size = out[1].split()[3:5]  # e.g. "461.1 MiB"
        units = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
        return int(float(size[0]) * units.get(size[1], 1))

    def kill_all(self) -> None:
        """SIGKILL every task and remove every container (what the kubelet left behind)."""
        for task in self.ctr("tasks", "ls", "-q", check=False).stdout.split():
            self.ctr("tasks", "kill", "-s", "SIGKILL", "--all", task, check=False)
        for task in self.ctr("tasks", "ls", "-q", check=False).stdout.split():
            self.ctr("tasks", "delete", "--force", task, check=False)
        for container in self.ctr("containers", "ls", "-q", check=False).stdout.split():
            self.ctr("containers", "delete", container, check=False)

    def shim_pids(self) -> list[int]:
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"containerd-shim-runc-v2") and str(self.socket).encode() in argv:
                pids.append(int(proc.name))
        return pids

    def stop(self) -> None:
        if self.socket.exists():
            self.kill_all()
        for pid in self.shim_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.pid:
            _terminate(self.pid)
        unmount_all(self.state_dir, self.root_dir)
        # containerd 1.6 keeps shim sockets and fifos in fixed folders; drop them once empty
        for folder in (Path("/run/containerd/s"), Path("/run/containerd/fifo"), Path("/run/containerd")):
            with contextlib.suppress(OSError):
                folder.rmdir()

    @classmethod
    def running_on_this_store(cls) -> Containerd | None:
        """A containerd already serving this image store (a node's, started by another process)."""
        root = node_cache_dir() / "containerd"
        for pid in node_process_pids():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            except OSError:
                continue
            if os.path.basename(argv[0]) != "containerd" or "--config" not in argv:
                continue
            conf = Path(argv[argv.index("--config") + 1])
            text = conf.read_text() if conf.exists() else ""
            if f'root = "{root}"' in text:
                return cls(state_dir=conf.parent, root_dir=root, pid=pid)
        return None

    @classmethod
    @contextlib.contextmanager
    def ensure(cls) -> Iterator[Containerd]:
        """The running node's containerd, or one started for the duration (same image store)."""
        running = cls.running_on_this_store()
        if running:
            yield running
            return
        with tempfile.TemporaryDirectory(prefix="kvtier-containerd-") as tmp:
            ctrd = Containerd(state_dir=Path(tmp)).start()
            try:
                yield ctrd
            finally:
                ctrd.stop()


# ---------------------------------------------------------------------------- the node


def cni_config(ipam_dir: Path) -> dict:
    """One bridge on a private subnet; no masquerading: pod traffic stays on this machine."""
    return {
        "cniVersion": "1.0.0",
        "name": "kvtier",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_SUBNET, "gateway": NODE_ADDRESS}]],
                    # only the Service range goes through the node: nothing routes off the machine
                    "routes": [{"dst": SERVICE_SUBNET}],
                    "dataDir": str(ipam_dir),
                },
            },
            {"type": "loopback"},
        ],
    }


def kubelet_config(pki: Path, containerd_socket: Path) -> dict:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_ADDRESS,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(pki / "ca.crt")},
        },
        "authorization": {"mode": "Webhook"},
        "tlsCertFile": str(pki / "kubelet.crt"),
        "tlsPrivateKeyFile": str(pki / "kubelet.key"),
        "containerRuntimeEndpoint": f"unix://{containerd_socket}",
        # cgroup v1 with the cgroupfs driver here (no systemd); swap is off anyway
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,
        "failSwapOn": False,
        "resolvConf": "/etc/resolv.conf",
        "serializeImagePulls": False,
        # images are imported, never pulled: the kubelet must not garbage-collect or evict for disk
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "shutdownGracePeriod": "0s",
        "syncFrequency": "10s",
        "fileCheckFrequency": "10s",
        "nodeStatusReportFrequency": "10s",
    }


@dataclass
class LocalNode:
    cp: LocalControlPlane
    state_dir: Path
    containerd: Containerd
    host: dict = field(default_factory=dict)  # what start changed and stop restores

    @classmethod
    def for_control_plane(cls, cp: LocalControlPlane) -> LocalNode:
        state = cp.state_dir / "node"
        return cls(cp, state, Containerd(state_dir=state / "containerd", cni_conf_dir=state / "cni"))

    @classmethod
    def load(cls, cp_state: Path) -> LocalNode:
        cp = LocalControlPlane.load(cp_state)
        node = cls.for_control_plane(cp)
        saved = json.loads((cp_state / STATE_FILE).read_text())
        node.host = saved["host"]
        node.containerd.pid = cp.pids.get("containerd")
        return node

    def running(self) -> bool:
        return all(_alive(self.cp.pids.get(n, 0) or 0) for n in NODE_PROCESSES)

    def _save(self) -> None:
        (self.cp.state_dir / STATE_FILE).write_text(json.dumps({"host": self.host}, indent=2))

    # ------------------------------------------------------------------ start

    @staticmethod
    def prepare_host(log=say) -> dict:
        """Record what the node will change on this host, then create the bridge the API server
        listens on. Runs before the control plane starts."""
        host = {
            "sysctls": read_sysctls(),
            "root_shared": root_is_shared(),
            "created": [str(f) for f in HOST_FOLDERS if not f.exists()],
        }
        stale = run(["ip", "link", "show", BRIDGE], check=False).returncode == 0
        if stale:
            raise RuntimeError(
                f"bridge {BRIDGE} exists: a node is running or was not stopped (kvtier dev down)"
            )
        log(f"bridge {BRIDGE} {NODE_ADDRESS}/24 (pods on {POD_SUBNET}, no route out)")
        run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        run(["ip", "addr", "add", f"{NODE_ADDRESS}/24", "dev", BRIDGE])
        run(["ip", "link", "set", BRIDGE, "up"])
        return host

    def start(self, images: list | None = None, log=say, timeout: float = 120) -> LocalNode:
        t0 = time.monotonic()
        self._save()
        bin_dir = self.cp.bin_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
        # bidirectional mount propagation (CSI plugins) needs shared mounts
        run(["mount", "--make-shared", "/"])
        KUBELET_DIR.mkdir(parents=True, exist_ok=True)
        for folder in (KUBELET_DIR, Path("/var/run/kvtier")):
            folder.mkdir(parents=True, exist_ok=True)
            run(["mount", "--bind", str(folder), str(folder)])
            run(["mount", "--make-rshared", str(folder)])

        cni = self.state_dir / "cni"
        cni.mkdir(exist_ok=True)
        (cni / "10-kvtier.conflist").write_text(json.dumps(cni_config(self.state_dir / "ipam"), indent=2))
        log("starting containerd")
        self.containerd.start()
        self.cp.pids["containerd"] = self.containerd.pid or 0
        self.cp._save_state()
        from kvtier.dev.image import binary_image

        wanted = [
            binary_image(bin_dir / "pause", PAUSE_REF),
            binary_image(bin_dir / "csi-node-driver-registrar", REGISTRAR_REF),
            *(images or []),
        ]
        self.containerd.prune(keep={image.ref for image in wanted})
        for image in wanted:
            if self.containerd.import_image(image):
                log(f"imported {image.ref}")

        pki = self.cp.pki
        ca = certs.KeyPair((pki / "ca.crt").read_bytes(), (pki / "ca.key").read_bytes())
        name = node_name()
        kubeconfigs = {
            "kubelet": certs.issue(
                ca, f"system:node:{name}", organization="system:nodes", server=False, client=True
            ),
            "kube-proxy": certs.issue(ca, "system:kube-proxy", server=False, client=True),
            "kube-controller-manager": certs.issue(
                ca, "system:kube-controller-manager", server=False, client=True
            ),
            "kube-scheduler": certs.issue(ca, "system:kube-scheduler", server=False, client=True),
        }
        for component, pair in kubeconfigs.items():
            path = self.state_dir / f"{component}.kubeconfig"
            write_kubeconfig(path, self.cp.url, ca.cert_pem, component, pair)
        serving = certs.issue(ca, name, dns_names=(name,), ips=(NODE_ADDRESS,))
        (pki / "kubelet.crt").write_bytes(serving.cert_pem)
        (pki / "kubelet.key").write_bytes(serving.key_pem)
        (pki / "kubelet.key").chmod(0o600)
        config = self.state_dir / "kubelet.yaml"
        config.write_text(yaml.safe_dump(kubelet_config(pki, self.containerd.socket)))

        env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")}
        kc = lambda c: str(self.state_dir / f"{c}.kubeconfig")  # noqa: E731
        log("starting kube-controller-manager, kube-scheduler, kubelet, kube-proxy")
        self.cp.spawn_managed(
            "kube-controller-manager",
            [
                str(bin_dir / "kube-controller-manager"),
                f"--kubeconfig={kc('kube-controller-manager')}",
                f"--authentication-kubeconfig={kc('kube-controller-manager')}",
                f"--authorization-kubeconfig={kc('kube-controller-manager')}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                "--use-service-account-credentials=true",
                "--leader-elect=false",
                f"--service-cluster-ip-range={SERVICE_SUBNET}",
            ],
            env,
        )
        self.cp.spawn_managed(
            "kube-scheduler",
            [
                str(bin_dir / "kube-scheduler"),
                f"--kubeconfig={kc('kube-scheduler')}",
                f"--authentication-kubeconfig={kc('kube-scheduler')}",
                f"--authorization-kubeconfig={kc('kube-scheduler')}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--leader-elect=false",
            ],
            env,
        )
        self.cp.spawn_managed(
            "kubelet",
            [
                str(bin_dir / "kubelet"),
                f"--config={config}",
                f"--kubeconfig={kc('kubelet')}",
                f"--root-dir={KUBELET_DIR}",
                f"--hostname-override={name}",
                f"--node-ip={NODE_ADDRESS}",
                "--v=1",
            ],
            env,
        )
        self.cp.spawn_managed(
            "kube-proxy",
            [
                str(bin_dir / "kube-proxy"),
                f"--kubeconfig={kc('kube-proxy')}",
                f"--hostname-override={name}",
                "--proxy-mode=iptables",
                f"--cluster-cidr={POD_SUBNET}",
                # leave the host's conntrack table and localhost routing alone
                "--conntrack-max-per-core=0",
                "--conntrack-tcp-timeout-established=0",
                "--conntrack-tcp-timeout-close-wait=0",
                "--iptables-localhost-nodeports=false",
                f"--healthz-bind-address=127.0.0.1:{free_port()}",
                f"--metrics-bind-address=127.0.0.1:{free_port()}",
            ],
            env,
        )
        self._wait_ready(name, timeout)
        log(f"node {name} Ready in {time.monotonic() - t0:.1f}s")
        return self

    def _wait_ready(self, name: str, timeout: float) -> None:
        kubectl = str(self.cp.bin_dir / "kubectl")
        deadline = time.monotonic() + timeout
        while True:
            for proc in NODE_PROCESSES:
                if not _alive(self.cp.pids.get(proc, 0) or 0):
                    log = self.cp.state_dir / f"{proc}.log"
                    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
                    raise RuntimeError(f"{proc} exited during start-up; its log ends:\n{tail}")
            out = run(
                [
                    kubectl,
                    "get",
                    "node",
                    name,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
                ],
                check=False,
                env=self.cp.env(),
            ).stdout
            if out.strip() == "True":
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {name} not Ready after {timeout:.0f}s")
            time.sleep(0.5)

    # ------------------------------------------------------------------ stop

    def stop(self, log=say) -> None:
        """Stop the node and undo every host change it made; safe to call on a half-started node."""
        kubectl = str(self.cp.bin_dir / "kubectl")
        for name in ("kube-controller-manager", "kube-scheduler"):
            self._stop_process(name)
        if _alive(self.cp.pids.get("kubelet", 0) or 0) and _alive(self.cp.pids.get("kube-apiserver", 0) or 0):
            # the kubelet tears its pods down properly (volumes, sandboxes, CNI) when they go
            run(
                [
                    kubectl,
                    "delete",
                    "pods",
                    "--all",
                    "--all-namespaces",
                    "--grace-period=0",
                    "--force",
                    "--wait=false",
                ],
                check=False,
                env=self.cp.env(),
                timeout=60,
            )
            deadline = time.monotonic() + 30
            while (
                time.monotonic() < deadline
                and "RUNNING" in self.containerd.ctr("tasks", "ls", check=False).stdout
            ):
                time.sleep(0.5)
        for name in ("kubelet", "kube-proxy"):
            self._stop_process(name)
        self.containerd.pid = self.cp.pids.get("containerd")
        self.containerd.stop()
        self.cp.pids.pop("containerd", None)
        self.cp._save_state()
        cni_netns = sorted(NETNS.glob("cni-*"))
        unmount_all(*HOST_FOLDERS, self.state_dir, *cni_netns)
        for netns in cni_netns:
            with contextlib.suppress(OSError):
                netns.unlink()
        for line in run(["ip", "-o", "link", "show", "master", BRIDGE], check=False).stdout.splitlines():
            run(["ip", "link", "del", line.split(":")[1].strip().split("@")[0]], check=False)
        run(["ip", "link", "del", BRIDGE], check=False)
        if (self.cp.bin_dir / "kube-proxy").exists():
            run([str(self.cp.bin_dir / "kube-proxy"), "--cleanup"], check=False)
        iptables_sweep()
        remove_cgroups("kubepods")  # the cgroupfs driver's tree
        for folder in self.host.get("created", []):
            shutil.rmtree(folder, ignore_errors=True)
        if not self.host.get("root_shared", True):
            run(["mount", "--make-private", "/"], check=False)
        restored = restore_sysctls(self.host.get("sysctls", {}))
        if restored:
            log(f"restored sysctls: {', '.join(restored)}")
        (self.cp.state_dir / STATE_FILE).unlink(missing_ok=True)

    def _stop_process(self, name: str) -> None:
        pid = self.cp.pids.pop(name, None)
        if pid:
            _terminate(pid)
        self.cp._save_state()


def node_process_pids() -> list[int]:
    """Processes of a node's programs (or containerd's shims) still running on this machine."""
    names = {*NODE_PROCESSES, "containerd-shim-runc-v2"}
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                argv0 = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if os.path.basename(argv0) in names:
                pids.append(int(proc.name))
    return pids


def leftovers() -> dict[str, int]:
    """What a stopped node must not leave behind (the counts CI checks after `kvtier dev down`)."""
    mounts = sum(1 for line in Path("/proc/self/mountinfo").read_text().splitlines() if "kubelet" in line)
    chains = sum(
        1
        for line in run(["iptables-save"], check=False).stdout.splitlines()
        if "KUBE" in line or "CNI-" in line
    )
    bridge = int(run(["ip", "link", "show", BRIDGE], check=False).returncode == 0)
    procs = len(node_process_pids())
    return {"kubelet_mounts": mounts, "iptables_lines": chains, "bridge": bridge, "processes": procs}


def up(cp_state: Path, bin_dir: Path, images: list | None = None, log=say) -> LocalNode:
    """The control plane set up for a node, and the node; stopped again if any part fails."""
    host = LocalNode.prepare_host(log)
    cp = LocalControlPlane(state_dir=cp_state, bin_dir=bin_dir, address=NODE_ADDRESS, for_node=True)
    node = LocalNode.for_control_plane(cp)
    node.host = host
    try:
        cp.start(log=log)
        node.start(images=images, log=log)
    except BaseException:
        down(node, log)
        raise
    return node


def down(node: LocalNode, log=say) -> None:
    try:
        node.stop(log)
    finally:
        node.cp.stop()
