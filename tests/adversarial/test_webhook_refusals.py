"""The pod webhook through the real API server, fed what a careless or hostile user writes: every
refusal is a 4xx naming the problem, pool names are checked before any API call, PYTHONPATH
survives whatever its source, a pod cannot declare itself injected or clash with the injected
names, and the chart's ValidatingAdmissionPolicy stops UPDATEs that change what kvtier injected."""

from __future__ import annotations

import copy
import subprocess
import time
import uuid

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.integration import test_webhook as hooks
from tests.integration.test_webhook import _create, _namespace, _pod
from tests.support import REPO, eventually

webhook = hooks.webhook  # that module's fixture: a pool and the live webhook configuration

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def live(kube, webhook) -> str:
    """The pool's name, once the webhook injects pods: until the operator's webhook server is up,
    failurePolicy Ignore lets pods through untouched."""
    ns = _namespace(kube, {"kvtier.io/tenant": "true"})

    def injected() -> bool:
        pod = _create(kube, ns, _named(_pod(webhook), f"warmup-{uuid.uuid4().hex[:6]}"))
        return "kvtier.io/injected" in (pod.metadata.annotations or {})

    eventually(injected, timeout=60, interval=0.5, message="the webhook injects pods")
    return webhook


def _refused(kube, ns: str, body: dict) -> ApiException:
    with pytest.raises(ApiException) as err:
        client.CoreV1Api(kube).create_namespaced_pod(ns, body)
    return err.value


def _named(pod: dict, name: str) -> dict:
    pod = copy.deepcopy(pod)
    pod["metadata"]["name"] = name
    return pod


@pytest.mark.parametrize("pool", ["..", ".", "fast/status", "x%2F", "Upper", "a" * 300])
def test_pool_names_that_are_not_kubernetes_names_are_a_400(kube, live, pool):
    ns = _namespace(kube, {"kvtier.io/tenant": "true"})
    err = _refused(kube, ns, _pod(pool))
    assert err.status == 400, err.body
    assert "is not a Kubernetes name" in err.body and "kvtier.io/pool" in err.body
    assert "validation error" not in err.body and "Traceback" not in err.body and len(err.body) < 1500


def test_pythonpath_is_kept_whatever_its_source(kube, live):
    ns = _namespace(kube, {"kvtier.io/tenant": "true"})
    pod = _pod(live)
    engine = pod["spec"]["containers"][0]
    engine["env"] = [{"name": "PYTHONPATH", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    pod["spec"]["containers"].append(
        {"name": "empty", "image": "busybox", "env": [{"name": "PYTHONPATH", "value": ""}]}
    )
    pod["spec"]["containers"].append(
        {"name": "plain", "image": "busybox", "env": [{"name": "PYTHONPATH", "value": "/app"}]}
    )
    created = _create(kube, ns, pod)
    env = {c.name: [(e.name, e.value, bool(e.value_from)) for e in c.env] for c in created.spec.containers}
    assert env["vllm"][:2] == [
        ("KVTIER_USER_PYTHONPATH", None, True),
        ("PYTHONPATH", "/opt/kvtier-lib:$(KVTIER_USER_PYTHONPATH)", False),
    ], "the user's valueFrom is kept and still on the path"
    assert ("PYTHONPATH", "/opt/kvtier-lib", False) in env["empty"]
    assert ("PYTHONPATH", "/opt/kvtier-lib:/app", False) in env["plain"]


def test_a_pod_cannot_declare_itself_injected(kube, live):
    ns = _namespace(kube, {"kvtier.io/tenant": "true"})
    forged = _pod(live)
    forged["metadata"]["annotations"]["kvtier.io/injected"] = f"pool={live}"
    err = _refused(kube, ns, forged)
    assert err.status == 400 and "only the webhook sets them" in err.body
    # a kvtier-prefetch container of its own, without the record, is refused the same way
    own = _pod(live)
    own["spec"]["initContainers"] = [{"name": "kvtier-prefetch", "image": "evil", "restartPolicy": "Always"}]
    assert _refused(kube, ns, own).status == 400


@pytest.mark.parametrize(
    "where, clash",
    [
        ("volumes", {"name": "kvtier-socket", "emptyDir": {}}),
        ("volumes", {"name": "kvtier-lib", "emptyDir": {}}),
        ("initContainers", {"name": "kvtier-stage", "image": "busybox"}),
        ("containers", {"name": "kvtier-stage", "image": "busybox"}),
    ],
)
def test_names_that_clash_with_the_injected_ones_are_refused_by_name(kube, live, where, clash):
    ns = _namespace(kube, {"kvtier.io/tenant": "true"})
    pod = _pod(live)
    pod["spec"].setdefault(where, []).append(clash)
    err = _refused(kube, ns, pod)
    assert err.status == 400 and f"'{clash['name']}'" in err.body and "which kvtier injects" in err.body


def test_updates_cannot_change_what_kvtier_injected(kube, control_plane, live):
    release = f"vap-{uuid.uuid4().hex[:6]}"
    rendered = subprocess.run(
        [str(control_plane.bin_dir / "helm"), "template", release, str(REPO / "charts" / "kvtier"),
         "--kube-version", "1.34.4", "-s", "templates/policy.yaml"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    adm = client.AdmissionregistrationV1Api(kube)
    policy, binding = docs
    adm.create_validating_admission_policy(policy)
    adm.create_validating_admission_policy_binding(binding)
    try:
        ns = _namespace(kube, {"kvtier.io/tenant": "true"})
        _create(kube, ns, _pod(live))
        core = client.CoreV1Api(kube)
        sidecar_at = next(
            i
            for i, c in enumerate(core.read_namespaced_pod("llm", ns).spec.init_containers)
            if c.name == "kvtier-prefetch"
        )
        probe = _create(kube, ns, _named(_pod(live), "probe"))
        assert probe.metadata.annotations["kvtier.io/injected"]
        deadline = time.monotonic() + 30  # enforced once the API server has loaded the policy
        while True:
            try:
                core.patch_namespaced_pod(
                    "probe", ns, {"metadata": {"annotations": {"kvtier.io/pool": uuid.uuid4().hex}}}
                )
            except ApiException as exc:
                assert exc.status in (403, 422), exc.body
                break
            assert time.monotonic() < deadline, "the policy never refused a changed pool annotation"
            time.sleep(0.5)
        forbidden = [
            [{"op": "replace", "path": "/metadata/annotations/kvtier.io~1pool", "value": "other-pool"}],
            [{"op": "remove", "path": "/metadata/annotations/kvtier.io~1injected"}],
            [{"op": "replace", "path": f"/spec/initContainers/{sidecar_at}/image", "value": "evil:latest"}],
        ]
        for ops in forbidden:
            with pytest.raises(ApiException) as err:
                core.patch_namespaced_pod("llm", ns, ops)
            assert err.value.status in (403, 422) and "cannot change" in err.value.body, err.value.body
        # the engine's own image and other annotations stay the user's to change
        core.patch_namespaced_pod(
            "llm", ns, [{"op": "replace", "path": "/spec/containers/0/image", "value": "vllm:next"}]
        )
        core.patch_namespaced_pod("llm", ns, {"metadata": {"annotations": {"team": "a"}}})
    finally:
        adm.delete_validating_admission_policy_binding(binding["metadata"]["name"])
        adm.delete_validating_admission_policy(policy["metadata"]["name"])
