"""The node tier: kvtier's chart on a real one-node Kubernetes (containerd, kubelet, CNI) started
once for the whole session. Skipped, with the reason, where this machine cannot run containers."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest


@dataclass
class NodeSession:
    cluster: object  # kvtier.dev.cluster.Cluster
    node: object  # kvtier.dev.node.LocalNode
    image: str
    timings: dict[str, float] = field(default_factory=dict)

    def kubectl(self, *args: str, **kw) -> str:
        return self.cluster.kubectl(*args, **kw)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from kvtier.dev.node import cannot_run_containers

    reason = cannot_run_containers()
    if reason:
        for item in items:
            if item.get_closest_marker("node"):
                item.add_marker(pytest.mark.skip(reason=f"cannot run containers here: {reason}"))


@pytest.fixture(scope="session")
def node_session() -> Iterator[NodeSession]:
    from kvtier.dev import node
    from kvtier.dev.cluster import Cluster
    from kvtier.dev.image import build_kvtier_image
    from kvtier.dev.tools import ensure_tools

    timings: dict[str, float] = {}
    t0 = time.monotonic()
    bin_dir = ensure_tools(quiet=True, node=True)
    image = build_kvtier_image()
    timings["tools_and_image_s"] = time.monotonic() - t0
    t0 = time.monotonic()
    state = Path(tempfile.mkdtemp(prefix="kvtier-node-"))
    started = node.up(state, bin_dir, [image], log=lambda *_: None)
    timings["node_up_s"] = time.monotonic() - t0
    try:
        yield NodeSession(Cluster(started.cp), started, image.ref, timings)
    finally:
        t0 = time.monotonic()
        node.down(started, log=lambda *_: None)
        timings["node_down_s"] = time.monotonic() - t0
        left = node.leftovers()
        assert not any(left.values()), f"the node left {left}"
