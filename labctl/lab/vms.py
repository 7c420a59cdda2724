"""The lab's workload VMs as the controller sees them: the inventory row, the spec a host is
handed, start and stop through the host's agent (typed host protocol)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from labctl.core.errors import LabStateError, RemoteError
from labctl.datastores import service as datastores
from labctl.guest.protocol import boot_args
from labctl.hosts import protocol as hp
from labctl.state.context import LabContext


def row(ctx: LabContext, name: str) -> dict[str, Any]:
    """The inventory row of VM ``name``; a clear error naming the VMs there are."""
    vm = ctx.inv.row("vms", name=name)
    if vm is None:
        known = ", ".join(r["name"] for r in ctx.inv.rows("vms")) or "none"
        raise LabStateError(f"unknown VM {name!r} (VMs: {known})", vm=name)
    return vm


def disk(ctx: LabContext, datastore: str | None, host: str) -> hp.IscsiDisk | None:
    """The VM disk on ``datastore`` as ``host`` reaches it (its own initiator name)."""
    if not datastore:
        return None
    u = datastores.unit(ctx.inv, datastore, host)
    return hp.IscsiDisk(portal=u.portal, target_iqn=u.target_iqn, lun=u.lun,
                        initiator_iqn=u.initiator_iqn, naa=u.naa)


def spec(ctx: LabContext, name: str, host: str) -> hp.VmStartSpec:
    """What ``host`` is handed to start VM ``name`` (the test guest, its boot parameters
    from the inventory; the host's own probe picks the accelerator)."""
    vm = row(ctx, name)
    kernel, initrd = ctx.inv.get_meta("guest_kernel"), ctx.inv.get_meta("guest_initrd")
    append = boot_args(round(vm["dirty_rate"]), vm["working_set"] >> 20,
                       extra=[f"labctl.vm={name}", f"labctl.hb_ms={vm['heartbeat_ms']}"])
    return hp.VmStartSpec(
        name=name, memory_mib=vm["memory"] >> 20, vcpus=vm["vcpus"],
        kernel=None if kernel is None else Path(kernel),
        initrd=None if initrd is None else Path(initrd), append=append,
        accel="auto", disk=disk(ctx, vm["datastore"], host),
        heartbeat_ms=int(vm["heartbeat_ms"]))


async def start(ctx: LabContext, name: str) -> hp.VmStarted:
    """Start VM ``name`` on its host; a VM the inventory says runs is asked about first
    (a QEMU that died is started again from the same LUN)."""
    vm = row(ctx, name)
    start_spec = spec(ctx, name, vm["host"])
    async with ctx.host_client(vm["host"]) as c:
        if vm["state"] == "running":  # as far as the inventory knows: ask its host
            process, returncode = "gone", None
            try:
                live = await hp.VM_STATUS.call(c, hp.VmName(name), timeout=15)
                process, returncode = live.process, live.returncode
            except RemoteError:
                pass
            if process in ("starting", "running"):
                raise LabStateError(f"VM {name} is already running on {vm['host']}", vm=name)
            ctx.progress(f"VM {name} had died on {vm['host']} (QEMU {process}, exit status "
                         f"{returncode}): starting it again")
        if vm["datastore"]:  # the host attaches by ID: hand it the mapping, it checks the LUN
            await datastores.attach_for_vm(c, ctx.inv, vm["datastore"], vm["host"])
        res = await hp.VM_START.call(c, hp.VmStart(spec=start_spec), timeout=120)
    ctx.inv.update("vms", {"name": name}, state="running", pid=res.pid, started_at=time.time())
    return res


async def stop(ctx: LabContext, name: str) -> None:
    vm = row(ctx, name)
    if vm["state"] != "running":
        raise LabStateError(f"VM {name} is not running", vm=name)
    async with ctx.host_client(vm["host"]) as c:
        await hp.VM_STOP.call(c, hp.VmStop(name), timeout=60)
    ctx.inv.update("vms", {"name": name}, state="stopped", pid=None)


def running_host(ctx: LabContext, name: str) -> str:
    """The host VM ``name`` runs on; LabStateError if it does not run."""
    vm = row(ctx, name)
    if vm["state"] != "running":
        raise LabStateError(f"VM {name} is not running", vm=name)
    return str(vm["host"])
