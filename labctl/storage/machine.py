"""A storage node that is a machine reached over SSH (a Vagrant or hardware lab), agent side.

In a node VM libvirt attaches one virtio disk per datastore, found by its serial. A
machine has no libvirt of the lab's: its data disks are sparse files in the directory the
node's config names (``disk_dir``, inside the lab's state directory on the machine), each
on a loop device. The file is named after the disk's serial, so the loop device backing a
datastore is found again from the kernel alone (``/sys/block/loopN/loop/backing_file``),
after an agent restart too. A ``truncate`` and ``losetup --set-capacity`` grow a disk the
way a libvirt block resize grows a virtio disk: iblock reports the new size at once and the
agent's capacity watch publishes it.

Ownership on a machine that outlives the lab: :func:`release` removes exactly the node's
own target (its IQN names the lab) and the backstores and loop devices on files in its
``disk_dir``; nothing else of the machine's LIO is touched.

Standard library, ``labctl.core``, ``labctl.drivers.lio`` (rtslib-fb, imported lazily) and
``labctl.drivers.nfsd``.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from labctl.core.errors import StorageNodeError
from labctl.core.proc import run
from labctl.drivers.lio import Lio
from labctl.drivers.nfsd import release_machine
from labctl.storage import protocol as p

log = logging.getLogger("labctl.storage")

#: the kernel modules a machine's node needs (configfs is mounted by hand when systemd has not)
MODULES = ("configfs", "target_core_mod", "target_core_iblock", "iscsi_target_mod", "loop")
CONFIGFS = Path("/sys/kernel/config")
#: exportfs reads every ``*.exports`` file here: a machine's node writes one of its own
EXPORTS_D = Path("/etc/exports.d")
_SERIAL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,19}$")


def check_serial(serial: str) -> str:
    if not isinstance(serial, str) or not _SERIAL_RE.match(serial):
        raise StorageNodeError(f"invalid disk serial {serial!r}: 1-20 of A-Z a-z 0-9 _ . - "
                               "(it names the disk's file)", disk_serial=serial)
    return serial


def loops_backed_by(disk_dir: Path, sys_block: Path = Path("/sys/block")) -> dict[str, str]:
    """Every loop device backed by a file of ``disk_dir``: {serial: "/dev/loopN"}."""
    found: dict[str, str] = {}
    want = os.path.realpath(disk_dir)
    for entry in sorted(sys_block.glob("loop*")):
        try:
            backing = (entry / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue  # not attached
        if backing.endswith(" (deleted)"):
            continue
        path = Path(backing)
        if path.suffix == ".img" and os.path.realpath(path.parent) == want:
            found.setdefault(path.stem, f"/dev/{entry.name}")
    return found


class MachineDisks:
    """The data disks of a machine's node: ``disk_dir/<serial>.img`` on loop devices."""

    def __init__(self, disk_dir: Path, sys_block: Path = Path("/sys/block")) -> None:
        self.dir = disk_dir
        self.sys_block = sys_block

    def path(self, serial: str) -> Path:
        return self.dir / f"{check_serial(serial)}.img"

    def device(self, serial: str) -> str | None:
        return loops_backed_by(self.dir, self.sys_block).get(serial)

    def find(self, serial: str) -> str:
        """The loop device of disk ``serial`` (what LIO backs its LUN with)."""
        device = self.device(serial)
        if device is None:
            raise StorageNodeError(f"no data disk with serial {serial!r} on this machine "
                                   f"(no loop device on {self.path(serial)})",
                                   disk_serial=serial,
                                   disks=loops_backed_by(self.dir, self.sys_block))
        return device

    def _info(self, serial: str, device: str, changed: bool) -> p.DiskInfo:
        path = self.path(serial)
        size = 0
        if device:
            try:
                size = int((self.sys_block / Path(device).name / "size").read_text()) * 512
            except (OSError, ValueError):
                size = path.stat().st_size
        return p.DiskInfo(serial=serial, device=device, path=str(path), size_bytes=size,
                          changed=changed)

    async def ensure(self, req: p.DiskSpec) -> p.DiskInfo:
        """The disk, made (a sparse file of ``size_bytes``) and attached if it is not."""
        path = self.path(req.serial)
        if req.size_bytes <= 0 or req.size_bytes % 512:
            raise StorageNodeError(f"disk {req.serial}: size {req.size_bytes} is not a positive "
                                   "multiple of 512 bytes", size_bytes=req.size_bytes)
        made = False
        if not path.exists():
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            _sparse(path, req.size_bytes, create=True)
            made = True
        device = self.device(req.serial)
        if device is None:
            got = await run(["losetup", "--find", "--show", str(path)], timeout=60,
                            what=f"attach disk {req.serial}")
            device = got.stdout.strip()
            made = True
            log.info("disk %s: %s on %s", req.serial, path, device)
        return self._info(req.serial, device, made)

    async def resize(self, req: p.DiskSpec) -> p.DiskInfo:
        """Grow the disk to ``size_bytes``; its loop device takes the new capacity."""
        path = self.path(req.serial)
        device = self.device(req.serial)
        if device is None:
            raise StorageNodeError(f"no disk {req.serial} on this node", disk_serial=req.serial)
        now = path.stat().st_size
        if req.size_bytes < now:
            raise StorageNodeError(f"disk {req.serial} is {now} bytes: a disk only grows "
                                   f"(asked for {req.size_bytes})", disk_serial=req.serial)
        if req.size_bytes == now:
            return self._info(req.serial, device, False)
        _sparse(path, req.size_bytes, create=False)
        await run(["losetup", "--set-capacity", device], timeout=60,
                  what=f"grow disk {req.serial}")
        log.info("disk %s: grown to %d bytes", req.serial, req.size_bytes)
        return self._info(req.serial, device, True)

    async def remove(self, req: p.DiskSerial) -> p.DiskInfo:
        """Detach the disk's loop device and delete its file (the LUN on it is gone first)."""
        path = self.path(req.serial)
        device = self.device(req.serial)
        if device is not None:
            await run(["losetup", "--detach", device], timeout=60,
                      what=f"detach disk {req.serial}")
        existed = path.exists()
        path.unlink(missing_ok=True)
        return p.DiskInfo(serial=req.serial, device="", path=str(path), size_bytes=0,
                          changed=existed or device is not None)


def _sparse(path: Path, size: int, create: bool) -> None:
    flags = os.O_WRONLY | (os.O_CREAT | os.O_EXCL if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


async def prepare() -> None:
    """LIO's and the loop driver's kernel modules, and configfs mounted (a machine's
    systemd mounts it; a minimal one may not have)."""
    for module in MODULES:
        await run(["modprobe", module], timeout=60, check=False, what=f"modprobe {module}")
    if not (CONFIGFS / "target").exists() and not os.path.ismount(CONFIGFS):
        await run(["mount", "-t", "configfs", "configfs", str(CONFIGFS)], timeout=60,
                  check=False, what="mount configfs")


@dataclass(frozen=True)
class MachineFiles:
    """Where a machine's node keeps its file datastores: mounted under ``root`` (in the
    node's directory), exported through ``exports`` (a file of the node's own), the NFS
    daemons it started recorded in ``state``."""

    root: Path
    exports: Path
    state: Path


def machine_files(conf: p.NodeConfig) -> MachineFiles:
    if conf.disk_dir is None:
        raise StorageNodeError("a node VM's file datastores are under /srv/labctl")
    state = Path(conf.disk_dir).parent
    return MachineFiles(root=state / "fs",
                        exports=EXPORTS_D / f"labctl-{conf.lab}-{conf.node}.exports",
                        state=state)


def release(conf: p.NodeConfig, sys_block: Path = Path("/sys/block")) -> list[str]:
    """Remove what the node ``conf`` made on this machine's NFS server, LIO and loop
    driver: its exports and mounted file datastores (then the NFS daemons it started,
    when nothing else is exported), its target, the backstores on its disks, its loop
    devices. Returns one line per object."""
    if conf.disk_dir is None:
        raise StorageNodeError("release is for a machine's node (its config names disk_dir)")
    disk_dir = Path(conf.disk_dir)
    where = machine_files(conf)
    mounts = sorted(d for d in where.root.iterdir() if os.path.ismount(d)) \
        if where.root.is_dir() else []
    removed: list[str] = release_machine(where.state, where.exports, mounts)
    loops = loops_backed_by(disk_dir, sys_block)
    ours = {os.path.realpath(dev) for dev in loops.values()}
    if (CONFIGFS / "target").exists():  # else LIO holds nothing (the machine rebooted)
        removed += _release_lio(conf, ours)
    os.sync()
    for serial, dev in sorted(loops.items()):
        # synchronous on purpose: the agent is stopped, this runs once at teardown
        done = subprocess.run(["losetup", "--detach", dev], check=False, capture_output=True,
                              text=True, timeout=60)
        if done.returncode != 0:
            raise StorageNodeError(f"cannot detach {dev} (disk {serial}): "
                                   f"{done.stderr.strip()}", device=dev)
        removed.append(f"loop device {dev} (disk {serial})")
    return removed


def _release_lio(conf: p.NodeConfig, devices: set[str]) -> list[str]:
    """The node's own target and the backstores on ``devices`` (its loops) removed from
    LIO; rtslib-fb found as the agent finds it (:meth:`Lio.open`)."""
    rts = Lio(conf.node, conf.target_iqn, conf.ip).open()
    removed: list[str] = []
    try:
        root = rts.RTSRoot()
        for target in list(root.targets):
            if str(target.wwn).lower() == conf.target_iqn.lower():
                target.delete()
                removed.append(f"iSCSI target {target.wwn}")
        for so in list(root.storage_objects):
            if so.plugin == "block" and os.path.realpath(str(so.udev_path)) in devices:
                so.delete()
                removed.append(f"backstore {so.name}")
    except (rts.RTSLibError, OSError) as exc:
        raise StorageNodeError(f"cannot remove node {conf.node}'s LIO objects: {exc}",
                               error=repr(exc), removed=removed) from exc
    return removed
