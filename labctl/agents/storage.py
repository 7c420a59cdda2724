"""The storage agent: runs inside the storage node VM and drives LIO through rtslib-fb.

Standard library plus ``rtslib_fb`` only (imported lazily, so this module loads on
a host without it). It is delivered on the node's config disk together with
``labctl.errors`` and ``labctl.rpc`` and started by the node's PID 1 (see
``images/storage/init.py``), which calls :func:`serve`.

Model: one iSCSI target per storage node (``target_iqn``) with TPG 1 and one
portal on the node address, no demo mode (``generate_node_acls=0``). Each
datastore is an **iblock** backstore on the virtio disk the controller attached
for it (so a ``block_resize`` of that disk shows up as a LUN capacity change),
exported as a TPG LUN. Each initiator named for a datastore gets a NodeACL with
a MappedLUN of the same number as the TPG LUN; an ACL left without LUNs is
removed, so an initiator named for nothing is refused at login.

configfs is the only state: every operation reads it back, so all operations
are idempotent and survive an agent restart.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from labctl.errors import StorageNodeError
from labctl.rpc import Handler, RpcServer

log = logging.getLogger("labctl.storage")

DEFAULT_AGENT_PORT = 7700
ISCSI_PORT = 3260
TPG_TAG = 1
LIO_COMPANY_ID = 0x001405
"""LIO's default IEEE company ID (OpenFabrics), used until ``wwn/company_id`` says otherwise."""

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SERIAL_RE = re.compile(r"^[0-9a-fA-F]{32}$")
_IQN_RE = re.compile(r"^(iqn\.\d{4}-\d{2}\.[^\s]+|eui\.[0-9a-fA-F]{16}|naa\.[0-9a-fA-F]{16,32})$")
_BOOT = time.monotonic()


# --- pure helpers (unit-tested on the host) -----------------------------------------------

def naa_from_unit_serial(unit_serial: str, company_id: int = LIO_COMPANY_ID) -> str:
    """The NAA-6 designator LIO derives for a LUN (VPD page 0x83), as 32 hex digits.

    LIO builds it from NAA type 6, the 24-bit company ID, then the *hex digits only*
    of the unit serial, 25 of them, filling the 16 bytes (kernel
    ``spc_gen_naa_6h_vendor_specific``). Missing digits stay zero.
    """
    if not 0 <= company_id < (1 << 24):
        raise ValueError(f"company id {company_id:#x} does not fit 24 bits")
    digits = "".join(c for c in unit_serial.lower() if c in "0123456789abcdef")[:25]
    return f"6{company_id:06x}{digits.ljust(25, '0')}"


def normal_naa(naa: str) -> str:
    """``naa.`` + lowercase hex digits, whichever form a tool printed."""
    return "naa." + naa.lower().removeprefix("naa.")


def check_lun_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise StorageNodeError(
            f"invalid datastore name {name!r}: use 1-64 of A-Z a-z 0-9 _ . - "
            "(it names the LIO backstore)", name=name)
    return name


def check_unit_serial(unit_serial: str) -> str:
    if not isinstance(unit_serial, str) or not _SERIAL_RE.match(unit_serial):
        raise StorageNodeError(
            f"invalid unit serial {unit_serial!r}: need exactly 32 hex digits so the NAA ID "
            "is predictable", unit_serial=unit_serial)
    return unit_serial.lower()


def check_initiators(initiators: list[str]) -> list[str]:
    if not isinstance(initiators, list):
        raise StorageNodeError("initiators must be a list of IQNs", initiators=initiators)
    out: list[str] = []
    for iqn in initiators:
        if not isinstance(iqn, str) or not _IQN_RE.match(iqn):
            raise StorageNodeError(f"invalid initiator name {iqn!r} (expected iqn.YYYY-MM.…)",
                                   initiator=iqn)
        low = iqn.lower()
        if low not in out:
            out.append(low)
    return sorted(out)


def find_disk_by_serial(serial: str, sys_block: Path = Path("/sys/block")) -> str:
    """``/dev/vdX`` of the virtio disk whose serial is ``serial``."""
    seen: dict[str, str] = {}
    for entry in sorted(sys_block.glob("vd*")):
        try:
            value = (entry / "serial").read_text().strip()
        except OSError:
            continue
        seen[entry.name] = value
        if value == serial:
            return f"/dev/{entry.name}"
    raise StorageNodeError(
        f"no virtio disk with serial {serial!r} on this storage node", disk_serial=serial,
        disks=seen)


# --- the agent ----------------------------------------------------------------------------

class StorageAgent:
    """LIO state behind the RPC methods. rtslib calls run in a worker thread, one at a time."""

    def __init__(self, config: dict[str, Any], sys_block: Path = Path("/sys/block")) -> None:
        self.node = str(config.get("node", "storage"))
        self.target_iqn = str(config["target_iqn"]).lower()
        self.ip = str(config["address"]).split("/", 1)[0]
        self.sys_block = sys_block
        self.server: RpcServer | None = None
        self._lock = asyncio.Lock()
        self._rts: Any = None  # the rtslib_fb module, once RTSRoot() worked
        # LUNs whose backing device size is watched: name -> {device, naa, lun, size_bytes}
        self._watched: dict[str, dict[str, Any]] = {}
        self._portal_down = False

    def handlers(self) -> dict[str, Handler]:
        return {
            "status": self.status,
            "ping": self.ping,
            "ensure_lun": self.ensure_lun,
            "set_initiators": self.set_initiators,
            "delete_lun": self.delete_lun,
            "refresh_capacity": self.refresh_capacity,
            "portal_set": self.portal_set,
        }

    # RPC methods -------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._locked(self._status)
        return result

    async def ping(self) -> dict[str, Any]:
        """Cheap liveness (no LIO call); uptime tells a restarted node from a live one."""
        return {"node": self.node, "uptime_s": round(_uptime(), 2),
                "portal_down": self._portal_down}

    async def ensure_lun(self, name: str, disk_serial: str, unit_serial: str,
                         initiators: list[str]) -> dict[str, Any]:
        check_lun_name(name)
        serial = check_unit_serial(unit_serial)
        want = check_initiators(initiators)
        if not isinstance(disk_serial, str) or not disk_serial:
            raise StorageNodeError("disk_serial must name the virtio disk of the datastore",
                                   disk_serial=disk_serial)
        result: dict[str, Any] = await self._locked(self._ensure_lun, name, disk_serial, serial,
                                                    want)
        self._watch(result)
        if result.get("created"):
            self._publish("lun_added", result)
        return result

    async def set_initiators(self, name: str, initiators: list[str]) -> dict[str, Any]:
        check_lun_name(name)
        want = check_initiators(initiators)
        result: dict[str, Any] = await self._locked(self._set_initiators, name, want)
        return result

    async def delete_lun(self, name: str) -> dict[str, Any]:
        check_lun_name(name)
        gone = self._watched.pop(name, None)
        result: dict[str, Any] = await self._locked(self._delete_lun, name)
        if result.get("deleted"):
            self._publish("lun_removed", {**(gone or {}), **result})
        return result

    async def refresh_capacity(self, name: str) -> dict[str, Any]:
        check_lun_name(name)
        result: dict[str, Any] = await self._locked(self._capacity, name)
        w = self._watched.get(name)
        if w is None:
            result["previous_size_bytes"] = None
            return result
        seen = self._observe(w, int(result["size_bytes"]), str(result["device"]))
        result.update(naa=seen["naa"], lun=seen["lun"],
                      previous_size_bytes=seen["previous_size_bytes"])
        return result

    async def portal_set(self, up: bool) -> dict[str, Any]:
        """Take the iSCSI portal down (new logins refused) or bring it back; publish it."""
        if not isinstance(up, bool):
            raise StorageNodeError("portal_set: up must be true or false", up=up)
        result: dict[str, Any] = await self._locked(self._set_portal, up)
        self._publish("portal_up" if up else "portal_down", result)
        return result

    # events ------------------------------------------------------------------------------

    def _publish(self, event: str, data: dict[str, Any]) -> None:
        if self.server is not None:
            self.server.publish(event, {"node": self.node, "portal": f"{self.ip}:{ISCSI_PORT}",
                                        "target_iqn": self.target_iqn, **data})

    def _watch(self, lun: dict[str, Any]) -> None:
        self._watched[str(lun["name"])] = {
            "name": lun["name"], "device": os.path.basename(str(lun["device"])),
            "naa": lun["naa"], "lun": lun["lun"], "size_bytes": int(lun["size_bytes"])}

    async def watch_capacity(self, interval: float = 0.1) -> None:
        """Notice a capacity change of a backing disk by itself (a libvirt block resize of the
        node's virtio disk: iblock reports the new size at once) and publish it.

        A read of /sys/block/<dev>/size per exported LUN every ``interval`` s: cheap, and no
        udev is needed in the node."""
        while True:
            await asyncio.sleep(interval)
            for w in list(self._watched.values()):
                size = self._device_size(w["device"])
                if size is not None and size != w["size_bytes"]:
                    self._observe(w, size)

    def _observe(self, w: dict[str, Any], size: int, device: str | None = None) -> dict[str, Any]:
        """Record ``size`` bytes as the capacity of the watched LUN ``w``; a change is logged
        and published as ``lun_capacity_changed``. Returns what was observed."""
        before, w["size_bytes"] = w["size_bytes"], size
        seen = {"name": w["name"], "naa": w["naa"], "lun": w["lun"], "size_bytes": size,
                "previous_size_bytes": before, "device": device or f"/dev/{w['device']}"}
        if size != before:
            log.info("LUN %s: capacity %d -> %d bytes", w["name"], before, size)
            self._publish("lun_capacity_changed", seen)
        return seen

    # plumbing ----------------------------------------------------------------------------

    async def _locked(self, fn: Callable[..., Any], *args: Any) -> Any:
        async with self._lock:
            return await asyncio.to_thread(fn, *args)

    async def warm_up(self) -> None:
        """Import rtslib and open RTSRoot ahead of the first request (errors come later)."""
        try:
            await self._locked(self._lio)
        except StorageNodeError as exc:
            log.error("%s", exc)

    def _lio(self) -> Any:
        if self._rts is not None:
            return self._rts
        try:
            import rtslib_fb  # type: ignore[import-not-found, unused-ignore]
        except ImportError as exc:
            raise StorageNodeError(
                "rtslib-fb is not installed on this storage node (python3-rtslib-fb)",
                error=str(exc)) from exc
        try:
            rtslib_fb.RTSRoot()
        except FileNotFoundError as exc:
            raise StorageNodeError(
                "LIO is not available on this kernel: no configfs/target_core_mod "
                f"({exc.filename or exc})", error=str(exc), kernel=os.uname().release) from exc
        except Exception as exc:
            raise StorageNodeError(f"LIO did not initialise: {exc}", error=repr(exc),
                                   kernel=os.uname().release) from exc
        self._rts = rtslib_fb
        return rtslib_fb

    def _rtserr(self, what: str, exc: Exception, **evidence: Any) -> StorageNodeError:
        return StorageNodeError(f"{what}: {exc}", error=repr(exc), **evidence)

    def _tpg(self, create: bool) -> Any:
        """TPG 1 of our target, with its portal and no-demo-mode attributes; None if absent."""
        rts = self._lio()
        fabric = rts.FabricModule("iscsi")
        try:
            target = rts.Target(fabric, self.target_iqn, "any" if create else "lookup")
        except rts.RTSLibNotInCFS:
            return None
        except rts.RTSLibError as exc:
            raise self._rtserr(f"cannot set up iSCSI target {self.target_iqn}", exc) from exc
        try:
            tpg = rts.TPG(target, TPG_TAG, "any" if create else "lookup")
            if not create:
                return tpg
            if not self._portal_down:
                rts.NetworkPortal(tpg, self.ip, ISCSI_PORT, "any")
            self._apply_auth(tpg)
            tpg.set_attribute("generate_node_acls", "0")
            tpg.set_attribute("demo_mode_write_protect", "1")
            tpg.enable = True
        except rts.RTSLibNotInCFS:
            return None
        except rts.RTSLibError as exc:
            raise self._rtserr(f"cannot set up TPG {TPG_TAG} of {self.target_iqn}", exc) from exc
        return tpg

    def _apply_auth(self, tpg: Any) -> None:
        """Authentication policy of the TPG. Off for now; CHAP goes here (tpg/ACL chap_* )."""
        tpg.set_attribute("authentication", "0")

    def _find_so(self, name: str) -> Any:
        rts = self._lio()
        try:
            return rts.BlockStorageObject(name)
        except rts.RTSLibNotInCFS:
            return None

    def _tpg_lun_of(self, tpg: Any, so: Any) -> Any:
        for lun in tpg.luns:
            try:
                if lun.storage_object == so:
                    return lun
            except self._lio().RTSLibBrokenLink:
                continue
        return None

    def _company_id(self, so: Any) -> int:
        try:
            return int(Path(so.path, "wwn", "company_id").read_text().strip(), 0)
        except (OSError, ValueError):
            return LIO_COMPANY_ID

    def _lun_dict(self, tpg: Any, so: Any) -> dict[str, Any]:
        lun = self._tpg_lun_of(tpg, so) if tpg is not None else None
        initiators: list[str] = []
        if lun is not None:
            for mlun in lun.mapped_luns:
                initiators.append(mlun.parent_nodeacl.node_wwn)
        serial = so.wwn
        return {
            "name": so.name,
            "lun": lun.lun if lun is not None else None,
            "naa": naa_from_unit_serial(serial, self._company_id(so)),
            "serial": serial,
            "size_bytes": self._size(so),
            "device": so.udev_path,
            "initiators": sorted(set(initiators)),
        }

    def _device_size(self, dev: str) -> int | None:
        """Bytes of block device ``dev`` (its name under /sys/block) as the kernel sees it now."""
        try:
            return int((self.sys_block / dev / "size").read_text()) * 512
        except (OSError, ValueError):
            return None

    def _size(self, so: Any) -> int:
        """Capacity of the backing device as LIO sees it (iblock reads the live bdev size)."""
        size = self._device_size(os.path.basename(so.udev_path))
        return int(so.size) if size is None else size

    def _status(self) -> dict[str, Any]:
        rts = self._lio()
        tpg = self._tpg(create=False)
        luns = [self._lun_dict(tpg, so) for so in rts.RTSRoot().storage_objects
                if so.plugin == "block"]
        acls = sorted(acl.node_wwn for acl in tpg.node_acls) if tpg is not None else []
        return {
            "node": self.node,
            "target_iqn": self.target_iqn,
            "portal": f"{self.ip}:{ISCSI_PORT}",
            "luns": sorted(luns, key=lambda d: (d["lun"] is None, d["lun"], d["name"])),
            "acls": acls,
            "uptime_s": round(_uptime(), 2),
        }

    def _ensure_lun(self, name: str, disk_serial: str, serial: str,
                    want: list[str]) -> dict[str, Any]:
        rts = self._lio()
        device = find_disk_by_serial(disk_serial, self.sys_block)
        so = self._find_so(name)
        if so is not None:
            if os.path.realpath(so.udev_path) != os.path.realpath(device):
                raise StorageNodeError(
                    f"LUN {name} exists on {so.udev_path}, not on the disk with serial "
                    f"{disk_serial} ({device}); delete it first", name=name,
                    device=so.udev_path, wanted_device=device)
            if so.wwn.lower() != serial:
                raise StorageNodeError(
                    f"LUN {name} exists with unit serial {so.wwn}, not {serial}: its NAA ID "
                    "cannot change while exported; delete it first", name=name,
                    serial=so.wwn, wanted_serial=serial)
        else:
            try:
                so = rts.BlockStorageObject(name, dev=device, wwn=serial)
            except rts.RTSLibError as exc:
                raise self._rtserr(f"cannot create iblock backstore {name} on {device}", exc,
                                   name=name, device=device) from exc
            log.info("backstore %s on %s, unit serial %s", name, device, serial)
        tpg = self._tpg(create=True)
        lun = self._tpg_lun_of(tpg, so)
        created = lun is None
        if lun is None:
            try:
                lun = rts.LUN(tpg, storage_object=so, alias=name)
            except rts.RTSLibError as exc:
                raise self._rtserr(f"cannot export {name} as a LUN", exc, name=name) from exc
            log.info("exported %s as LUN %d", name, lun.lun)
        self._map(tpg, lun, want)
        return {**self._lun_dict(tpg, so), "created": created}

    def _set_portal(self, up: bool) -> dict[str, Any]:
        rts = self._lio()
        self._portal_down = not up
        tpg = self._tpg(create=True)
        try:
            if not up:
                for portal in list(tpg.network_portals):
                    portal.delete()
        except rts.RTSLibError as exc:
            raise self._rtserr("cannot change the portal", exc) from exc
        return {"up": up, "portals": [f"{p.ip_address}:{p.port}" for p in tpg.network_portals]}

    def _map(self, tpg: Any, lun: Any, want: list[str]) -> None:
        """Make exactly the initiators in ``want`` see ``lun`` (at the same LUN number)."""
        rts = self._lio()
        try:
            existing = {acl.node_wwn: acl for acl in tpg.node_acls}
            for iqn in want:
                acl = existing.get(iqn) or rts.NodeACL(tpg, iqn, "create")
                mapped = {m.mapped_lun: m for m in acl.mapped_luns}
                current = mapped.get(lun.lun)
                if current is not None and current.tpg_lun.lun != lun.lun:
                    current.delete()
                    current = None
                if current is None:
                    rts.MappedLUN(acl, lun.lun, lun)
            for iqn, acl in existing.items():
                if iqn in want:
                    continue
                for m in list(acl.mapped_luns):
                    if m.tpg_lun.lun == lun.lun:
                        m.delete()
                if not list(acl.mapped_luns):
                    acl.delete()  # named for nothing any more: refuse its logins
        except rts.RTSLibError as exc:
            raise self._rtserr(f"cannot set the initiators of LUN {lun.lun}", exc,
                               initiators=want) from exc

    def _set_initiators(self, name: str, want: list[str]) -> dict[str, Any]:
        so = self._find_so(name)
        tpg = self._tpg(create=False)
        lun = self._tpg_lun_of(tpg, so) if (so is not None and tpg is not None) else None
        if lun is None:
            raise StorageNodeError(f"no LUN {name} on {self.node}: call ensure_lun first",
                                   name=name)
        self._map(tpg, lun, want)
        return self._lun_dict(tpg, so)

    def _delete_lun(self, name: str) -> dict[str, Any]:
        rts = self._lio()
        so = self._find_so(name)
        if so is None:
            return {"name": name, "deleted": False}
        tpg = self._tpg(create=False)
        try:
            lun = self._tpg_lun_of(tpg, so) if tpg is not None else None
            if lun is not None:
                self._map(tpg, lun, [])
                lun.delete()
            so.delete()
        except rts.RTSLibError as exc:
            raise self._rtserr(f"cannot delete LUN {name}", exc, name=name) from exc
        log.info("deleted LUN %s", name)
        return {"name": name, "deleted": True}

    def _capacity(self, name: str) -> dict[str, Any]:
        so = self._find_so(name)
        if so is None:
            raise StorageNodeError(f"no LUN {name} on {self.node}", name=name)
        return {"name": name, "size_bytes": self._size(so), "device": so.udev_path}


def _uptime() -> float:
    try:
        return float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _BOOT


async def serve(config: dict[str, Any], on_ready: Callable[[], None] | None = None) -> None:
    """Serve the storage agent's RPC on ``config["address"]``'s IP, port ``agent_port``.

    Returns only if the server stops. ``on_ready`` runs once the socket listens.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="labctl-storage: %(message)s")
    try:
        secret = bytes.fromhex(str(config["secret"]))
        port = int(config.get("agent_port") or DEFAULT_AGENT_PORT)
        agent = StorageAgent(config)
    except (KeyError, ValueError) as exc:
        raise StorageNodeError(f"bad storage agent config: {exc!r}",
                               keys=sorted(config)) from exc
    server = RpcServer(secret, agent.handlers(), name=f"storage agent {agent.node}")
    agent.server = server
    await server.start(agent.ip, port)
    if on_ready is not None:
        on_ready()
    warm = asyncio.ensure_future(agent.warm_up())
    watch = asyncio.ensure_future(agent.watch_capacity())
    try:
        await server.serve_forever()
    finally:
        warm.cancel()
        watch.cancel()
        await server.close()
