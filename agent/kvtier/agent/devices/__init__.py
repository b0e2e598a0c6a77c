"""Node hardware: GPUs through NVML (`gpu`), NVMe discovery and namespace lifecycle (`nvme`), and the
one narrow seam every command goes through (`runner`), so tests replay recorded output."""

from kvtier.agent.devices.gpu import gpu_inventory, numa_for_gpus, pci_numa_node, sysfs_bus_id

__all__ = ["gpu_inventory", "numa_for_gpus", "pci_numa_node", "sysfs_bus_id"]
