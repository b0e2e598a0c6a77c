"""Which pools a cluster event concerns, so the operator recomputes only those (no I/O, no kopf).

The operator's watch-fed indexes hold the objects; `Fleet` holds what each pool's status was last
computed from (its selected nodes and whether each is cordoned) and answers, for a Node or pool
event, which pools now see something different. A Node's status heartbeat, an unrelated label or
another pool's status write concerns no pool at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from kvtier.operator.status import node_matches

Selector = Mapping[str, str] | None


@dataclass(frozen=True)
class NodeView:
    """The part of a Node a pool's status depends on."""

    labels: Mapping[str, str]
    unschedulable: bool = False


@dataclass
class Fleet:
    selectors: dict[str, dict[str, str]] = field(default_factory=dict)  # pool -> nodeSelector
    members: dict[str, dict[str, bool]] = field(default_factory=dict)  # pool -> {node: cordoned}
    pools_of: dict[str, set[str]] = field(default_factory=dict)  # node -> pools selecting it

    def set_pool(self, pool: str, selector: Selector, nodes: Mapping[str, NodeView]) -> set[str]:
        """A pool appeared or its nodeSelector changed. Returns the pools whose status changes:
        this one, and every pool that shares (or shared) a node with it (conflicts)."""
        selector = dict(selector or {})
        if pool in self.selectors and self.selectors[pool] == selector:
            return set()
        before = set(self.members.get(pool, {}))
        self.selectors[pool] = selector
        self.members[pool] = {
            name: view.unschedulable for name, view in nodes.items() if node_matches(selector, view.labels)
        }
        for name in before - set(self.members[pool]):
            self.pools_of.get(name, set()).discard(pool)
        for name in self.members[pool]:
            self.pools_of.setdefault(name, set()).add(pool)
        return {pool} | self._sharing(before | set(self.members[pool]))

    def remove_pool(self, pool: str) -> set[str]:
        before = set(self.members.pop(pool, {}))
        self.selectors.pop(pool, None)
        for name in before:
            self.pools_of.get(name, set()).discard(pool)
        return self._sharing(before)

    def set_node(self, name: str, view: NodeView | None) -> set[str]:
        """A Node was added, changed or (view None) deleted. Returns the pools whose selected nodes
        or cordoned nodes changed, and the pools sharing a node with them."""
        changed = set()
        for pool, selector in self.selectors.items():
            now_in = view is not None and node_matches(selector, view.labels)
            was = self.members[pool].get(name)
            if now_in and was != view.unschedulable:  # type: ignore[union-attr]
                self.members[pool][name] = view.unschedulable  # type: ignore[union-attr]
                self.pools_of.setdefault(name, set()).add(pool)
                changed.add(pool)
            elif not now_in and was is not None:
                del self.members[pool][name]
                self.pools_of.get(name, set()).discard(pool)
                changed.add(pool)
        if not changed:
            return set()
        return changed | self.pools_of.get(name, set())

    def selected(self, pool: str) -> list[str]:
        return sorted(self.members.get(pool, {}))

    def cordoned(self, pool: str) -> list[str]:
        return sorted(n for n, cordoned in self.members.get(pool, {}).items() if cordoned)

    def conflicts(self, pool: str) -> dict[str, list[str]]:
        """Nodes this pool shares with other pools: {node: [other pools]}."""
        out = {}
        for name in self.members.get(pool, {}):
            others = self.pools_of.get(name, set()) - {pool}
            if others:
                out[name] = sorted(others)
        return out

    def _sharing(self, nodes: Iterable[str]) -> set[str]:
        return {p for name in nodes for p in self.pools_of.get(name, set())}
