"""`kvtier demo`: the whole path on one machine, with a summary.

Where this machine can run containers (root, containerd, runc, CNI), the user's path on real pods:
a one-node Kubernetes (kvtier.dev.node), `helm install` of the chart with the locally built image,
`kubectl apply` of a pool, the agent DaemonSet's pod Ready, and an engine Deployment labelled for
injection whose pod runs a small model on the CPU and saves its prompt's KV through the socket the
CSI driver mounted; the pod is deleted, comes back and restores instead of recomputing; the same
engine in another namespace gets no hits.

Elsewhere (or with --processes), the same path with processes: a real local control plane
(etcd + kube-apiserver), the operator as a local process, this machine registered as a Node, the
agent started with exactly the configuration the operator rendered (host paths moved into a demo
folder), and the small model's KV saved, dropped and restored from DRAM and then from NVMe.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

POOL = "demo"
NAMESPACE = "kvtier-system"
TENANT = "team-a"


def say(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def demo_pool(node: str, nvme_path: Path) -> dict[str, Any]:
    return {
        "apiVersion": "kvtier.io/v1alpha1",
        "kind": "KVCachePool",
        "metadata": {"name": POOL},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "tiers": {
                "dram": {"size": "256Mi"},
                "nvme": {"size": "1Gi", "mode": "file", "path": str(nvme_path)},
            },
            "blockTokens": 256,
        },
    }


def _wait(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"timed out waiting for {what}")


def local_config_from_configmap(rendered: str, folder: Path, secret: bytes):
    """The operator's rendered AgentConfig, with host paths moved under `folder` and free ports."""
    from kvtier.api.agentconfig import AgentConfig

    cfg = AgentConfig.model_validate(yaml.safe_load(rendered))
    secret_file = folder / "pool-secret"
    secret_file.write_bytes(secret)
    secret_file.chmod(0o600)
    return cfg.model_copy(
        update={
            "socketDir": str(folder / "run" / cfg.pool),
            "stateDir": str(folder / "lib" / cfg.pool),
            "secretFile": str(secret_file),
            "peerPort": 0,
            "peerHost": "127.0.0.1",
            "metricsPort": 0,
            "heartbeatSeconds": 2.0,
        }
    )


def run_workload(agent, fingerprint_model: str = "demo") -> dict[str, Any]:
    """Prefill a prompt with a small model, save its KV, drop it, restore it from each tier."""
    import numpy as np

    from kvtier.agent.client import Client
    from kvtier.agent.keys import KVLayout, block_keys
    from kvtier.bench.tinymodel import TinyConfig, TinyModel, blocks_to_cache, cache_to_blocks

    cfg = TinyConfig()
    model = TinyModel(cfg)
    B = 256
    layout = KVLayout(cfg.name, "float32", cfg.layers, cfg.kv_heads, cfg.head_dim, B)
    tokens = np.random.default_rng(7).integers(0, cfg.vocab, 4096 + 1)
    context = tokens[:-1].tolist()
    keys = block_keys(context, B)
    out: dict[str, Any] = {
        "tokens": len(context),
        "blocks": len(keys),
        "kv_bytes": len(keys) * layout.block_bytes,
    }

    t0 = time.perf_counter()
    ref, cache = model.prefill(tokens)
    out["recompute_s"] = time.perf_counter() - t0

    with Client(agent.tenant(TENANT)) as client:
        t0 = time.perf_counter()
        out["saved_blocks"] = client.put(
            layout.fingerprint, keys, cache_to_blocks(cache, B, len(keys)), wait=10
        )
        out["save_s"] = time.perf_counter() - t0
        del cache  # the engine forgets the context

        def restore() -> tuple[float, float, int]:
            t0 = time.perf_counter()
            with client.read(layout.fingerprint, keys) as pinned:
                restored = blocks_to_cache([b.view for b in pinned], cfg, B)
                n = len(pinned)
            logits = model.forward(tokens[-1:], restored)
            return time.perf_counter() - t0, float(np.abs(logits - ref).max()), n

        restore()  # first touch of the mapped arena
        out["dram_s"], out["dram_diff"], out["dram_blocks"] = restore()
        agent.admin("evict_dram", timeout=60)
        out["nvme_s"], out["nvme_diff"], out["nvme_blocks"] = restore()
    with Client(agent.tenant("team-b")) as other:
        out["other_namespace_hits"] = other.lookup(layout.fingerprint, keys)
    return out


def main(args: argparse.Namespace) -> int:
    if getattr(args, "engine", False):
        return engine_main()
    from kvtier.dev.node import cannot_run_containers

    if getattr(args, "processes", False):
        say("--processes: the demo runs kvtier as local processes")
        return process_demo(args)
    reason = cannot_run_containers()
    if reason is None:
        from kvtier.demo_node import node_demo

        return node_demo(args)
    say(f"this machine cannot run containers ({reason}): the demo runs kvtier as local processes")
    return process_demo(args)


ENGINE_MARK = "KVTIER-DEMO "
ENGINE_TOKENS = 4096


def engine_main() -> int:
    """The demo's engine, inside its pod: a small model whose prompt KV goes through kvtier.

    A prompt whose KV the agent holds is restored (and checked against a recompute); otherwise it is
    prefilled and its KV saved. One JSON line per start (ENGINE_MARK), then it serves nothing, forever.
    """
    import json

    import numpy as np

    from kvtier.agent.client import Client
    from kvtier.agent.keys import KVLayout, block_keys
    from kvtier.bench.tinymodel import TinyConfig, TinyModel, blocks_to_cache, cache_to_blocks

    cfg = TinyConfig()
    model = TinyModel(cfg)
    B = 256
    layout = KVLayout(cfg.name, "float32", cfg.layers, cfg.kv_heads, cfg.head_dim, B)
    tokens = np.random.default_rng(7).integers(0, cfg.vocab, ENGINE_TOKENS + 1)
    keys = block_keys(tokens[:-1].tolist(), B)
    client = _wait(lambda: Client(os.environ["KVTIER_SOCKET"]), 120, "the agent's socket")
    t0 = time.perf_counter()
    hits = client.lookup(layout.fingerprint, keys)
    event: dict[str, Any] = {
        "namespace": os.environ.get("POD_NAMESPACE", ""),
        "hits": hits,
        "blocks": len(keys),
    }
    if hits == len(keys):
        with client.read(layout.fingerprint, keys) as pinned:
            restored = blocks_to_cache([b.view for b in pinned], cfg, B)
        logits = model.forward(tokens[-1:], restored)
        event["restore_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        ref, _ = model.prefill(tokens)  # the check: a restore must give the recompute's logits
        event |= {"event": "restored", "recompute_s": time.perf_counter() - t1}
        event["logits_diff"] = float(np.abs(logits - ref).max())
    else:
        t1 = time.perf_counter()
        _, cache = model.prefill(tokens)
        event |= {"event": "computed", "recompute_s": time.perf_counter() - t1}
        event["saved"] = client.put(layout.fingerprint, keys, cache_to_blocks(cache, B, len(keys)), wait=10)
        event["kv_bytes"] = len(keys) * layout.block_bytes
    print(ENGINE_MARK + json.dumps(event), flush=True)
    while True:
        time.sleep(3600)


def process_demo(args: argparse.Namespace) -> int:
    from kubernetes import client, config

    from kvtier.dev.agents import spawn_agent
    from kvtier.dev.controlplane import LocalControlPlane
    from kvtier.dev.local_operator import install_chart_with_local_operator
    from kvtier.dev.tools import ensure_tools

    folder = Path(tempfile.mkdtemp(prefix="kvtier-demo-"))
    node = socket.gethostname().lower()
    say("building or finding etcd, kube-apiserver, kubectl and helm")
    bin_dir = ensure_tools()
    say("starting a local control plane (real etcd + kube-apiserver)")
    cp = LocalControlPlane(state_dir=folder / "controlplane", bin_dir=bin_dir).start(log=lambda m: say(m))
    agent = None
    try:
        api = config.new_client_from_config(str(cp.kubeconfig))
        env = cp.env()
        say(f"registering this machine as Node {node!r} (no kubelet: nothing is scheduled here)")
        client.CoreV1Api(api).create_node(
            {"metadata": {"name": node, "labels": {"kubernetes.io/hostname": node}}}
        )
        install_chart_with_local_operator(cp, log=say, extra_env={"KVTIER_STATUS_INTERVAL": "2"})
        print(_kubectl(bin_dir, env, "-n", NAMESPACE, "get", "deployment,service").strip())
        print(
            "    (the chart's Deployment has no pod here: no kubelet; the operator runs as a local process)"
        )
        pool = demo_pool(node, folder / "nvme" / "demo.cache")
        (folder / "pool.yaml").write_text(yaml.safe_dump(pool, sort_keys=False))
        say("kubectl apply -f pool.yaml")
        print(_kubectl(bin_dir, env, "apply", "-f", str(folder / "pool.yaml")).strip())
        core = client.CoreV1Api(api)
        cm = _wait(
            lambda: core.read_namespaced_config_map(f"kvtier-agent-{POOL}", NAMESPACE), 90, "the ConfigMap"
        )
        secret = _wait(
            lambda: core.read_namespaced_secret(f"kvtier-pool-{POOL}", NAMESPACE), 90, "the Secret"
        )
        _wait(
            lambda: client.AppsV1Api(api).read_namespaced_daemon_set(f"kvtier-agent-{POOL}", NAMESPACE),
            90,
            "DS",
        )
        print(_kubectl(bin_dir, env, "-n", NAMESPACE, "get", "daemonset,configmap,service").strip())
        say("starting the node agent with the configuration the operator rendered")
        cfg = local_config_from_configmap(
            cm.data["agent.yaml"], folder, base64.b64decode(secret.data["secret"])
        )
        agent = spawn_agent(
            cfg,
            folder / "agent.yaml",
            env={**env, "NODE_NAME": node, "KVTIER_LOG": "WARNING"},
            log=folder / "agent.log",
        )
        print(f"    {agent.ready_line.strip()}")
        say("a small model on the CPU: prefill 4,096 tokens, save the KV, drop it, restore it")
        w = run_workload(agent)
        say("an engine pod labelled kvtier.io/inject=true, created through the API server and the webhook")
        print(f"    {_injected_pod(api)}")
        say("waiting for the operator to aggregate the agent's KVCacheNode into the pool status")

        def ready() -> bool:
            pool = client.CustomObjectsApi(api).get_cluster_custom_object(
                "kvtier.io", "v1alpha1", "kvcachepools", POOL
            )
            conds = {c["type"]: c["status"] for c in pool.get("status", {}).get("conditions", [])}
            return conds.get("Ready") == "True" and pool["status"].get("hitRatio") is not None

        _wait(ready, 90, "pool Ready")
        print(_kubectl(bin_dir, env, "get", "kvp,kvn").strip())
        _summary(w)
        if args.keep:
            print(f"\nleft running; export KUBECONFIG={cp.kubeconfig} PATH={bin_dir}:$PATH")
            print(
                f"agent sockets: {cfg.socketDir}; stop with: kill {agent.proc.pid}; "
                f"KVTIER_DEV_DIR={cp.state_dir} kvtier dev down"
            )
            return 0
        return 0 if w["dram_diff"] == 0 and w["nvme_diff"] == 0 and w["other_namespace_hits"] == 0 else 1
    finally:
        if not args.keep:
            try:
                if agent:
                    agent.kill()
                cp.stop()  # stops the operator it started too
            finally:
                shutil.rmtree(folder, ignore_errors=True)


def _injected_pod(api) -> str:
    """Create a labelled engine pod and say what the webhook added (retrying while it starts)."""
    from kubernetes import client

    core = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": TENANT}})
    body = {
        "metadata": {
            "name": "engine",
            "labels": {"kvtier.io/inject": "true"},
            "annotations": {"kvtier.io/pool": POOL},
        },
        "spec": {
            "containers": [{"name": "engine", "image": "python:3.12", "command": ["python", "serve.py"]}]
        },
    }

    def create():
        pod = core.create_namespaced_pod(TENANT, body)
        if (pod.metadata.annotations or {}).get("kvtier.io/injected"):
            return pod
        core.delete_namespaced_pod("engine", TENANT, grace_period_seconds=0)
        return None

    pod = _wait(create, 90, "the webhook")
    added = [c.name for c in pod.spec.init_containers]
    volume = next(v for v in pod.spec.volumes if v.csi)
    return (
        f"pod {TENANT}/engine: injected {pod.metadata.annotations['kvtier.io/injected']}; init containers {added}; "
        f"volume {volume.name} (csi {volume.csi.driver}); no hostPath"
    )


def _kubectl(bin_dir: Path, env: dict[str, str], *args: str) -> str:
    return subprocess.run(
        [str(bin_dir / "kubectl"), *args], env=env, capture_output=True, text=True, check=True
    ).stdout


def _summary(w: dict[str, Any]) -> None:
    kb = w["kv_bytes"] / 2**20
    print(
        f"""
summary
  context            {w["tokens"]:,} tokens = {w["blocks"]} blocks of 256, {kb:.1f} MiB of KV
  recompute (prefill) {w["recompute_s"] * 1e3:8.1f} ms
  restore from DRAM   {w["dram_s"] * 1e3:8.1f} ms   {w["recompute_s"] / w["dram_s"]:6.1f}x faster, {w["dram_blocks"]} blocks, logits diff {w["dram_diff"]}
  restore from NVMe   {w["nvme_s"] * 1e3:8.1f} ms   {w["recompute_s"] / w["nvme_s"]:6.1f}x faster, {w["nvme_blocks"]} blocks, logits diff {w["nvme_diff"]}
  another namespace   {w["other_namespace_hits"]} hits on the same prompt (tenants never share KV)
""".rstrip()
    )


if __name__ == "__main__":
    main(argparse.Namespace(keep=False))
    os._exit(0)
