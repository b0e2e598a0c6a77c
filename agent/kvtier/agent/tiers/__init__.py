"""Where blocks live: the DRAM arena (`dram.py`) and the NVMe tier (`nvme.py`), both keeping the
contract in `base.py`; the NVMe tier's crash-consistent manifest is in `manifest.py`."""

from kvtier.agent.tiers.base import Tier

__all__ = ["Tier"]
