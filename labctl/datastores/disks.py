"""A datastore's data disk on its storage node: libvirt attaches a node VM's (hot-plug);
a machine's agent makes its own (a sparse file on a loop device in the lab's directory
there). The same for LUNs and file datastores."""

from __future__ import annotations

from pathlib import Path

from labctl.hosts.sshhosts import SshAccess, state_dir
from labctl.state.context import LabContext
from labctl.state.inventory import Inventory
from labctl.storage import node as storagenode
from labctl.storage import protocol as sp
from labctl.storage.node import DataDisk


def machine_of(inv: Inventory, node: str) -> SshAccess | None:
    """How to reach storage node ``node`` when it is a machine reached over SSH; None for a
    node VM of this machine's."""
    row = inv.row("storage_nodes", name=node)
    text = row["ssh"] if row is not None else None
    return SshAccess.from_json(str(text)) if text else None


def disk_path(ctx: LabContext, node: str, serial: str, name: str) -> Path:
    """Where a data disk's file is: in the lab's directory for a node VM; on a machine, in
    the agent's directory there (the agent names it after the serial)."""
    if machine_of(ctx.inv, node) is not None:
        return Path(state_dir(ctx.dir.tag, node)) / "disks" / f"{serial}.img"
    return ctx.dir.storage_dir(node) / f"{name}.img"


async def attach_disk(ctx: LabContext, node: str, disk: DataDisk) -> None:
    """A datastore's data disk onto its node."""
    if machine_of(ctx.inv, node) is None:
        await storagenode.attach_data_disk(ctx.name, node, disk)
        return
    async with ctx.storage_client(node) as c:
        await sp.DISK_ENSURE.call(c, sp.DiskSpec(disk.serial, disk.size_bytes), timeout=120)


async def detach_disk(ctx: LabContext, node: str, serial: str, path: Path) -> None:
    """The disk off its node, its file removed (a machine's agent removes its own)."""
    if machine_of(ctx.inv, node) is None:
        await storagenode.detach_data_disk(ctx.name, node, serial)
        path.unlink(missing_ok=True)
        return
    async with ctx.storage_client(node) as c:
        await sp.DISK_REMOVE.call(c, sp.DiskSerial(serial), timeout=120)


async def resize_disk(ctx: LabContext, node: str, serial: str, size: int) -> None:
    if machine_of(ctx.inv, node) is None:
        await storagenode.resize_data_disk(ctx.name, node, serial, size)
        return
    async with ctx.storage_client(node) as c:
        await sp.DISK_RESIZE.call(c, sp.DiskSpec(serial, size), timeout=120)
