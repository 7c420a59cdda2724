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

RPC methods:

* ``storage_attach(units)`` — take over mappings (and scan each one);
* ``storage_forget(units)`` — drop units (datastore deleted);
* ``storage_refresh(unit, origin)`` — re-read one unit;
* ``storage_rescan(unit=None)`` — one unit, or every unit plus discovery of the
  LUNs each known portal shows this initiator (REPORT LUNS via ``iscsi-ls``);
* ``storage_lookup(unit)`` — does this host share the unit? (from the cache,
  no SCSI command: how the rescan service polls hosts);
* ``storage_cache()``, ``storage_report(kind, unit, detail)``;
* ``vm_block_resize(name, size_bytes)`` — tell a VM's QEMU the LUN's new size.

Events pushed (besides the agent's own): ``host_capacity_changed``,
``unit_attention``, ``io_error`` (QEMU's BLOCK_IO_ERROR on a VM's disk), each
``{host, unit, ...}``. A refresh the controller asked for (``origin
="controller"``) never raises an event, so a refresh cannot trigger itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from labctl.core.errors import LabError, LabStateError
from labctl.core.ids import normal_id
from labctl.drivers import iscsi
from labctl.drivers.iscsi import probe_unit

if TYPE_CHECKING:
    from labctl.core.rpc import Handler
    from labctl.drivers.qemu import QemuVm
    from labctl.hosts.agent import HostAgent
    from labctl.hosts.protocol import IscsiDisk

log = logging.getLogger("labctl.agents.host.storage")

class HostStorage:
    """The storage cache of one host agent and the RPC methods over it."""

    def __init__(self, agent: HostAgent) -> None:
        self.agent = agent
        self.cache: dict[str, dict[str, Any]] = {}
        self.scsi_commands = 0
        self._locks: dict[str, asyncio.Lock] = {}

    def handlers(self) -> dict[str, Handler]:
        return {
            "storage_attach": self.storage_attach, "storage_forget": self.storage_forget,
            "storage_refresh": self.storage_refresh, "storage_rescan": self.storage_rescan,
            "storage_lookup": self.storage_lookup, "storage_cache": self.storage_cache,
            "storage_report": self.storage_report, "vm_block_resize": self.vm_block_resize,
        }

    # -- helpers
    def _publish(self, event: str, data: dict[str, Any]) -> None:
        if self.agent.server is not None:
            self.agent.server.publish(event, {"host": self.agent.host, "at": time.time(), **data})

    def _entry(self, unit: str) -> dict[str, Any]:
        uid = normal_id(unit)
        if uid not in self.cache:
            raise LabStateError(f"host {self.agent.host} has no datastore {uid} in its cache",
                                host=self.agent.host, unit=uid, known=sorted(self.cache))
        return self.cache[uid]

    def _view(self, e: dict[str, Any]) -> dict[str, Any]:
        return {k: e.get(k) for k in ("id", "datastore", "portal", "target_iqn", "lun",
                                       "size_bytes", "state", "seen_naa", "scanned_at",
                                       "scans", "scsi_commands", "error")}

    async def _scan(self, uid: str, origin: str) -> dict[str, Any]:
        e = self.cache[uid]
        async with self._locks.setdefault(uid, asyncio.Lock()):
            before = e.get("size_bytes")
            try:
                got = await asyncio.to_thread(probe_unit, e["portal"], e["target_iqn"],
                                              int(e["lun"]), e["initiator_iqn"])
            except LabError as exc:
                cmds = int(exc.evidence.get("scsi_commands", 0))
                e.update(state="unreachable" if "login" in exc.message else "error",
                         error=exc.message, scanned_at=time.time())
            else:
                cmds = int(got["commands"])
                seen = str(got["naa"])
                e.update(seen_naa=seen, size_bytes=int(got["size_bytes"]), scanned_at=time.time(),
                         state="ok" if seen == uid else "mismatch",
                         error=None if seen == uid else f"LUN reports {seen}, not {uid}")
                for key, ascq in got["unit_attentions"]:
                    log.info("unit %s: UNIT ATTENTION ascq %#06x", uid, ascq)
                    if origin != "controller":
                        self._publish("unit_attention", {"unit": uid, "sense_key": key,
                                                         "ascq": ascq})
                if (before is not None and before != e["size_bytes"] and origin != "controller"):
                    self._publish("host_capacity_changed", {
                        "unit": uid, "datastore": e.get("datastore"),
                        "previous_size_bytes": before, "size_bytes": e["size_bytes"]})
            e["scans"] = int(e.get("scans", 0)) + 1
            e["scsi_commands"] = int(e.get("scsi_commands", 0)) + cmds
            self.scsi_commands += cmds
            return {**self._view(e), "commands_this_scan": cmds}

    # -- RPC methods
    async def storage_attach(self, units: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Take over the controller's mapping ID -> portal/target/LUN and scan each unit."""
        if not isinstance(units, list):
            raise LabError("storage_attach: units must be a list")
        ids = []
        for u in units:
            if not isinstance(u, dict):
                raise LabError("storage_attach: each unit is an object", unit=u)
            uid = normal_id(str(u.get("id")))
            for key in ("portal", "target_iqn", "lun", "initiator_iqn"):
                if key not in u:
                    raise LabError(f"storage_attach: unit {uid} has no {key}", unit=u)
            entry = self.cache.setdefault(uid, {"id": uid, "state": "new", "scans": 0,
                                                "scsi_commands": 0})
            entry.update(datastore=u.get("datastore"), portal=str(u["portal"]),
                         target_iqn=str(u["target_iqn"]), lun=int(u["lun"]),
                         initiator_iqn=str(u["initiator_iqn"]))
            ids.append(uid)
        return list(await asyncio.gather(*(self._scan(uid, "controller") for uid in ids)))

    async def storage_forget(self, units: list[str]) -> list[str]:
        gone = []
        for u in units:
            if self.cache.pop(normal_id(u), None) is not None:
                gone.append(normal_id(u))
        return gone

    async def storage_refresh(self, unit: str, origin: str = "controller") -> dict[str, Any]:
        """Re-read one unit (its capacity and ID) without touching any other."""
        uid = normal_id(unit)
        self._entry(uid)
        return await self._scan(uid, origin)

    async def storage_rescan(self, unit: str | None = None) -> dict[str, Any]:
        """Rescan one unit, or everything: each known unit plus discovery (REPORT LUNS) on the
        portals this host knows, so LUNs the array added or removed show up."""
        if unit is not None:
            return {"units": [await self.storage_refresh(unit, origin="user")], "discovered": []}
        units = await asyncio.gather(*(self._scan(uid, "user") for uid in sorted(self.cache)))
        discovered: list[dict[str, Any]] = []
        portals = sorted({(e["portal"], e["initiator_iqn"]) for e in self.cache.values()})
        for portal, initiator in portals:
            try:
                luns = await iscsi.list_luns(portal, initiator)
            except LabError as exc:
                discovered.append({"portal": portal, "error": exc.message})
                continue
            self.scsi_commands += len(luns) + 1  # REPORT LUNS + a READ CAPACITY per LUN
            known = {(e["target_iqn"], int(e["lun"])) for e in self.cache.values()}
            for info in luns:
                discovered.append({"portal": portal, "target_iqn": info.target_iqn,
                                   "lun": info.lun, "size": info.size,
                                   "mapped": (info.target_iqn, info.lun) in known})
        return {"units": list(units), "discovered": discovered}

    async def storage_lookup(self, unit: str) -> dict[str, Any]:
        """Whether this host shares ``unit``, from its cache alone (no SCSI command)."""
        uid = normal_id(unit)
        e = self.cache.get(uid)
        return {"host": self.agent.host, "unit": uid, "shares": e is not None,
                "entry": None if e is None else self._view(e)}

    async def storage_cache(self) -> dict[str, Any]:
        return {"host": self.agent.host, "scsi_commands": self.scsi_commands,
                "units": [self._view(self.cache[k]) for k in sorted(self.cache)]}

    async def storage_report(self, kind: str, unit: str, detail: dict[str, Any] | None = None
                             ) -> dict[str, Any]:
        """Report something this host noticed about a unit (e.g. from another tool)."""
        if kind not in ("io_error", "unit_attention", "host_capacity_changed"):
            raise LabError(f"storage_report: unknown kind {kind!r} (io_error, unit_attention, "
                           "host_capacity_changed)", kind=kind)
        uid = normal_id(unit)
        self._publish(kind, {"unit": uid, "detail": detail or {}, "reported": True})
        return {"host": self.agent.host, "unit": uid, "kind": kind}

    async def vm_block_resize(self, name: str, size_bytes: int) -> dict[str, Any]:
        """QEMU ``block_resize`` of the VM's disk node to exactly ``size_bytes`` (the LUN's
        new capacity): the guest's virtio-blk then reports the new size."""
        if not isinstance(size_bytes, int) or size_bytes <= 0:
            raise LabError("vm_block_resize: size_bytes must be a positive integer")
        vm = self.agent.vm(name)
        await vm.execute("block_resize", {"node-name": "disk0", "size": size_bytes},
                         timeout=30.0)
        return {"name": name, "size_bytes": size_bytes}

    async def probe_disk(self, disk: IscsiDisk) -> tuple[str, int]:
        """The NAA ID and capacity a VM's iSCSI disk reports to this host now (one login, as
        a refresh does); the cached entry of its unit, if any, is updated by the same probe."""
        if disk.naa is not None:
            uid = normal_id(disk.naa)
            e = self.cache.get(uid)
            if e is not None and (e.get("portal"), e.get("target_iqn"), e.get("lun")) == (
                    disk.portal, disk.target_iqn, disk.lun):
                got = await self._scan(uid, "controller")
                if got["state"] not in ("ok", "mismatch"):
                    raise LabError(f"host {self.agent.host}: {got.get('error')}", unit=uid)
                return str(got["seen_naa"]), int(got["size_bytes"])
        found = await asyncio.to_thread(probe_unit, disk.portal, disk.target_iqn, disk.lun,
                                        disk.initiator_iqn)
        self.scsi_commands += int(found["commands"])
        return str(found["naa"]), int(found["size_bytes"])

    # -- QEMU block I/O errors
    def on_vm_event(self, vm: QemuVm, ev: dict[str, Any]) -> None:
        """A QMP event of a VM of this host: BLOCK_IO_ERROR on its disk is published as a
        storage event of the datastore."""
        if ev.get("event") != "BLOCK_IO_ERROR":
            return
        disk = getattr(vm.spec.disk, "naa", None)
        unit = normal_id(disk) if isinstance(disk, str) and disk else None
        if unit is None:
            for uid, e in self.cache.items():
                if getattr(vm.spec.disk, "lun", None) == e.get("lun") and getattr(
                        vm.spec.disk, "portal", None) == e.get("portal"):
                    unit = uid
        self._publish("io_error", {"unit": unit, "vm": vm.spec.name,
                                   "detail": ev.get("data", {})})
