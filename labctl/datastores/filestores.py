"""File datastores: a filesystem on a storage node's virtio disk, exported over NFSv3 to
exactly the hosts that share it, holding image files (qcow2 chains) whose content IDs the
node's storage agent keeps (see :mod:`labctl.storage.files` for the rule).

A file datastore's **ID** comes from the same registry as a LUN's and reads the same
(``naa.`` and 32 hex digits): it is issued once, never reused, and its unit serial is
also the UUID of the datastore's ext4 filesystem, so the disk itself says which
datastore it is (the agent refuses a disk whose filesystem is another one's).

The data of image files moves only between storage agents (``pull_file``), never
through the controller; ``labctl image import`` streams a file from the controller's
disk to the agent.
"""

from __future__ import annotations

import asyncio
import os
import time
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path

from labctl.core.errors import AgentError, AgentUnreachable, LabError, LabStateError
from labctl.core.rpc import RpcClient
from labctl.core.wire import Message, WallTime
from labctl.datastores import disks
from labctl.datastores import protocol as dp
from labctl.datastores.mappings import is_file_datastore as is_file_datastore
from labctl.datastores.registry import IdRegistry
from labctl.drivers.sparse import send_extents
from labctl.state.context import LabContext
from labctl.state.inventory import Inventory
from labctl.storage import protocol as sp
from labctl.storage.node import DataDisk

#: the smallest file datastore: ext4 with its journal needs room of its own
MIN_SIZE = 64 << 20


@dataclass(frozen=True)
class HostCheck(Message):
    """What a sharing host found when it last read the export with QEMU's NFS client."""

    #: ``ok``, ``failed`` (see ``error``) or ``unchecked``
    state: str
    error: str | None
    checked_at: WallTime | None


@dataclass(frozen=True)
class FileDatastore(Message):
    """A file datastore as ``datastore list|show --json`` prints it."""

    name: str
    kind: str
    naa: str
    node: str
    size_bytes: int
    #: ``nfs://<node address><export>/`` + a file name opens a file of it (QEMU's nfs driver)
    url: str | None
    state: str
    hosts: list[str]
    #: each sharing host's own check of the export
    checked_by: dict[str, HostCheck] = field(default_factory=dict)


@dataclass(frozen=True)
class FilesListed(Message):
    """``labctl datastore files DS --json``."""

    datastore: str
    naa: str
    url: str | None
    size_bytes: int
    free_bytes: int
    files: list[sp.FileEntry]


@dataclass(frozen=True)
class Imported(Message):
    """``labctl image import --json``."""

    datastore: str
    file: sp.FileEntry
    bytes_moved: int
    seconds: float


def row(inv: Inventory, name: str) -> dict[str, object]:
    r = inv.row("file_datastores", name=name)
    if r is None:
        known = ", ".join(x["name"] for x in inv.rows("file_datastores")) or "none"
        kind = " (a block datastore)" if inv.row("datastores", name=name) else ""
        raise LabStateError(f"no file datastore {name!r}{kind} (file datastores: {known})",
                            datastore=name)
    return r


def _agent(ctx: LabContext, datastore: str) -> AbstractAsyncContextManager[RpcClient]:
    """A connection to the storage agent of the node holding file datastore ``datastore``."""
    return ctx.storage_client(str(row(ctx.inv, datastore)["node"]))


def register(ctx: LabContext, node: str, name: str, size: int, hosts: list[str],
             state: str) -> DataDisk:
    """Issue the datastore's ID (its filesystem's UUID too) and record it."""
    serial, naa = IdRegistry().issue(ctx.name, ctx.dir.path, node, name)
    disk = DataDisk(serial=f"lf-{name}"[:20], path=disks.disk_path(ctx, node, f"lf-{name}"[:20],
                                                                   name), size_bytes=size)
    ctx.inv.upsert("file_datastores", name=name, node=node, size_bytes=size,
                   unit_serial=serial, naa=naa, disk_serial=disk.serial,
                   backing_path=str(disk.path), export=None, state=state, created=time.time())
    for h in hosts:
        ctx.inv.upsert("file_datastore_hosts", datastore=name, host=h)
    return disk


async def export(ctx: LabContext, name: str, wait_disk: float = 0.0) -> sp.FilestoreInfo:
    """Have the node mount (making the filesystem the first time) and export the datastore
    to exactly its hosts' addresses."""
    inv = ctx.inv
    r = row(inv, name)
    clients = [str(h["address"]) for h in (inv.row("hosts", name=s["host"]) for s in
               inv.rows("file_datastore_hosts", datastore=name)) if h is not None]
    req = sp.EnsureFilestore(name=name, disk_serial=str(r["disk_serial"]),
                             fs_uuid=str(r["unit_serial"]), clients=clients)
    deadline = time.monotonic() + wait_disk
    async with ctx.storage_client(str(r["node"]), timeout=10) as c:
        while True:
            try:
                info = await sp.ENSURE_FILESTORE.call(c, req, timeout=300)
                break
            except AgentError as exc:
                # a hot-plugged disk needs a moment before the node's kernel lists it
                if "no virtio disk" not in exc.message or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
    inv.update("file_datastores", {"name": name}, export=info.export, state="exported")
    return info


async def check_hosts(ctx: LabContext, name: str) -> dict[str, HostCheck]:
    """Each sharing host reads the export with QEMU's own NFS client; the inventory keeps
    what each found. A host that cannot is reported, not fatal (``datastore show`` says)."""
    inv = ctx.inv
    server, export = node_address(ctx, name)

    async def one(host: str) -> None:
        try:
            async with ctx.host_client(host) as c:
                got = await dp.NFS_CHECK.call(c, dp.NfsCheck(server=server, export=export),
                                              timeout=60)
            error = got.error
        except LabError as exc:
            error = f"host agent: {exc.message}"
        inv.update("file_datastore_hosts", {"datastore": name, "host": host},
                   checked_at=time.time(), check_error=error)

    await asyncio.gather(*(one(str(s["host"])) for s in
                           inv.rows("file_datastore_hosts", datastore=name)))
    return shown(inv, name).checked_by


async def create(ctx: LabContext, name: str, size: int, hosts: list[str],
                 node: str) -> FileDatastore:
    """Allocate, make and export a new file datastore while the lab runs (the caller has
    checked the name, size and hosts and picked the node)."""
    disk = register(ctx, node, name, size, hosts, "allocating")
    await disks.attach_disk(ctx, node, disk)
    await export(ctx, name, wait_disk=10.0)
    await check_hosts(ctx, name)
    return shown(ctx.inv, name)


async def delete(ctx: LabContext, name: str) -> FileDatastore:
    """Unexport and unmount it, unplug its disk; its ID is never reused."""
    inv = ctx.inv
    gone = shown(inv, name)
    r = row(inv, name)
    users = [str(v["name"]) for v in inv.rows("vms", datastore=name)]
    if users:
        raise LabStateError(f"datastore {name} holds the disk of VM {', '.join(users)}: "
                            "delete refused", datastore=name, vms=users)
    async with ctx.storage_client(str(r["node"])) as c:
        await sp.DELETE_FILESTORE.call(c, sp.DatastoreName(datastore=name), timeout=120)
    await disks.detach_disk(ctx, str(r["node"]), str(r["disk_serial"]),
                            Path(str(r["backing_path"])))
    with inv.transaction():
        inv.conn.execute("DELETE FROM file_datastore_hosts WHERE datastore=?", (name,))
        inv.conn.execute("DELETE FROM file_datastores WHERE name=?", (name,))
    IdRegistry().release(gone.naa)
    return gone


def url(inv: Inventory, r: dict[str, object]) -> str | None:
    node = inv.row("storage_nodes", name=r["node"])
    if node is None or not r.get("export"):
        return None
    return f"nfs://{node['address']}{r['export']}/"


def shown(inv: Inventory, name: str) -> FileDatastore:
    r = row(inv, name)
    shares = inv.rows("file_datastore_hosts", datastore=name)
    return FileDatastore(
        name=name, kind="file", naa=str(r["naa"]), node=str(r["node"]),
        size_bytes=int(str(r["size_bytes"])), url=url(inv, r), state=str(r["state"]),
        hosts=[str(s["host"]) for s in shares],
        checked_by={str(s["host"]): HostCheck(
            state="unchecked" if s["checked_at"] is None else
            "failed" if s["check_error"] else "ok",
            error=s["check_error"], checked_at=s["checked_at"]) for s in shares})


def list_all(inv: Inventory) -> list[FileDatastore]:
    return [shown(inv, str(r["name"])) for r in inv.rows("file_datastores")]


async def files(ctx: LabContext, name: str) -> FilesListed:
    r = row(ctx.inv, name)
    async with ctx.storage_client(str(r["node"])) as c:
        got = await sp.LIST_FILES.call(c, sp.DatastoreName(datastore=name), timeout=120)
    return FilesListed(datastore=name, naa=str(r["naa"]), url=url(ctx.inv, r),
                       size_bytes=got.size_bytes, free_bytes=got.free_bytes, files=got.files)


async def import_image(ctx: LabContext, path: Path, datastore: str, name: str | None = None
                       ) -> Imported:
    """Stream an image file from this machine into a file datastore (sparse: only its data
    extents move): a whole image, or a layer whose backing file is already there."""
    r = row(ctx.inv, datastore)
    target = name or path.name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise LabStateError(f"cannot read {path}: {exc.strerror}", path=str(path)) from None
    node = ctx.inv.row("storage_nodes", name=r["node"])
    assert node is not None
    t0 = time.monotonic()
    try:
        st = os.fstat(fd)
        stream = await RpcClient.open_stream(
            str(node["address"]), int(node["agent_port"]), ctx.secret(), sp.FILE_UPLOAD,
            sp.Upload(datastore=datastore, name=target,
                      allocated_bytes=st.st_blocks * 512).to_wire(),
            peer=f"storage node {r['node']}")
        async with stream:
            try:
                first = await stream.recv()
                if "error" in first or not first.get("ready"):
                    err = first.get("error", {})
                    raise LabStateError(f"storage node {r['node']}: "
                                        f"{err.get('message', first)}", remote=err)
                await send_extents(stream, fd, st.st_size)
                await stream.send({"end": True, "size": st.st_size})
            except (EOFError, ConnectionError) as exc:
                raise AgentUnreachable(f"storage node {r['node']} went away during the "
                                       f"import of {target}: {exc!r}", node=r["node"]) from exc
            res = await stream.result()
    finally:
        os.close(fd)
    return Imported(datastore=datastore, file=sp.FileEntry.from_wire(res["file"]),
                    bytes_moved=int(res["bytes"]), seconds=round(time.monotonic() - t0, 3))


async def clone(ctx: LabContext, datastore: str, backing: str | None, name: str,
                holder: str | None = None, size_bytes: int | None = None) -> sp.FileEntry:
    """A linked clone: a new, empty qcow2 layer ``name`` on top of ``backing`` (a running
    VM's top when ``holder`` is that VM: a snapshot); without ``backing`` a blank image."""
    async with _agent(ctx, datastore) as c:
        return await sp.CREATE_OVERLAY.call(c, sp.CreateOverlay(
            datastore=datastore, name=name, backing=backing, holder=holder,
            size_bytes=size_bytes), timeout=120)


async def lease(ctx: LabContext, datastore: str, name: str, holder: str,
                release: bool = False) -> sp.FileEntry:
    """VM ``holder`` writes ``name`` from now on, or (``release``) no longer."""
    async with _agent(ctx, datastore) as c:
        return await sp.LEASE_FILE.call(c, sp.LeaseFile(datastore=datastore, name=name,
                                                       holder=holder, release=release))


async def chain(ctx: LabContext, datastore: str, name: str) -> sp.Chain:
    async with _agent(ctx, datastore) as c:
        return await sp.CHAIN.call(c, sp.FileRef(datastore=datastore, name=name), timeout=120)


async def wait_quiet(ctx: LabContext, datastore: str, name: str, timeout: float = 30.0
                     ) -> sp.FileEntry:
    """``name`` once nothing writes it any more (the NFS server closes a file a few seconds
    after its last write): it has a content ID then."""
    deadline = time.monotonic() + timeout
    while True:
        got = (await chain(ctx, datastore, name)).layers[0]  # that file alone, not a listing
        if got.content_id is not None:
            return got
        if time.monotonic() > deadline:
            raise LabStateError(f"{datastore}:{name} is still {got.state} after {timeout:g} s",
                                file=name, state=got.state)
        await asyncio.sleep(0.5)


def node_address(ctx: LabContext, datastore: str) -> tuple[str, str]:
    """(the storage node's address, the export's path) of a file datastore."""
    r = row(ctx.inv, datastore)
    node = ctx.inv.row("storage_nodes", name=r["node"])
    assert node is not None
    return str(node["address"]), str(r["export"])


async def delete_file(ctx: LabContext, datastore: str, name: str) -> sp.FileDeleted:
    users = [str(v["name"]) for v in ctx.inv.rows("vms", datastore=datastore)
             if v["disk_file"] == name]
    if users:
        raise LabStateError(f"{datastore}:{name} is the disk of VM {', '.join(users)}: delete "
                            "refused", file=name, vms=users)
    async with _agent(ctx, datastore) as c:
        return await sp.DELETE_FILE.call(c, sp.FileRef(datastore=datastore, name=name))
