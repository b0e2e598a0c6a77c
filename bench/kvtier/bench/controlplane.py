"""`kvtier bench controlplane`: the operator at fleet scale on the local control plane.

`--nodes` Node objects (labelled, one pool each) with one simulated agent per node: it writes its
KVCacheNode with the agent's own ReportPolicy and merge patches (first write, jittered heartbeat,
writes when usage moves a step), and a simulated kubelet patches each Node's status every 5 minutes
(not kvtier's load, but events the operator must ignore). `--pools` pools select the nodes.

Measured: pool applied -> its DaemonSet exists; a Node leaving a pool's selector -> the pool's
status shows it; a KVCacheNode turning unhealthy -> the pool's status shows it (p50/p99, under the
steady load); over a steady window, the API server's own request counts and latencies
(apiserver_request_total and apiserver_request_duration_seconds from its /metrics, by resource and
verb), split into what kvtier caused and what the simulated kubelet did; the operator's CPU and RSS.
"""

from __future__ import annotations

import argparse
import datetime as dt
import heapq
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kvtier.api import v1alpha1 as api

NS = "kvtier-system"
POOL_LABEL = "kvtier.bench/pool"
KVN = (api.GROUP, api.VERSION, "kvcachenodes")
POOLS = (api.GROUP, api.VERSION, "kvcachepools")
GiB = 1 << 30
POLL_S = 5.0  # how often a simulated agent looks at its state (the real one: 2 s; writes differ little)
KUBELET_STATUS_S = 300.0  # nodeStatusReportFrequency's default
USAGE_WALK = 0.02  # of capacity per minute (standard deviation): a usage write every few minutes


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    return {
        "p50_s": round(_pct(values, 0.5), 3),
        "p99_s": round(_pct(values, 0.99), 3),
        "max_s": round(max(values), 3),
        "mean_s": round(statistics.mean(values), 3),
        "n": len(values),
    }


def _node_name(i: int) -> str:
    return f"gpu-{i:05d}"


def _pool_name(i: int) -> str:
    return f"bench-{i:03d}"


# ------------------------------------------------------------------------- simulated agents


class SimAgents:
    """One simulated agent per Node, all driven from one scheduler thread and a few writers."""

    def __init__(self, custom, nodes: int, pools: int, heartbeat: float, seed: int = 1) -> None:
        from kvtier.agent.report import ReportPolicy

        self.custom, self.pools = custom, pools
        self.policy = ReportPolicy(heartbeat_s=heartbeat)
        self.rng = random.Random(seed)
        self.used = [0.5] * nodes  # fraction of the DRAM tier
        self.hits = [0] * nodes
        self.health = ["Healthy"] * nodes
        self.sent: list[dict[str, Any] | None] = [None] * nodes
        self.sent_view: list[dict[str, Any] | None] = [None] * nodes
        self.last_write = [0.0] * nodes
        self.beat_at = [0.0] * nodes
        self.writes: dict[str, int] = defaultdict(int)
        self.errors = 0
        self.lock = threading.Lock()
        self.pool_ = ThreadPoolExecutor(8, thread_name_prefix="sim-agent")
        self.stop = threading.Event()

    CAPACITY = 512 * GiB

    def decision_view(self, i: int) -> dict[str, Any]:
        """What ReportPolicy.due looks at (non-usage fields and tier usage), cheap to build: the
        full status is built only for a write."""
        used = int(self.used[i] * self.CAPACITY)
        return {
            "health": self.health[i],
            "tiers": {"dram": {"capacityBytes": self.CAPACITY, "usedBytes": used}},
        }

    def status(self, i: int, now: dt.datetime) -> dict[str, Any]:
        cap = self.CAPACITY
        gpus = [
            {
                "index": g,
                "name": "NVIDIA H200",
                "uuid": f"GPU-{i:05d}-{g}",
                "pciBusId": f"00000000:{g + 10:02X}:00.0",
                "memoryBytes": 150_000_000_000,
                "numaNode": g // 4,
            }
            for g in range(8)
        ]
        return {
            "tiers": {
                "dram": {"capacityBytes": cap, "usedBytes": int(self.used[i] * cap), "blocks": 1000},
                "nvme": {"capacityBytes": 8 << 40, "usedBytes": 1 << 40, "blocks": 100000},
            },
            "devices": {"gpus": gpus, "nvme": [{"path": "/dev/nvme0n1", "state": "adopted"}]},
            "hits": self.hits[i],
            "misses": self.hits[i] // 4,
            "health": self.health[i],
            "agentVersion": "0.1.0",
            "numaNode": 0,
            "peerAddress": f"10.1.{i // 250}.{i % 250}:7070",
            "heartbeat": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "heartbeatSeconds": self.policy.heartbeat_s,
            "conditions": [
                {
                    "type": "Draining",
                    "status": "False",
                    "reason": "Schedulable",
                    "message": "node schedulable and selected by the pool",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                }
            ],
        }

    def write(self, i: int, current: dict[str, Any], reason: str) -> None:
        from kvtier.kubeapi import merge_patch

        name = api.kvcachenode_name(_pool_name(i % self.pools), _node_name(i))
        try:
            if self.sent[i] is None:
                self.custom.create_cluster_custom_object(
                    *KVN,
                    {
                        "apiVersion": api.API_VERSION,
                        "kind": "KVCacheNode",
                        "metadata": {"name": name, "labels": {"kvtier.io/pool": _pool_name(i % self.pools)}},
                        "spec": {"pool": _pool_name(i % self.pools), "node": _node_name(i)},
                    },
                )
                delta = current
            else:
                delta = merge_patch(self.sent[i], current)
            self.custom.patch_cluster_custom_object_status(*KVN, name, {"status": delta})
            with self.lock:
                self.sent[i] = current
                self.writes[reason] += 1
        except Exception:
            with self.lock:
                self.errors += 1

    def populate(self) -> None:
        """Every agent's first write (as a fleet of agents starting)."""
        now = dt.datetime.now(dt.UTC)
        t = time.monotonic()
        list(self.pool_.map(lambda i: self.write(i, self.status(i, now), "first"), range(len(self.used))))
        for i in range(len(self.used)):  # a fleet in steady state: heartbeats spread over the interval
            self.sent_view[i] = self.decision_view(i)
            self.last_write[i] = t
            self.beat_at[i] = t + self.rng.uniform(0, self.policy.heartbeat_s)

    def run(self) -> None:
        heap = [(time.monotonic() + self.rng.uniform(0, POLL_S), i) for i in range(len(self.used))]
        heapq.heapify(heap)
        while not self.stop.is_set():
            at, i = heapq.heappop(heap)
            delay = at - time.monotonic()
            if delay > 0 and self.stop.wait(delay):
                return
            now = time.monotonic()
            self.used[i] = min(
                1.0, max(0.0, self.used[i] + self.rng.gauss(0, USAGE_WALK * (POLL_S / 60) ** 0.5))
            )
            self.hits[i] += self.rng.randint(0, 50)
            view = self.decision_view(i)
            reason = self.policy.due(self.sent_view[i], view, now, self.last_write[i], self.beat_at[i])
            if reason:
                self.last_write[i] = now
                self.beat_at[i] = self.policy.next_beat(now, self.rng)
                self.sent_view[i] = view
                self.pool_.submit(self.write, i, self.status(i, dt.datetime.now(dt.UTC)), reason)
            heapq.heappush(heap, (now + POLL_S, i))


class SimKubelets:
    """Node status updates every KUBELET_STATUS_S, jittered: events on Nodes that concern no pool."""

    def __init__(self, core, nodes: int, seed: int = 2) -> None:
        self.core, self.nodes, self.rng = core, nodes, random.Random(seed)
        self.stop = threading.Event()
        self.writes = 0

    def run(self) -> None:
        heap = [(time.monotonic() + self.rng.uniform(0, KUBELET_STATUS_S), i) for i in range(self.nodes)]
        heapq.heapify(heap)
        while not self.stop.is_set():
            at, i = heapq.heappop(heap)
            if (delay := at - time.monotonic()) > 0 and self.stop.wait(delay):
                return
            stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            cond = {"type": "Ready", "status": "True", "reason": "KubeletReady", "lastHeartbeatTime": stamp,
                    "lastTransitionTime": "2026-01-01T00:00:00Z", "message": "kubelet is posting ready status"}  # fmt: skip
            try:
                self.core.patch_node_status(_node_name(i), {"status": {"conditions": [cond]}})
                self.writes += 1
            except Exception:
                pass
            heapq.heappush(heap, (time.monotonic() + KUBELET_STATUS_S * self.rng.uniform(0.9, 1.1), i))


# ------------------------------------------------------------------------- measurements


class PoolWatch:
    """Every status each pool had, with the time the watch delivered it (no polling): a change's
    latency is read from when its status arrived, however late the bench looks."""

    def __init__(self, custom) -> None:
        self.custom = custom
        self.history: dict[str, list[tuple[float, dict[str, Any]]]] = defaultdict(list)
        self.changed = threading.Condition()
        self.stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        from kubernetes import watch

        while not self.stop.is_set():
            try:
                for ev in watch.Watch().stream(
                    self.custom.list_cluster_custom_object, *POOLS, timeout_seconds=60
                ):
                    obj, now = ev["object"], time.monotonic()
                    with self.changed:
                        self.history[obj["metadata"]["name"]].append((now, obj.get("status") or {}))
                        self.changed.notify_all()
                    if self.stop.is_set():
                        return
            except Exception:
                time.sleep(0.5)

    def wait(
        self, names: list[str], check, timeout: float, since: dict[str, float] | None = None
    ) -> dict[str, float]:
        """{pool: monotonic time its status first satisfied check (at or after since[pool])}."""
        got: dict[str, float] = {}
        deadline = time.monotonic() + timeout
        with self.changed:
            while len(got) < len(names) and time.monotonic() < deadline:
                for n in names:
                    if n in got:
                        continue
                    t0 = (since or {}).get(n, 0.0)
                    hit = next((t for t, st in self.history[n] if t >= t0 and check(n, st)), None)
                    if hit is not None:
                        got[n] = hit
                self.changed.wait(timeout=0.05)
        return got


def _apiserver_metrics(cp) -> dict[str, dict[tuple, float]]:
    """apiserver_request_total and apiserver_request_duration_seconds, by (resource, verb)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
    for family in text_string_to_metric_families(cp._get("/metrics")):
        if family.name not in ("apiserver_request", "apiserver_request_duration_seconds"):
            continue
        for s in family.samples:
            key = (s.labels.get("resource", ""), s.labels.get("subresource", ""), s.labels.get("verb", ""))
            if s.name == "apiserver_request_total":
                out["count"][key] += s.value
            elif s.name == "apiserver_request_duration_seconds_sum":
                out["sum"][key] += s.value
            elif s.name == "apiserver_request_duration_seconds_count":
                out["dcount"][key] += s.value
            elif s.name == "apiserver_request_duration_seconds_bucket":
                out["bucket"][(*key, float(s.labels["le"]))] += s.value
    return out


# What kvtier's operator and agents touch; the API server's own loopback requests (leases, endpoints,
# ...) and the simulated kubelet's Node status patches are not kvtier's load.
KVTIER_RESOURCES = {
    "kvcachenodes", "kvcachepools", "daemonsets", "configmaps", "services", "secrets", "serviceaccounts",
    "clusterroles", "clusterrolebindings", "events", "nodes", "customresourcedefinitions",
}  # fmt: skip


def _kvtier_caused(key: tuple) -> bool:
    resource, _, verb = key
    return resource in KVTIER_RESOURCES and not (resource == "nodes" and verb == "PATCH")


def _load(before, after, window: float) -> dict[str, Any]:
    rows = {}
    for key, n in after["count"].items():
        delta = n - before["count"].get(key, 0)
        if delta <= 0 or key[0] == "":
            continue
        count = after["dcount"].get(key, 0) - before["dcount"].get(key, 0)
        total = after["sum"].get(key, 0) - before["sum"].get(key, 0)
        buckets = sorted(
            (le, after["bucket"][(*key, le)] - before["bucket"].get((*key, le), 0))
            for (*k, le) in after["bucket"]
            if tuple(k) == key
        )
        p99 = next((le for le, c in buckets if count and c >= 0.99 * count), None)
        rows["/".join(filter(None, key[:2])) + " " + key[2]] = {
            "per_s": round(delta / window, 3),
            "mean_ms": round(1000 * total / count, 2) if count and key[2] != "WATCH" else None,
            "p99_bucket_le_s": p99 if key[2] != "WATCH" else None,
            "kvtier": _kvtier_caused(key),
        }
    return dict(sorted(rows.items(), key=lambda kv: -kv[1]["per_s"]))


def _proc(pid: int) -> tuple[float, int, int]:
    """CPU seconds, RSS and peak RSS (bytes) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    kib = lambda k: int(status[k].split()[0]) * 1024  # noqa: E731
    return cpu, kib("VmRSS"), kib("VmHWM")


def _scrape(port: int) -> dict[str, float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        f"{s.name}{{{','.join(f'{k}={v}' for k, v in sorted(s.labels.items()))}}}": s.value
        for f in text_string_to_metric_families(text)
        if f.name.startswith("kvtier_operator")
        for s in f.samples
        if s.name.endswith(("_total", "_bucket", "_count"))
    }


def _operator_delay(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """The operator's own share of the change latencies (event in -> status written), from its
    histogram: upper bounds of the buckets holding p50 and p99."""
    name = "kvtier_operator_status_delay_seconds"
    count = after.get(f"{name}_count{{}}", 0) - before.get(f"{name}_count{{}}", 0)
    buckets = sorted(
        (float(k.split("le=")[1].rstrip("}")), v - before.get(k, 0))
        for k, v in after.items()
        if k.startswith(f"{name}_bucket")
    )
    bound = lambda q: next((le for le, c in buckets if count and c >= q * count), None)  # noqa: E731
    return {"n": int(count), "p50_le_s": bound(0.5), "p99_le_s": bound(0.99)}


def main(args: argparse.Namespace) -> int:
    from kubernetes import client, config, watch

    from kvtier.dev.controlplane import LocalControlPlane
    from kvtier.dev.local_operator import operator_argv
    from kvtier.dev.ports import free_port
    from kvtier.dev.tools import ensure_tools
    from kvtier.operator.kube import apply_crds

    n_nodes, n_pools = args.nodes, args.pools
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the control plane on the way out
    folder = Path(tempfile.mkdtemp(prefix="kvtier-bench-cp-"))
    cp = LocalControlPlane(state_dir=folder / "cp", bin_dir=ensure_tools(quiet=True)).start(
        log=lambda *_: None
    )
    op = agents = kubelets = pools_watch = None
    say = lambda msg: print(f"[bench controlplane] {msg}", flush=True)  # noqa: E731
    try:
        kube = config.new_client_from_config(str(cp.kubeconfig))
        kube.configuration.connection_pool_maxsize = 32
        apply_crds(kube)
        custom, apps, core = client.CustomObjectsApi(kube), client.AppsV1Api(kube), client.CoreV1Api(kube)
        names = [_pool_name(i) for i in range(n_pools)]

        say(f"creating {n_nodes} Nodes")
        t0 = time.monotonic()

        def make_node(i: int) -> None:
            labels = {
                POOL_LABEL: _pool_name(i % n_pools),
                "kubernetes.io/hostname": _node_name(i),
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": "NVIDIA-H200",
                "topology.kubernetes.io/zone": f"zone-{i % 3}",
                "node.kubernetes.io/instance-type": "gpu-8x-h200",
            }
            core.create_node({"metadata": {"name": _node_name(i), "labels": labels}})

        with ThreadPoolExecutor(8) as ex:
            list(ex.map(make_node, range(n_nodes)))
        nodes_s = time.monotonic() - t0

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
                if all(n in seen for n in names):
                    w.stop()
            done.set()

        threading.Thread(target=watch_ds, daemon=True).start()
        time.sleep(0.5)
        metrics_port = free_port()
        env = {**cp.env(), "KVTIER_METRICS_PORT": str(metrics_port)}
        op = subprocess.Popen(
            operator_argv(NS),
            env=env,
            stdout=open(folder / "operator.log", "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        # operator start-up: login, watches, the initial listing of every Node and KVCacheNode; a
        # pool that selects nothing shows when it is done (then pools are applied in steady state)
        say("waiting for the operator to start")
        t0 = time.monotonic()
        warmup = "bench-warmup"
        custom.create_cluster_custom_object(
            *POOLS,
            {
                "apiVersion": api.API_VERSION,
                "kind": "KVCachePool",
                "metadata": {"name": warmup},
                "spec": {"nodeSelector": {POOL_LABEL: "none"}, "tiers": {"dram": {"size": "1Gi"}}},
            },
        )
        while warmup not in seen and time.monotonic() - t0 < 300:
            time.sleep(0.1)
        operator_ready_s = time.monotonic() - t0
        say(f"creating {n_pools} pools")

        for name in names:
            body = {
                "apiVersion": api.API_VERSION,
                "kind": "KVCachePool",
                "metadata": {"name": name},
                "spec": {"nodeSelector": {POOL_LABEL: name}, "tiers": {"dram": {"size": "512Gi"}}},
            }
            created[name] = time.monotonic()
            custom.create_cluster_custom_object(*POOLS, body)
        done.wait(timeout=300)
        apply_lat = [seen[n] - created[n] for n in names if n in seen]

        say(f"starting {n_nodes} simulated agents (first writes)")
        pools_watch = PoolWatch(custom)
        agents = SimAgents(custom, n_nodes, n_pools, args.heartbeat)
        t0 = time.monotonic()
        agents.populate()
        populate_s = time.monotonic() - t0
        per_pool = {n: sum(1 for i in range(n_nodes) if i % n_pools == k) for k, n in enumerate(names)}
        ready = pools_watch.wait(
            names, lambda n, st: (st.get("nodes") or {}).get("ready") == per_pool[n], timeout=180
        )
        say(f"{len(ready)}/{n_pools} pools report all agents ready; steady window of {args.window:.0f}s")
        threading.Thread(target=agents.run, daemon=True).start()
        kubelets = SimKubelets(core, n_nodes)
        threading.Thread(target=kubelets.run, daemon=True).start()
        time.sleep(min(10.0, args.window / 4))  # past the start-up burst

        # --- steady window: the API server's own counters, the operator's CPU and memory
        before, cpu0, writes0 = _apiserver_metrics(cp), _proc(op.pid)[0], dict(agents.writes)
        bench_cpu0 = _proc(os.getpid())[0]
        load_start = os.getloadavg()[0]
        ops0 = _scrape(metrics_port)
        t0 = time.monotonic()
        time.sleep(args.window)
        window = time.monotonic() - t0
        after, (cpu1, rss, hwm) = _apiserver_metrics(cp), _proc(op.pid)
        bench_cpu = (_proc(os.getpid())[0] - bench_cpu0) / window
        ops1 = _scrape(metrics_port)
        load = _load(before, after, window)
        kvtier_rate = sum(r["per_s"] for r in load.values() if r["kvtier"])
        agent_writes = {k: round((agents.writes[k] - writes0.get(k, 0)) / window, 3) for k in agents.writes}

        # --- change latencies, under the same steady load
        ops_probe0 = _scrape(metrics_port)
        say("node leaves its pool's selector -> pool status")
        changed: dict[str, float] = {}
        for k, name in enumerate(names):
            changed[name] = time.monotonic()
            core.patch_node(_node_name(k), {"metadata": {"labels": {POOL_LABEL: "none"}}})
            time.sleep(0.02)
        got = pools_watch.wait(
            names,
            lambda n, st: (st.get("nodes") or {}).get("desired") == per_pool[n] - 1,
            timeout=60,
            since=changed,
        )
        node_lat = [got[n] - changed[n] for n in names if n in got]

        say("KVCacheNode turns unhealthy -> pool status")
        changed = {}
        now = dt.datetime.now(dt.UTC)
        for k, name in enumerate(names):
            i = k + n_pools if k + n_pools < n_nodes else k  # a node still in the pool
            agents.health[i] = "Degraded"
            agents.sent_view[i] = agents.decision_view(i)  # written here, not by the simulation
            changed[name] = time.monotonic()
            agents.write(i, agents.status(i, now), "changed")
            time.sleep(0.02)

        def degraded(_: str, st: dict) -> bool:
            return any(c["type"] == "Degraded" and c["status"] == "True" for c in st.get("conditions") or [])

        got = pools_watch.wait(names, degraded, timeout=60, since=changed)
        kvn_lat = [got[n] - changed[n] for n in names if n in got]
        operator_delay = _operator_delay(ops_probe0, _scrape(metrics_port))

        report = {
            "command": "kvtier bench controlplane " + " ".join(args.argv_echo),
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{os.cpu_count()} CPUs, shared; etcd, kube-apiserver, the operator and the simulated agents on one machine",
            "load_average_1m_window_start_and_report": [round(load_start, 1), round(os.getloadavg()[0], 1)],
            "nodes": n_nodes,
            "pools": n_pools,
            "agent_model": {
                "heartbeat_s": args.heartbeat,
                "heartbeat_jitter": agents.policy.jitter,
                "usage_write": f"usage moved >= {agents.policy.usage_step:.0%} of capacity, at most every {agents.policy.usage_gap_s:.0f}s",
                "usage_random_walk_per_min": USAGE_WALK,
                "kubelet_node_status_s": KUBELET_STATUS_S,
                "not_simulated": "each real agent also holds one watch on its own Node (a long-lived request)",
            },
            "apply_to_daemonset": _stats(apply_lat),
            "node_leaves_selector_to_pool_status": _stats(node_lat),
            "kvcachenode_unhealthy_to_pool_status": _stats(kvn_lat),
            "operator_share_of_both": operator_delay,
            "steady": {
                "window_s": round(window, 1),
                "kvtier_requests_per_s": round(kvtier_rate, 3),
                "kvtier_requests_per_s_per_node": round(kvtier_rate / n_nodes, 5),
                "agent_writes_per_s": agent_writes,
                "operator_status_writes_per_s": {
                    k: round((v - ops0.get(k, 0)) / window, 3)
                    for k, v in ops1.items()
                    if "status_writes" in k
                },
                "apiserver_by_resource_verb": load,
                "operator_cpu_cores": round((cpu1 - cpu0) / window, 3),
                "operator_rss_mib": round(rss / (1 << 20), 1),
                "operator_peak_rss_mib": round(hwm / (1 << 20), 1),
                "sim_agent_write_errors": agents.errors,
                "bench_process_cpu_cores": round(bench_cpu, 3),
            },
            "setup": {
                "create_nodes_s": round(nodes_s, 1),
                "operator_start_to_first_pool_applied_s": round(operator_ready_s, 1),
                "first_agent_writes_s": round(populate_s, 1),
            },
        }
        print(json.dumps(report, indent=2))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        return 0
    finally:
        for part in (agents, kubelets, pools_watch):
            if part is not None:
                part.stop.set()
        if op:
            op.terminate()
            op.wait(timeout=30)
        cp.stop()
