"""The user's path on real pods: helm install, a pool, an injected engine pod, failures, upgrade,
removal. One node for the module; the tests run in order and each builds on the previous state."""

from __future__ import annotations

import base64
import json
import os
import signal
import time

import pytest

from kvtier.dev.cluster import NAMESPACE, pod_ready, small_pool
from kvtier.dev.node import REGISTRAR_REF
from tests.support import eventually

pytestmark = [pytest.mark.node, pytest.mark.timeout(900)]

POOL = "nodetest"
OPERATOR = "app.kubernetes.io/component=operator"
CSI = "app.kubernetes.io/component=csi"
AGENT = f"kvtier.io/pool={POOL}"

# The engine pod's program (python3 of the image; the client comes from the injected stager).
# `serve` is the container's main process: one connection it keeps across agent restarts
# (AgentConnection), printing a line whenever what it sees changes. `put` and `get` run once (exec).
ENGINE_SCRIPT = r"""
import hashlib, json, os, sys, time
from kvtier.agent.client import CONNECTION_LOST, AgentConnection, Client
FP = "model=node-test;dtype=bf16;layers=2;kv_heads=2;head_dim=64;block=256;tp=0/1"
keys, parent = [], b""
for i in range(8):
    parent = hashlib.sha256(parent + b"node-test:%d" % i).digest()
    keys.append(parent)
blobs = [hashlib.sha256(k).digest() * 4096 for k in keys]  # 128 KiB each, derived from the key
def seen(c):
    got = c.get(FP, keys)
    return {"hits": c.lookup(FP, keys), "exact": got == blobs[: len(got)], "got": len(got)}
if sys.argv[1] == "serve":
    conn, last = AgentConnection(timeout=5, retry_after=0.5), None
    while True:
        c = conn.get()
        try:
            now = seen(c) if c else {"connected": False}
        except CONNECTION_LOST as exc:
            conn.lost(exc)
            now = {"lost": type(exc).__name__}
        if now != last:
            print(json.dumps(now), flush=True)
            last = now
        time.sleep(0.3)
c = Client(os.environ["KVTIER_SOCKET"], timeout=20)
if sys.argv[1] == "put":
    c.put(FP, keys, blobs, sync=True, wait=10)  # acknowledged = on NVMe
print(json.dumps(seen(c)))
"""


# A second agent of the pool, started inside the engine pod (so inside the pod network, with no
# Kubernetes API and the pool secret handed over on stdin), with the pool's agent as its static peer:
# it prefetches team-a's chain, which can only come from the pool's agent, over NIXL.
PEER_SCRIPT = r"""
import hashlib, json, os, sys, tempfile
from pathlib import Path
from kvtier.agent.client import Client
from kvtier.dev.agents import local_agent_config, spawn_agent
FP, TENANT = sys.argv[1], "team-a"
keys, parent = [], b""
for i in range(8):
    parent = hashlib.sha256(parent + b"node-test:%d" % i).digest()
    keys.append(parent)
blobs = [hashlib.sha256(k).digest() * 4096 for k in keys]
os.environ.pop("KUBERNETES_SERVICE_HOST", None)  # a bare agent: no KVCacheNode of its own
folder = Path(tempfile.mkdtemp())
secret = folder / "secret"
secret.write_bytes(bytes.fromhex(sys.stdin.read().strip()))
secret.chmod(0o600)
cfg = local_agent_config(folder, sys.argv[2], {"tiers": {"dram": {"size": "16Mi"}}}, segment_bytes=4 << 20,
                         secretFile=str(secret), peers=[sys.argv[3]], nodeName="peer-in-engine-pod")
agent = spawn_agent(cfg, folder / "agent.yaml")
try:
    with Client(agent.tenant(TENANT), timeout=30) as c:
        fetched = c.call("prefetch", fingerprint=FP, keys=[k.hex() for k in keys], deadline=20)["result"]
        got = c.get(FP, keys)
    print(json.dumps({"transport": agent.stats()["transport"], "prefetch": fetched,
                      "exact": got == blobs, "got": len(got)}))
finally:
    agent.kill()
"""

METRIC_SCRIPT = r"""
import urllib.request
text = urllib.request.urlopen("http://127.0.0.1:9400/metrics", timeout=10).read().decode()
print(next(l.split()[-1] for l in text.splitlines() if l.startswith('kvtier_peer_bytes_total{direction="served"}')))
"""


def engine_pod(name: str, namespace: str, image: str, inject: bool = True) -> dict:
    labels = {"kvtier.io/inject": "true"} if inject else {}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "annotations": {"kvtier.io/pool": POOL},
        },
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "engine",
                    "image": image,
                    "command": ["python3", "-c", ENGINE_SCRIPT, "serve"],
                }
            ],
        },
    }


def engine(s, pod: str, namespace: str, verb: str) -> dict:
    out = s.kubectl("exec", "-n", namespace, pod, "-c", "engine", "--", "python3", "-c", ENGINE_SCRIPT, verb)
    return json.loads(out.strip().splitlines()[-1])


def test_chart_pods_ready_and_csi_driver_registered(node_session):
    s = node_session
    s.timings["helm_install_to_ready_s"] = s.cluster.helm_install(
        s.image, REGISTRAR_REF, "operator.statusInterval=2"
    )
    s.cluster.wait_ready(NAMESPACE, OPERATOR)
    s.cluster.wait_ready(NAMESPACE, CSI)
    drivers = eventually(
        lambda: [d["name"] for d in s.cluster.get("csinode")["items"][0]["spec"].get("drivers") or []],
        timeout=60,
        message="the registrar registers csi.kvtier.io with the kubelet",
    )
    assert "csi.kvtier.io" in drivers


def test_pool_agent_ready_and_reports_its_node(node_session):
    s = node_session
    t0 = time.monotonic()
    s.cluster.apply(small_pool(POOL, "128Mi", "256Mi"))
    s.cluster.wait_ready(NAMESPACE, AGENT)
    s.timings["pool_apply_to_agent_ready_s"] = time.monotonic() - t0
    kvn = eventually(lambda: s.cluster.get("kvn")["items"], timeout=60, message="a KVCacheNode")
    assert kvn[0]["metadata"]["name"].startswith(POOL)


def test_injected_pod_gets_socket_and_sidecar_and_stores_blocks(node_session):
    s = node_session
    for ns in ("team-a", "team-b"):
        s.kubectl("create", "namespace", ns)
    t0 = time.monotonic()
    s.cluster.apply(engine_pod("engine", "team-a", s.image))
    pod = s.cluster.wait_ready("team-a", "kvtier.io/inject=true")[0]
    s.timings["engine_pod_created_to_ready_s"] = time.monotonic() - t0
    assert pod["metadata"]["annotations"].get("kvtier.io/injected")
    sidecars = {c["name"]: c for c in pod["status"]["initContainerStatuses"]}
    assert any(c.get("started") and c.get("ready") for c in sidecars.values()), sidecars
    assert any(v.get("csi", {}).get("driver") == "csi.kvtier.io" for v in pod["spec"]["volumes"])
    assert not any("hostPath" in v for v in pod["spec"]["volumes"])
    listing = s.kubectl("exec", "-n", "team-a", "engine", "-c", "engine", "--", "ls", "/var/run/kvtier")
    assert "kvtier.sock" in listing.split()
    first = engine(s, "engine", "team-a", "put")
    assert first == {"hits": 8, "exact": True, "got": 8}


def test_another_namespace_gets_no_hits(node_session):
    s = node_session
    s.cluster.apply(engine_pod("engine", "team-b", s.image))
    s.cluster.wait_ready("team-b", "kvtier.io/inject=true")
    assert engine(s, "engine", "team-b", "get") == {"hits": 0, "exact": True, "got": 0}


def test_the_agent_pod_moves_blocks_to_a_peer_over_nixl(node_session):
    s = node_session
    (kvn,) = s.cluster.get("kvn")["items"]
    status = kvn["status"]
    transport = status["transport"]
    # the image carries NIXL; no RDMA device here, so UCX over TCP, and the node says why
    assert transport["library"].startswith("nixl ") and "UCX" in transport["library"], transport
    assert transport["ucxTransports"] == "tcp" and transport["rdma"] is False, transport
    assert transport["reason"] and transport["rdmaReason"], transport
    secret_name = next(
        v["secret"]["secretName"]
        for v in s.cluster.pods(NAMESPACE, AGENT)[0]["spec"]["volumes"]
        if "secret" in v
    )
    secret = s.cluster.get("secret", "-n", NAMESPACE, secret_name)["data"]["secret"]
    fp = ENGINE_SCRIPT.split('FP = "', 1)[1].split('"', 1)[0]
    out = s.kubectl(
        "exec", "-i", "-n", "team-a", "engine", "-c", "engine", "--",
        "python3", "-c", PEER_SCRIPT, fp, POOL, status["peerAddress"],
        input=base64.b64decode(secret).hex(),
    )  # fmt: skip
    peer = json.loads(out.strip().splitlines()[-1])
    assert peer["transport"]["library"] == transport["library"], peer
    assert peer["prefetch"]["fetched"] == 8 and peer["prefetch"]["missing"] == 0, peer
    assert peer["exact"] and peer["got"] == 8, "every block came over NIXL bit-exact"
    served = s.kubectl("exec", "-n", NAMESPACE, s.cluster.pods(NAMESPACE, AGENT)[0]["metadata"]["name"], "--",
                       "python3", "-c", METRIC_SCRIPT)  # fmt: skip
    assert float(served) >= 8 * 128 * 1024, "the pool's agent counts the bytes it served"


def test_agent_sigkill_restart_keeps_acknowledged_blocks(node_session):
    s = node_session
    agent = s.cluster.wait_ready(NAMESPACE, AGENT)[0]
    restarts = agent["status"]["containerStatuses"][0]["restartCount"]
    container_id = agent["status"]["containerStatuses"][0]["containerID"].split("//")[1]
    pid = 0
    for line in s.node.containerd.ctr("tasks", "ls").stdout.splitlines()[1:]:
        task, task_pid = line.split()[:2]
        if task == container_id:
            pid = int(task_pid)
    assert pid, "the agent's process on the host"
    os.kill(pid, signal.SIGKILL)
    eventually(
        lambda: (
            (p := s.cluster.pods(NAMESPACE, AGENT))
            and p[0]["status"]["containerStatuses"][0]["restartCount"] > restarts
            and pod_ready(p[0])
        ),
        timeout=120,
        message="the kubelet restarts the killed agent and it is Ready again",
    )

    def reconnected() -> bool:
        logs = s.kubectl("logs", "-n", "team-a", "engine", "-c", "engine").splitlines()
        lines = [json.loads(x) for x in logs if x.startswith("{")]  # (the client also logs warnings)
        lost = next((i for i, x in enumerate(lines) if "lost" in x or x.get("connected") is False), None)
        return lost is not None and lines[-1] == {"hits": 8, "exact": True, "got": 8}

    eventually(
        reconnected, timeout=60, message="the engine's own connection comes back and finds every block"
    )
    engine_status = s.cluster.get("pod", "-n", "team-a", "engine")["status"]["containerStatuses"]
    assert all(c["restartCount"] == 0 for c in engine_status), "the engine process itself never restarted"
    back = engine(s, "engine", "team-a", "get")
    assert back == {"hits": 8, "exact": True, "got": 8}, "acknowledged blocks come back bit-exact from NVMe"


def test_pods_are_created_while_the_operator_is_down(node_session):
    s = node_session
    s.kubectl("scale", "-n", NAMESPACE, "deployment", "-l", OPERATOR, "--replicas=0")
    s.cluster.wait_gone("pods", "-n", NAMESPACE, "-l", OPERATOR)
    s.kubectl("create", "namespace", "team-c")
    s.cluster.apply(
        engine_pod("labelled", "team-c", s.image), engine_pod("plain", "team-c", s.image, inject=False)
    )
    pods = {p["metadata"]["name"]: p for p in s.cluster.pods("team-c")}
    assert set(pods) == {"labelled", "plain"}, "failurePolicy Ignore: kvtier down never blocks pods"
    assert "kvtier.io/injected" not in (pods["labelled"]["metadata"].get("annotations") or {})
    s.kubectl("delete", "namespace", "team-c", "--wait=false")
    s.kubectl("scale", "-n", NAMESPACE, "deployment", "-l", OPERATOR, "--replicas=1")
    s.cluster.wait_ready(NAMESPACE, OPERATOR)


def test_helm_upgrade_rolls_the_pods(node_session):
    s = node_session
    before = {p["metadata"]["uid"] for p in s.cluster.pods(NAMESPACE, f"{OPERATOR}")}
    before |= {p["metadata"]["uid"] for p in s.cluster.pods(NAMESPACE, CSI)}
    s.cluster.helm_install(
        s.image,
        REGISTRAR_REF,
        "operator.statusInterval=3",
        "csi.resources.limits.memory=160Mi",
        verb="upgrade",
    )
    after = s.cluster.wait_ready(NAMESPACE, OPERATOR) + s.cluster.wait_ready(NAMESPACE, CSI)
    assert not before & {p["metadata"]["uid"] for p in after}, "every operator and CSI pod was replaced"
    assert "deployed" in s.cluster.helm("status", "kvtier", "-n", NAMESPACE)


def test_pool_delete_removes_its_agents_and_nodes(node_session):
    s = node_session
    for ns in ("team-a", "team-b"):
        s.kubectl("delete", "namespace", ns, "--wait=false")
    s.kubectl("delete", "kvp", POOL, "--timeout=120s")
    s.cluster.wait_gone("pods", "-n", NAMESPACE, "-l", AGENT)
    s.cluster.wait_gone("kvn")
    assert not s.cluster.get("daemonset", "-n", NAMESPACE, "-l", AGENT)["items"]


def test_helm_uninstall_leaves_only_the_crds(node_session):
    s = node_session
    s.cluster.helm("uninstall", "kvtier", "-n", NAMESPACE, "--wait", "--timeout", "3m")
    s.cluster.wait_gone("pods", "-n", NAMESPACE)
    assert not s.cluster.get("all", "-n", NAMESPACE)["items"]
    assert not s.cluster.get("csidriver")["items"]
    assert not s.cluster.get("mutatingwebhookconfigurations")["items"]
    crds = {c["metadata"]["name"] for c in s.cluster.get("crd")["items"]}
    assert {"kvcachepools.kvtier.io", "kvcachenodes.kvtier.io"} <= crds
    eventually(
        lambda: not (s.cluster.get("csinode")["items"][0]["spec"].get("drivers") or []),
        timeout=60,
        message="the kubelet unregisters csi.kvtier.io",
    )
