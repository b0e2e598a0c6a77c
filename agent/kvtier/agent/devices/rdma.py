"""RDMA discovery: the node's RDMA devices and ports (state, link layer, active MTU, GIDs).

Read through pyverbs (rdma-core's Python binding) where it is installed, else from rdma-core's
`ibv_devinfo -v` through the command seam (`runner`); both report the same verbs port attributes,
so tests replay recorded `ibv_devinfo -v` output of real devices. The result goes into the
KVCacheNode's `transport` status and metrics, and decides whether UCX may use RDMA transports.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from kvtier.agent.devices.runner import Runner, SubprocessRunner
from kvtier.api.v1alpha1 import RdmaPort

# verbs enums (infiniband/verbs.h), as pyverbs returns them
PORT_STATES = {0: "NOP", 1: "DOWN", 2: "INIT", 3: "ARMED", 4: "ACTIVE", 5: "ACTIVE_DEFER"}
LINK_LAYERS = {0: "InfiniBand", 1: "InfiniBand", 2: "Ethernet"}  # 0 is "unspecified": InfiniBand
MTUS = {1: 256, 2: 512, 3: 1024, 4: 2048, 5: 4096}

_HCA = re.compile(r"^hca_id:\s*(\S+)")
_PORT = re.compile(r"^\s+port:\s*(\d+)")
_FIELD = re.compile(r"^\s+(state|active_mtu|link_layer):\s*(\S+)(?:\s*\((\d+)\))?")
_GID = re.compile(r"^\s+GID\[\s*\d+\]:\s*([^,\s]+)")


def discover(runner: Runner | None = None) -> tuple[list[RdmaPort], str | None]:
    """The node's RDMA ports, or [] and the reason none are listed."""
    try:
        from pyverbs.device import get_device_list  # noqa: F401 - only to learn it is there
    except Exception:
        pyverbs_missing = True
    else:
        pyverbs_missing = False
        try:
            return _from_pyverbs_or_reason()
        except Exception as exc:  # a broken rdma-core must not stop the agent
            return [], f"pyverbs could not query the RDMA devices: {exc}"
    code, out = (runner or SubprocessRunner(timeout=10)).run(["ibv_devinfo", "-v"])
    if code == 0:
        ports = parse_ibv_devinfo(out)
        return ports, None if ports else "no RDMA device on this node"
    if pyverbs_missing and code == 127:
        return [], "no RDMA tooling in this image (neither pyverbs nor ibv_devinfo)"
    return [], f"ibv_devinfo: {out.strip()[:200] or f'exit {code}'}"


def _from_pyverbs_or_reason() -> tuple[list[RdmaPort], str | None]:  # pragma: no cover - needs a device
    from pyverbs.device import Context, get_device_list

    ports: list[RdmaPort] = []
    for dev in get_device_list():
        with Context(name=dev.name.decode()) as ctx:
            ports += ports_of(dev.name.decode(), ctx)
    return ports, None if ports else "no RDMA device on this node"


def ports_of(device: str, ctx: Any) -> list[RdmaPort]:
    """One device's ports from a pyverbs `Context` (query_device, query_port, query_gid)."""
    ports = []
    for number in range(1, ctx.query_device().phys_port_cnt + 1):
        attr = ctx.query_port(number)
        gids = []
        for index in range(attr.gid_tbl_len):
            try:
                gid = gid_text(str(ctx.query_gid(number, index).gid))
            except Exception:
                break  # past the populated entries (RoCE tables are sparse at the end)
            if gid != "::":
                gids.append(gid)
        ports.append(
            RdmaPort(
                device=device,
                port=number,
                state=PORT_STATES.get(attr.state, str(attr.state)),
                linkLayer=LINK_LAYERS.get(attr.link_layer, str(attr.link_layer)),
                activeMtu=MTUS.get(attr.active_mtu),
                gids=gids,
            )
        )
    return ports


def parse_ibv_devinfo(text: str) -> list[RdmaPort]:
    """Ports from `ibv_devinfo [-v]` output (GIDs are listed with -v only)."""
    ports: list[dict[str, Any]] = []
    device = ""
    for line in text.splitlines():
        if m := _HCA.match(line):
            device = m.group(1)
        elif m := _PORT.match(line):
            ports.append({"device": device, "port": int(m.group(1)), "gids": []})
        elif ports and (m := _FIELD.match(line)):
            name, value, code = m.groups()
            if name == "state":
                ports[-1]["state"] = PORT_STATES.get(int(code), value) if code else value
            elif name == "active_mtu":
                ports[-1]["activeMtu"] = int(value)
            else:
                ports[-1]["linkLayer"] = value
        elif ports and (m := _GID.match(line)):
            ports[-1]["gids"].append(gid_text(m.group(1)))
    return [RdmaPort.model_validate({"state": "UNKNOWN", "linkLayer": "InfiniBand", **p}) for p in ports]


def gid_text(raw: str) -> str:
    """One spelling for a GID whichever tool printed it (IPv4-mapped RoCE GIDs keep their IPv4)."""
    try:
        addr = ipaddress.IPv6Address(raw)
    except ValueError:
        return raw
    return f"::ffff:{addr.ipv4_mapped}" if addr.ipv4_mapped else str(addr)
