"""NVMe discovery and the namespace lifecycle, against nvme-cli and lsblk output (tests/fixtures/nvme)."""

from __future__ import annotations

import pytest

from kvtier.agent.devices.nvme import NvmeError, discover, inventory, prepare, select
from kvtier.agent.devices.runner import RecordedRunner
from kvtier.api.v1alpha1 import DeviceSelector
from tests.support import REPO

pytestmark = pytest.mark.unit
FIX = REPO / "tests" / "fixtures" / "nvme"
TiB = 1 << 40
LSBLK = "lsblk -J -b -o PATH,TYPE,FSTYPE,MOUNTPOINT,SIZE"


def ok(name: str):
    return (0, (FIX / name).read_text())


def node(listing: str = "list-flat.json") -> dict:
    answers = {
        "nvme list -o json": ok(listing),
        "lsblk -J -b -o PATH,TYPE,FSTYPE,MOUNTPOINT,SIZE": ok("lsblk-all.json"),
        "nvme id-ns /dev/nvme0n1 -o json": ok("id-ns-nvme0n1.json"),
        "nvme create-ns /dev/nvme0 --nsze=268435456 --ncap=268435456 --flbas=1 --dps=0": ok("create-ns.txt"),
        "nvme attach-ns /dev/nvme0 --namespace-id=2 --controllers=6": ok("attach-ns.txt"),
        "nvme ns-rescan /dev/nvme0": (0, ""),
        "nvme format /dev/nvme0n2 --lbaf=1 --ses=0 --force": ok("format.txt"),
    }
    for c in ("nvme0", "nvme1", "nvme2"):
        answers[f"nvme id-ctrl /dev/{c} -o json"] = ok(f"id-ctrl-{c}.json")
    for ns in ("nvme0n1", "nvme0n2", "nvme1n1", "nvme2n1"):
        answers[f"{LSBLK} /dev/{ns}"] = ok(f"lsblk-{ns}.json")
    return answers


def test_discovery_reads_three_drive_models():
    ctrls = {c.path: c for c in discover(RecordedRunner(node()))}
    assert set(ctrls) == {"/dev/nvme0", "/dev/nvme1", "/dev/nvme2"}
    pm9a3, client, intel = ctrls["/dev/nvme0"], ctrls["/dev/nvme1"], ctrls["/dev/nvme2"]
    assert pm9a3.model == "SAMSUNG MZQL23T8HCLS-00A07" and pm9a3.serial == "S64HNE0R600123"
    assert pm9a3.ns_management and intel.ns_management and not client.ns_management
    assert pm9a3.unallocated_bytes == 1920372572160 and intel.unallocated_bytes == 0
    assert (
        client.namespaces[0].in_use == "/dev/nvme1n1 has 2 partition(s), /dev/nvme1n1p1 mounted at /boot/efi"
    )
    assert pm9a3.namespaces[0].in_use is None and pm9a3.namespaces[0].sector_size == 4096


def test_verbose_listing_gives_the_same_controller():
    answers = node("list-verbose.json")
    (ctrl,) = discover(RecordedRunner(answers))
    assert (ctrl.path, ctrl.serial, ctrl.namespaces[0].path, ctrl.namespaces[0].nsid) == (
        "/dev/nvme0",
        "S64HNE0R600123",
        "/dev/nvme0n1",
        1,
    )


def test_selector_patterns():
    ctrls = discover(RecordedRunner(node()))
    assert [c.path for c in select(ctrls, DeviceSelector(model=["SAMSUNG MZQL*"]))] == ["/dev/nvme0"]
    assert [c.path for c in select(ctrls, DeviceSelector(path=["/dev/nvme2n1"]))] == ["/dev/nvme2"]
    assert select(ctrls, DeviceSelector(serial=["nope*"])) == []


def test_namespace_is_created_attached_formatted_then_adopted(tmp_path):
    runner = RecordedRunner(node())
    got = prepare(runner, "fast", "namespace", TiB, DeviceSelector(model=["SAMSUNG*"]), False, tmp_path)
    assert got.path == "/dev/nvme0n2" and got.devices[0].state == "created"
    admin = [c for c in runner.calls if c.split()[1] in ("create-ns", "attach-ns", "ns-rescan", "format")]
    assert admin == [
        "nvme create-ns /dev/nvme0 --nsze=268435456 --ncap=268435456 --flbas=1 --dps=0",  # 1 TiB of 4 KiB LBAs
        "nvme attach-ns /dev/nvme0 --namespace-id=2 --controllers=6",
        "nvme ns-rescan /dev/nvme0",
        "nvme format /dev/nvme0n2 --lbaf=1 --ses=0 --force",
    ]
    # a restart (the device now lists nsid 2) adopts it and creates nothing
    again = RecordedRunner(node("list-flat-after-create.json"))
    got = prepare(again, "fast", "namespace", TiB, DeviceSelector(model=["SAMSUNG*"]), False, tmp_path)
    assert got.path == "/dev/nvme0n2" and got.devices[0].state == "adopted"
    assert not [c for c in again.calls if "create-ns" in c or "format" in c]


def test_controller_without_namespace_management_is_refused(tmp_path):
    with pytest.raises(NvmeError, match=r"/dev/nvme1: controller does not support namespace management"):
        prepare(
            RecordedRunner(node()),
            "fast",
            "namespace",
            TiB,
            DeviceSelector(model=["Samsung SSD 980*"]),
            False,
            tmp_path,
        )


def test_fully_allocated_controller_is_refused_with_its_numbers(tmp_path):
    with pytest.raises(NvmeError, match=r"/dev/nvme2: 0 unallocated bytes, the pool asks for 1099511627776"):
        prepare(
            RecordedRunner(node()),
            "fast",
            "namespace",
            TiB,
            DeviceSelector(model=["INTEL*"]),
            False,
            tmp_path,
        )


def test_drive_in_use_is_reported_and_partitions_in_use_refused(tmp_path):
    devices, reason = inventory(RecordedRunner(node()))
    assert reason is None
    busy = {d.path: d for d in devices if d.state == "in-use"}
    assert set(busy) == {"/dev/nvme1n1"} and "mounted at /boot/efi" in busy["/dev/nvme1n1"].reason
    runner = RecordedRunner(node())
    with pytest.raises(NvmeError, match="mounted at /; set allowInUse"):
        prepare(runner, "fast", "partition", TiB, DeviceSelector(path=["/dev/nvme1n1p2"]), False, tmp_path)
    free = prepare(runner, "fast", "partition", TiB, DeviceSelector(path=["/dev/nvme2n1p*"]), False, tmp_path)
    assert free.path == "/dev/nvme2n1p1"


def test_no_nvme_cli_is_a_reason_not_a_crash():
    devices, reason = inventory(RecordedRunner({}))
    assert devices == [] and "NVMe discovery failed" in reason
