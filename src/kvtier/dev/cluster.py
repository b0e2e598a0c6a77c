"""kubectl and helm against a local cluster, the way a user types them (the node tier and the demo)."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from typing import Any

import yaml

from kvtier.dev.controlplane import LocalControlPlane
from kvtier.dev.tools import repo_root

RELEASE = "kvtier"
NAMESPACE = "kvtier-system"


@dataclass
class Cluster:
    cp: LocalControlPlane

    def _tool(self, tool: str, *args: str, input: str | None = None, check: bool = True, timeout=300) -> str:
        result = subprocess.run(
            [str(self.cp.bin_dir / tool), *args],
            env=self.cp.env(),
            capture_output=True,
            text=True,
            input=input,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} failed:\n{result.stderr.strip()}")
        return result.stdout

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout=300) -> str:
        return self._tool("kubectl", *args, input=input, check=check, timeout=timeout)

    def helm(self, *args: str, check: bool = True, timeout=300) -> str:
        return self._tool("helm", *args, check=check, timeout=timeout)

    def apply(self, *objects: dict[str, Any]) -> str:
        return self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objects))

    def get(self, *args: str) -> dict[str, Any]:
        return json.loads(self.kubectl("get", *args, "-o", "json"))

    def helm_install(self, image_ref: str, registrar_ref: str, *sets: str, verb: str = "install") -> float:
        """`helm install|upgrade` the chart with a locally built image; seconds until all its pods
        are Ready (`--wait`)."""
        repository, tag = image_ref.rsplit(":", 1)
        t0 = time.monotonic()
        self.helm(
            verb, RELEASE, str(repo_root() / "charts" / "kvtier"),
            "-n", NAMESPACE, "--create-namespace", "--wait", "--timeout", "5m",
            "--set", f"image.repository={repository}", "--set", f"image.tag={tag}",
            "--set", f"csi.registrarImage={registrar_ref}",
            *[a for s in sets for a in ("--set", s)],
        )  # fmt: skip
        return time.monotonic() - t0

    def pods(self, namespace: str, selector: str = "") -> list[dict[str, Any]]:
        args = ["pods", "-n", namespace] + (["-l", selector] if selector else [])
        return self.get(*args)["items"]

    def wait_ready(self, namespace: str, selector: str, count: int = 1, timeout: float = 180) -> list[dict]:
        """Pods matching `selector` that are Ready (at least `count`), or a TimeoutError with why not."""
        deadline = time.monotonic() + timeout
        while True:
            pods = [p for p in self.pods(namespace, selector) if not p["metadata"].get("deletionTimestamp")]
            ready = [p for p in pods if pod_ready(p)]
            if len(ready) >= count:
                return ready
            if time.monotonic() > deadline:
                why = self.kubectl("describe", "pods", "-n", namespace, "-l", selector, check=False)
                raise TimeoutError(
                    f"pods {selector!r} in {namespace} not Ready after {timeout:.0f}s:\n{why[-4000:]}"
                )
            time.sleep(0.3)

    def wait_gone(self, *args: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.get(*args)["items"]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{' '.join(args)} still present after {timeout:.0f}s")
            time.sleep(0.3)


def small_pool(name: str, dram: str, nvme: str) -> dict[str, Any]:
    """A KVCachePool for every node with an NVMe file under /var/lib/kvtier (the demo, the node tier)."""
    return {
        "apiVersion": "kvtier.io/v1alpha1",
        "kind": "KVCachePool",
        "metadata": {"name": name},
        "spec": {
            "tiers": {
                "dram": {"size": dram},
                "nvme": {"size": nvme, "mode": "file", "path": f"/var/lib/kvtier/{name}/{name}.cache"},
            },
            "blockTokens": 256,
        },
    }


def pod_ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
