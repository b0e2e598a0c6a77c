"""The local control plane is a real Kubernetes API: objects round-trip, CRDs serve, tools work."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kubernetes import client

from tests.support import kubectl

pytestmark = pytest.mark.integration


def test_configmap_and_crd_roundtrip(control_plane, kube, namespace):
    core = client.CoreV1Api(kube)
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "hello"}, "data": {"k": "v"}})
    assert core.read_namespaced_config_map("hello", namespace).data == {"k": "v"}

    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.kvtier.io"},
        "spec": {
            "group": "example.kvtier.io",
            "scope": "Namespaced",
            "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {"type": "object", "properties": {"size": {"type": "integer"}}}
                            },
                        }
                    },
                }
            ],
        },
    }
    client.ApiextensionsV1Api(kube).create_custom_resource_definition(crd)
    custom = client.CustomObjectsApi(kube)
    deadline = time.monotonic() + 20
    while True:
        try:
            custom.create_namespaced_custom_object(
                "example.kvtier.io",
                "v1",
                namespace,
                "widgets",
                {
                    "apiVersion": "example.kvtier.io/v1",
                    "kind": "Widget",
                    "metadata": {"name": "w"},
                    "spec": {"size": 3},
                },
            )
            break
        except client.exceptions.ApiException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    got = custom.get_namespaced_custom_object("example.kvtier.io", "v1", namespace, "widgets", "w")
    assert got["spec"] == {"size": 3}


def test_kubectl_and_helm_from_the_built_tools(control_plane):
    version = kubectl(control_plane, "version", "-o", "json").stdout
    assert '"gitVersion": "v1.34.4"' in version
    helm = subprocess.run(
        [str(control_plane.bin_dir / "helm"), "version", "--short"], capture_output=True, text=True
    )
    assert helm.stdout.startswith("v3.")


def _processes_under(path: Path) -> list[str]:
    out = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(path) in line and "ps -eww" not in line]


def test_dev_up_then_down_leaves_nothing_running(tmp_path):
    state = tmp_path / "dev"
    env = {**os.environ, "KVTIER_DEV_DIR": str(state)}
    up = subprocess.run(
        [sys.executable, "-m", "kvtier.cli", "dev", "up"], env=env, capture_output=True, text=True
    )
    try:
        assert up.returncode == 0, up.stderr
        assert f"export KUBECONFIG={state / 'kubeconfig'}" in up.stdout
        bin_dir = Path(up.stdout.split("PATH=")[1].split(":")[0])
        version = subprocess.run(
            [str(bin_dir / "kubectl"), "get", "--raw", "/version"],
            env={**env, "KUBECONFIG": str(state / "kubeconfig")},
            capture_output=True,
            text=True,
        )
        assert '"gitVersion": "v1.34.4"' in version.stdout
        assert _processes_under(state), "etcd and kube-apiserver run under the state folder"
    finally:
        down = subprocess.run(
            [sys.executable, "-m", "kvtier.cli", "dev", "down"], env=env, capture_output=True, text=True
        )
    assert down.returncode == 0
    assert not _processes_under(state)
    assert not state.exists()


def test_dev_up_operator_installs_the_chart_with_a_working_webhook(tmp_path):
    import base64

    import yaml
    from kubernetes import client, config

    from tests.support import REPO, eventually

    state = tmp_path / "dev"
    env = {**os.environ, "KVTIER_DEV_DIR": str(state)}
    up = subprocess.run(
        [sys.executable, "-m", "kvtier.cli", "dev", "up", "--operator"],
        env=env,
        capture_output=True,
        text=True,
    )
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        kube = config.new_client_from_config(str(state / "kubeconfig"))
        adm = client.AdmissionregistrationV1Api(kube)
        eventually(
            lambda: (
                adm.read_mutating_webhook_configuration("kvtier-inject").webhooks[0].client_config.ca_bundle
            ),
            timeout=90,  # the operator starts kopf and its webhook server: slow on a loaded 2-core machine
            message="the local operator patched the chart's webhook caBundle",
        )
        ca = base64.b64decode(
            adm.read_mutating_webhook_configuration("kvtier-inject").webhooks[0].client_config.ca_bundle
        )
        assert ca.startswith(b"-----BEGIN CERTIFICATE-----")
        pool = yaml.safe_load((REPO / "examples" / "gpu-node-pool.yaml").read_text())
        client.CustomObjectsApi(kube).create_cluster_custom_object(
            "kvtier.io", "v1alpha1", "kvcachepools", pool
        )
        client.CoreV1Api(kube).create_namespace(
            {"metadata": {"name": "team-a", "labels": {"kvtier.io/tenant": "true"}}}
        )
        body = {
            "metadata": {
                "name": "llm",
                "labels": {"kvtier.io/inject": "true"},
                "annotations": {"kvtier.io/pool": "fast"},
            },
            "spec": {"containers": [{"name": "app", "image": "python:3.12"}]},
        }

        def injected():
            pod = client.CoreV1Api(kube).create_namespaced_pod("team-a", body)
            if (pod.metadata.annotations or {}).get("kvtier.io/injected"):
                return pod
            client.CoreV1Api(kube).delete_namespaced_pod("llm", "team-a", grace_period_seconds=0)
            return None

        eventually(injected, timeout=90, message="a pod injected by the chart's webhook")
    finally:
        down = subprocess.run(
            [sys.executable, "-m", "kvtier.cli", "dev", "down"], env=env, capture_output=True, text=True
        )
        assert down.returncode == 0
    assert not _processes_under(state)
