"""A local Kubernetes control plane, envtest style: real etcd + kube-apiserver, nothing else.

All state (certificates, etcd data, logs, kubeconfig, pids) lives under one folder. By itself there
is no kubelet, scheduler or controller-manager: objects are stored and validated, webhooks are
called, but no pod runs and nothing is garbage-collected. With `for_node=True` the API server is
set up for a real node (kvtier.dev.node): it listens on the node bridge's address that pods reach,
authorizes with Node+RBAC, issues ServiceAccount tokens and reaches kubelets for logs and exec.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kvtier import certs
from kvtier.dev.ports import free_port

STATE_FILE = "controlplane.json"


def _write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


@dataclass
class LocalControlPlane:
    state_dir: Path
    bin_dir: Path
    etcd_port: int = 0
    apiserver_port: int = 0
    pids: dict[str, int] = field(default_factory=dict)
    address: str = "127.0.0.1"  # where kube-apiserver listens (a real node: its bridge's address)
    for_node: bool = False

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def url(self) -> str:
        return f"https://{self.address}:{self.apiserver_port}"

    @property
    def pki(self) -> Path:
        return self.state_dir / "pki"

    # ---------------------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 90.0, log=print) -> LocalControlPlane:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        pki = self.state_dir / "pki"
        pki.mkdir(exist_ok=True)
        self.etcd_port, peer_port, self.apiserver_port = free_port(), free_port(), free_port()

        log("control plane: generating certificates and service-account keys")
        ca = certs.new_ca("kvtier-local-ca")
        serving = certs.issue(
            ca,
            "kube-apiserver",
            dns_names=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"),
            ips=tuple(dict.fromkeys(("127.0.0.1", "10.0.0.1", self.address))),
        )
        admin = certs.issue(ca, "kvtier-admin", organization="system:masters", server=False, client=True)
        sa_key, sa_pub = certs.new_rsa_keypair_pem()
        _write(pki / "ca.crt", ca.cert_pem, 0o644)
        _write(pki / "ca.key", ca.key_pem)
        _write(pki / "apiserver.crt", serving.cert_pem, 0o644)
        _write(pki / "apiserver.key", serving.key_pem)
        _write(pki / "sa.key", sa_key)
        _write(pki / "sa.pub", sa_pub, 0o644)
        self._write_kubeconfig(ca.cert_pem, admin)

        log(f"control plane: starting etcd on 127.0.0.1:{self.etcd_port}")
        self._spawn(
            "etcd",
            [
                str(self.bin_dir / "etcd"),
                f"--data-dir={self.state_dir / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{self.etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{self.etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=default=http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        if self.for_node:
            kubelet_client = certs.issue(
                ca, "kube-apiserver-kubelet-client", organization="system:masters", server=False, client=True
            )
            _write(pki / "kubelet-client.crt", kubelet_client.cert_pem, 0o644)
            _write(pki / "kubelet-client.key", kubelet_client.key_pem)
            node_flags = [
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                f"--kubelet-client-certificate={pki / 'kubelet-client.crt'}",
                f"--kubelet-client-key={pki / 'kubelet-client.key'}",
                "--kubelet-preferred-address-types=InternalIP",
            ]
        else:
            node_flags = ["--authorization-mode=RBAC", "--disable-admission-plugins=ServiceAccount"]
        log(f"control plane: starting kube-apiserver on {self.url}")
        self._spawn(
            "kube-apiserver",
            [
                str(self.bin_dir / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
                f"--cert-dir={pki}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--secure-port={self.apiserver_port}",
                f"--bind-address={self.address}",
                f"--advertise-address={self.address}",
                *node_flags,
                "--service-cluster-ip-range=10.0.0.0/24",
                "--allow-privileged=true",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--v=0",
            ],
        )
        self._save_state()
        self._wait_ready(timeout, log)
        return self

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, every process; the state folder is removed."""
        # whatever runs against the API first (an operator started by `dev up --operator`), then the API
        order = [n for n in self.pids if n not in ("kube-apiserver", "etcd")] + ["kube-apiserver", "etcd"]
        for name in order:
            pid = self.pids.get(name)
            if pid:
                _terminate(pid)
        self.pids.clear()
        shutil.rmtree(self.state_dir, ignore_errors=True)

    @classmethod
    def load(cls, state_dir: Path) -> LocalControlPlane:
        state = json.loads((state_dir / STATE_FILE).read_text())
        return cls(
            state_dir=state_dir,
            bin_dir=Path(state["bin_dir"]),
            etcd_port=state["etcd_port"],
            apiserver_port=state["apiserver_port"],
            pids=state["pids"],
            address=state.get("address", "127.0.0.1"),
            for_node=state.get("for_node", False),
        )

    def running(self) -> bool:
        return bool(self.pids) and all(_alive(pid) for pid in self.pids.values())

    def version(self) -> dict[str, str]:
        return json.loads(self._get("/version"))

    def env(self) -> dict[str, str]:
        """Environment for child processes (kubectl, helm, operator, agents) to reach this cluster."""
        return {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "PATH": f"{self.bin_dir}:{os.environ['PATH']}",
        }

    # ------------------------------------------------------------------------------ details

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        log = open(self.state_dir / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        self.pids[name] = proc.pid

    def spawn_managed(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        """A process that lives as long as this control plane (stopped by `stop`, even from `dev down`)."""
        self._spawn(name, argv, env)
        self._save_state()

    def _save_state(self) -> None:
        state = {
            "bin_dir": str(self.bin_dir),
            "etcd_port": self.etcd_port,
            "apiserver_port": self.apiserver_port,
            "pids": self.pids,
            "address": self.address,
            "for_node": self.for_node,
        }
        (self.state_dir / STATE_FILE).write_text(json.dumps(state, indent=2))

    def _write_kubeconfig(self, ca_pem: bytes, admin: certs.KeyPair) -> None:
        write_kubeconfig(self.kubeconfig, self.url, ca_pem, "kvtier-admin", admin)

    def _ssl(self) -> ssl.SSLContext:
        pki = self.state_dir / "pki"
        ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        config = yaml.safe_load(self.kubeconfig.read_text())
        user = config["users"][0]["user"]
        cert, key = pki / "admin.crt", pki / "admin.key"
        if not cert.exists():
            _write(cert, base64.b64decode(user["client-certificate-data"]))
            _write(key, base64.b64decode(user["client-key-data"]))
        ctx.load_cert_chain(str(cert), str(key))
        return ctx

    def _get(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, context=self._ssl(), timeout=5) as resp:
            return resp.read().decode()

    def _wait_ready(self, timeout: float, log) -> None:
        deadline = time.monotonic() + timeout
        last_report = 0.0
        while True:
            for name, pid in self.pids.items():
                if not _alive(pid):
                    tail = (self.state_dir / f"{name}.log").read_text(errors="replace")[-3000:]
                    self.stop()
                    raise RuntimeError(f"{name} exited during start-up; its log ends:\n{tail}")
            try:
                if self._get("/readyz") == "ok":
                    log(f"control plane: ready ({self.version()['gitVersion']})")
                    return
            except OSError:
                pass
            now = time.monotonic()
            if now > deadline:
                self.stop()
                raise TimeoutError(f"kube-apiserver not ready after {timeout:.0f}s")
            if now - last_report > 5:
                log("control plane: waiting for kube-apiserver /readyz ...")
                last_report = now
            time.sleep(0.25)


def write_kubeconfig(path: Path, server: str, ca_pem: bytes, user: str, pair: certs.KeyPair) -> Path:
    """A kubeconfig (mode 0600) for `user` authenticating with a client certificate."""
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "kvtier-local", "cluster": {"server": server, "certificate-authority-data": b64(ca_pem)}}
        ],
        "users": [
            {
                "name": user,
                "user": {"client-certificate-data": b64(pair.cert_pem), "client-key-data": b64(pair.key_pem)},
            }
        ],
        "contexts": [{"name": "kvtier-local", "context": {"cluster": "kvtier-local", "user": user}}],
        "current-context": "kvtier-local",
    }
    return _write(path, yaml.safe_dump(config).encode())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of this process is not alive.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def _terminate(pid: int, grace: float = 10.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    if _alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def default_state_dir() -> Path:
    return Path(os.environ.get("KVTIER_DEV_DIR", f"/tmp/kvtier-dev-{os.getuid()}"))
