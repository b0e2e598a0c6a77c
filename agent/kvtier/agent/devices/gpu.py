"""GPU inventory through NVML, and the NUMA placement it implies.

`nvml` is the real nvidia-ml-py module or a stand-in; no driver, no library or an NVML error
becomes an empty list plus a reason, never a crash.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from kvtier.api.v1alpha1 import GpuDevice

SYSFS_PCI = Path("/sys/bus/pci/devices")


def _load_nvml() -> Any:
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        return pynvml
    except Exception:
        return None


def sysfs_bus_id(nvml_bus_id: str) -> str:
    """NVML's '00000000:18:00.0' -> sysfs' '0000:18:00.0'."""
    domain, rest = nvml_bus_id.lower().split(":", 1)
    return f"{int(domain, 16):04x}:{rest}"


def pci_numa_node(bus_id: str, sysfs: Path = SYSFS_PCI) -> int | None:
    try:
        node = int((sysfs / sysfs_bus_id(bus_id) / "numa_node").read_text().strip())
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None


def gpu_inventory(nvml: Any = "load", sysfs: Path = SYSFS_PCI) -> tuple[list[GpuDevice], str | None]:
    """(GPUs, reason the list is empty)."""
    if nvml == "load":
        nvml = _load_nvml()
    if nvml is None:
        return [], "NVML unavailable (no NVIDIA driver or nvidia-ml-py on this node)"
    gpus = []
    try:
        for i in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            name = nvml.nvmlDeviceGetName(h)
            bus = nvml.nvmlDeviceGetPciInfo(h).busId
            bus = bus.decode() if isinstance(bus, bytes) else bus
            uuid = nvml.nvmlDeviceGetUUID(h)
            gpus.append(
                GpuDevice(
                    index=i,
                    name=name.decode() if isinstance(name, bytes) else name,
                    uuid=uuid.decode() if isinstance(uuid, bytes) else uuid,
                    pciBusId=bus,
                    memoryBytes=int(nvml.nvmlDeviceGetMemoryInfo(h).total),
                    numaNode=pci_numa_node(bus, sysfs),
                )
            )
    except Exception as exc:
        return gpus, f"NVML error: {exc}"
    return gpus, None if gpus else "no GPUs found by NVML"


def numa_for_gpus(gpus: list[GpuDevice]) -> int | None:
    """`numa: auto`: the NUMA node most of the node's GPUs hang off (None: leave placement to the kernel)."""
    nodes = Counter(g.numaNode for g in gpus if g.numaNode is not None)
    return nodes.most_common(1)[0][0] if nodes else None
