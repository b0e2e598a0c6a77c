"""The Helm chart: lint, render, schema, and a real `helm install` (driven through pyhelm3) on a local
control plane of its own, with the webhook it installs admitting pods through a local operator that
manages its own certificates (the chart's self-managed mode)."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml
from kubernetes import client, config

from kvtier.api import v1alpha1 as api
from kvtier.dev.local_operator import operator_argv
from tests.support import REPO, eventually

pytestmark = pytest.mark.integration
CHART = REPO / "charts" / "kvtier"
NS = "kvtier-system"


@pytest.fixture(scope="module")
def chart_cluster():
    from kvtier.dev.controlplane import LocalControlPlane
    from kvtier.dev.tools import ensure_tools

    cp = LocalControlPlane(Path(tempfile.mkdtemp(prefix="kvtier-chart-")), ensure_tools(quiet=True))
    cp.start(log=lambda *_: None)
    try:
        yield cp, config.new_client_from_config(str(cp.kubeconfig))
    finally:
        cp.stop()


def helm(cp, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(cp.bin_dir / "helm"), *args], env=cp.env(), capture_output=True, text=True, check=check
    )


def template(cp, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`helm template` of the chart for this Kubernetes version (helm alone assumes an old one)."""
    return helm(cp, "template", "kvtier", str(CHART), "--kube-version", "1.34.4", *args, check=check)


def test_lint_is_clean_and_a_values_typo_is_refused(chart_cluster):
    cp, _ = chart_cluster
    lint = helm(cp, "lint", "--strict", str(CHART))
    assert "1 chart(s) linted, 0 chart(s) failed" in lint.stdout
    typo = template(cp, "--set", "webhook.failurPolicy=Fail", check=False)
    assert typo.returncode != 0 and "additional properties 'failurPolicy' not allowed" in typo.stderr
    bad = template(cp, "--set", "webhook.timeoutSeconds=30", check=False)
    assert bad.returncode != 0 and "timeoutSeconds" in bad.stderr


def test_name_overrides_rename_every_object_and_bad_names_are_refused(chart_cluster):
    cp, _ = chart_cluster

    def names(*args: str) -> set[str]:
        docs = yaml.safe_load_all(template(cp, *args).stdout)
        return {
            d["metadata"]["name"]
            for d in docs
            if d and d["kind"] not in ("CustomResourceDefinition", "CSIDriver")
        }

    assert all(n.startswith("kvtier-") for n in names())
    assert all(n.startswith("cache-") for n in names("--set", "fullnameOverride=cache"))
    assert all(n.startswith("kvtier-cache-") for n in names("--set", "nameOverride=cache"))
    bad = template(cp, "--set", "nameOverride=Bad_Name", check=False)
    assert bad.returncode != 0 and "nameOverride" in bad.stderr


def test_rendered_manifests_validate_on_the_api_server(chart_cluster):
    cp, _ = chart_cluster
    out = template(cp, "-n", NS).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("CustomResourceDefinition") == 2 and "CSIDriver" in kinds and "Deployment" in kinds
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"]["type"] == "Recreate"
    pod = deploy["spec"]["template"]["spec"]["containers"][0]
    assert pod["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["securityContext"]["readOnlyRootFilesystem"] and pod["securityContext"]["runAsNonRoot"]
    crd = next(d for d in docs if d["kind"] == "CustomResourceDefinition")
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep", (
        "CRDs stay; upgrades update them"
    )
    csi = next(d for d in docs if d["kind"] == "CSIDriver")
    assert csi["spec"] == {
        "attachRequired": False,
        "podInfoOnMount": True,
        "volumeLifecycleModes": ["Ephemeral"],
        "fsGroupPolicy": "None",
    }
    hook = next(d for d in docs if d["kind"] == "MutatingWebhookConfiguration")["webhooks"][0]
    assert (
        hook["failurePolicy"] == "Ignore" and hook["sideEffects"] == "None" and hook["timeoutSeconds"] <= 10
    )
    assert hook["namespaceSelector"]["matchExpressions"][0]["values"] == ["kube-system", NS]
    subprocess.run(
        [str(cp.bin_dir / "kubectl"), "create", "namespace", "chart-dry-run"], env=cp.env(), check=True
    )
    rendered = template(cp, "-n", "chart-dry-run").stdout
    applied = subprocess.run(
        [str(cp.bin_dir / "kubectl"), "apply", "--dry-run=server", "-f", "-"],
        env=cp.env(),
        input=rendered,
        capture_output=True,
        text=True,
    )
    assert applied.returncode == 0, applied.stderr
    cm = template(cp, "--set", "webhook.certificates.mode=cert-manager").stdout
    assert "kind: Certificate" in cm and "cert-manager.io/inject-ca-from" in cm


def _operator(cp, port: int, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        operator_argv(NS, port, self_managed=True),
        env={**cp.env(), "KVTIER_STATUS_INTERVAL": "1"},
        stdout=open(log, "a"),
        stderr=subprocess.STDOUT,
    )


def _ca_bundle(kube) -> str | None:
    hook = client.AdmissionregistrationV1Api(kube).read_mutating_webhook_configuration("kvtier-inject")
    return hook.webhooks[0].client_config.ca_bundle


def test_helm_install_then_pods_are_injected_and_certificates_stay_stable(chart_cluster, tmp_path):
    from pyhelm3 import Client

    from kvtier.dev.ports import free_port

    cp, kube = chart_cluster
    port = free_port()
    values = {"webhook": {"url": f"https://127.0.0.1:{port}/kvtier-inject"}, "csi": {"enabled": True}}
    helm3 = Client(executable=str(cp.bin_dir / "helm"), kubeconfig=cp.kubeconfig)

    async def install():
        chart = await helm3.get_chart(CHART)
        return await helm3.install_or_upgrade_release(
            "kvtier", chart, values, namespace=NS, create_namespace=True
        )

    revision = asyncio.run(install())
    assert revision.revision == 1 and revision.status.value == "deployed"
    op = _operator(cp, port, tmp_path / "operator.log")
    try:
        bundle = eventually(lambda: _ca_bundle(kube), timeout=30, message="caBundle patched by the operator")
        secret = client.CoreV1Api(kube).read_namespaced_secret("kvtier-webhook-tls", NS).data["tls.crt"]
        assert base64.b64decode(bundle).startswith(b"-----BEGIN CERTIFICATE-----")

        pool = yaml.safe_load((REPO / "examples" / "gpu-node-pool.yaml").read_text())
        client.CustomObjectsApi(kube).create_cluster_custom_object(
            api.GROUP, api.VERSION, "kvcachepools", pool
        )
        ns = f"team-{uuid.uuid4().hex[:6]}"
        client.CoreV1Api(kube).create_namespace(
            {"metadata": {"name": ns, "labels": {"kvtier.io/tenant": "true"}}}
        )
        body = {
            "metadata": {
                "name": "llm",
                "labels": {"kvtier.io/inject": "true"},
                "annotations": {"kvtier.io/pool": "fast"},
            },
            "spec": {
                "containers": [
                    {"name": "vllm", "image": "vllm/vllm-openai:v0.11.0", "command": ["vllm", "serve"]}
                ]
            },
        }

        def create():
            created = client.CoreV1Api(kube).create_namespaced_pod(ns, body)
            if created.metadata.annotations.get("kvtier.io/injected"):
                return created
            client.CoreV1Api(kube).delete_namespaced_pod("llm", ns, grace_period_seconds=0)
            time.sleep(0.5)  # webhook server still starting: failurePolicy Ignore let it through untouched
            return None

        pod = eventually(create, timeout=30, message="a pod injected through the chart's webhook")
        assert [c.name for c in pod.spec.init_containers] == ["kvtier-stage", "kvtier-prefetch"]

        # stable: an operator restart and a helm upgrade keep the same certificate and caBundle
        op.terminate()
        op.wait(timeout=20)
        op = _operator(cp, port, tmp_path / "operator.log")
        time.sleep(3)
        assert (
            client.CoreV1Api(kube).read_namespaced_secret("kvtier-webhook-tls", NS).data["tls.crt"] == secret
        )
        assert asyncio.run(install()).revision == 2
        assert _ca_bundle(kube) == bundle
    finally:
        op.terminate()
        op.wait(timeout=20)
