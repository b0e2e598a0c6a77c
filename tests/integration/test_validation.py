"""Validation that protects data: the API server (the CRD's CEL rules) and the pydantic models refuse
the same pools, each with a message that says what to fix."""

from __future__ import annotations

import json
import uuid

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from kvtier.api import v1alpha1 as api

pytestmark = pytest.mark.integration
POOL_ARGS = (api.GROUP, api.VERSION, "kvcachepools")


def _nvme(path: str) -> dict:
    return {"tiers": {"dram": {"size": "1Gi"}, "nvme": {"size": "1Ti", "mode": "file", "path": path}}}


def _dram(size) -> dict:
    return {"tiers": {"dram": {"size": size}}}


REFUSED = [
    (_nvme("/"), "absolute path to a file"),
    (_nvme("/etc/passwd"), "system folder"),
    (_nvme("/dev/sda"), "system folder"),
    (_nvme("/proc/self/mem"), "system folder"),
    (_nvme("/var/lib/kubelet/pods/x"), "system folder"),
    (_nvme("/mnt/../etc/shadow"), "'..' segments"),
    (_nvme("/mnt/nvme0/./cache"), "'..' segments"),
    (_nvme("relative/cache.img"), "absolute path"),
    (_nvme("/mnt/nvme0/cache\x01.img"), "control characters"),
    (_nvme("/mnt/nvme0/cache\n.img"), "control characters"),
    (_dram("1e1000000"), "positive quantity of at most 1Ei"),
    (_dram("2Ei"), "positive quantity of at most 1Ei"),
    (_dram(" 64Gi "), "without spaces"),
    (_dram("1"), "at least 16Mi"),
    (_dram(1), "at least 16Mi"),
    (_dram("1.2.3"), "positive quantity"),
    ({**_dram("1Gi"), "tenancy": {"dramShare": 0}}, "dramShare"),
    ({**_dram("1Gi"), "limits": {"peerPreAuthFrameBytes": 1 << 30}}, "peerPreAuthFrameBytes"),
]
ACCEPTED = [_nvme("/mnt/nvme0/kvtier/fast.cache"), _dram("64Gi"), _dram(17 << 20), _dram("16Mi")]


def _body(name: str, spec: dict) -> dict:
    return {"apiVersion": api.API_VERSION, "kind": "KVCachePool", "metadata": {"name": name}, "spec": spec}


def _api_server_refusal(kube, body: dict) -> str | None:
    custom = client.CustomObjectsApi(kube)
    try:
        custom.create_cluster_custom_object(*POOL_ARGS, body)
    except ApiException as exc:
        assert exc.status == 422, exc.body
        return json.loads(exc.body)["message"]
    custom.delete_cluster_custom_object(*POOL_ARGS, body["metadata"]["name"])
    return None


@pytest.mark.parametrize(("spec", "message"), REFUSED, ids=[f"{i}-{m}" for i, (_, m) in enumerate(REFUSED)])
def test_api_server_and_models_refuse_alike(kube, crds_installed, spec, message):
    body = _body(f"bad-{uuid.uuid4().hex[:6]}", spec)
    refusal = _api_server_refusal(kube, body)
    assert refusal is not None and message in refusal, refusal
    with pytest.raises(ValidationError, match=message.replace(".", r"\.")):
        api.KVCachePool.model_validate(body)


@pytest.mark.parametrize("spec", ACCEPTED)
def test_api_server_and_models_accept_alike(kube, crds_installed, spec):
    body = _body(f"ok-{uuid.uuid4().hex[:6]}", spec)
    assert _api_server_refusal(kube, body) is None
    api.KVCachePool.model_validate(body)


@pytest.mark.parametrize("name", ["a" * 51, "with.dot", "x" * 63])
def test_pool_names_that_would_break_child_names_are_refused(kube, crds_installed, name):
    body = _body(name, _dram("1Gi"))
    refusal = _api_server_refusal(kube, body)
    assert refusal is not None and "at most 50 characters" in refusal, refusal
    with pytest.raises(ValidationError, match="at most 50 characters"):
        api.KVCachePool.model_validate(body)
    ok = _body("a" * 44 + uuid.uuid4().hex[:6], _dram("1Gi"))  # 50 characters, unique per case
    assert _api_server_refusal(kube, ok) is None


@pytest.mark.parametrize(("before", "after"), [("namespace", "shared"), ("shared", "namespace")])
def test_a_pools_isolation_cannot_change(kube, crds_installed, before, after):
    """Blocks on NVMe outlive the change, and under the other isolation the namespace called
    `shared` and the shared key space are one: its private blocks would be read by every namespace
    (or it would read everyone's). The API server refuses the change; other tenancy edits pass."""
    custom = client.CustomObjectsApi(kube)
    name = f"iso-{uuid.uuid4().hex[:6]}"
    custom.create_cluster_custom_object(
        *POOL_ARGS, _body(name, {**_dram("1Gi"), "tenancy": {"isolation": before}})
    )
    try:
        with pytest.raises(ApiException) as exc:
            custom.patch_cluster_custom_object(*POOL_ARGS, name, {"spec": {"tenancy": {"isolation": after}}})
        assert exc.value.status == 422 and "tenancy.isolation is immutable" in exc.value.body
        custom.patch_cluster_custom_object(*POOL_ARGS, name, {"spec": {"tenancy": {"dramShare": 0.25}}})
    finally:
        custom.delete_cluster_custom_object(*POOL_ARGS, name)
