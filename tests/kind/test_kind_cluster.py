"""On a real cluster with nodes (kind, for users who have Docker): the CRDs install, a pool is
accepted and the operator's rendered DaemonSet is valid for a real scheduler. Skipped without Docker."""

from __future__ import annotations

import pytest

from kvtier.api.crds import all_crds
from kvtier.operator.render import render_pool
from tests.support import REPO

pytestmark = pytest.mark.kind


def test_crds_and_rendered_children_apply_on_kind(kind_cluster):  # fixture from pytest-kind
    import yaml

    from kvtier.api import v1alpha1 as api

    for crd in all_crds():
        kind_cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(crd))
    kind_cluster.kubectl("apply", "-f", str(REPO / "examples" / "gpu-node-pool.yaml"))
    pool = api.KVCachePool.model_validate(
        yaml.safe_load((REPO / "examples" / "gpu-node-pool.yaml").read_text())
    )
    kind_cluster.kubectl("create", "namespace", "kvtier-system")
    for manifest in render_pool(pool, "00000000-0000-0000-0000-000000000000", "kvtier-system"):
        manifest["metadata"].pop("ownerReferences", None)
        kind_cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump(manifest))
