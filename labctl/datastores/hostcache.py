"""The host agent's storage cache: what this host sees of each datastore, by its ID.

Registered into the host agent's handler table (``labctl/agents/host.py``). Each
entry is keyed by the datastore ID (the LUN's NAA ID, ``naa.6001405…``) and
holds the mapping the controller handed over (portal, target, LUN) plus what
the host itself last read from the array: capacity, the NAA ID it reported,
state (``ok`` / ``unreachable`` / ``mismatch`` / ``error``), when it was last
scanned, and how many SCSI commands this host sent for it.

The SCSI work runs in this process (the agent already lives in the host's
network namespace) through libiscsi via ctypes: one login, INQUIRY VPD 0x83
and READ CAPACITY(16), logout. A CHECK CONDITION with UNIT ATTENTION is
reported as an event and the command retried once.

RPC methods (requests, replies and events are the messages of
:mod:`labctl.datastores.protocol`):

* ``storage_attach(units)`` — take over mappings (and scan each one);
* ``storage_forget(units)`` — drop units (datastore deleted);
* ``storage_refresh(unit, origin)`` — re-read one unit;
* ``storage_rescan(unit=None)`` — one unit, or every unit plus discovery of the
  LUNs each known target shows this initiator (REPORT LUNS, in process, mutual CHAP);
* ``storage_lookup(unit)`` — does this host share the unit? (from the cache,
  no SCSI command: how the rescan service polls hosts);
* ``storage_cache()``, ``storage_report(kind, unit, detail)``;
* ``vm_block_resize(name, size_bytes)`` — tell a VM's QEMU the LUN's new size.

Events pushed (besides the agent's own): ``host_capacity_changed``,
``unit_attention``, ``io_error`` (QEMU's BLOCK_IO_ERROR on a VM's disk), each
``{host, at, unit, ...}``. A refresh the controller asked for (``origin
="controller"``) never raises an event, so a refresh cannot trigger itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from labctl.core.errors import LabError, LabStateError
from labctl.core.ids import normal_id
from labctl.core.wire import Empty, Json, WallTime, handlers
from labctl.datastores import protocol as p
from labctl.drivers import iscsi
from labctl.drivers.qemu import nfs_image_size
from labctl.hosts.protocol import NfsChainDisk, NfsLayer
from labctl.storage.protocol import NFS_MARKER

if TYPE_CHECKING:
    from labctl.core.rpc import Handler
    from labctl.drivers.qemu import QemuVm
    from labctl.hosts.agent import HostAgent
    from labctl.hosts.protocol import IscsiDisk

log = logging.getLogger("labctl.agents.host.storage")


@dataclass
class _Entry:
    """One unit in the cache: the mapping handed over and what the host last read."""

    naa: str
    portal: str
    target_iqn: str
    lun: int
    initiator_iqn: str
    datastore: str | None = None
    state: p.UnitState = "new"
    size_bytes: int | None = None
    seen_naa: str | None = None
    scanned_at: WallTime | None = None
    scans: int = 0
    scsi_commands: int = 0
    error: str | None = None

    def view(self) -> p.CacheEntry:
        return p.CacheEntry(
            naa=self.naa, datastore=self.datastore, portal=self.portal,
            target_iqn=self.target_iqn, lun=self.lun, size_bytes=self.size_bytes,
            state=self.state, seen_naa=self.seen_naa, scanned_at=self.scanned_at,
            scans=self.scans, scsi_commands=self.scsi_commands, error=self.error)

    def scanned(self, commands: int) -> p.Scan:
        return p.Scan(**vars(self.view()), commands_this_scan=commands)


class HostStorage:
    """The storage cache of one host agent and the RPC methods over it."""

    def __init__(self, agent: HostAgent) -> None:
        self.agent = agent
        self.cache: dict[str, _Entry] = {}
        self.scsi_commands = 0
        self._locks: dict[str, asyncio.Lock] = {}

    def handlers(self) -> dict[str, Handler]:
        return handlers(
            p.STORAGE_ATTACH.serve(self.storage_attach), p.STORAGE_FORGET.serve(self.storage_forget),
            p.STORAGE_REFRESH.serve(self.storage_refresh),
            p.STORAGE_RESCAN.serve(self.storage_rescan),
            p.STORAGE_LOOKUP.serve(self.storage_lookup), p.STORAGE_CACHE.serve(self.storage_cache),
            p.STORAGE_REPORT.serve(self.storage_report),
            p.VM_BLOCK_RESIZE.serve(self.vm_block_resize), p.NFS_CHECK.serve(self.nfs_check))

    async def nfs_check(self, req: p.NfsCheck) -> p.NfsChecked:
        """Read the export's marker file with QEMU's own NFS client (``qemu-img info``): the
        MOUNT service answers this host, the export lets it in, NFS reads work."""
        try:  # checked as a VM's disk on that export would be
            marker = NfsChainDisk(server=req.server, layers=[
                NfsLayer(f"{req.export}/{NFS_MARKER}", "raw")])
        except ValueError as exc:
            raise LabError(f"nfs_check: {exc}") from None
        t0 = time.monotonic()
        _size, error = await nfs_image_size(marker.server, marker.layers[0].path)
        return p.NfsChecked(server=req.server, export=req.export, error=error,
                            seconds=round(time.monotonic() - t0, 3))

    # -- helpers
    def _entry(self, unit: str) -> _Entry:
        uid = normal_id(unit)
        if uid not in self.cache:
            raise LabStateError(f"host {self.agent.host} has no datastore {uid} in its cache",
                                host=self.agent.host, naa=uid, known=sorted(self.cache))
        return self.cache[uid]

    async def _scan(self, uid: str, origin: str) -> p.Scan:
        e = self.cache[uid]
        async with self._locks.setdefault(uid, asyncio.Lock()):
            before = e.size_bytes
            try:
                got = await asyncio.to_thread(iscsi.probe_unit, e.portal, e.target_iqn, e.lun,
                                              e.initiator_iqn,
                                              self.agent.chap(e.initiator_iqn, e.target_iqn))
            except LabError as exc:
                cmds = int(exc.evidence.get("scsi_commands", 0))
                e.state = "unreachable" if "login" in exc.message else "error"
                e.error, e.scanned_at = exc.message, WallTime(time.time())
            else:
                cmds = got.commands
                seen = got.naa
                e.seen_naa, e.size_bytes, e.scanned_at = seen, got.size_bytes, WallTime(time.time())
                e.state = "ok" if seen == uid else "mismatch"
                e.error = None if seen == uid else f"LUN reports {seen}, not {uid}"
                for key, ascq in got.unit_attentions:
                    log.info("unit %s: UNIT ATTENTION ascq %#06x", uid, ascq)
                    if origin != "controller":
                        self.agent.publish(p.EVENT_UNIT_ATTENTION, p.UnitAttention(
                            host=self.agent.host, at=time.time(), naa=uid, sense_key=key,
                            ascq=ascq))
                if before is not None and before != e.size_bytes and origin != "controller":
                    self.agent.publish(p.EVENT_HOST_CAPACITY_CHANGED, p.HostCapacityChanged(
                        host=self.agent.host, at=time.time(), naa=uid, datastore=e.datastore,
                        previous_size_bytes=before, size_bytes=got.size_bytes))
            e.scans += 1
            e.scsi_commands += cmds
            self.scsi_commands += cmds
            return e.scanned(cmds)

    # -- RPC methods
    async def storage_attach(self, req: p.StorageAttach) -> p.Attached:
        """Take over the controller's mapping ID -> portal/target/LUN and scan each unit."""
        ids = []
        for u in req.units:
            uid = normal_id(u.naa)
            entry = self.cache.get(uid)
            if entry is None:
                entry = self.cache[uid] = _Entry(naa=uid, portal=u.portal,
                                                 target_iqn=u.target_iqn, lun=u.lun,
                                                 initiator_iqn=u.initiator_iqn)
            entry.datastore, entry.portal, entry.target_iqn = u.datastore, u.portal, u.target_iqn
            entry.lun, entry.initiator_iqn = u.lun, u.initiator_iqn
            ids.append(uid)
        return p.Attached(units=list(await asyncio.gather(
            *(self._scan(uid, "controller") for uid in ids))))

    async def storage_forget(self, req: p.UnitIds) -> p.UnitIds:
        gone = []
        for u in req.units:
            if self.cache.pop(normal_id(u), None) is not None:
                gone.append(normal_id(u))
        return p.UnitIds(units=gone)

    async def storage_refresh(self, req: p.Refresh) -> p.Scan:
        """Re-read one unit (its capacity and ID) without touching any other."""
        uid = normal_id(req.naa)
        self._entry(uid)
        return await self._scan(uid, req.origin)

    async def storage_rescan(self, req: p.Rescan) -> p.Rescanned:
        """Rescan one unit, or everything: each known unit plus discovery (REPORT LUNS) on the
        portals this host knows, so LUNs the array added or removed show up."""
        if req.naa is not None:
            return p.Rescanned(
                units=[await self.storage_refresh(p.Refresh(req.naa, origin="user"))],
                discovered=[])
        units = await asyncio.gather(*(self._scan(uid, "user") for uid in sorted(self.cache)))
        discovered: list[p.Discovered] = []
        portals = sorted({(e.portal, e.initiator_iqn, e.target_iqn)
                          for e in self.cache.values()})
        for portal, initiator, target in portals:
            try:
                luns, commands = await asyncio.to_thread(
                    iscsi.report_luns, portal, target, initiator,
                    self.agent.chap(initiator, target))
            except LabError as exc:
                self.scsi_commands += int(exc.evidence.get("scsi_commands", 0))
                discovered.append(p.Discovered(portal=portal, target_iqn=target,
                                               error=exc.message))
                continue
            self.scsi_commands += commands
            known = {(e.target_iqn, e.lun) for e in self.cache.values()}
            for info in luns:
                discovered.append(p.Discovered(
                    portal=portal, target_iqn=info.target_iqn, lun=info.lun,
                    size_bytes=info.size_bytes, mapped=(info.target_iqn, info.lun) in known))
        return p.Rescanned(units=list(units), discovered=discovered)

    async def storage_lookup(self, req: p.UnitId) -> p.Lookup:
        """Whether this host shares ``unit``, from its cache alone (no SCSI command)."""
        uid = normal_id(req.naa)
        e = self.cache.get(uid)
        return p.Lookup(host=self.agent.host, naa=uid, shares=e is not None,
                        entry=None if e is None else e.view())

    async def storage_cache(self, _: Empty) -> p.HostCache:
        return p.HostCache(host=self.agent.host, scsi_commands=self.scsi_commands,
                           units=[self.cache[k].view() for k in sorted(self.cache)])

    async def storage_report(self, req: p.Report) -> p.Reported:
        """Report something this host noticed about a unit (e.g. from another tool)."""
        if req.kind not in p.HOST_EVENTS:
            raise LabError(f"storage_report: unknown kind {req.kind!r} (io_error, unit_attention, "
                           "host_capacity_changed)", kind=req.kind)
        uid = normal_id(req.naa)
        self.agent.publish(req.kind, p.StorageReported(host=self.agent.host, at=time.time(),
                                                       naa=uid, detail=req.detail or {}))
        return p.Reported(host=self.agent.host, naa=uid, kind=req.kind)

    async def vm_block_resize(self, req: p.VmSize) -> p.VmSize:
        """QEMU ``block_resize`` of the VM's disk node to exactly ``size_bytes`` (the LUN's
        new capacity): the guest's virtio-blk then reports the new size."""
        if req.size_bytes <= 0:
            raise LabError("vm_block_resize: size_bytes must be a positive integer")
        vm = self.agent.vm(req.name)
        await vm.execute("block_resize", {"node-name": "disk0", "size": req.size_bytes},
                         timeout=30.0)
        return p.VmSize(name=req.name, size_bytes=req.size_bytes)

    async def probe_disk(self, disk: IscsiDisk) -> tuple[str, int]:
        """The NAA ID and capacity a VM's iSCSI disk reports to this host now (one login, as
        a refresh does); the cached entry of its unit, if any, is updated by the same probe."""
        if disk.naa is not None:
            uid = normal_id(disk.naa)
            e = self.cache.get(uid)
            if e is not None and (e.portal, e.target_iqn, e.lun) == (
                    disk.portal, disk.target_iqn, disk.lun):
                got = await self._scan(uid, "controller")
                if got.state not in ("ok", "mismatch") or got.seen_naa is None \
                        or got.size_bytes is None:
                    raise LabError(f"host {self.agent.host}: {got.error}", naa=uid)
                return got.seen_naa, got.size_bytes
        found = await asyncio.to_thread(iscsi.probe_unit, disk.portal, disk.target_iqn, disk.lun,
                                        disk.initiator_iqn, self.agent.disk_chap(disk))
        self.scsi_commands += found.commands
        return found.naa, found.size_bytes

    # -- QEMU block I/O errors
    def on_vm_event(self, vm: QemuVm, ev: dict[str, Json]) -> None:
        """A QMP event of a VM of this host: BLOCK_IO_ERROR on its disk is published as a
        storage event of the datastore."""
        if ev.get("event") != "BLOCK_IO_ERROR":
            return
        disk = getattr(vm.spec.disk, "naa", None)
        unit = normal_id(disk) if isinstance(disk, str) and disk else None
        if unit is None:
            for uid, e in self.cache.items():
                if getattr(vm.spec.disk, "lun", None) == e.lun and getattr(
                        vm.spec.disk, "portal", None) == e.portal:
                    unit = uid
        self.agent.publish(p.EVENT_IO_ERROR, p.IoError(host=self.agent.host, at=time.time(),
                                                       naa=unit, vm=vm.spec.name,
                                                       detail=ev.get("data", {})))
