"""A machine's data disks on this kernel's real loop driver: what a storage node reached
over SSH makes for each datastore (a sparse file of the lab's on a loop device), found
again from the kernel alone, grown the way a virtio disk is (the device's size follows),
removed with its file; loop devices on other files are never taken for the lab's."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from labctl.core.errors import StorageNodeError
from labctl.storage import protocol as p
from labctl.storage.machine import CONFIGFS, MachineDisks, loops_backed_by, release
from tests.conftest import E2E

pytestmark = E2E


@pytest.fixture
def disks(tmp_path: Path) -> Iterator[MachineDisks]:
    d = MachineDisks(tmp_path / "disks")
    yield d
    # whatever a failed test left attached: only loops on this test's own files
    for dev in loops_backed_by(d.dir).values():
        subprocess.run(["losetup", "--detach", dev], check=False, timeout=60)


@pytest.fixture
def foreign_loop(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A loop device on a file named like a lab's disk, in a directory that is not the
    node's: (that directory, the device), detached after."""
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "lc-ds1.img").write_bytes(b"\0" * (1 << 20))
    dev = subprocess.run(["losetup", "--find", "--show", str(other / "lc-ds1.img")],
                         capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    try:
        yield other, dev
    finally:
        subprocess.run(["losetup", "--detach", dev], check=False, timeout=60)


def _size(dev: str) -> int:
    return int(Path(f"/sys/block/{Path(dev).name}/size").read_text()) * 512


def test_a_disk_made_found_grown_and_removed(disks: MachineDisks, tmp_path: Path) -> None:
    made = asyncio.run(disks.ensure(p.DiskSpec("lc-ds1", 8 << 20)))
    assert made.changed and made.device.startswith("/dev/loop")
    assert made.size_bytes == _size(made.device) == 8 << 20
    path = Path(made.path)
    assert path == disks.dir / "lc-ds1.img" and path.stat().st_mode & 0o777 == 0o600
    assert path.stat().st_blocks == 0  # sparse: nothing written
    # again: the same device, found from the kernel (another agent instance too)
    again = asyncio.run(MachineDisks(disks.dir).ensure(p.DiskSpec("lc-ds1", 8 << 20)))
    assert (again.device, again.changed) == (made.device, False)
    assert disks.find("lc-ds1") == made.device
    # data written through the device is on the file
    with open(made.device, "r+b") as f:
        f.seek(4096)
        f.write(b"labctl" * 100)
    with open(path, "rb") as f:
        f.seek(4096)
        assert f.read(6) == b"labctl"
    # grown: the device takes the new size at once; shrinking is refused
    grown = asyncio.run(disks.resize(p.DiskSpec("lc-ds1", 12 << 20)))
    assert grown.changed and _size(made.device) == 12 << 20
    with pytest.raises(StorageNodeError, match="only grows"):
        asyncio.run(disks.resize(p.DiskSpec("lc-ds1", 4 << 20)))
    gone = asyncio.run(disks.remove(p.DiskSerial("lc-ds1")))
    assert gone.changed and not path.exists() and disks.device("lc-ds1") is None
    with pytest.raises(StorageNodeError, match="no data disk with serial 'lc-ds1'"):
        disks.find("lc-ds1")


def test_loops_on_other_files_are_not_the_labs(disks: MachineDisks,
                                               foreign_loop: tuple[Path, str]) -> None:
    other, dev = foreign_loop
    assert disks.device("lc-ds1") is None
    assert loops_backed_by(other) == {"lc-ds1": dev}


@pytest.mark.parametrize("serial", ["../x", "", "a/b", "x" * 21])
def test_a_bad_serial_names_no_file(disks: MachineDisks, serial: str) -> None:
    with pytest.raises(StorageNodeError, match="invalid disk serial"):
        asyncio.run(disks.ensure(p.DiskSpec(serial, 1 << 20)))


@pytest.mark.skipif((CONFIGFS / "target").exists(), reason="this kernel has LIO loaded: "
                    "release would look at its targets (tested on a Vagrant machine)")
def test_release_detaches_only_the_nodes_loops(disks: MachineDisks,
                                               foreign_loop: tuple[Path, str]) -> None:
    """``--release`` on a kernel holding no LIO (a machine rebooted): the node's loops are
    detached, another directory's are not, LIO is not asked."""
    other, dev = foreign_loop
    made = asyncio.run(disks.ensure(p.DiskSpec("lc-ds1", 1 << 20)))
    conf = p.NodeConfig(lab="t", node="n1", address="10.250.9.2/24", gateway=None, mac="",
                        secret="", target_iqn="iqn.2026-11.dev.labctl:t.n1",
                        disk_dir=str(disks.dir))
    assert release(conf) == [f"loop device {made.device} (disk lc-ds1)"]
    assert disks.device("lc-ds1") is None and loops_backed_by(other) == {"lc-ds1": dev}
    assert Path(made.path).exists()  # the file goes with the directory, not here
