"""Least privilege, asked of the real API server: the chart's and the operator's ServiceAccounts
(operator, CSI node plugin, each pool's agents) hold exactly the verbs docs/install.md lists, as
`kubectl auth can-i --list --as=system:serviceaccount:...` reports them (SelfSubjectRulesReview).
The per-pool agent RBAC is applied as the operator itself, so the operator can grant it."""

from __future__ import annotations

import re
import subprocess
import uuid

import pytest
import yaml
from kubernetes import client

from kvtier.api import v1alpha1 as api
from kvtier.operator.render import render_pool, secret_name
from tests.support import REPO, kubectl

pytestmark = pytest.mark.integration
RBAC_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
ALL = {"get", "list", "watch", "create", "update", "patch", "delete"}
ROW = re.compile(r"^(\S*?)\s*\[(.*?)\]\s+\[(.*?)\]\s+\[(.*?)\]$")


def expected(fullname: str) -> dict[str, dict[tuple[str, str], set[str]]]:
    """Account -> (resource, resourceNames) -> verbs: the table of docs/install.md."""
    kv = {(r, ""): set(ALL) for r in ("kvcachepools.kvtier.io", "kvcachepools.kvtier.io/status",
                                      "kvcachenodes.kvtier.io", "kvcachenodes.kvtier.io/status")}  # fmt: skip
    return {
        "operator": {
            **kv,
            ("nodes", ""): {"get", "list", "watch"},
            ("namespaces", ""): {"get", "list", "watch"},
            ("events", ""): {"create", "patch"},
            ("events.events.k8s.io", ""): {"create", "patch"},
            ("clusterroles.rbac.authorization.k8s.io", ""): {"get", "create", "patch", "update", "delete"},
            ("clusterrolebindings.rbac.authorization.k8s.io", ""): {"get", "create", "patch", "update", "delete"},
            ("customresourcedefinitions.apiextensions.k8s.io", ""): {"get", "list", "watch"},
            ("mutatingwebhookconfigurations.admissionregistration.k8s.io", f"{fullname}-inject"): {"get", "patch"},
            ("daemonsets.apps", ""): set(ALL),
            ("networkpolicies.networking.k8s.io", ""): {"get", "create", "patch", "update", "delete"},
            **{(r, ""): set(ALL) for r in ("configmaps", "services", "serviceaccounts", "secrets")},
        },
        "csi": {("kvcachepools.kvtier.io", ""): {"get"}, ("namespaces", ""): {"get"}},
        "agent": {("kvcachenodes.kvtier.io", ""): {"get", "list", "create"}, ("kvcachenodes.kvtier.io/status", ""): {"patch"},
                  ("nodes", ""): {"get", "list", "watch"}},
    }  # fmt: skip


def rules(control_plane, ns: str, account: str) -> dict[tuple[str, str], set[str]]:
    out = kubectl(
        control_plane, "auth", "can-i", "--list", "-n", ns, f"--as=system:serviceaccount:{ns}:{account}"
    )
    table: dict[tuple[str, str], set[str]] = {}
    for line in out.stdout.splitlines()[1:]:
        m = ROW.match(line.strip())
        assert m, line
        resource, urls, names, verbs = m.groups()
        if urls:
            continue  # non-resource URLs (discovery, health) granted to every authenticated user
        table.setdefault((resource, names), set()).update(verbs.split())
    return table


def can(control_plane, ns: str, account: str, *what: str) -> bool:
    out = kubectl(
        control_plane,
        "auth",
        "can-i",
        *what,
        "-n",
        ns,
        f"--as=system:serviceaccount:{ns}:{account}",
        check=False,
    )
    return out.stdout.strip() == "yes"


def test_each_account_holds_exactly_the_listed_verbs(control_plane, kube, crds_installed):
    tag = uuid.uuid4().hex[:6]
    release, ns = f"rb-{tag}", f"rbac-{tag}"
    fullname = f"{release}-kvtier"
    core = client.CoreV1Api(kube)
    core.create_namespace({"metadata": {"name": ns}})
    core.create_namespaced_service_account(ns, {"metadata": {"name": "nobody"}})
    rendered = helm_template(control_plane, release, ns)
    workloads = {
        d["metadata"]["name"]: d
        for d in yaml.safe_load_all(rendered)
        if d and d["kind"] in ("Deployment", "DaemonSet")
    }
    assert (
        workloads[f"{fullname}-operator"]["spec"]["template"]["spec"]["serviceAccountName"]
        == f"{fullname}-operator"
    )
    assert workloads[f"{fullname}-csi"]["spec"]["template"]["spec"]["serviceAccountName"] == f"{fullname}-csi"
    docs = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] in RBAC_KINDS]
    kubectl(control_plane, "apply", "-f", "-", input=yaml.safe_dump_all(docs))

    pool_name = f"rb-{tag}"
    body = {"apiVersion": api.API_VERSION, "kind": "KVCachePool", "metadata": {"name": pool_name},
            "spec": {"nodeSelector": {"kvtier.test/rbac": tag}, "tiers": {"dram": {"size": "64Mi"}}}}  # fmt: skip
    made = client.CustomObjectsApi(kube).create_cluster_custom_object(
        api.GROUP, api.VERSION, "kvcachepools", body
    )
    pool = api.KVCachePool.model_validate(made)
    rendered_pool = render_pool(pool, made["metadata"]["uid"], ns)
    (agents,) = [m for m in rendered_pool if m["kind"] == "DaemonSet"]
    assert agents["spec"]["template"]["spec"]["serviceAccountName"] == f"kvtier-agent-{pool_name}"
    agent_rbac = [m for m in rendered_pool if m["kind"] in RBAC_KINDS]
    as_operator = kubectl(
        control_plane, "apply", "--server-side", "--field-manager=kvtier-operator",
        f"--as=system:serviceaccount:{ns}:{fullname}-operator", "-f", "-",
        input=yaml.safe_dump_all(agent_rbac), check=False,
    )  # fmt: skip
    assert as_operator.returncode == 0, f"the operator cannot grant its agents' RBAC: {as_operator.stderr}"

    baseline = rules(control_plane, ns, "nobody")  # what every account has (self reviews)
    accounts = {
        "operator": f"{fullname}-operator",
        "csi": f"{fullname}-csi",
        "agent": f"kvtier-agent-{pool_name}",
    }
    want = expected(fullname)
    for role, account in accounts.items():
        got = {k: v for k, v in rules(control_plane, ns, account).items() if baseline.get(k) != v}
        assert got == want[role], f"{role} ({account}): {got}"

    secret = secret_name(pool_name)
    assert can(control_plane, ns, accounts["operator"], "get", f"secrets/{secret}")
    for role in ("csi", "agent"):
        assert not can(control_plane, ns, accounts[role], "get", f"secrets/{secret}"), (
            f"{role} reads no Secret"
        )
        assert not can(control_plane, ns, accounts[role], "list", "secrets"), role
        assert not can(control_plane, ns, accounts[role], "create", "daemonsets.apps"), role
        assert not can(control_plane, ns, accounts[role], "create", "clusterrolebindings"), role


def helm_template(control_plane, release: str, ns: str) -> str:
    return subprocess.run(
        [str(control_plane.bin_dir / "helm"), "template", release, str(REPO / "charts" / "kvtier"),
         "-n", ns, "--kube-version", "1.34.4"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
