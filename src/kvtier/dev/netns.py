"""Separate network namespaces standing in for nodes on one machine (tests, `kvtier bench transport`).

Each "node" is a network namespace with one veth interface and a private address; the other ends
sit on a bridge in a hub namespace of their own, so nothing is added to the machine's own network
namespace and everything goes away with `close()`. Needs root (CAP_NET_ADMIN) and iproute2.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field

SUBNET = "10.231.77"  # addresses exist only inside the namespaces made here


class NetnsUnavailable(Exception):
    """Network namespaces cannot be made here (no root, no iproute2, a sandbox refusing them)."""


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode:
        raise NetnsUnavailable(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")


@dataclass
class Nodes:
    names: list[str]
    addresses: list[str]
    hub: str
    shaped: list[str] = field(default_factory=list)

    def argv(self, index: int) -> list[str]:
        """Prefix that runs a command inside node `index`."""
        return ["ip", "netns", "exec", self.names[index]]

    def run(self, index: int, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([*self.argv(index), *argv], capture_output=True, text=True)

    def limit_rate(self, index: int, rate: str) -> None:
        """Slow node `index`'s outgoing traffic (tc tbf), e.g. '200mbit'."""
        done = self.run(
            index, "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate, "burst", "256kb",
            "latency", "400ms",
        )  # fmt: skip
        if done.returncode:
            raise NetnsUnavailable(f"tc: {done.stderr.strip()}")

    def close(self) -> None:
        for name in [*self.names, self.hub]:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def make_nodes(count: int) -> Nodes:
    """`count` namespaces on one private bridge: node i is at 10.231.77.(i+1)."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        raise NetnsUnavailable("network namespaces need root and iproute2")
    tag = uuid.uuid4().hex[:6]
    nodes = Nodes(
        [f"kvt-{tag}-{i}" for i in range(count)],
        [f"{SUBNET}.{i + 1}" for i in range(count)],
        f"kvt-{tag}-hub",
    )
    try:
        _ip("netns", "add", nodes.hub)
        _ip("-n", nodes.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", nodes.hub, "link", "set", "br0", "up")
        for i, (name, address) in enumerate(zip(nodes.names, nodes.addresses, strict=True)):
            _ip("netns", "add", name)
            _ip(
                "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", f"v{i}", "netns", nodes.hub
            )
            _ip("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", name, "link", "set", "eth0", "up")
            _ip("-n", name, "link", "set", "lo", "up")
            _ip("-n", nodes.hub, "link", "set", f"v{i}", "master", "br0")
            _ip("-n", nodes.hub, "link", "set", f"v{i}", "up")
    except NetnsUnavailable:
        nodes.close()
        raise
    return nodes
