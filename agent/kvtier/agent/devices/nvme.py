"""NVMe devices for the NVMe tier: discovery, selection, in-use checks, namespace lifecycle.

Everything is read from nvme-cli and lsblk JSON through the runner seam. The flow for a pool is
`discover` -> `select` -> `prepare_namespace` (namespace mode) or `prepare_partition` (partition
mode), returning the block device the tier opens with O_DIRECT plus what to report in the
KVCacheNode. Namespaces the agent creates are recorded in its state folder, so a restart (or a
second run) adopts them instead of creating more; a device that holds a filesystem, is mounted, or
has partitions is refused unless the pool says `allowInUse`.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvtier.agent.devices.runner import CommandError, Runner, run_json, run_text
from kvtier.api.v1alpha1 import DeviceSelector, NvmeDevice

OACS_NS_MGMT = 1 << 3  # Identify Controller, Optional Admin Command Support: namespace management
LBA_4K = 12  # lbaf "ds" (log2 of the data size) of a 4096-byte format


@dataclass
class Namespace:
    path: str
    nsid: int
    size_bytes: int
    sector_size: int
    in_use: str | None = None  # why it must not be touched, if it must not


@dataclass
class Controller:
    path: str
    model: str
    serial: str
    firmware: str = ""
    cntlid: int = 0
    ns_management: bool = False
    total_bytes: int = 0
    unallocated_bytes: int = 0
    namespaces: list[Namespace] = field(default_factory=list)


class NvmeError(Exception):
    """The pool's NVMe request cannot be met on this node; the message goes to the KVCacheNode."""


# --------------------------------------------------------------------------------- discovery


def _controller_of(ns_path: str) -> str:
    return re.sub(r"n\d+$", "", ns_path)  # /dev/nvme0n1 -> /dev/nvme0


def _list_entries(listing: dict[str, Any]) -> list[dict[str, Any]]:
    """Namespaces from `nvme list -o json`, flat (nvme-cli 1.x and 2.x) or verbose (2.x -v)."""
    out: list[dict[str, Any]] = []
    for dev in listing.get("Devices", []):
        if "DevicePath" in dev:
            out.append(dev)
            continue
        for subsystem in dev.get("Subsystems", []):  # verbose: hosts -> subsystems -> controllers
            for ctrl in subsystem.get("Controllers", []):
                for ns in ctrl.get("Namespaces", []) + subsystem.get("Namespaces", []):
                    out.append(
                        {
                            "DevicePath": f"/dev/{ns['NameSpace']}",
                            "NameSpace": ns.get("NSID"),
                            "ModelNumber": ctrl.get("ModelNumber", ""),
                            "SerialNumber": ctrl.get("SerialNumber", ""),
                            "Firmware": ctrl.get("Firmware", ""),
                            "PhysicalSize": ns.get("PhysicalSize", 0),
                            "SectorSize": ns.get("SectorSize", 512),
                            "Controller": f"/dev/{ctrl['Controller']}",
                        }
                    )
    return out


def in_use_reason(runner: Runner, path: str) -> str | None:
    """Why a block device must not be overwritten: a filesystem, a mount, partitions."""
    try:
        tree = run_json(runner, ["lsblk", "-J", "-b", "-o", "PATH,TYPE,FSTYPE,MOUNTPOINT,SIZE", path])
    except (CommandError, json.JSONDecodeError) as exc:
        return f"cannot inspect {path}: {exc}"
    for dev in tree.get("blockdevices", []):
        if dev.get("mountpoint"):
            return f"{path} is mounted at {dev['mountpoint']}"
        if dev.get("fstype"):
            return f"{path} holds a {dev['fstype']} filesystem"
        children = dev.get("children") or []
        if children:
            mounted = [c for c in children if c.get("mountpoint")]
            what = f", {mounted[0]['path']} mounted at {mounted[0]['mountpoint']}" if mounted else ""
            return f"{path} has {len(children)} partition(s){what}"
    return None


def discover(runner: Runner) -> list[Controller]:
    controllers: dict[str, Controller] = {}
    for entry in _list_entries(run_json(runner, ["nvme", "list", "-o", "json"])):
        ctrl_path = entry.get("Controller") or _controller_of(entry["DevicePath"])
        if ctrl_path not in controllers:
            ident = run_json(runner, ["nvme", "id-ctrl", ctrl_path, "-o", "json"])
            controllers[ctrl_path] = Controller(
                path=ctrl_path,
                model=str(ident.get("mn", entry.get("ModelNumber", ""))).strip(),
                serial=str(ident.get("sn", entry.get("SerialNumber", ""))).strip(),
                firmware=str(ident.get("fr", entry.get("Firmware", ""))).strip(),
                cntlid=int(ident.get("cntlid", 0)),
                ns_management=bool(int(ident.get("oacs", 0)) & OACS_NS_MGMT),
                total_bytes=int(ident.get("tnvmcap", 0)),
                unallocated_bytes=int(ident.get("unvmcap", 0)),
            )
        nsid = int(entry.get("NameSpace") or re.sub(r".*n", "", entry["DevicePath"]))
        controllers[ctrl_path].namespaces.append(
            Namespace(
                path=entry["DevicePath"],
                nsid=nsid,
                size_bytes=int(entry.get("PhysicalSize", 0)),
                sector_size=int(entry.get("SectorSize", 512)),
                in_use=in_use_reason(runner, entry["DevicePath"]),
            )
        )
    return list(controllers.values())


def select(controllers: list[Controller], selector: DeviceSelector | None) -> list[Controller]:
    """Controllers whose model, serial and path (controller or any namespace) match every pattern given."""
    if selector is None:
        return controllers

    def any_match(patterns: list[str] | None, *values: str) -> bool:
        return not patterns or any(fnmatch.fnmatch(v, p) for p in patterns for v in values)

    return [
        c
        for c in controllers
        if any_match(selector.model, c.model)
        and any_match(selector.serial, c.serial)
        and any_match(selector.path, c.path, *(n.path for n in c.namespaces))
    ]


# ------------------------------------------------------------------------------------- state


class DeviceState:
    """Namespaces kvtier created, per pool: {pool: {"serial", "controller", "nsid", "bytes"}}."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.exists() else {}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        os.replace(tmp, self.path)


# ------------------------------------------------------------------------- namespace lifecycle


@dataclass
class Prepared:
    path: str  # the block device the NVMe tier opens
    devices: list[NvmeDevice]  # for the KVCacheNode


def _lba_format_4k(runner: Runner, ctrl: Controller) -> int:
    """Index of the 4096-byte LBA format (from any namespace's id-ns), 0 if none is known."""
    for ns in ctrl.namespaces:
        try:
            ident = run_json(runner, ["nvme", "id-ns", ns.path, "-o", "json"])
        except CommandError:
            continue
        for i, fmt in enumerate(ident.get("lbafs", [])):
            if fmt.get("ds") == LBA_4K and not fmt.get("ms"):
                return i
    return 0


def _refused(c: Controller, reason: str) -> NvmeDevice:
    return NvmeDevice(path=c.path, model=c.model, serial=c.serial, state="refused", reason=reason)


def prepare_namespace(
    runner: Runner,
    pool: str,
    size: int,
    controllers: list[Controller],
    state: DeviceState,
    allow_in_use: bool = False,
) -> Prepared:
    """Adopt the pool's namespace if one exists, else create, attach and format one. Idempotent."""
    mine = state.data.get(pool)
    if mine:
        for c in controllers:
            ns = next(
                (n for n in c.namespaces if c.serial == mine["serial"] and n.nsid == mine["nsid"]), None
            )
            if ns:
                if ns.in_use and not allow_in_use:
                    raise NvmeError(
                        f"the pool's namespace {ns.path}: {ns.in_use}; set allowInUse to reuse it"
                    )
                dev = NvmeDevice(
                    path=ns.path,
                    model=c.model,
                    serial=c.serial,
                    namespaceId=ns.nsid,
                    sizeBytes=ns.size_bytes,
                    state="adopted",
                )
                return Prepared(ns.path, [dev])
    report: list[NvmeDevice] = []
    for c in controllers:
        if not c.ns_management:
            report.append(_refused(c, "controller does not support namespace management (OACS bit 3 clear)"))
            continue
        if c.unallocated_bytes < size:
            report.append(
                _refused(c, f"{c.unallocated_bytes} unallocated bytes, the pool asks for {size} per node")
            )
            continue
        lbaf = _lba_format_4k(runner, c)
        blocks = size // 4096 if lbaf else size // 512
        out = run_text(
            runner,
            [
                "nvme",
                "create-ns",
                c.path,
                f"--nsze={blocks}",
                f"--ncap={blocks}",
                f"--flbas={lbaf}",
                "--dps=0",
            ],
        )
        match = re.search(r"nsid:?\s*(\d+)", out)
        if not match:
            raise NvmeError(f"create-ns on {c.path} did not say which namespace it created: {out.strip()}")
        nsid = int(match.group(1))
        # recorded before attaching: a crash from here on adopts this namespace, never makes another
        state.data[pool] = {"serial": c.serial, "controller": c.path, "nsid": nsid, "bytes": size}
        state.save()
        run_text(runner, ["nvme", "attach-ns", c.path, f"--namespace-id={nsid}", f"--controllers={c.cntlid}"])
        run_text(runner, ["nvme", "ns-rescan", c.path])
        path = f"{c.path}n{nsid}"
        run_text(runner, ["nvme", "format", path, f"--lbaf={lbaf}", "--ses=0", "--force"])
        dev = NvmeDevice(
            path=path, model=c.model, serial=c.serial, namespaceId=nsid, sizeBytes=size, state="created"
        )
        return Prepared(path, [dev, *report])
    reasons = (
        "; ".join(f"{d.path}: {d.reason}" for d in report) or "no NVMe controller matches the deviceSelector"
    )
    raise NvmeError(f"no controller can hold a {size}-byte namespace for pool {pool}: {reasons}")


def prepare_partition(
    runner: Runner, size: int, selector: DeviceSelector | None, allow_in_use: bool
) -> Prepared:
    """Partition mode: the partition named by deviceSelector.path, if it is free and large enough."""
    patterns = (selector.path if selector else None) or []
    if not patterns:
        raise NvmeError("partition mode needs deviceSelector.path naming the partition, e.g. /dev/nvme0n1p3")
    tree = run_json(runner, ["lsblk", "-J", "-b", "-o", "PATH,TYPE,FSTYPE,MOUNTPOINT,SIZE"])
    parts = []

    def walk(devs: list[dict[str, Any]]) -> None:
        for d in devs:
            if d.get("type") == "part":
                parts.append(d)
            walk(d.get("children") or [])

    walk(tree.get("blockdevices", []))
    for part in parts:
        if not any(fnmatch.fnmatch(part["path"], p) for p in patterns):
            continue
        busy = (f"mounted at {part['mountpoint']}" if part.get("mountpoint") else None) or (
            f"holds a {part['fstype']} filesystem" if part.get("fstype") else None
        )
        if busy and not allow_in_use:
            raise NvmeError(f"{part['path']} {busy}; set allowInUse to let kvtier overwrite it")
        if int(part.get("size") or 0) < size:
            raise NvmeError(f"{part['path']} has {part.get('size')} bytes, the pool asks for {size}")
        return Prepared(
            part["path"], [NvmeDevice(path=part["path"], sizeBytes=int(part["size"]), state="partition")]
        )
    raise NvmeError(f"no partition matches {patterns}")


def prepare(
    runner: Runner,
    pool: str,
    mode: str,
    size: int,
    selector: DeviceSelector | None,
    allow_in_use: bool,
    state_dir: Path,
) -> Prepared:
    """The block device for a pool's NVMe tier in namespace or partition mode."""
    if mode == "partition":
        return prepare_partition(runner, size, selector, allow_in_use)
    # A new namespace never touches existing data, so busy namespaces beside it do not matter; the
    # one we would adopt must be free (checked in prepare_namespace).
    controllers = select(discover(runner), selector)
    state = DeviceState(state_dir / "nvme-namespaces.json")
    return prepare_namespace(runner, pool, size, controllers, state, allow_in_use)


def inventory(runner: Runner) -> tuple[list[NvmeDevice], str | None]:
    """Every NVMe namespace on the node with why it is busy, for the KVCacheNode (never raises)."""
    try:
        controllers = discover(runner)
    except (CommandError, json.JSONDecodeError, KeyError, ValueError) as exc:
        return [], f"NVMe discovery failed: {exc}"
    return [
        NvmeDevice(
            path=n.path,
            model=c.model,
            serial=c.serial,
            namespaceId=n.nsid,
            sizeBytes=n.size_bytes,
            state="in-use" if n.in_use else "free",
            reason=n.in_use,
        )
        for c in controllers
        for n in c.namespaces
    ], None
