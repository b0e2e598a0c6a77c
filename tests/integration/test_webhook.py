"""The pod webhook through the real API server: pods created via the apiserver are admitted by the
operator's webhook (kopf WebhookServer), injected once, refused with a message, or left alone."""

from __future__ import annotations

import base64
import uuid

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kvtier.api import v1alpha1 as api
from tests.support import REPO, eventually

pytestmark = pytest.mark.integration


def webhook_config(name: str, url: str, ca: bytes, namespace_selector: dict) -> dict:
    """What the chart installs, with a URL clientConfig (the operator runs as a local process)."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [
            {
                "name": "inject.kvtier.io",
                "admissionReviewVersions": ["v1"],
                "clientConfig": {"url": url, "caBundle": base64.b64encode(ca).decode()},
                "rules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE"],
                        "resources": ["pods"],
                    }
                ],
                "objectSelector": {"matchLabels": {"kvtier.io/inject": "true"}},
                "namespaceSelector": namespace_selector,
                "failurePolicy": "Ignore",
                "sideEffects": "None",
                "timeoutSeconds": 5,
                "reinvocationPolicy": "IfNeeded",
            }
        ],
    }


@pytest.fixture(scope="module")
def webhook(kube, operator_process):
    tag = uuid.uuid4().hex[:6]
    pool = yaml.safe_load((REPO / "examples" / "gpu-node-pool.yaml").read_text())
    pool["metadata"]["name"] = f"wh-{tag}"
    custom = client.CustomObjectsApi(kube)
    custom.create_cluster_custom_object(api.GROUP, api.VERSION, "kvcachepools", pool)
    adm = client.AdmissionregistrationV1Api(kube)
    live = webhook_config(
        f"kvtier-{tag}",
        operator_process.webhook["url"],
        operator_process.webhook["ca"],
        {
            "matchExpressions": [
                {
                    "key": "kubernetes.io/metadata.name",
                    "operator": "NotIn",
                    "values": ["kube-system", "kvtier-system"],
                },
                {"key": "kvtier.test/operator-down", "operator": "DoesNotExist"},
            ]
        },
    )
    # a second configuration, for namespaces labelled operator-down, pointing where nothing listens
    down = webhook_config(
        f"kvtier-down-{tag}",
        "https://127.0.0.1:9/kvtier-inject",
        operator_process.webhook["ca"],
        {"matchLabels": {"kvtier.test/operator-down": "true"}},
    )
    adm.create_mutating_webhook_configuration(live)
    adm.create_mutating_webhook_configuration(down)
    yield pool["metadata"]["name"]
    adm.delete_mutating_webhook_configuration(live["metadata"]["name"])
    adm.delete_mutating_webhook_configuration(down["metadata"]["name"])
    custom.delete_cluster_custom_object(api.GROUP, api.VERSION, "kvcachepools", pool["metadata"]["name"])


def _namespace(kube, labels: dict[str, str]) -> str:
    name = f"wh-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api(kube).create_namespace({"metadata": {"name": name, "labels": labels}})
    return name


def _pod(pool: str | None, labelled: bool = True) -> dict:
    meta: dict = {"name": "llm", "labels": {"app": "llm"}}
    if labelled:
        meta["labels"]["kvtier.io/inject"] = "true"
    if pool:
        meta["annotations"] = {"kvtier.io/pool": pool}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {
            "containers": [
                {"name": "vllm", "image": "vllm/vllm-openai:v0.11.0", "command": ["vllm", "serve"]}
            ]
        },
    }


def _create(kube, ns: str, body: dict):
    # the webhook server may still be starting when the first test runs: retry on connection refusals
    def attempt():
        try:
            return client.CoreV1Api(kube).create_namespaced_pod(ns, body)
        except ApiException as exc:
            if exc.status == 500 and "connection refused" in exc.body:
                return None
            raise

    return eventually(attempt, timeout=30, message="pod created through the webhook")


def test_labelled_pod_is_injected_once_without_host_access(kube, webhook):
    ns = _namespace(kube, {"kvtier.io/tenant": "true"})
    pod = _create(kube, ns, _pod(webhook))
    spec = pod.spec
    assert pod.metadata.annotations["kvtier.io/injected"] == f"pool={webhook},engines=vllm:vllm"
    names = [c.name for c in spec.init_containers]
    assert names.count("kvtier-prefetch") == 1 and names.count("kvtier-stage") == 1, "injected exactly once"
    sidecar = next(c for c in spec.init_containers if c.name == "kvtier-prefetch")
    assert sidecar.restart_policy == "Always"
    assert [v.name for v in spec.volumes if v.csi] == ["kvtier-socket"]
    assert spec.volumes[[v.name for v in spec.volumes].index("kvtier-socket")].csi.driver == "csi.kvtier.io"
    assert not any(v.host_path for v in spec.volumes), "no hostPath"
    assert not (spec.host_network or spec.host_ipc or spec.host_pid)
    assert "--kv-transfer-config" in spec.containers[0].args
    terms = (
        spec.affinity.node_affinity.required_during_scheduling_ignored_during_execution.node_selector_terms
    )
    assert terms[0].match_expressions[0].key == "nvidia.com/gpu.present"


def test_unlabelled_pod_is_untouched(kube, webhook):
    ns = _namespace(kube, {"kvtier.io/tenant": "true"})
    pod = _create(kube, ns, _pod(webhook, labelled=False))
    assert not pod.spec.init_containers and "kvtier.io/injected" not in (pod.metadata.annotations or {})


def test_namespace_the_pool_does_not_admit_is_refused_with_the_reason(kube, webhook):
    ns = _namespace(kube, {})
    with pytest.raises(ApiException) as err:
        client.CoreV1Api(kube).create_namespaced_pod(ns, _pod(webhook))
    assert err.value.status == 403
    assert f"namespace '{ns}' is not admitted by KVCachePool '{webhook}'" in err.value.body
    with pytest.raises(ApiException) as err:
        client.CoreV1Api(kube).create_namespaced_pod(ns, _pod("no-such-pool"))
    assert "KVCachePool 'no-such-pool' does not exist" in err.value.body


def test_pods_are_created_when_the_webhook_is_down(kube, webhook):
    ns = _namespace(kube, {"kvtier.io/tenant": "true", "kvtier.test/operator-down": "true"})
    pod = client.CoreV1Api(kube).create_namespaced_pod(ns, _pod(webhook))
    assert pod.metadata.name == "llm" and not pod.spec.init_containers, "failurePolicy Ignore: never blocked"
