"""Where the control plane's binaries come from: hack/build-tools.sh builds them once per version."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TOOLS = ("etcd", "kube-apiserver", "kubectl", "helm", "csi-sanity")
NODE_TOOLS = (
    "kubelet",
    "kube-controller-manager",
    "kube-scheduler",
    "kube-proxy",
    "csi-node-driver-registrar",
    "pause",
)


def repo_root() -> Path:
    # src/kvtier/dev/tools.py -> repo root (an editable install of the repo is how kvtier dev runs).
    return Path(__file__).resolve().parents[3]


def build_script() -> Path:
    return repo_root() / "hack" / "build-tools.sh"


def ensure_tools(quiet: bool = False, node: bool = False) -> Path:
    """The folder holding etcd, kube-apiserver, kubectl and helm, building them when missing
    (with `node`, also what a real node runs: NODE_TOOLS).

    KVTIER_BIN_DIR points at prebuilt binaries and skips the build. The build script prints its
    progress on stderr (shown to the user) and the folder on the last line of stdout.
    """
    override = os.environ.get("KVTIER_BIN_DIR")
    if override:
        bin_dir = Path(override)
    else:
        result = subprocess.run(
            ["bash", str(build_script()), *(["--node"] if node else [])],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL if quiet else sys.stderr,
            text=True,
            check=True,
        )
        bin_dir = Path(result.stdout.strip().splitlines()[-1])
    missing = [t for t in TOOLS + (NODE_TOOLS if node else ()) if not (bin_dir / t).is_file()]
    if missing:
        raise FileNotFoundError(f"missing {', '.join(missing)} in {bin_dir}; run hack/build-tools.sh")
    return bin_dir
