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
from pathlib import Path
from typing import Any

from labctl.core.errors import StorageNodeError
from labctl.core.names import ISCSI_PORT, STORAGE_AGENT_PORT
from labctl.core.rpc import Handler, RpcServer
from labctl.drivers.lio import Lio

log = logging.getLogger("labctl.storage")


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

class StorageAgent:
    """LIO state behind the RPC methods. rtslib calls run in a worker thread, one at a time."""

    def __init__(self, config: dict[str, Any], sys_block: Path = Path("/sys/block")) -> None:
        self.node = str(config.get("node", "storage"))
        self.target_iqn = str(config["target_iqn"]).lower()
        self.ip = str(config["address"]).split("/", 1)[0]
        self.lio = Lio(self.node, self.target_iqn, self.ip, sys_block)
        self.server: RpcServer | None = None
        self._lock = asyncio.Lock()
        # LUNs whose backing device size is watched: name -> {device, naa, lun, size_bytes}
        self._watched: dict[str, dict[str, Any]] = {}

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
        result: dict[str, Any] = await self._locked(self.lio.status)
        result["uptime_s"] = round(_uptime(), 2)
        return result

    async def ping(self) -> dict[str, Any]:
        """Cheap liveness (no LIO call); uptime tells a restarted node from a live one."""
        return {"node": self.node, "uptime_s": round(_uptime(), 2),
                "portal_down": self.lio.portal_down}

    async def ensure_lun(self, name: str, disk_serial: str, unit_serial: str,
                         initiators: list[str]) -> dict[str, Any]:
        check_lun_name(name)
        serial = check_unit_serial(unit_serial)
        want = check_initiators(initiators)
        if not isinstance(disk_serial, str) or not disk_serial:
            raise StorageNodeError("disk_serial must name the virtio disk of the datastore",
                                   disk_serial=disk_serial)
        result: dict[str, Any] = await self._locked(self.lio.ensure_lun, name, disk_serial, serial,
                                                    want)
        self._watch(result)
        if result.get("created"):
            self._publish("lun_added", result)
        return result

    async def set_initiators(self, name: str, initiators: list[str]) -> dict[str, Any]:
        check_lun_name(name)
        want = check_initiators(initiators)
        result: dict[str, Any] = await self._locked(self.lio.set_initiators, name, want)
        return result

    async def delete_lun(self, name: str) -> dict[str, Any]:
        check_lun_name(name)
        gone = self._watched.pop(name, None)
        result: dict[str, Any] = await self._locked(self.lio.delete_lun, name)
        if result.get("deleted"):
            self._publish("lun_removed", {**(gone or {}), **result})
        return result

    async def refresh_capacity(self, name: str) -> dict[str, Any]:
        check_lun_name(name)
        result: dict[str, Any] = await self._locked(self.lio.capacity, name)
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
        result: dict[str, Any] = await self._locked(self.lio.set_portal, up)
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
                size = self.lio.device_size(w["device"])
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
            await self._locked(self.lio.open)
        except StorageNodeError as exc:
            log.error("%s", exc)

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
        port = int(config.get("agent_port") or STORAGE_AGENT_PORT)
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
