"""`kvtier demo` on real pods: a one-node Kubernetes on this machine, the chart, a pool, and an
engine Deployment whose returning context is restored through kvtier (see kvtier.demo)."""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from kvtier.demo import ENGINE_MARK, POOL, say
from kvtier.dev.cluster import small_pool

ENGINE = "engine"
TENANTS = ("team-a", "team-b")


def engine_deployment(namespace: str, image: str) -> dict[str, Any]:
    labels = {"app": ENGINE}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": ENGINE, "namespace": namespace},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {
                    "labels": {**labels, "kvtier.io/inject": "true"},
                    "annotations": {"kvtier.io/pool": POOL},
                },
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [
                        {
                            "name": ENGINE,
                            "image": image,
                            # -I: the image's own kvtier (with the model), not the staged client copy
                            "command": [
                                "/opt/kvtier/bin/python",
                                "-I",
                                "-m",
                                "kvtier.cli",
                                "demo",
                                "--engine",
                            ],
                            "env": [
                                {
                                    "name": "POD_NAMESPACE",
                                    "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
                                }
                            ],
                            "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}},
                        }
                    ],
                },
            },
        },
    }


def _engine_event(cluster, namespace: str, pod: str, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logs = cluster.kubectl("logs", "-n", namespace, pod, "-c", ENGINE, check=False)
        for line in logs.splitlines():
            if line.startswith(ENGINE_MARK):
                return json.loads(line[len(ENGINE_MARK) :])
        time.sleep(0.2)
    raise TimeoutError(f"the engine pod {namespace}/{pod} reported nothing in {timeout:.0f}s")


def _new_engine_pod(cluster, namespace: str, old: set[str], timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pod in cluster.pods(namespace, f"app={ENGINE}"):
            if pod["metadata"]["name"] not in old and not pod["metadata"].get("deletionTimestamp"):
                return pod["metadata"]["name"]
        time.sleep(0.1)
    raise TimeoutError(f"no new engine pod in {namespace}")


def pod_usage(cluster, node: str) -> list[dict[str, Any]]:
    """CPU and memory of kvtier's own containers, from the kubelet's stats summary."""
    summary = json.loads(cluster.kubectl("get", "--raw", f"/api/v1/nodes/{node}/proxy/stats/summary"))
    rows = []
    for pod in summary.get("pods", []):
        ref = pod["podRef"]
        for c in pod.get("containers", []):
            if ref["namespace"] == "kvtier-system" or c["name"].startswith("kvtier-"):
                rows.append(
                    {
                        "pod": f"{ref['namespace']}/{ref['name']}",
                        "container": c["name"],
                        "cpu_millicores": round((c.get("cpu", {}).get("usageNanoCores") or 0) / 1e6, 1),
                        "rss_mib": round((c.get("memory", {}).get("rssBytes") or 0) / 2**20, 1),
                        "working_set_mib": round(
                            (c.get("memory", {}).get("workingSetBytes") or 0) / 2**20, 1
                        ),
                    }
                )
    return rows


def node_demo(args: argparse.Namespace) -> int:
    from kvtier.dev import node
    from kvtier.dev.cluster import NAMESPACE, Cluster
    from kvtier.dev.image import build_engine_image, build_kvtier_image
    from kvtier.dev.tools import ensure_tools

    times: dict[str, float] = {}
    t0 = time.monotonic()
    say("building or finding the control plane's and the node's binaries")
    bin_dir = ensure_tools(node=True)
    say("building the kvtier image from Debian packages and the kvtier wheel (cached by content)")
    image = build_kvtier_image()
    engine_image = build_engine_image(image)
    print(f"    {image.ref} ({image.size / 2**20:.0f} MiB); engine: {engine_image.ref}")
    times["tools_and_images_s"] = time.monotonic() - t0
    folder = Path(tempfile.mkdtemp(prefix="kvtier-demo-"))
    say("starting a one-node Kubernetes: etcd, kube-apiserver, containerd, kubelet, kube-proxy, ...")
    t0 = time.monotonic()
    n = node.up(folder / "cluster", bin_dir, [image, engine_image], log=lambda m: print(f"    {m}"))
    times["node_up_s"] = time.monotonic() - t0
    cluster = Cluster(n.cp)
    ok = False
    try:
        repository, tag = image.ref.rsplit(":", 1)
        say(
            "helm install kvtier charts/kvtier -n kvtier-system --create-namespace --wait "
            f"--set image.repository={repository},image.tag={tag}"
        )
        times["helm_install_to_ready_s"] = cluster.helm_install(
            image.ref, node.REGISTRAR_REF, "operator.statusInterval=2"
        )
        print(cluster.kubectl("get", "pods", "-n", NAMESPACE).rstrip())

        (folder / "pool.yaml").write_text(yaml.safe_dump(small_pool(POOL, "256Mi", "1Gi"), sort_keys=False))
        say("kubectl apply -f pool.yaml   (256Mi of DRAM, 1Gi of NVMe file per node)")
        t0 = time.monotonic()
        print("    " + cluster.kubectl("apply", "-f", str(folder / "pool.yaml")).strip())
        cluster.wait_ready(NAMESPACE, f"kvtier.io/pool={POOL}")
        times["pool_apply_to_agent_ready_s"] = time.monotonic() - t0

        events: dict[str, dict[str, Any]] = {}
        for ns in TENANTS:
            cluster.kubectl("create", "namespace", ns)
        say("an engine Deployment in team-a, labelled kvtier.io/inject=true: prefill, save the KV")
        cluster.apply(engine_deployment("team-a", engine_image.ref))
        first = _new_engine_pod(cluster, "team-a", set())
        events["first"] = _engine_event(cluster, "team-a", first)
        pod = cluster.get("pod", "-n", "team-a", first)
        injected = pod["metadata"]["annotations"].get("kvtier.io/injected")
        volume = next(v for v in pod["spec"]["volumes"] if v.get("csi"))
        print(
            f"    pod {first}: injected {injected}; volume {volume['name']} (csi {volume['csi']['driver']})"
        )
        print(f"    {json.dumps(events['first'])}")

        say("kubectl delete pod: the Deployment brings the engine back (a returning context)")
        cluster.kubectl("delete", "pod", "-n", "team-a", first, "--wait=false")
        second = _new_engine_pod(cluster, "team-a", {first})
        t0 = time.monotonic()
        events["returning"] = _engine_event(cluster, "team-a", second)
        times["engine_pod_created_to_first_restore_s"] = time.monotonic() - t0
        print(f"    {json.dumps(events['returning'])}")

        say("the same engine in namespace team-b (another tenant)")
        cluster.apply(engine_deployment("team-b", engine_image.ref))
        other = _new_engine_pod(cluster, "team-b", set())
        events["other_namespace"] = _engine_event(cluster, "team-b", other)
        print(f"    {json.dumps(events['other_namespace'])}")

        time.sleep(2)  # the status timer and the kubelet's CPU sampling
        usage = pod_usage(cluster, node.node_name())
        _summary(times, events, usage)
        print(cluster.kubectl("get", "kvp,kvn").rstrip())
        print(cluster.kubectl("get", "pods", "-A", "-o", "wide").rstrip())
        ok = (
            events["returning"].get("event") == "restored"
            and events["returning"].get("logits_diff") == 0.0
            and events["other_namespace"].get("hits") == 0
        )
        if args.out:
            report = {
                "what": "kvtier demo on a real one-node Kubernetes (kubelet, containerd) on this machine",
                "command": "kvtier demo --out " + args.out,
                "machine": {"cpus": _cpus(), "kernel": platform.release()},
                "times_s": {k: round(v, 2) for k, v in times.items()},
                "engine_events": events,
                "kvtier_containers": usage,
                "notes": "times from the demo's polling (0.1-0.2 s); cpu from the kubelet's stats summary",
            }
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
            print(f"wrote {args.out}")
        if args.keep:
            print(f"\nleft running; export KUBECONFIG={n.cp.kubeconfig} PATH={bin_dir}:$PATH")
            print(f"stop with: KVTIER_DEV_DIR={n.cp.state_dir} kvtier dev down")
        return 0 if ok else 1
    finally:
        if not args.keep:
            say("kvtier dev down: stopping the node and undoing its host changes")
            node.down(n, log=lambda m: print(f"    {m}"))
            print(f"    left behind: {node.leftovers()}")
            shutil.rmtree(folder, ignore_errors=True)


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def _summary(times: dict[str, float], events: dict[str, dict[str, Any]], usage: list[dict[str, Any]]) -> None:
    first, back, other = events["first"], events["returning"], events["other_namespace"]
    print(
        f"""
summary (real pods under a kubelet on this machine)
  node up                          {times["node_up_s"]:6.1f} s
  helm install -> all pods Ready   {times["helm_install_to_ready_s"]:6.1f} s
  pool apply -> agent pod Ready    {times["pool_apply_to_agent_ready_s"]:6.1f} s
  engine pod created -> restored   {times["engine_pod_created_to_first_restore_s"]:6.1f} s (pod start included)
  first engine pod                 prefill {first["recompute_s"] * 1e3:.0f} ms, saved {first.get("saved")} blocks ({first.get("kv_bytes", 0) / 2**20:.1f} MiB of KV)
  returning engine pod             {back.get("event")} {back["hits"]}/{back["blocks"]} blocks in {back.get("restore_s", 0) * 1e3:.0f} ms vs prefill {back["recompute_s"] * 1e3:.0f} ms, logits diff {back.get("logits_diff")}
  another namespace                {other["hits"]} hits on the same prompt (tenants never share KV)
  kvtier's containers (CPU, RSS):"""
    )
    for row in usage:
        print(
            f"    {row['pod']:<48} {row['container']:<24} {row['cpu_millicores']:7.1f}m {row['rss_mib']:7.1f} MiB"
        )
