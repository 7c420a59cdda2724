"""The lab's workload VMs as the controller sees them: the inventory row, the spec a host is
handed, start and stop through the host's agent (typed host protocol)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labctl.core.errors import LabError, LabStateError, RemoteError
from labctl.core.names import SERVER_BASE
from labctl.core.rpc import RpcClient
from labctl.core.wire import Message
from labctl.datastores import filestores
from labctl.datastores import service as datastores
from labctl.drivers.ssh import SshMachine
from labctl.guest.protocol import boot_args
from labctl.hosts import protocol as hp
from labctl.lab.vmrows import disk as disk
from labctl.lab.vmrows import is_on_file as is_on_file
from labctl.lab.vmrows import row as row
from labctl.lab.vmrows import running_host as running_host
from labctl.replication import app
from labctl.replication.image import SERVER_CMDLINE
from labctl.state import sshkey
from labctl.state.context import LabContext

#: the test guest's disk as a base image: blank (the guest keeps its disk counter record in
#: sector 0); made on a file datastore the first time a VM names it
GUEST_BASE = "labctl-guest.qcow2"
GUEST_BASE_SIZE = 64 << 20


async def chain_disk(ctx: LabContext, vm: dict[str, Any]) -> hp.NfsChainDisk:
    """The VM's disk on its file datastore as the host opens it: its top layer and every
    layer below, by path on the node's export. The linked clone is made on first use."""
    ds = str(vm["datastore"])
    top = vm["disk_file"] or await _make_clone(ctx, vm)
    layers = (await filestores.chain(ctx, ds, top)).layers
    server, export = filestores.node_address(ctx, ds)
    return hp.NfsChainDisk(server=server, layers=[
        hp.NfsLayer(f"{export}/{layer.name}", layer.format) for layer in layers])


async def _make_clone(ctx: LabContext, vm: dict[str, Any]) -> str:
    """``<vm>.qcow2`` on the VM's base (the shipped blank guest disk is made if missing)."""
    ds, base, name = str(vm["datastore"]), str(vm["base"]), f"{vm['name']}.qcow2"
    listed = {f.name: f for f in (await filestores.files(ctx, ds)).files}
    have = set(listed)
    if name in listed and (listed[name].backing_file != base
                           or listed[name].in_use_by not in (None, vm["name"])):
        raise LabStateError(f"VM {vm['name']}: {ds}:{name} exists and is not a clone of {base}"
                            " this VM may take: delete or rename it", vm=vm["name"], file=name)
    if base not in have and base == SERVER_BASE:  # the server image, as a whole disk
        rootfs = ctx.inv.get_meta("server_rootfs")
        if rootfs is None:
            raise LabStateError(f"VM {vm['name']}: the lab has no server image to make "
                                f"{ds}:{base} from: bring the lab up again", vm=vm["name"])
        ctx.progress(f"{ds}: importing the server image as {base}")
        await filestores.import_image(ctx, Path(rootfs), ds, base)
    elif base not in have:
        if base != GUEST_BASE:
            raise LabStateError(f"VM {vm['name']}: its base image {base} is not on {ds}: "
                                f"import it first (labctl image import FILE --to {ds} "
                                f"--name {base})", vm=vm["name"], base=base)
        await filestores.clone(ctx, ds, None, GUEST_BASE, size_bytes=GUEST_BASE_SIZE)
    if name not in have:
        await filestores.clone(ctx, ds, base, name, size_bytes=vm["disk_size"])
    ctx.inv.update("vms", {"name": vm["name"]}, disk_file=name)
    return name


async def spec(ctx: LabContext, name: str, host: str) -> hp.VmStartSpec:
    """What ``host`` is handed to start VM ``name`` (the test guest, its boot parameters
    from the inventory; the host's own probe picks the accelerator)."""
    vm = row(ctx, name)
    if vm["guest"] == "server":
        return await _server_spec(ctx, vm, host)
    kernel, initrd = ctx.inv.get_meta("guest_kernel"), ctx.inv.get_meta("guest_initrd")
    at = ctx.inv.row("hosts", name=host)
    if at is not None and at.get("ssh"):
        # another machine: the controller's files are not there; its agent boots the copy
        # of the test guest handed over with it (LABCTL_GUEST_IMAGE)
        kernel = initrd = None
    append = boot_args(round(vm["dirty_rate"]), vm["working_set"] >> 20,
                       extra=[f"labctl.vm={name}", f"labctl.hb_ms={vm['heartbeat_ms']}"])
    return hp.VmStartSpec(
        name=name, memory_mib=vm["memory"] >> 20, vcpus=vm["vcpus"],
        kernel=None if kernel is None else Path(kernel),
        initrd=None if initrd is None else Path(initrd), append=append,
        accel="auto", disk=await chain_disk(ctx, vm) if is_on_file(ctx, vm)
        else disk(ctx, vm["datastore"], host), heartbeat_ms=int(vm["heartbeat_ms"]))


async def _server_spec(ctx: LabContext, vm: dict[str, Any], host: str) -> hp.VmStartSpec:
    """A server guest: the server image's kernel straight onto its clone (the NVMe root),
    its address routed by its host, the lab's SSH key in its boot configuration (as a
    cloud's instance metadata would give it)."""
    kernel, initrd = ctx.inv.get_meta("server_kernel"), ctx.inv.get_meta("server_initrd")
    if kernel is None or initrd is None:
        raise LabStateError(f"VM {vm['name']} is a server guest and the lab has no server "
                            "image: bring the lab up again", vm=vm["name"])
    h = ctx.inv.row("hosts", name=host)
    assert h is not None
    key = sshkey.ensure_key(ctx.name, ctx.dir.path)
    append = " ".join([SERVER_CMDLINE, f"labctl.vm={vm['name']}", f"labctl.ip={vm['address']}",
                       f"labctl.gw={h['address']}", f"labctl.mac={vm['mac']}",
                       f"labctl.key={key.boot_arg()}", f"labctl.hb_ms={vm['heartbeat_ms']}"])
    return hp.VmStartSpec(
        name=vm["name"], memory_mib=vm["memory"] >> 20, vcpus=vm["vcpus"], kernel=Path(kernel),
        initrd=Path(initrd), append=append, accel="auto", disk=await chain_disk(ctx, vm),
        disk_bus="nvme", nic=hp.Nic(mac=str(vm["mac"]), address=str(vm["address"])),
        heartbeat_ms=int(vm["heartbeat_ms"]))


def host_key_from(lines: list[str]) -> str | None:
    """The SSH host key a server guest printed on its console (the last one), or None."""
    keys = [ln.split("hostkey ", 1)[1].strip() for ln in lines if "labctl-server: hostkey " in ln]
    return keys[-1] if keys else None


def guest_ssh(ctx: LabContext, name: str, address: str) -> SshMachine:
    """Server guest ``name``'s management channel at ``address`` (ip or ip/prefix): the
    lab's key, the host key pinned from its console."""
    key = sshkey.ensure_key(ctx.name, ctx.dir.path)
    pinned = sshkey.pinned_host_key(ctx.dir.path, name)
    if pinned is None:
        raise LabStateError(f"VM {name} has not printed its SSH host key yet (is it running?)",
                            vm=name)
    return SshMachine(name, address.split("/")[0], key.private, pinned)


async def _pin_host_key(ctx: LabContext, c: RpcClient, name: str) -> None:
    """Pin a server guest's SSH host key from its console (printed before its first
    heartbeat, so it is there once the VM started)."""
    tail = await hp.VM_CONSOLE_TAIL.call(c, hp.ConsoleTailRequest(name, lines=400))
    key = host_key_from(tail.lines)
    if key is None:
        raise LabStateError(f"VM {name} printed no SSH host key on its console", vm=name,
                            console_tail=tail.lines[-20:])
    sshkey.pin_host_key(ctx.dir.path, name, key)


#: where a server guest's application lives and writes (labctl/replication/app.py)
APP = "/opt/labctl/app.py"
APP_DIR = "/srv/app"


async def _start_app(ctx: LabContext, name: str, rate: float) -> None:
    """The application, copied into the guest over its management channel and started
    in the background (it refuses a second copy of itself, and to start over lost data)."""
    async with guest_ssh(ctx, name, str(row(ctx, name)["address"])) as m:
        await m.run(["mkdir", "-p", "/opt/labctl"])
        await m.put(Path(app.__file__).read_bytes(), APP, 0o755)
        await m.run(["python3", "-B", APP, "run", "--dir", APP_DIR, "--rate", f"{rate:g}",
                     "--background"])
    ctx.progress(f"VM {name}: the application writes {rate / 1024:g} KiB/s into {APP_DIR}")


async def start(ctx: LabContext, name: str) -> hp.VmStarted:
    """Start VM ``name`` on its host; a VM the inventory says runs is asked about first
    (a QEMU that died is started again from the same LUN)."""
    vm = row(ctx, name)
    start_spec = await spec(ctx, name, vm["host"])
    on_file = is_on_file(ctx, vm)
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
        if on_file:  # one writer per image: the VM holds its top layer's lease
            top = row(ctx, name)["disk_file"]  # (spec() made the clone on a first start)
            await filestores.lease(ctx, vm["datastore"], top, name)
        elif vm["datastore"]:  # the host attaches by ID: hand it the mapping, it checks the LUN
            await datastores.attach_for_vm(c, ctx.inv, vm["datastore"], vm["host"])
        try:
            # the agent bounds its own wait for the first heartbeat (60 s; five times that
            # for TCG on a host under TCG itself, a Vagrant host without KVM)
            res = await hp.VM_START.call(c, hp.VmStart(spec=start_spec), timeout=360)
            if vm["guest"] == "server":
                await _pin_host_key(ctx, c, name)
                if vm["app_rate"]:
                    await _start_app(ctx, name, float(vm["app_rate"]))
        except RemoteError:
            # the host refused to start it (nothing runs): the lease goes with the attempt,
            # unless an earlier QEMU the inventory knows of may still hold it; on a timeout or
            # a lost connection this one may run, so the lease stays
            if on_file and vm["state"] != "running":
                with contextlib.suppress(LabError):
                    await filestores.lease(ctx, vm["datastore"], top, name, release=True)
            raise
    ctx.inv.update("vms", {"name": name}, state="running", pid=res.pid, started_at=time.time())
    return res


async def stop(ctx: LabContext, name: str) -> None:
    vm = row(ctx, name)
    if vm["state"] != "running":
        raise LabStateError(f"VM {name} is not running", vm=name)
    async with ctx.host_client(vm["host"]) as c:
        await hp.VM_STOP.call(c, hp.VmStop(name), timeout=60)
    ctx.inv.update("vms", {"name": name}, state="stopped", pid=None)
    if is_on_file(ctx, vm) and vm["disk_file"]:
        await filestores.lease(ctx, vm["datastore"], vm["disk_file"], name, release=True)


async def snapshot(ctx: LabContext, name: str, layer: str | None = None) -> Snapshotted:
    """A new top layer for running VM ``name`` on a file datastore (QMP
    blockdev-snapshot): the old top stops being written, so it gets a content ID and can be
    copied; the guest goes on writing into the new one."""
    vm = row(ctx, name)
    if not is_on_file(ctx, vm):
        raise LabStateError(f"VM {name} is not on a file datastore: a snapshot is a new qcow2 "
                            "layer (a LUN has none)", vm=name)
    host = running_host(ctx, name)
    ds, old = str(vm["datastore"]), str(vm["disk_file"])
    have = {f.name for f in (await filestores.files(ctx, ds)).files}
    if layer is None:
        i = 1
        while f"{name}.s{i}.qcow2" in have:
            i += 1
        layer = f"{name}.s{i}.qcow2"
    others = [str(v["name"]) for v in ctx.inv.rows("vms") if v["name"] != name]
    if any(layer == f"{o}.qcow2" for o in others):
        raise LabStateError(f"{layer} is the name of VM {layer[:-6]}'s disk: choose another",
                            layer=layer)
    new = layer
    await filestores.clone(ctx, ds, old, new, holder=name)
    await filestores.lease(ctx, ds, new, name)
    export = filestores.node_address(ctx, ds)[1]
    try:
        async with ctx.host_client(host) as c:
            done = await hp.VM_SNAPSHOT.call(c, hp.VmSnapshot(
                name=name, layer=hp.NfsLayer(f"{export}/{new}")), timeout=150)
    except RemoteError:
        # the host says the switch did not happen: the new layer was never written
        with contextlib.suppress(LabError):
            await filestores.lease(ctx, ds, new, name, release=True)
            await filestores.delete_file(ctx, ds, new)
        raise
    except LabError as exc:
        # no answer: QEMU may write the new layer already; both layers stay leased
        raise LabStateError(f"VM {name}: no answer to the snapshot onto {new} ({exc.message}):"
                            f" {new} and {old} are both kept in use; stop and start the VM "
                            "to settle it", vm=name, layer=new) from exc
    ctx.inv.update("vms", {"name": name}, disk_file=new)
    await filestores.lease(ctx, ds, old, name, release=True)
    return Snapshotted(vm=name, datastore=ds, top=new, previous=old, took_ms=done.took_ms,
                       layers=[layer.path.rsplit("/", 1)[1] for layer in done.disk.layers])


@dataclass(frozen=True)
class Snapshotted(Message):
    """``labctl vm snapshot --json``."""

    vm: str
    datastore: str
    #: the layer the VM writes now, and the one it wrote before (now read only)
    top: str
    previous: str
    #: how long the guest's writes were held for the switch, ms
    took_ms: float
    #: its chain now, top first
    layers: list[str]
