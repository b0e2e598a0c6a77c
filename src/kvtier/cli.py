"""`kvtier`: one command for the operator, the node agent, the local dev cluster, the demo and benchmarks.

Each subcommand imports what it needs when it runs, so `kvtier agent` never loads kopf and the
engine-side client never loads the operator.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path


def _dev_up(args: argparse.Namespace) -> int:
    from kvtier.dev.controlplane import LocalControlPlane, default_state_dir
    from kvtier.dev.tools import ensure_tools

    state_dir = Path(args.dir) if args.dir else default_state_dir()
    if (state_dir / "controlplane.json").exists():
        existing = LocalControlPlane.load(state_dir)
        if existing.running():
            print(f"already running: export KUBECONFIG={existing.kubeconfig}")
            return 0
        _dev_down(args)
    if args.node:
        from kvtier.dev import node

        reason = node.cannot_run_containers()
        if reason:
            print(f"cannot run a real node here: {reason}")
            return 1
        bin_dir = ensure_tools(node=True)
        images = []
        if not args.no_image:
            from kvtier.dev.image import build_kvtier_image

            images.append(build_kvtier_image())
        cp = node.up(state_dir, bin_dir, images).cp
        repository, tag = (images[0].ref if images else "ghcr.io/kvtier/kvtier:0.1.0").rsplit(":", 1)
        print(
            "install the chart with the local images:\n  helm install kvtier charts/kvtier -n kvtier-system "
            f"--create-namespace --set image.repository={repository},image.tag={tag},"
            f"csi.registrarImage={node.REGISTRAR_REF}"
        )
    else:
        bin_dir = ensure_tools()
        cp = LocalControlPlane(state_dir=state_dir, bin_dir=bin_dir).start()
    if args.operator:
        from kvtier.dev.local_operator import install_chart_with_local_operator

        install_chart_with_local_operator(cp)
    print(f"kubeconfig: {cp.kubeconfig}")
    print(f"export KUBECONFIG={cp.kubeconfig} PATH={bin_dir}:$PATH")
    return 0


def _dev_down(args: argparse.Namespace) -> int:
    from kvtier.dev.controlplane import LocalControlPlane, default_state_dir

    state_dir = Path(args.dir) if args.dir else default_state_dir()
    if not (state_dir / "controlplane.json").exists():
        print("nothing running")
        return 0
    from kvtier.dev import node

    if (state_dir / node.STATE_FILE).exists():
        node.down(node.LocalNode.load(state_dir))
        print(f"node stopped; left behind: {node.leftovers()}")
    else:
        LocalControlPlane.load(state_dir).stop()
    print(f"stopped; removed {state_dir}")
    return 0


def _dev_env(args: argparse.Namespace) -> int:
    from kvtier.dev.tools import TOOLS, ensure_tools

    bin_dir = ensure_tools()
    for tool in TOOLS:
        print(f"{tool}: {bin_dir / tool}")
    print(f"export PATH={bin_dir}:$PATH")
    return 0


def _stage(args: argparse.Namespace) -> int:
    """Copy the kvtier package into a folder an engine container puts on its PYTHONPATH (the
    injected init container runs this): the engine imports the client and connectors from there."""
    import shutil

    import kvtier

    target = Path(args.folder) / "kvtier"
    if target.exists():
        shutil.rmtree(target)
    sources = [Path(p) for p in kvtier.__path__]
    shutil.copytree(sources[0], target, ignore=shutil.ignore_patterns("__pycache__"))
    # the operator, agent and bench subpackages live in their own folders in a source checkout
    import kvtier.agent

    shutil.copytree(
        Path(kvtier.agent.__path__[0]),
        target / "agent",
        ignore=shutil.ignore_patterns("__pycache__"),
        dirs_exist_ok=True,
    )
    print(f"staged kvtier into {target}")
    return 0


def _crds(args: argparse.Namespace) -> int:
    from kvtier.api.crds import crd_files
    from kvtier.dev.tools import repo_root

    stale = []
    for path, text in crd_files(repo_root()).items():
        if not path.exists() or path.read_text() != text:
            stale.append(path)
            if args.write:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    verb = "wrote" if args.write else "out of date"
    for path in stale:
        print(f"{verb}: {path.relative_to(repo_root())}")
    return 1 if stale and not args.write else 0


def _lazy(module: str, func: str = "main") -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        import importlib

        return int(getattr(importlib.import_module(module), func)(args) or 0)

    return run


def build_parser() -> argparse.ArgumentParser:
    from kvtier import __version__, logs

    parser = argparse.ArgumentParser(prog="kvtier", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"kvtier {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("dev", help="local control plane (real etcd + kube-apiserver)")
    dev_sub = dev.add_subparsers(dest="dev_command", required=True)
    for name, func, help_ in (
        ("up", _dev_up, "start it and print the KUBECONFIG line"),
        ("down", _dev_down, "stop it and remove its state"),
        ("env", _dev_env, "build (once) and print where etcd, kube-apiserver, kubectl and helm are"),
    ):
        p = dev_sub.add_parser(name, help=help_)
        p.add_argument("--dir", help="state folder (default /tmp/kvtier-dev-$UID or $KVTIER_DEV_DIR)")
        p.set_defaults(func=func)
        if name == "up":
            p.add_argument(
                "--operator",
                action="store_true",
                help="also helm install the chart and run the operator locally",
            )
            p.add_argument(
                "--node",
                action="store_true",
                help="also run a real node: containerd, CNI, kubelet, kube-proxy, controller-manager, scheduler (root)",
            )
            p.add_argument(
                "--no-image", action="store_true", help="with --node: skip building the kvtier image"
            )

    image = sub.add_parser("image", help="the kvtier image, built without Docker")
    image_sub = image.add_subparsers(dest="image_command", required=True)
    b = image_sub.add_parser(
        "build", help="mmdebstrap + the kvtier wheel, imported into the local containerd"
    )
    b.set_defaults(func=_lazy("kvtier.dev.image"))

    stage = sub.add_parser(
        "stage", help="copy the kvtier client and connectors into FOLDER (for engine images)"
    )
    stage.add_argument("folder")
    stage.set_defaults(func=_stage)

    crds = sub.add_parser("crds", help="check (default) or --write the CRDs generated from the API models")
    crds.add_argument("--write", action="store_true")
    crds.set_defaults(func=_crds)

    op = sub.add_parser("operator", help="run the kopf operator (reconciles KVCachePools)")
    op.add_argument("--namespace", default="kvtier-system", help="where agents' DaemonSets live")
    op.add_argument("--liveness", default="http://0.0.0.0:8080/healthz")
    op.add_argument("--webhook-port", type=int, default=0, help="serve the pod webhook on this port (0: off)")
    op.add_argument("--webhook-host", default="0.0.0.0")
    op.add_argument(
        "--webhook-cert", default=None, help="serving certificate (PEM); kopf makes one if absent"
    )
    op.add_argument("--webhook-key", default=None, help="its private key (PEM)")
    op.add_argument(
        "--webhook-on-refusal", choices=["deny", "warn"], default="deny", help="a pod that cannot be injected"
    )
    op.add_argument(
        "--webhook-tls-secret", default=None, help="self-managed certificates: keep them in this Secret"
    )
    op.add_argument("--webhook-config", default=None, help="self-managed: patch this config's caBundle")
    op.add_argument(
        "--webhook-service", default="kvtier-webhook", help="self-managed: the Service the cert names"
    )
    logs.add_arguments(op)
    op.set_defaults(func=_lazy("kvtier.operator.main"))

    agent = sub.add_parser("agent", help="run a node agent for one pool")
    agent.add_argument("--config", required=True, help="the agent configuration the operator rendered")
    logs.add_arguments(agent)
    agent.set_defaults(func=_lazy("kvtier.agent.main"))

    csi = sub.add_parser("csi", help="the CSI node plugin for csi.kvtier.io (delivers agent sockets to pods)")
    csi.add_argument("--endpoint", default="unix:///csi/csi.sock")
    csi.add_argument("--sockets", default="/var/run/kvtier", help="where each pool's agent keeps its sockets")
    csi.add_argument("--node-id", default=None, help="default: $NODE_NAME")
    csi.add_argument(
        "--pods-dir",
        default="/var/lib/kubelet/pods",
        help="the kubelet's pods folder: the only place it mounts",
    )
    csi.add_argument(
        "--state-dir", default="/csi", help="where it records its own publishes (kept across restarts)"
    )
    logs.add_arguments(csi)
    csi.set_defaults(func=_lazy("kvtier.agent.csi.server"))

    side = sub.add_parser(
        "sidecar", help="the prefetch sidecar (HTTP hints -> promote and fetch via the agent)"
    )
    side.add_argument("--pool", required=True)
    side.add_argument("--socket", default="/var/run/kvtier/kvtier.sock")
    side.add_argument("--port", type=int, default=8765)
    side.add_argument("--host", default="127.0.0.1", help="the hints endpoint: the pod's loopback by default")
    side.add_argument("--probe-port", type=int, default=None, help="healthz and metrics on every address")
    side.add_argument(
        "--public-port", type=int, default=None, help="token-authenticated cross-pod hints (off by default)"
    )
    side.add_argument("--token-file", default=None, help="the bearer token the public endpoint requires")
    side.add_argument("--deadline", type=float, default=2.0, help="seconds, for hints that give none")
    logs.add_arguments(side)
    side.set_defaults(func=_lazy("kvtier.agent.sidecar"))

    demo = sub.add_parser("demo", help="the whole path on this machine, with a summary")
    demo.add_argument("--keep", action="store_true", help="leave the cluster and agents running")
    demo.add_argument(
        "--processes", action="store_true", help="run kvtier as local processes even where pods could run"
    )
    demo.add_argument("--out", default=None, help="on a real node: write the measured times here (JSON)")
    demo.add_argument("--engine", action="store_true", help=argparse.SUPPRESS)  # the engine pod's program
    demo.set_defaults(func=_lazy("kvtier.demo"))

    bench = sub.add_parser("bench", help="benchmarks (write JSON)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    b = bench_sub.add_parser("store", help="agent put/get vs memcpy, NVMe vs raw direct I/O, vs Redis")
    b.add_argument("--out", default="bench-store.json")
    b.add_argument("--quick", action="store_true", help="small sizes, for CI and the demo")
    b.set_defaults(func=_lazy("kvtier.bench.store"))
    b = bench_sub.add_parser("chaos", help="fuzzed frames, SIGKILL loop: wrong bytes and leaks (must be 0)")
    b.add_argument("--out", default="bench-chaos.json")
    b.add_argument("--frames", type=int, default=3000, help="fuzzed frames per socket (tenant, admin, peer)")
    b.add_argument("--kills", type=int, default=32, help="SIGKILLs of the agent under concurrent writers")
    b.set_defaults(func=_lazy("kvtier.bench.chaos"))
    b = bench_sub.add_parser(
        "controlplane", help="nodes and pools on the local control plane, simulated agents"
    )
    b.add_argument("--out", default="bench-controlplane.json")
    b.add_argument("--nodes", type=int, default=1000, help="Nodes, each running one simulated agent")
    b.add_argument("--pools", type=int, default=100, help="pools; each selects nodes/pools of the Nodes")
    b.add_argument("--window", type=float, default=120.0, help="steady-load window (s)")
    b.add_argument("--heartbeat", type=float, default=60.0, help="the agents' heartbeat (s)")
    b.set_defaults(func=_lazy("kvtier.bench.controlplane"))
    b = bench_sub.add_parser(
        "transport", help="peer fetches over NIXL between two network namespaces vs raw TCP (needs root)"
    )
    b.add_argument("--out", default="bench-transport.json")
    b.add_argument("--block-mib", default="0.25,1,4,16", help="block sizes in MiB, comma-separated")
    b.add_argument("--total-mib", type=int, default=256, help="bytes fetched per block size")
    b.add_argument("--repeats", type=int, default=7, help="(raw stream, fetch) pairs per block size")
    b.add_argument("--transport", default="auto", choices=["auto", "rdma", "tcp"])
    b.set_defaults(func=_lazy("kvtier.bench.transport"))
    b = bench_sub.add_parser(
        "vllm-worker",
        help="the vLLM connector's loads into vLLM's paged KV cache (whole, layer-wise) vs the link's floor "
        "and the HF path (no vLLM needed)",
    )
    b.add_argument("out", help="folder for vllm-worker.json")
    b.add_argument("--small", action="store_true", help="a tiny model shape on the CPU (tests)")
    b.add_argument("--tokens", default=None, help="context lengths (16384,65536,131072; --small: 1024,4096)")
    b.add_argument("--block-tokens", type=int, default=None, help="kvtier block (256; --small: 64)")
    b.add_argument("--layouts", default=None, help="vLLM KV cache layouts to load into (LBNHC,BLNHC)")
    b.add_argument(
        "--new-tokens", default=None, help="tokens the simulated forward computes (1,512,4096; --small: 1,16)"
    )
    b.add_argument("--repeats", type=int, default=3, help="timings per mode (the fastest is reported)")
    b.set_defaults(func=_lazy("kvtier.bench.vllmworker"))

    b = bench_sub.add_parser("nixl-gpu", help="host->GPU through NIXL vs the connectors' copy path (one GPU)")
    b.add_argument("out_dir", help="folder for nixl-gpu.json")
    b.add_argument("--gib", default="1,4,8", help="bytes moved per run, GiB, comma-separated")
    b.add_argument("--block-mib", type=float, default=2.0)
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--seed", type=int, default=17)
    b.add_argument("--wheels", default=None, help="folder of NIXL wheels, used when NIXL is not importable")
    b.add_argument("--minutes", type=float, default=8.0, help="start no new size after this")
    b.set_defaults(func=_lazy("kvtier.bench.nixlgpu"))
    b = bench_sub.add_parser("ttft", help="restore TTFT vs recompute (GPU, or a small model on CPU)")
    b.add_argument("--out", default="bench-ttft.json")
    b.add_argument("--plot", default=None)
    b.add_argument("--tokens", default=None, help="comma-separated context lengths")
    b.add_argument("--small", action="store_true", help="a small model shape on the CPU")
    b.add_argument("--nvme-path", default=None, help="folder for the NVMe tier's file (default: a temp dir)")
    b.add_argument("--block-tokens", type=int, default=256)
    b.add_argument(
        "--prefill",
        choices=["auto", "one-shot", "chunked", "both"],
        default="auto",
        help="recompute modes to time (auto: one-shot where it fits, chunked too up to --chunked-upto "
        "or where one-shot does not fit); the fastest measured is the baseline",
    )
    b.add_argument(
        "--chunk", type=int, default=None, help="prefill chunk (tokens); default: the largest that fits"
    )
    b.add_argument(
        "--chunked-upto",
        type=int,
        default=1 << 30,
        help="with --prefill auto: also time chunked up to here (default: every length; chunks beat "
        "the one forward from 128k on an H200)",
    )
    b.add_argument(
        "--peers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time torch.save and safetensors of the DynamicCache from tmpfs and disk (HF path)",
    )
    b.add_argument("--peers-upto", type=int, default=1 << 30, help="time the file peers up to this length")
    b.add_argument(
        "--lmcache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --peers: also time LMCache's local CPU and local disk backends (when it is installed)",
    )
    b.add_argument("--nvme-tokens", default=None, help="context lengths that get NVMe rows (default: all)")
    b.add_argument(
        "--io-lock",
        default=None,
        help="a lock file serialising restores and disk reads with another benchmark on the same machine",
    )
    b.add_argument(
        "--engine", choices=["hf", "numpy"], default=None, help="with --small: numpy (default) or hf"
    )
    b.add_argument(
        "--tp",
        type=int,
        default=None,
        help="tensor parallel: N ranks, one process and GPU each (CPU + gloo with --small)",
    )
    b.add_argument(
        "--shape", choices=["qwen2.5-7b", "llama3-70b"], default="llama3-70b", help="model shape with --tp"
    )
    b.add_argument(
        "--only-rank",
        type=int,
        default=None,
        help="with --tp N: run this rank alone on one GPU (its shards; the all-reduces skipped)",
    )
    b.add_argument(
        "--share-gpus",
        action="store_true",
        help="with --tp N on fewer GPUs: ranks share them over gloo (checks the multi-rank path; times mean little)",
    )
    b.set_defaults(func=_lazy("kvtier.bench.ttft"))
    b = bench_sub.add_parser(
        "serve", help="many users on one GPU: turns per GPU-hour and $/M tokens, kvtier vs recompute"
    )
    b.add_argument("--out", default="bench-serve.json")
    b.add_argument("--plot", default=None)
    b.add_argument("--small", action="store_true", help="a tiny model on the CPU (tests)")
    b.add_argument(
        "--probe",
        action="store_true",
        help="GPU check in under a minute: decode ms/step vs the HBM floor, prefill and restore rates",
    )
    b.add_argument("--policies", default="recompute,kvtier,kvtier+prefetch")
    for knob, kind, say in (
        ("users", int, "concurrent users (12)"),
        ("contexts", str, "history lengths drawn per user (16384,32768,65536,131072)"),
        ("turns", int, "turns per user (20)"),
        ("new-tokens", int, "user tokens per turn (256)"),
        ("output-tokens", int, "model tokens per turn (128)"),
        ("think-s", float, "mean think time between turns, exponential (2)"),
        ("hbm-contexts", int, "HBM KV budget in contexts (4)"),
        ("duration-s", float, "seconds per policy (90)"),
        ("prefetch-lead-s", float, "how early the next turn is hinted (1)"),
        ("dram-gib", float, "the agent's DRAM tier (48)"),
        ("block-tokens", int, "tokens per KV block (256)"),
    ):
        b.add_argument(f"--{knob}", type=kind, default=None, help=say + "; --small has its own defaults")
    b.add_argument(
        "--nvme-gib", type=int, default=None, help="NVMe tier (default: every context at its longest)"
    )
    b.add_argument("--nvme-path", default=None, help="folder for the NVMe tier's file (default: a temp dir)")
    b.add_argument("--no-returns", action="store_true", help="histories not cached before: nobody returns")
    b.add_argument("--one-shot-max", type=int, default=262144, help="longest one-shot (is_causal) prefill")
    b.add_argument("--chunk", type=int, default=65536, help="prefill chunk beyond --one-shot-max")
    b.add_argument("--gpu-hour-usd", type=float, default=4.54, help="price of one GPU-hour (see docs)")
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=_lazy("kvtier.bench.serve"))
    b = bench_sub.add_parser("report", help="merge `bench ttft` JSON files into one, with a plot")
    b.add_argument("inputs", nargs="+")
    b.add_argument("--out", required=True)
    b.add_argument("--plot", default=None)
    b.set_defaults(func=_lazy("kvtier.bench.ttft", "report"))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv_echo = argv[2:]  # for benchmark reports: the exact command
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
