"""The storage agent: runs inside the storage node VM; its RPC methods drive LIO through
:class:`labctl.drivers.lio.Lio` and it publishes storage events (a LUN added, removed,
its capacity changed, the portal down or up).

Standard library plus ``rtslib_fb`` only (imported lazily). It is delivered on the
node's config disk with the modules listed in ``labctl.storage.node.AGENT_FILES`` and
started by the node's PID 1 (``images/storage/init.py``) through
:mod:`labctl.agents.storage`.

Each datastore is an **iblock** backstore on the virtio disk the controller attached
for it, so a ``block_resize`` of that disk shows up as a LUN capacity change, which the
agent notices by itself (:meth:`StorageAgent.watch_capacity`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from labctl.core.chap import chap_for
from labctl.core.errors import ProtocolError, StorageNodeError
from labctl.core.names import ISCSI_PORT, STORAGE_AGENT_PORT, TCP_BUFFERS
from labctl.core.proc import run
from labctl.core.rpc import Handler, RpcServer, StreamHandler
from labctl.core.wire import Empty, Json, handlers
from labctl.drivers.lio import Lio
from labctl.drivers.nfsd import NfsServer
from labctl.storage import protocol as p
from labctl.storage.files import Filestores
from labctl.storage.machine import MachineDisks, machine_files, prepare

log = logging.getLogger("labctl.storage")
T = TypeVar("T")


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SERIAL_RE = re.compile(r"^[0-9a-fA-F]{32}$")
_IQN_RE = re.compile(r"^(iqn\.\d{4}-\d{2}\.[^\s]+|eui\.[0-9a-fA-F]{16}|naa\.[0-9a-fA-F]{16,32})$")
_BOOT = time.monotonic()


# --- pure helpers (unit-tested on the host) -----------------------------------------------

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


# --- the agent ----------------------------------------------------------------------------

@dataclass
class _Watched:
    """A LUN whose backing device size the agent watches."""

    name: str
    device: str  # its name under /sys/block
    naa: str
    lun: int | None
    size_bytes: int


class StorageAgent:
    """LIO state behind the RPC methods. rtslib calls run in a worker thread, one at a time."""

    def __init__(self, config: p.NodeConfig, sys_block: Path = Path("/sys/block")) -> None:
        self.node = config.node
        self.target_iqn = config.target_iqn.lower()
        self.ip = config.ip
        secret = bytes.fromhex(config.secret)
        #: a machine's node makes its own data disks (loop devices); a VM's are libvirt's
        self.disks = (MachineDisks(Path(config.disk_dir), sys_block)
                      if config.disk_dir is not None else None)
        self.lio = Lio(self.node, self.target_iqn, self.ip, sys_block,
                       chap=lambda iqn: chap_for(secret, iqn, self.target_iqn),
                       find_disk=None if self.disks is None else self.disks.find,
                       prefix=config.backstore_prefix)
        self.server: RpcServer | None = None
        self._lock = asyncio.Lock()
        self._watched: dict[str, _Watched] = {}
        self._routes: dict[str, str] = {}
        # a pull authenticates to the source node with the key every site's nodes share
        on_machine: dict[str, Any] = {}
        if self.disks is not None:  # mounted and recorded in the node's directory there
            where = machine_files(config)
            on_machine = {"root": where.root, "find_disk": self.disks.find,
                          "nfs": NfsServer(where.exports, where.state)}
        self.files = Filestores(self.node, self.ip, self.peer_secret(config),
                                config.agent_port or STORAGE_AGENT_PORT, sys_block=sys_block,
                                **on_machine)

    @staticmethod
    def peer_secret(config: p.NodeConfig) -> bytes:
        return bytes.fromhex(config.peer_secret or config.secret)

    def handlers(self) -> dict[str, Handler]:
        return handlers(
            p.STATUS.serve(self.status), p.PING.serve(self.ping),
            p.ENSURE_LUN.serve(self.ensure_lun), p.SET_INITIATORS.serve(self.set_initiators),
            p.DELETE_LUN.serve(self.delete_lun), p.REFRESH_CAPACITY.serve(self.refresh_capacity),
            p.PORTAL_SET.serve(self.portal_set),
            p.ENSURE_FILESTORE.serve(self.ensure_filestore),
            p.DELETE_FILESTORE.serve(self.delete_filestore),
            p.LIST_FILES.serve(self.files.list_files), p.CHAIN.serve(self.files.chain),
            p.FILE_DIGEST.serve(self.files.digest), p.DELETE_FILE.serve(self.files.delete_file),
            p.PULL_FILE.serve(self.files.pull),
            p.CREATE_OVERLAY.serve(self.files.create_overlay),
            p.PEER_COPY.serve(self.files.peer_copy), p.SET_ROUTES.serve(self.set_routes),
            p.LEASE_FILE.serve(self.files.lease),
            p.DISK_ENSURE.serve(self.disk_ensure), p.DISK_RESIZE.serve(self.disk_resize),
            p.DISK_REMOVE.serve(self.disk_remove))

    def _machine_disks(self) -> MachineDisks:
        if self.disks is None:
            raise StorageNodeError(f"storage node {self.node} is a VM: libvirt attaches its "
                                   "data disks, the agent does not make them")
        return self.disks

    async def disk_ensure(self, req: p.DiskSpec) -> p.DiskInfo:
        disks = self._machine_disks()
        async with self._lock:
            return await disks.ensure(req)

    async def disk_resize(self, req: p.DiskSpec) -> p.DiskInfo:
        disks = self._machine_disks()
        async with self._lock:
            return await disks.resize(req)

    async def disk_remove(self, req: p.DiskSerial) -> p.DiskInfo:
        disks = self._machine_disks()
        async with self._lock:
            device = disks.device(req.serial)
            in_use = [w.name for w in self._watched.values() if f"/dev/{w.device}" == device]
            if in_use:
                raise StorageNodeError(f"disk {req.serial} backs LUN {in_use[0]}: delete the "
                                       "LUN first", disk_serial=req.serial, lun=in_use[0])
            return await disks.remove(req)

    async def set_routes(self, req: p.SetRoutes) -> p.RoutesSet:
        """Routes to other sites through their WAN routers (a file copy between sites goes
        node to node), and TCP buffers that let one flow fill a long fat link."""
        want = {r.subnet: r.via for r in req.routes}
        for subnet, via in want.items():
            await run(["ip", "route", "replace", subnet, "via", via], timeout=30,
                      what=f"route to {subnet}")
        for subnet in set(self._routes) - set(want):
            await run(["ip", "route", "del", subnet], timeout=30, check=False,
                      what=f"remove the route to {subnet}")
        self._routes = want
        if want:
            for key in ("tcp_rmem", "tcp_wmem"):
                Path(f"/proc/sys/net/ipv4/{key}").write_text(TCP_BUFFERS)
        return p.RoutesSet(routes=[p.Route(s, v) for s, v in sorted(want.items())])

    def streams(self) -> dict[str, StreamHandler]:
        return {p.FILE_SEND: self.files.send, p.FILE_UPLOAD: self.files.receive_upload}

    async def delete_filestore(self, req: p.DatastoreName) -> p.FilestoreDeleted:
        return await self.files.delete(req.datastore)

    async def ensure_filestore(self, req: p.EnsureFilestore) -> p.FilestoreInfo:
        return await self.files.ensure(req)

    @property
    def portal(self) -> str:
        return f"{self.ip}:{ISCSI_PORT}"

    # RPC methods -------------------------------------------------------------------------

    async def status(self, _: Empty) -> p.NodeStatus:
        state = await self._locked(self.lio.status)
        return p.NodeStatus(node=self.node, target_iqn=self.target_iqn, portal=self.portal,
                            luns=state.luns, acls=state.acls, uptime_s=round(_uptime(), 2))

    async def ping(self, _: Empty) -> p.NodePing:
        """Cheap liveness (no LIO call); uptime tells a restarted node from a live one."""
        return p.NodePing(node=self.node, uptime_s=round(_uptime(), 2),
                          portal_down=self.lio.portal_down)

    async def ensure_lun(self, req: p.EnsureLun) -> p.LunEnsured:
        check_lun_name(req.name)
        serial = check_unit_serial(req.unit_serial)
        want = check_initiators(req.initiators)
        if not req.disk_serial:
            raise StorageNodeError("disk_serial must name the virtio disk of the datastore",
                                   disk_serial=req.disk_serial)
        lun = await self._locked(self.lio.ensure_lun, req.name, req.disk_serial, serial, want)
        self._watch(lun)
        if lun.created:
            self._publish(p.EVENT_LUN_ADDED, p.LunAdded(
                node=self.node, portal=self.portal, target_iqn=self.target_iqn, name=lun.name,
                lun=lun.lun, naa=lun.naa, serial=lun.serial, size_bytes=lun.size_bytes,
                device=lun.device, initiators=lun.initiators, created=lun.created))
        return lun

    async def set_initiators(self, req: p.SetInitiators) -> p.LunInfo:
        check_lun_name(req.name)
        want = check_initiators(req.initiators)
        return await self._locked(self.lio.set_initiators, req.name, want)

    async def delete_lun(self, req: p.LunName) -> p.LunDeleted:
        check_lun_name(req.name)
        gone = self._watched.pop(req.name, None)
        result = await self._locked(self.lio.delete_lun, req.name)
        if result.deleted:
            self._publish(p.EVENT_LUN_REMOVED, p.LunRemoved(
                node=self.node, portal=self.portal, target_iqn=self.target_iqn,
                name=result.name, device=None if gone is None else gone.device,
                naa=None if gone is None else gone.naa, lun=None if gone is None else gone.lun,
                size_bytes=None if gone is None else gone.size_bytes, deleted=True))
        return result

    async def refresh_capacity(self, req: p.LunName) -> p.Capacity:
        check_lun_name(req.name)
        got = await self._locked(self.lio.capacity, req.name)
        w = self._watched.get(req.name)
        if w is None:
            return p.Capacity(name=got.name, size_bytes=got.size_bytes, device=got.device)
        seen = self._observe(w, got.size_bytes, got.device)
        return p.Capacity(name=got.name, size_bytes=got.size_bytes, device=got.device,
                          naa=seen.naa, lun=seen.lun,
                          previous_size_bytes=seen.previous_size_bytes)

    async def portal_set(self, req: p.PortalSet) -> p.PortalState:
        """Take the iSCSI portal down (new logins refused) or bring it back; publish it."""
        result = await self._locked(self.lio.set_portal, req.up)
        self._publish(p.EVENT_PORTAL_UP if req.up else p.EVENT_PORTAL_DOWN, p.PortalChanged(
            node=self.node, portal=self.portal, target_iqn=self.target_iqn, up=result.up,
            portals=result.portals))
        return result

    # events ------------------------------------------------------------------------------

    def _publish(self, event: str, data: p.StorageEvent) -> None:
        if self.server is not None:
            self.server.publish(event, data.to_wire())

    def _watch(self, lun: p.LunInfo) -> None:
        self._watched[lun.name] = _Watched(
            name=lun.name, device=os.path.basename(lun.device), naa=lun.naa, lun=lun.lun,
            size_bytes=lun.size_bytes)

    async def watch_capacity(self, interval: float = 0.1) -> None:
        """Notice a capacity change of a backing disk by itself (a libvirt block resize of the
        node's virtio disk: iblock reports the new size at once) and publish it.

        A read of /sys/block/<dev>/size per exported LUN every ``interval`` s: cheap, and no
        udev is needed in the node."""
        while True:
            await asyncio.sleep(interval)
            for w in list(self._watched.values()):
                size = self.lio.device_size(w.device)
                if size is not None and size != w.size_bytes:
                    self._observe(w, size)

    def _observe(self, w: _Watched, size: int, device: str | None = None
                 ) -> p.LunCapacityChanged:
        """Record ``size`` bytes as the capacity of the watched LUN ``w``; a change is logged
        and published as ``lun_capacity_changed``. Returns what was observed."""
        before, w.size_bytes = w.size_bytes, size
        seen = p.LunCapacityChanged(
            node=self.node, portal=self.portal, target_iqn=self.target_iqn, name=w.name,
            naa=w.naa, lun=w.lun, size_bytes=size, previous_size_bytes=before,
            device=device or f"/dev/{w.device}")
        if size != before:
            log.info("LUN %s: capacity %d -> %d bytes", w.name, before, size)
            self._publish(p.EVENT_LUN_CAPACITY_CHANGED, seen)
        return seen

    # plumbing ----------------------------------------------------------------------------

    async def _locked(self, fn: Callable[..., T], *args: object) -> T:
        async with self._lock:
            return await asyncio.to_thread(fn, *args)

    async def warm_up(self) -> None:
        """Import rtslib and open RTSRoot ahead of the first request (errors come later)."""
        try:
            await self._locked(self.lio.open)
        except StorageNodeError as exc:
            log.error("%s", exc)


def _uptime() -> float:
    try:
        return float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _BOOT


async def serve(config: Json, on_ready: Callable[[], None] | None = None) -> None:
    """Serve the storage agent's RPC on the config's address, port ``agent_port``
    (``config`` is ``config.json`` of the config disk, a :class:`~labctl.storage.protocol.NodeConfig`).

    Returns only if the server stops. ``on_ready`` runs once the socket listens.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="labctl-storage: %(message)s")
    # PID 1 starts the agent with an empty environment: the tools it runs are in sbin
    os.environ.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    try:
        conf = p.NodeConfig.from_wire(config, "storage agent config")
        secret = bytes.fromhex(conf.secret)
    except (ProtocolError, ValueError) as exc:
        raise StorageNodeError(f"bad storage agent config: {exc!r}",
                               keys=sorted(config) if isinstance(config, dict) else None
                               ) from exc
    if conf.disk_dir is not None:
        await prepare()  # a machine: LIO's modules and configfs (a node VM's PID 1 did it)
    agent = StorageAgent(conf)
    server = RpcServer(secret, agent.handlers(), name=f"storage agent {agent.node}",
                       streams=agent.streams(),
                       # another site's node may read a file (a chain copy), not drive this one
                       limited={agent.peer_secret(conf): frozenset({"file_send"})})
    agent.server = server
    await server.start(agent.ip, conf.agent_port or STORAGE_AGENT_PORT)
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
