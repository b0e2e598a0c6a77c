"""`kvtier bench controlplane`: the operator at scale on the local control plane.

N pools, each with M KVCacheNodes written as agents would. Measures, per pool: apply -> its
DaemonSet exists; a change in one KVCacheNode -> the pool's aggregated status shows it. p50 and p99.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kvtier.api import v1alpha1 as api

NS = "kvtier-system"


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "p50_s": round(_pct(values, 0.5), 3),
        "p99_s": round(_pct(values, 0.99), 3),
        "max_s": round(max(values), 3),
        "mean_s": round(statistics.mean(values), 3),
        "n": len(values),
    }


def main(args: argparse.Namespace) -> int:
    from kubernetes import client, config, watch
    from kvtier.operator.kube import apply_crds

    from kvtier.dev.controlplane import LocalControlPlane
    from kvtier.dev.local_operator import operator_argv
    from kvtier.dev.tools import ensure_tools

    interval = args.status_interval
    folder = Path(tempfile.mkdtemp(prefix="kvtier-bench-cp-"))
    cp = LocalControlPlane(state_dir=folder / "cp", bin_dir=ensure_tools(quiet=True)).start(
        log=lambda *_: None
    )
    op = None
    try:
        kube = config.new_client_from_config(str(cp.kubeconfig))
        kube.configuration.connection_pool_maxsize = 32
        apply_crds(kube)
        custom, apps = client.CustomObjectsApi(kube), client.AppsV1Api(kube)
        op = subprocess.Popen(
            operator_argv(NS),
            env={**cp.env(), "KVTIER_STATUS_INTERVAL": str(interval), "KVTIER_RESYNC_SECONDS": "3600"},
            stdout=open(folder / "operator.log", "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        time.sleep(3)  # operator start-up (login, watches)
        names = [f"bench-{i:03d}" for i in range(args.pools)]

        # --- apply -> DaemonSet created
        created: dict[str, float] = {}
        seen: dict[str, float] = {}
        done = threading.Event()

        def watch_ds() -> None:
            w = watch.Watch()
            for ev in w.stream(apps.list_namespaced_daemon_set, NS, timeout_seconds=600):
                pool = ev["object"].metadata.labels.get("kvtier.io/pool")
                if pool and pool not in seen:
                    seen[pool] = time.monotonic()
                if len(seen) >= len(names):
                    w.stop()
            done.set()

        threading.Thread(target=watch_ds, daemon=True).start()
        time.sleep(0.5)
        for name in names:
            body = {
                "apiVersion": api.API_VERSION,
                "kind": "KVCachePool",
                "metadata": {"name": name},
                "spec": {"tiers": {"dram": {"size": "64Gi"}}},
            }
            created[name] = time.monotonic()
            custom.create_cluster_custom_object(api.GROUP, api.VERSION, "kvcachepools", body)
        done.wait(timeout=600)
        apply_lat = [seen[n] - created[n] for n in names if n in seen]

        # --- M KVCacheNodes per pool, written as agents write them
        def beat(used: int) -> dict:
            return {
                "tiers": {"dram": {"capacityBytes": 64 << 30, "usedBytes": used, "blocks": 1}},
                "hits": 1,
                "misses": 1,
                "health": "Healthy",
                "heartbeat": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }

        def write_node(pool: str, node: int, used: int, create: bool) -> None:
            name = api.kvcachenode_name(pool, f"gpu-{node:03d}")
            args_ = (api.GROUP, api.VERSION, "kvcachenodes")
            if create:
                custom.create_cluster_custom_object(
                    *args_,
                    {
                        "apiVersion": api.API_VERSION,
                        "kind": "KVCacheNode",
                        "metadata": {"name": name, "labels": {"kvtier.io/pool": pool}},
                        "spec": {"pool": pool, "node": f"gpu-{node:03d}"},
                    },
                )
            custom.patch_cluster_custom_object_status(*args_, name, {"status": beat(used)})

        t0 = time.monotonic()
        with ThreadPoolExecutor(16) as pool_:
            list(
                pool_.map(
                    lambda pn: write_node(pn[0], pn[1], 1 << 30, True),
                    [(p, n) for p in names for n in range(args.nodes)],
                )
            )
        populate_s = time.monotonic() - t0

        def expected_used(n_big: int) -> int:
            return (args.nodes - n_big) * (1 << 30) + n_big * (2 << 30)

        def wait_status(target: int, deadline: float) -> dict[str, float]:
            got: dict[str, float] = {}
            while len(got) < len(names) and time.monotonic() < deadline:
                for item in custom.list_cluster_custom_object(api.GROUP, api.VERSION, "kvcachepools")[
                    "items"
                ]:
                    n = item["metadata"]["name"]
                    used = item.get("status", {}).get("tiers", {}).get("dram", {}).get("usedBytes")
                    if n not in got and used == target:
                        got[n] = time.monotonic()
                time.sleep(0.05)
            return got

        wait_status(expected_used(0), time.monotonic() + 120)  # everything aggregated once
        # --- one node of every pool changes: how long until each pool's status shows it?
        changed: dict[str, float] = {}
        for name in names:
            changed[name] = time.monotonic()
            write_node(name, 0, 2 << 30, False)
        got = wait_status(expected_used(1), time.monotonic() + 120)
        status_lat = [got[n] - changed[n] for n in names if n in got]
        report = {
            "command": "kvtier bench controlplane " + " ".join(args.argv_echo),
            "date": time.strftime("%Y-%m-%d"),
            "pools": args.pools,
            "nodes_per_pool": args.nodes,
            "status_interval_s": interval,
            "apply_to_daemonset": _stats(apply_lat),
            "node_update_to_pool_status": _stats(status_lat),
            "populate_kvcachenodes_s": round(populate_s, 1),
            "missing": {"daemonsets": len(names) - len(apply_lat), "status": len(names) - len(status_lat)},
        }
        print(json.dumps(report, indent=2))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        return 0
    finally:
        if op:
            op.terminate()
            op.wait(timeout=30)
        cp.stop()
