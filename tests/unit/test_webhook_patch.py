"""The webhook's pure core: (pod, pool, namespace) -> decision and JSONPatch, against golden files.

Regenerate the golden files after an intended change with KVTIER_UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import yaml
from kvtier.operator.webhook import (
    INJECTED_ANNOTATION,
    SIDECAR,
    InjectSettings,
    apply_patch,
    decide,
)

from kvtier.api import v1alpha1 as api
from tests.conftest import REPO

pytestmark = pytest.mark.unit
GOLDEN = REPO / "tests" / "golden" / "webhook"
POOL = api.KVCachePool.model_validate(yaml.safe_load((REPO / "examples" / "gpu-node-pool.yaml").read_text()))
TENANT = {"kvtier.io/tenant": "true"}


def vllm_pod() -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "llm",
            "labels": {"kvtier.io/inject": "true", "app": "llm"},
            "annotations": {"kvtier.io/pool": "fast"},
        },
        "spec": {
            "containers": [
                {
                    "name": "vllm",
                    "image": "vllm/vllm-openai:v0.11.0",
                    "command": ["vllm", "serve"],
                    "args": ["Qwen/Qwen2.5-7B-Instruct", "--max-model-len", "131072"],
                    "env": [{"name": "PYTHONPATH", "value": "/app"}],
                    "resources": {"limits": {"nvidia.com/gpu": "1"}},
                }
            ],
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {"key": "gpu.product", "operator": "In", "values": ["H200"]}
                                ]
                            }
                        ]
                    }
                }
            },
        },
    }


def hf_pod() -> dict:
    pod = vllm_pod()
    pod["metadata"]["annotations"] = {"kvtier.io/pool": "fast"}
    pod["spec"] = {"containers": [{"name": "app", "image": "my/hf-server:1", "args": ["python", "serve.py"]}]}
    return pod


CASES = {
    "vllm-with-affinity": lambda: decide(vllm_pod(), POOL, "fast", "team-a", TENANT),
    "hf-no-affinity": lambda: decide(hf_pod(), POOL, "fast", "team-a", TENANT),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_patch_matches_golden(case):
    got = CASES[case]()
    text = json.dumps({"allowed": got.allowed, "message": got.message, "patch": got.patch}, indent=2) + "\n"
    path = GOLDEN / f"{case}.json"
    if os.environ.get("KVTIER_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.read_text() == text, (
        f"{path} differs; rerun with KVTIER_UPDATE_GOLDEN=1 if the change is intended"
    )


def test_injected_pod_has_everything_and_stays_within_pod_security():
    pod = vllm_pod()
    decision = decide(pod, POOL, "fast", "team-a", TENANT)
    assert decision.allowed
    out = apply_patch(pod, decision.patch)
    spec = out["spec"]
    assert not any("hostPath" in v for v in spec["volumes"]), "no hostPath: baseline allows the pod"
    assert not any(spec.get(k) for k in ("hostNetwork", "hostIPC", "hostPID"))
    csi = next(v for v in spec["volumes"] if "csi" in v)["csi"]
    assert csi == {"driver": "csi.kvtier.io", "readOnly": True, "volumeAttributes": {"pool": "fast"}}
    sidecar = next(c for c in spec["initContainers"] if c["name"] == SIDECAR)
    assert sidecar["restartPolicy"] == "Always" and "startupProbe" in sidecar
    sc = sidecar["securityContext"]
    assert sc["runAsNonRoot"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault", "the sidecar meets restricted"
    engine = spec["containers"][0]
    env = {e["name"]: e["value"] for e in engine["env"]}
    assert (
        env["PYTHONPATH"] == "/opt/kvtier-lib:/app" and env["KVTIER_SOCKET"] == "/var/run/kvtier/kvtier.sock"
    )
    i = engine["args"].index("--kv-transfer-config")
    cfg = json.loads(engine["args"][i + 1])
    assert cfg["kv_connector_module_path"] == "kvtier.agent.connectors.vllm" and cfg["kv_role"] == "kv_both"
    (term,) = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    keys = [e["key"] for e in term["matchExpressions"]]
    assert keys == ["gpu.product", "nvidia.com/gpu.present"], (
        "the pool's nodes are ANDed into the pod's own term"
    )
    assert out["metadata"]["annotations"][INJECTED_ANNOTATION] == "pool=fast,engines=vllm:vllm"
    # a second admission (reinvocation) changes nothing
    again = decide(out, POOL, "fast", "team-a", TENANT)
    assert again.allowed and again.patch == []
    assert decide(copy.deepcopy(pod), POOL, "fast", "team-a", TENANT).patch == decision.patch, "deterministic"


@pytest.mark.parametrize(
    ("pool", "name", "labels", "message"),
    [
        (POOL, "fast", {}, "namespace 'team-a' is not admitted by KVCachePool 'fast'"),
        (None, "nope", TENANT, "KVCachePool 'nope' does not exist"),
        (POOL, None, TENANT, "has no kvtier.io/pool annotation"),
    ],
)
def test_refusals_say_what_to_fix_and_warn_mode_leaves_the_pod_alone(pool, name, labels, message):
    denied = decide(vllm_pod(), pool, name, "team-a", labels)
    assert not denied.allowed and message in denied.message and denied.patch == []
    warned = decide(vllm_pod(), pool, name, "team-a", labels, InjectSettings(on_refusal="warn"))
    assert warned.allowed and warned.patch == [] and message in warned.warnings[0]
