"""Datastores with array-style IDs: allocation, the ID registry, create/delete/resize.

A datastore is one iSCSI LUN (LIO iblock) on a virtio data disk of a storage node
VM. Its **ID is the NAA identifier LIO builds for the LUN**: NAA type 6, LIO's
company ID 0x001405, then the first 25 hex digits of the LUN's unit serial
(``naa_from_unit_serial``). The controller draws a random 32-hex-digit unit
serial and asks the :class:`IdRegistry` for it: the registry (SQLite under
``labctl.paths.home()``, outside every lab) records every ID ever issued, across
labs and storage nodes, and never hands one out twice — also after a delete.

Allocation policy: the datastore goes to a storage node that is up, in the site of
its hosts, with room for it (node capacity minus the sizes of its datastores); among
those, the one with the **most free space** (ties: topology order), unless ``node=``
names one. No such node: a clear refusal listing each node's free space.

The mapping ID -> storage node, target, LUN, backing volume lives in the lab
inventory (``datastores`` table); a host gets it (``storage_attach``) when it is
named for the datastore, and again when a VM on it starts there, so the host
attaches by ID and checks the LUN really reports that ID.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labctl.core import names
from labctl.core.errors import AgentError, LabStateError, ProtocolError, StorageNodeError
from labctl.core.ids import normal_naa
from labctl.core.rpc import RpcClient
from labctl.core.sizes import format_size, parse_size
from labctl.core.wire import Message, WallTime
from labctl.datastores import filestores, rescan, tables
from labctl.datastores import protocol as dp
from labctl.datastores.disks import attach_disk as attach_disk
from labctl.datastores.disks import detach_disk as detach_disk
from labctl.datastores.disks import disk_path as disk_path
from labctl.datastores.disks import machine_of as machine_of
from labctl.datastores.disks import resize_disk as resize_disk
from labctl.datastores.mappings import Backing as Backing
from labctl.datastores.mappings import Mapping as Mapping
from labctl.datastores.mappings import mapping as mapping
from labctl.datastores.mappings import unit as unit
from labctl.datastores.registry import IdRegistry
from labctl.datastores.tables import RescanEvent, record_seen, sharing
from labctl.hosts.sshhosts import SshAccess, SshHosts
from labctl.state.context import LabContext
from labctl.state.inventory import Inventory
from labctl.storage import node as storagenode
from labctl.storage import protocol as sp
from labctl.storage.image import ensure_storage_image
from labctl.storage.node import DataDisk

MIN_SIZE = 1 << 20


# ------------------------------------------------------------------------------ results
# What the operations return; ``to_wire()`` is what ``labctl datastore ... --json`` prints.

@dataclass(frozen=True)
class Seen(Message):
    """What one host last read of a datastore (the inventory's record)."""

    naa: str | None
    size_bytes: int | None
    scanned_at: WallTime | None


@dataclass(frozen=True)
class Registered(Message):
    """When the registry issued a datastore's ID, and to which lab."""

    issued: float
    lab: str


@dataclass(frozen=True)
class Shown(Mapping):
    """``datastore show``: the mapping, what each host last read, its VMs, its registry entry."""

    seen_by: dict[str, Seen]
    vms: list[str]
    registry: Registered | None


@dataclass(frozen=True)
class Created(Mapping):
    """``datastore create``: the mapping and each named host's first scan of it."""

    seen_by: dict[str, dp.Scan]
    seconds: float


@dataclass(frozen=True)
class Deleted(Message):
    name: str
    naa: str | None
    #: the hosts that dropped the unit from their cache
    hosts_told: list[str]


@dataclass(frozen=True)
class Resized(Message):
    name: str
    naa: str | None
    size_bytes: int
    #: the libvirt block resize
    resized_at: WallTime
    #: the rescan service's record of the round that carried the new size (None: not waited,
    #: or nothing changed)
    event: RescanEvent | None
    #: False when the datastore already had that size (nothing was done)
    changed: bool = True


@dataclass(frozen=True)
class Reexported(Message):
    name: str
    naa: str
    lun: int | None


@dataclass(frozen=True)
class Restarted(Message):
    node: str
    #: from domain start to the agent answering
    boot_s: float
    #: the whole restart, re-export included
    seconds: float
    luns: list[Reexported]
    #: file datastores mounted and exported again (their content IDs are on their disks)
    file_datastores: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------ mappings

async def hand_mappings(ctx: LabContext, hosts: list[str] | None = None,
                        datastores: list[str] | None = None) -> dict[str, list[dp.Scan]]:
    """Give each host the mappings of the datastores it is named for; each scans them by ID."""
    seen: dict[str, list[dp.Scan]] = {}
    inv = ctx.inv

    async def one(host: str) -> None:
        names = [r.datastore for r in sharing(inv, host=host)
                 if datastores is None or r.datastore in datastores]
        if not names:
            return
        units = [unit(inv, d, host) for d in names]
        async with ctx.host_client(host) as c:
            got = await dp.STORAGE_ATTACH.call(c, dp.StorageAttach(units), timeout=60)
        if len(got.units) != len(units):
            raise ProtocolError(f"host {host} answered storage_attach for {len(got.units)} "
                                   f"of {len(units)} units", host=host)
        seen[host] = got.units
        for d, g in zip(names, got.units, strict=True):
            if g.state == "ok":
                record_seen(inv, d, host, g)

    targets = hosts if hosts is not None else [h["name"] for h in inv.rows("hosts", kind="host")]
    await asyncio.gather(*(one(h) for h in targets))
    return seen


# ------------------------------------------------------------------------------ allocation

def free_space(inv: Inventory) -> dict[str, int]:
    free = {n["name"]: int(n["capacity"]) for n in inv.rows("storage_nodes")}
    for ds in inv.rows("datastores") + inv.rows("file_datastores"):
        free[ds["node"]] = free.get(ds["node"], 0) - int(ds["size_bytes"])
    return free


def pick_node(inv: Inventory, size: int, site: str, node: str | None = None) -> str:
    """The storage node a new datastore of ``size`` bytes goes to (see the module's policy)."""
    free = free_space(inv)
    nodes = [n for n in inv.rows("storage_nodes") if n["site"] == site]
    if node is not None:
        row = inv.row("storage_nodes", name=node)
        if row is None:
            raise LabStateError(f"unknown storage node {node!r} (storage nodes: "
                                f"{', '.join(n['name'] for n in inv.rows('storage_nodes'))})")
        if row["site"] != site:
            raise LabStateError(f"storage node {node} is in site {row['site']}, the hosts in {site}")
        nodes = [row]
    fits = [n for n in nodes if n["state"] == "up" and free[n["name"]] >= size]
    if not fits:
        room = "; ".join(f"{n['name']}: {format_size(max(free[n['name']], 0))} free of "
                         f"{format_size(n['capacity'])}" + ("" if n["state"] == "up" else
                                                             f" ({n['state']})")
                         for n in nodes) or f"no storage node in site {site}"
        raise LabStateError(f"no storage node has room for {format_size(size)} ({room})",
                            size_bytes=size, free=free)
    return str(max(fits, key=lambda n: free[n["name"]])["name"])


def _check_name(name: str) -> None:
    if not names.LAB_NAME_RE.fullmatch(name):
        raise LabStateError(f"bad datastore name {name!r}: {names.LAB_NAME_RULE}",
                            datastore=name)


def check_size(size: int | str) -> int:
    """The bytes of a datastore size as ``datastore create|resize`` take it (``128M``)."""
    try:
        n = parse_size(size)
    except ValueError as exc:
        raise LabStateError(str(exc)) from None
    if n < MIN_SIZE or n % 512:
        raise LabStateError(f"bad size {size!r}: at least 1M and a multiple of 512 bytes")
    return n


def check_hosts(inv: Inventory, hosts: list[str]) -> str:
    """The site of the hosts named for a new datastore: at least one, each once, each a host
    of the lab, all in one site (else a refusal that lists the lab's hosts)."""
    rows = {r["name"]: r for r in inv.rows("hosts", kind="host")}
    known = ", ".join(rows) or "none"
    if not hosts:
        raise LabStateError(f"no host named: --hosts lists the hosts that share the datastore, "
                            f"comma-separated (hosts: {known})", hosts=hosts)
    for h in hosts:
        if h not in rows:
            raise LabStateError(f"unknown host {h!r} (hosts: {known})", host=h)
        if hosts.count(h) > 1:
            raise LabStateError(f"host {h} is named twice in --hosts: name each host once",
                                hosts=hosts)
    sites = {rows[h]["site"] for h in hosts}
    if len(sites) != 1:
        raise LabStateError(f"the hosts of a datastore must be in one site ({sorted(sites)})")
    return str(sites.pop())


# ------------------------------------------------------------------------------ operations

async def create(ctx: LabContext, name: str, size: int | str, hosts: list[str],
                 node: str | None = None) -> Created:
    """Allocate, export and hand out a new datastore while the lab runs."""
    _check_name(name)
    nbytes = check_size(size)
    inv = ctx.inv
    with ctx.lock():
        if inv.row("datastores", name=name) or inv.row("file_datastores", name=name):
            raise LabStateError(f"datastore {name} already exists", datastore=name)
        site = check_hosts(inv, hosts)
        chosen = pick_node(inv, nbytes, site, node)
        naa, disk = register(ctx, chosen, name, nbytes, hosts, "allocating")
        t0 = time.monotonic()
        await attach_disk(ctx, chosen, disk)
        lun = await export_lun(ctx, name, wait_disk=10.0)
        if normal_naa(lun.naa) != naa:
            raise StorageNodeError(f"LIO built NAA {normal_naa(lun.naa)} for {name}, the "
                                   f"registry issued {naa}", datastore=name)
        seen = await hand_mappings(ctx, hosts=hosts, datastores=[name])
        took = time.monotonic() - t0
        m = mapping(inv, name)
        return Created(**vars(m), seen_by={h: s[0] for h, s in seen.items()},
                       seconds=round(took, 3))


async def create_file(ctx: LabContext, name: str, size: int | str, hosts: list[str],
                      node: str | None = None) -> filestores.FileDatastore:
    """A new file datastore (the same name, size, host and placement rules as a LUN)."""
    _check_name(name)
    nbytes = check_size(size)
    inv = ctx.inv
    if inv.row("datastores", name=name) or inv.row("file_datastores", name=name):
        raise LabStateError(f"datastore {name} already exists", datastore=name)
    if nbytes < filestores.MIN_SIZE:
        raise LabStateError(f"bad size {size!r}: a file datastore needs at least "
                            f"{format_size(filestores.MIN_SIZE)} (its filesystem)",
                            size_bytes=nbytes)
    site = check_hosts(inv, hosts)
    chosen = pick_node(inv, nbytes, site, node)
    return await filestores.create(ctx, name, nbytes, hosts, chosen)


def register(ctx: LabContext, node: str, name: str, size: int, hosts: list[str],
             state: str) -> tuple[str, DataDisk]:
    """Issue the datastore's ID and record it, its backing disk and who shares it in the
    inventory. Returns the NAA ID and the backing disk to give the storage node."""
    inv = ctx.inv
    serial, naa = IdRegistry().issue(ctx.name, ctx.dir.path, node, name)
    disk = DataDisk(serial=f"lc-{name}"[:20], path=disk_path(ctx, node, f"lc-{name}"[:20],
                                                             name), size_bytes=size)
    inv.upsert("datastores", name=name, node=node, size_bytes=size, unit_serial=serial,
               naa=naa, lun=None, disk_serial=disk.serial, backing_path=str(disk.path),
               state=state, created=time.time())
    for h in hosts:
        inv.upsert("datastore_hosts", datastore=name, host=h, seen_naa=None, seen_size=None,
                   scanned_at=None)
    return naa, disk


async def export_lun(ctx: LabContext, name: str, wait_disk: float = 0.0) -> sp.LunEnsured:
    """Have the storage node export the datastore as a LUN to exactly its hosts (the ACLs);
    the inventory takes the LUN as LIO reports it (its ID as ``normal_naa(lun.naa)``)."""
    inv = ctx.inv
    ds = tables.datastore(inv, name=name)
    assert ds is not None
    initiators = [h["initiator_iqn"] for h in (inv.row("hosts", name=r.host) for r in
                  sharing(inv, datastore=name)) if h is not None]
    req = sp.EnsureLun(name=name, disk_serial=ds.disk_serial, unit_serial=ds.unit_serial,
                       initiators=initiators)
    deadline = time.monotonic() + wait_disk
    async with ctx.storage_client(ds.node) as c:
        while True:
            try:
                lun = await sp.ENSURE_LUN.call(c, req)
                break
            except AgentError as exc:
                # a hot-plugged disk needs a moment before the node's kernel lists it
                if "no virtio disk" not in exc.message or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
    inv.update("datastores", {"name": name}, naa=normal_naa(lun.naa), lun=lun.lun,
               size_bytes=lun.size_bytes, state="exported")
    return lun


async def delete(ctx: LabContext, name: str) -> Deleted:
    """Remove a datastore no VM uses: hosts forget it, LIO drops it, the disk is unplugged."""
    inv = ctx.inv
    with ctx.lock():
        m = mapping(inv, name)
        users = [v["name"] for v in inv.rows("vms", datastore=name)]
        if users:
            raise LabStateError(f"datastore {name} is the disk of VM {', '.join(users)}: "
                                "delete refused", datastore=name, vms=users)
        forgot = []
        for h in m.hosts:
            try:
                async with ctx.host_client(h) as c:
                    await dp.STORAGE_FORGET.call(c, dp.UnitIds(units=[m.naa or ""]))
                forgot.append(h)
            except AgentError as exc:
                ctx.progress(f"warning: host {h} did not drop {m.naa}: {exc.message}")
        async with ctx.storage_client(m.node) as c:
            await sp.DELETE_LUN.call(c, sp.LunName(name), timeout=60)
        await detach_disk(ctx, m.node, m.backing.disk_serial, Path(m.backing.path))
        with inv.transaction():
            inv.conn.execute("DELETE FROM datastore_hosts WHERE datastore=?", (name,))
            inv.conn.execute("DELETE FROM datastores WHERE name=?", (name,))
        if m.naa:
            IdRegistry().release(m.naa)
        return Deleted(name=name, naa=m.naa, hosts_told=forgot)


async def resize(ctx: LabContext, name: str, size: int | str, wait: float = 30.0) -> Resized:
    """Grow the datastore's backing disk through libvirt (a hardware reconfiguration: LIO
    itself then reports the new capacity); the storage agent notices and publishes the
    event, and the lab's rescan service refreshes the sharing hosts. Waits for its record."""
    nbytes = check_size(size)
    inv = ctx.inv
    with ctx.lock():
        m = mapping(inv, name)
        if nbytes == m.size_bytes:  # already there: like any idempotent request, done
            return Resized(name=name, naa=m.naa, size_bytes=nbytes, resized_at=WallTime(time.time()),
                           event=None, changed=False)
        if nbytes < m.size_bytes:
            raise LabStateError(f"datastore {name} is {format_size(m.size_bytes)}: a LUN "
                                f"only grows (asked for {format_size(nbytes)})",
                                datastore=name)
        free = free_space(inv)[m.node]
        if nbytes - m.size_bytes > free:
            raise LabStateError(f"storage node {m.node} has {format_size(free)} free: "
                                f"cannot grow {name} by "
                                f"{format_size(nbytes - m.size_bytes)}", datastore=name)
        after = rescan.last_event_id(inv)
        t0 = WallTime(time.time())
        await resize_disk(ctx, m.node, m.backing.disk_serial, nbytes)
    if wait <= 0 or m.naa is None:
        return Resized(name=name, naa=m.naa, size_bytes=nbytes, resized_at=t0, event=None)
    ev = await rescan.wait_for_event(inv, m.naa, after, size_bytes=nbytes, timeout=wait)
    return Resized(name=name, naa=m.naa, size_bytes=nbytes, resized_at=t0, event=ev)


def show(ctx: LabContext, name: str) -> Shown:
    inv = ctx.inv
    m = mapping(inv, name)
    reg = IdRegistry().get(m.naa) if m.naa else None
    return Shown(
        **vars(m),
        seen_by={r.host: Seen(naa=r.seen_naa, size_bytes=r.seen_size, scanned_at=r.scanned_at)
                 for r in sharing(inv, datastore=name)},
        vms=[v["name"] for v in inv.rows("vms", datastore=name)],
        registry=None if reg is None else Registered(issued=reg.issued, lab=reg.lab))


def list_all(ctx: LabContext) -> list[Mapping]:
    return [mapping(ctx.inv, d.name) for d in tables.datastores(ctx.inv)]


# ------------------------------------------------------------------------------ hosts

async def host_storage(ctx: LabContext, host: str, rescan_unit: str | None = None,
                       rescan_all: bool = False) -> dp.HostCache:
    async with ctx.host_client(host) as c:
        if rescan_all or rescan_unit is not None:
            await dp.STORAGE_RESCAN.call(c, dp.Rescan(naa=rescan_unit), timeout=120)
        return await dp.STORAGE_CACHE.call(c)


async def attach_for_vm(client: RpcClient, inv: Inventory, datastore: str, host: str
                        ) -> dp.Scan:
    """Hand ``host`` the mapping of a VM's datastore before the VM starts there; the host scans
    the unit by ID and the VM is started only if the LUN really reports that ID."""
    u = unit(inv, datastore, host)
    got = await dp.STORAGE_ATTACH.call(client, dp.StorageAttach([u]), timeout=60)
    if len(got.units) != 1:
        raise ProtocolError(f"host {host} answered storage_attach for {len(got.units)} units, "
                            "not 1", host=host)
    scan = got.units[0]
    if scan.state != "ok":
        raise LabStateError(f"host {host} cannot attach datastore {datastore} by its ID "
                            f"{u.naa}: {scan.error or scan.state}",
                            host=host, datastore=datastore, seen=scan.to_wire())
    return scan


# ------------------------------------------------------------------------------ storage nodes

async def portal_set(ctx: LabContext, node: str, up: bool) -> sp.PortalState:
    """Take a storage node's iSCSI portal down (new logins refused) or bring it back."""
    async with ctx.storage_client(node) as c:
        return await sp.PORTAL_SET.call(c, sp.PortalSet(up=up))


async def restart_node(ctx: LabContext, node: str) -> Restarted:
    """Restart a storage node (a fresh root overlay: LIO state is gone) and re-export every
    datastore on it with the same unit serials, so every ID stays what hosts know."""
    inv = ctx.inv
    with ctx.lock():
        row = inv.row("storage_nodes", name=node)
        if row is None:
            raise LabStateError(f"unknown storage node {node!r}", node=node)
        site = inv.row("sites", name=row["site"])
        assert site is not None
        prefix = site["subnet"].split("/")[1]
        if row["ssh"]:
            return await _restart_machine(ctx, row, int(prefix))
        stores = tables.datastores(inv, node=node)
        spec = storagenode.StorageNodeSpec(
            lab=ctx.name, name=node, lab_dir=ctx.dir.path,
            address_cidr=f"{row['address']}/{prefix}", bridge=site["bridge"], tap=row["tap"],
            mac=str(row["mac"]), memory_mib=int(row["memory"]) >> 20,
            data_disks=[DataDisk(serial=d.disk_serial, path=Path(d.backing_path),
                                 size_bytes=d.size_bytes) for d in stores]
            + [DataDisk(serial=f["disk_serial"], path=Path(f["backing_path"]),
                        size_bytes=int(f["size_bytes"]))
               for f in inv.rows("file_datastores", node=node)],
            secret=ctx.secret(), target_iqn=row["target_iqn"],
            agent_port=names.STORAGE_AGENT_PORT, peer_secret=ctx.storage_peer_key())
        image = await ensure_storage_image(progress=ctx.progress)
        inv.update("storage_nodes", {"name": node}, state="restarting")
        t0 = time.monotonic()
        handle = await storagenode.start(spec, image, accel=str(row["domain_type"]))
        inv.update("storage_nodes", {"name": node}, state="up")
        return await _reexport(ctx, node, stores, handle.boot_s, t0)


async def _restart_machine(ctx: LabContext, row: dict[str, Any], prefix: int) -> Restarted:
    """A storage node that is a machine: its agent stopped and what it made in the
    machine's kernel released (its LUNs and exports vanish from the hosts, as when a node
    VM restarts), then the agent started again on the same disks (their files kept) and
    every datastore re-exported. The machine itself is not rebooted: another lab's node
    may be on it."""
    node = str(row["name"])
    machines = SshHosts(ctx.name, ctx.dir.path, ctx.inv)
    ctx.inv.update("storage_nodes", {"name": node}, state="restarting")
    t0 = time.monotonic()
    for line in await machines.stop_storage(node):
        ctx.progress(f"storage node {node}: {line}")
    await machines.provision_storage(node, str(row["address"]), prefix,
                                     str(row["target_iqn"]), ctx.secret(),
                                     ctx.storage_peer_key(), SshAccess.from_json(row["ssh"]))
    return await serve_again(ctx, node, time.monotonic() - t0, t0)


async def serve_again(ctx: LabContext, node: str, boot_s: float = 0.0,
                      t0: float | None = None) -> Restarted:
    """A machine's node whose agent was started again (restarted, or after the machine
    rebooted): each disk attached again (its file is there: the same blocks, on a loop
    device again if the machine lost it) and every datastore, LUN or file, exported again
    with its serial."""
    stores = tables.datastores(ctx.inv, node=node)
    disks = [DataDisk(serial=d.disk_serial, path=Path(d.backing_path), size_bytes=d.size_bytes)
             for d in stores] + [
        DataDisk(serial=f["disk_serial"], path=Path(f["backing_path"]),
                 size_bytes=int(f["size_bytes"]))
        for f in ctx.inv.rows("file_datastores", node=node)]
    for disk in disks:
        await attach_disk(ctx, node, disk)
    ctx.inv.update("storage_nodes", {"name": node}, state="up")
    return await _reexport(ctx, node, stores, boot_s, time.monotonic() if t0 is None else t0)


async def _reexport(ctx: LabContext, node: str, stores: list[tables.Datastore],
                    boot_s: float, t0: float) -> Restarted:
    """Every datastore of a restarted node exported again with its unit serial: each LUN
    must come back with the NAA hosts know; each file datastore mounted, exported and
    checked from its hosts."""
    inv = ctx.inv
    luns = []
    for d in stores:
        lun = await export_lun(ctx, d.name)
        naa = normal_naa(lun.naa)
        if naa != d.naa:
            raise StorageNodeError(f"after the restart {d.name} has NAA {naa}, "
                                   f"not {d.naa}", datastore=d.name)
        luns.append(Reexported(name=d.name, naa=naa, lun=lun.lun))
    files = []
    for f in inv.rows("file_datastores", node=node):
        # the filesystem and its content IDs are on the disk: mounted and exported again
        await filestores.export(ctx, str(f["name"]))
        await filestores.check_hosts(ctx, str(f["name"]))
        files.append(str(f["name"]))
    return Restarted(node=node, boot_s=round(boot_s, 2),
                     seconds=round(time.monotonic() - t0, 2), luns=luns,
                     file_datastores=files)
