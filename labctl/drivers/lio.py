"""LIO through rtslib-fb: the storage node's iSCSI target, its iblock backstores, LUNs,
ACLs and portal. Blocking calls (run them in a worker thread, one at a time).

Standard library only at import time: ``rtslib_fb`` is imported on first use, so this
module loads on a machine without it (and says clearly when LIO is missing).

Model: one iSCSI target per storage node with TPG 1 and one portal on the node address,
no demo mode (``generate_node_acls=0``) and, given CHAP credentials, ``authentication=1``:
every NodeACL then carries its initiator's secret and the target's secret for mutual CHAP
(:mod:`labctl.core.chap`), so an initiator that only claims an IQN logs in nowhere. Each
datastore is an **iblock** backstore on a virtio disk found by its serial, exported as a
TPG LUN; each initiator named for it gets
a NodeACL with a MappedLUN of the same number; an ACL left without LUNs is removed.
configfs is the only state: every operation reads it back, so all are idempotent.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labctl.core.chap import Chap
from labctl.core.errors import StorageNodeError
from labctl.core.ids import LIO_COMPANY_ID, naa_from_unit_serial, normal_naa
from labctl.core.names import ISCSI_PORT
from labctl.storage.protocol import LunDeleted, LunEnsured, LunInfo, PortalState

TPG_TAG = 1
log = logging.getLogger("labctl.storage")


@dataclass(frozen=True)
class TargetState:
    """What :meth:`Lio.status` read: every iblock backstore and the target's NodeACLs."""

    luns: list[LunInfo]
    acls: list[str]


@dataclass(frozen=True)
class BackingSize:
    """What :meth:`Lio.capacity` read of one backstore."""

    name: str
    size_bytes: int
    device: str  # /dev/vdX


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


class Lio:
    """One storage node's LIO target (see the module docstring)."""

    def __init__(self, node: str, target_iqn: str, ip: str,
                 sys_block: Path = Path("/sys/block"),
                 chap: Callable[[str], Chap] | None = None,
                 find_disk: Callable[[str], str] | None = None, prefix: str = "") -> None:
        self.node = node
        #: what this node's backstore names begin with (a datastore's name follows): a
        #: machine's LIO is shared with whatever else runs there, another lab's node too,
        #: and a backstore's name is the kernel's, machine-wide ("" in a node VM, whose LIO
        #: is the node's alone)
        self.prefix = prefix
        #: the block device of a data disk by its serial (default: a virtio disk's)
        self.find_disk = find_disk or (lambda serial: find_disk_by_serial(serial, sys_block))
        #: the CHAP credentials of an initiator at this target; None: no authentication
        self.chap = chap
        self.target_iqn = target_iqn
        self.ip = ip
        self.sys_block = sys_block
        self.portal_down = False
        self._rts: Any = None  # the rtslib_fb module, once RTSRoot() worked

    def open(self) -> Any:
        if self._rts is not None:
            return self._rts
        try:
            import rtslib_fb  # type: ignore[import-not-found, unused-ignore]  # noqa: PLC0415
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
        rts = self.open()
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
            if not self.portal_down:
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
        """CHAP on every normal session of the TPG when credentials are known (discovery
        stays open: it lists target names, never a LUN)."""
        tpg.set_attribute("authentication", "1" if self.chap is not None else "0")

    def _set_credentials(self, acl: Any) -> None:
        """Give ``acl`` its initiator's CHAP secret and the target's (mutual) one; written
        only when they differ, so a live session is not disturbed."""
        if self.chap is None:
            return
        cred = self.chap(str(acl.node_wwn))
        for attr, value in (("chap_userid", cred.user), ("chap_password", cred.password),
                            ("chap_mutual_userid", cred.target_user),
                            ("chap_mutual_password", cred.target_password)):
            if getattr(acl, attr) != value:
                setattr(acl, attr, value)

    def _find_so(self, name: str) -> Any:
        rts = self.open()
        try:
            return rts.BlockStorageObject(self.prefix + name)
        except rts.RTSLibNotInCFS:
            return None

    def _ours(self, so: Any) -> bool:
        return so.plugin == "block" and str(so.name).startswith(self.prefix)

    def _tpg_lun_of(self, tpg: Any, so: Any) -> Any:
        for lun in tpg.luns:
            try:
                if lun.storage_object == so:
                    return lun
            except self.open().RTSLibBrokenLink:
                continue
        return None

    def _company_id(self, so: Any) -> int:
        try:
            return int(Path(so.path, "wwn", "company_id").read_text().strip(), 0)
        except (OSError, ValueError):
            return LIO_COMPANY_ID

    def _lun_info(self, tpg: Any, so: Any) -> LunInfo:
        lun = self._tpg_lun_of(tpg, so) if tpg is not None else None
        initiators: list[str] = []
        if lun is not None:
            for mlun in lun.mapped_luns:
                initiators.append(str(mlun.parent_nodeacl.node_wwn))
        serial = str(so.wwn)
        return LunInfo(
            name=str(so.name)[len(self.prefix):],
            lun=int(lun.lun) if lun is not None else None,
            naa=normal_naa(naa_from_unit_serial(serial, self._company_id(so))),
            serial=serial,
            size_bytes=self._size(so),
            device=str(so.udev_path),
            initiators=sorted(set(initiators)),
        )

    def device_size(self, dev: str) -> int | None:
        """Bytes of block device ``dev`` (its name under /sys/block) as the kernel sees it now."""
        try:
            return int((self.sys_block / dev / "size").read_text()) * 512
        except (OSError, ValueError):
            return None

    def _size(self, so: Any) -> int:
        """Capacity of the backing device as LIO sees it (iblock reads the live bdev size)."""
        size = self.device_size(os.path.basename(so.udev_path))
        return int(so.size) if size is None else size

    def status(self) -> TargetState:
        rts = self.open()
        tpg = self._tpg(create=False)
        luns = [self._lun_info(tpg, so) for so in rts.RTSRoot().storage_objects
                if self._ours(so)]
        acls = sorted(str(acl.node_wwn) for acl in tpg.node_acls) if tpg is not None else []
        return TargetState(
            luns=sorted(luns, key=lambda d: (d.lun is None, d.lun or 0, d.name)), acls=acls)

    def ensure_lun(self, name: str, disk_serial: str, serial: str,
                    want: list[str]) -> LunEnsured:
        rts = self.open()
        device = self.find_disk(disk_serial)
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
                so = rts.BlockStorageObject(self.prefix + name, dev=device, wwn=serial)
            except rts.RTSLibError as exc:
                raise self._rtserr(f"cannot create iblock backstore {name} on {device}", exc,
                                   name=name, device=device) from exc
            log.info("backstore %s on %s, unit serial %s", so.name, device, serial)
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
        return LunEnsured(**dataclasses.asdict(self._lun_info(tpg, so)), created=created)

    def set_portal(self, up: bool) -> PortalState:
        rts = self.open()
        self.portal_down = not up
        tpg = self._tpg(create=True)
        try:
            if not up:
                for portal in list(tpg.network_portals):
                    portal.delete()
        except rts.RTSLibError as exc:
            raise self._rtserr("cannot change the portal", exc) from exc
        return PortalState(up=up,
                           portals=[f"{p.ip_address}:{p.port}" for p in tpg.network_portals])

    def _map(self, tpg: Any, lun: Any, want: list[str]) -> None:
        """Make exactly the initiators in ``want`` see ``lun`` (at the same LUN number)."""
        rts = self.open()
        try:
            existing = {acl.node_wwn: acl for acl in tpg.node_acls}
            for iqn in want:
                acl = existing.get(iqn) or rts.NodeACL(tpg, iqn, "create")
                self._set_credentials(acl)
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

    def set_initiators(self, name: str, want: list[str]) -> LunInfo:
        so = self._find_so(name)
        tpg = self._tpg(create=False)
        lun = self._tpg_lun_of(tpg, so) if (so is not None and tpg is not None) else None
        if lun is None:
            raise StorageNodeError(f"no LUN {name} on {self.node}: call ensure_lun first",
                                   name=name)
        self._map(tpg, lun, want)
        return self._lun_info(tpg, so)

    def delete_lun(self, name: str) -> LunDeleted:
        rts = self.open()
        so = self._find_so(name)
        if so is None:
            return LunDeleted(name=name, deleted=False)
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
        return LunDeleted(name=name, deleted=True)

    def capacity(self, name: str) -> BackingSize:
        so = self._find_so(name)
        if so is None:
            raise StorageNodeError(f"no LUN {name} on {self.node}", name=name)
        return BackingSize(name=name, size_bytes=self._size(so), device=str(so.udev_path))


