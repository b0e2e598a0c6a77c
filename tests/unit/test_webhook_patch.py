"""The webhook's pure core: (pod, pool, namespace) -> decision and JSONPatch, against golden files.

Regenerate the golden files after an intended change with KVTIER_UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import yaml

from kvtier.api import v1alpha1 as api
from kvtier.operator.webhook import (
    INJECTED_ANNOTATION,
    SIDECAR,
    InjectSettings,
    apply_patch,
    decide,
)
from tests.support import REPO

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


@pytest.mark.parametrize("name", ["..", ".", "fast/status", "x%2F", "Fast", "a" * 254, ""])
def test_pool_names_that_are_not_kubernetes_names_are_refused_as_malformed(name):
    pod = vllm_pod()
    pod["metadata"]["annotations"]["kvtier.io/pool"] = name
    denied = decide(pod, None, name, "team-a", TENANT)
    assert not denied.allowed and denied.code == 400 and denied.patch == []


def test_names_that_clash_are_named_and_warn_mode_leaves_the_pod_alone():
    pod = vllm_pod()
    pod["spec"]["volumes"] = [{"name": "kvtier-lib", "emptyDir": {}}]
    pod["spec"]["containers"][0]["volumeMounts"] = [{"name": "x", "mountPath": "/var/run/kvtier/"}]
    denied = decide(pod, POOL, "fast", "team-a", TENANT)
    assert not denied.allowed and denied.code == 400
    assert "volume 'kvtier-lib'" in denied.message and "mountPath '/var/run/kvtier/'" in denied.message
    warned = decide(pod, POOL, "fast", "team-a", TENANT, InjectSettings(on_refusal="warn"))
    assert warned.allowed and warned.patch == [] and "kvtier-lib" in warned.warnings[0]


def test_only_a_consistent_injection_counts_as_injected():
    injected = apply_patch(vllm_pod(), decide(vllm_pod(), POOL, "fast", "team-a", TENANT).patch)
    assert decide(injected, POOL, "fast", "team-a", TENANT).message == "already injected"
    forged = vllm_pod()
    forged["metadata"]["annotations"][INJECTED_ANNOTATION] = "pool=fast"
    assert not decide(forged, POOL, "fast", "team-a", TENANT).allowed
    other = copy.deepcopy(injected)
    other["metadata"]["annotations"][INJECTED_ANNOTATION] = "pool=slow"
    assert not decide(other, POOL, "fast", "team-a", TENANT).allowed, "the record must match the pool"
    assert not decide(injected, POOL, "fast", "team-a", {}).allowed, "checks run again on reinvocation"


def test_pythonpath_from_valuefrom_or_empty_keeps_the_library_first():
    pod = vllm_pod()
    source = {"configMapKeyRef": {"name": "paths", "key": "py"}}
    pod["spec"]["containers"][0]["env"] = [
        {"name": "A", "value": "1"},
        {"name": "PYTHONPATH", "valueFrom": source},
    ]
    pod["spec"]["containers"].append(
        {"name": "b", "image": "x", "env": [{"name": "PYTHONPATH", "value": ""}]}
    )
    pod["spec"]["containers"].append(
        {"name": "c", "image": "x", "envFrom": [{"configMapRef": {"name": "e"}}]}
    )
    decision = decide(pod, POOL, "fast", "team-a", TENANT)
    a, b, _ = apply_patch(pod, decision.patch)["spec"]["containers"]
    assert a["env"][:3] == [
        {"name": "A", "value": "1"},
        {"name": "KVTIER_USER_PYTHONPATH", "valueFrom": source},
        {"name": "PYTHONPATH", "value": "/opt/kvtier-lib:$(KVTIER_USER_PYTHONPATH)"},
    ]
    assert {"name": "PYTHONPATH", "value": "/opt/kvtier-lib"} in b["env"]
    assert any("'c' takes variables from envFrom" in w for w in decision.warnings)


def test_sidecar_listens_on_loopback_and_the_token_reaches_the_sidecar_alone():
    spec = apply_patch(vllm_pod(), decide(vllm_pod(), POOL, "fast", "team-a", TENANT).patch)["spec"]
    sidecar = next(c for c in spec["initContainers"] if c["name"] == SIDECAR)
    assert sidecar["args"][sidecar["args"].index("--host") + 1] == "127.0.0.1"
    assert "--public-port" not in sidecar["args"] and not any("secret" in v for v in spec["volumes"])
    pod = vllm_pod()
    pod["metadata"]["annotations"]["kvtier.io/hints-secret"] = "gateway-token"
    spec = apply_patch(pod, decide(pod, POOL, "fast", "team-a", TENANT).patch)["spec"]
    sidecar = next(c for c in spec["initContainers"] if c["name"] == SIDECAR)
    assert "--public-port" in sidecar["args"] and "--token-file" in sidecar["args"]
    (token,) = [v for v in spec["volumes"] if "secret" in v]
    assert token["secret"]["secretName"] == "gateway-token"
    holders = [c["name"] for c in spec["initContainers"] + spec["containers"]
               if any(m["name"] == token["name"] for m in c.get("volumeMounts", []))]  # fmt: skip
    assert holders == [SIDECAR]
    pod["metadata"]["annotations"]["kvtier.io/hints-secret"] = "../x"
    assert decide(pod, POOL, "fast", "team-a", TENANT).code == 400
