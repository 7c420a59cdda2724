"""The ``Lab`` face: one lab, found by name, and everything a user can ask of it. Used by
the CLI, the scenarios and the tests; features are handed a
:class:`~labctl.state.context.LabContext` instead of this object.

All methods are coroutines (but ``find``/``context``); the CLI runs each command in one
event loop.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from labctl.core.errors import AgentError, LabError, LabStateError, TopologyError
from labctl.datastores import service as datastores
from labctl.datastores.tables import DATASTORES
from labctl.guest.protocol import HEARTBEAT_MS_MAX, HEARTBEAT_MS_MIN, valid_heartbeat_ms
from labctl.hosts import protocol as hp
from labctl.lab import bringup, teardown, vms
from labctl.lab.topology import Topology
from labctl.migration import inlab
from labctl.migration.policy import Policy
from labctl.migration.records import MIGRATIONS, get_migration, list_migrations
from labctl.state.context import LabContext, Progress, quiet
from labctl.state.inventory import Inventory
from labctl.state.labdir import LabDir, existing_labs
from labctl.storage import protocol as sp

#: every feature's inventory tables, each declared next to its feature
SCHEMAS = (DATASTORES, MIGRATIONS)


class Lab:
    """One lab, found by name. Cheap to construct: nothing happens until a method is called."""

    def __init__(self, name: str, root: Path | None = None, progress: Progress = quiet) -> None:
        self.dir = LabDir(name, root)
        self.name = name
        self.progress = progress

    @classmethod
    def find(cls, name: str | None, root: Path | None = None, progress: Progress = quiet) -> Lab:
        """The lab called ``name``; without a name, the only lab that exists."""
        if name is not None:
            return cls(name, root, progress)
        labs = existing_labs(root)
        if len(labs) == 1:
            return cls(labs[0], root, progress)
        if not labs:
            raise LabStateError("no lab is up (start one with: labctl up)")
        raise LabStateError(f"several labs exist ({', '.join(labs)}): say which with --lab NAME")

    def open_inventory(self) -> Inventory:
        """The lab's inventory (the caller closes it); a clear error when the lab is not up."""
        if not self.dir.exists():
            raise LabStateError(f"lab {self.name} is not up (start it with: labctl up)", lab=self.name)
        return self.dir.inventory(SCHEMAS)

    @contextmanager
    def context(self) -> Iterator[LabContext]:
        """The lab opened for a feature to work on (its inventory closed afterwards)."""
        inv = self.open_inventory()
        try:
            yield LabContext(self.name, self.dir, inv, self.progress)
        finally:
            inv.close()

    # ------------------------------------------------------------------ up
    async def up(self, topo: Topology) -> dict[str, Any]:
        """Bring the lab up. Idempotent for the same topology; refuses a different one."""
        if topo.name != self.name:
            raise TopologyError(topo.source, "name", f"names lab {topo.name}, not {self.name}")
        bringup.preflight()
        with self.dir.lock():
            if self.dir.exists():
                inv = self.dir.inventory(SCHEMAS)
                try:
                    state = inv.get_meta("state")
                    digest = inv.get_meta("topology_digest")
                finally:
                    inv.close()
                if state == "up" and digest == topo.digest:
                    self.progress(f"lab {self.name} is already up with this topology")
                    return await self.status()
                if state == "up":
                    raise LabStateError(
                        f"lab {self.name} is already up with a different topology; "
                        f"run 'labctl down --lab {self.name}' first", lab=self.name)
                raise LabStateError(
                    f"lab {self.name} did not come up completely last time (state {state}); "
                    f"run 'labctl down --lab {self.name}' to clean it up, then up again",
                    lab=self.name, state=state)
            bringup.check_host_network(topo)
            bringup.check_disk_space(topo, self.dir.path.parent)
            self.dir.create()
            inv = self.dir.inventory(SCHEMAS)
            try:
                await bringup.build(LabContext(self.name, self.dir, inv, self.progress), topo)
            finally:
                inv.close()
        return await self.status()

    # ------------------------------------------------------------------ VMs
    async def vm_start(self, name: str) -> hp.VmStarted:
        with self.context() as ctx, ctx.lock():
            return await vms.start(ctx, name)

    async def vm_stop(self, name: str) -> None:
        with self.context() as ctx, ctx.lock():
            await vms.stop(ctx, name)

    def vm_set_heartbeat(self, name: str, period_ms: int) -> None:
        """Set a stopped VM's heartbeat period (``labctl.hb_ms`` on its next start); the
        migration code reads the period from the inventory."""
        if not valid_heartbeat_ms(period_ms):
            raise LabError(f"heartbeat period {period_ms!r}: an integer from {HEARTBEAT_MS_MIN} "
                           f"to {HEARTBEAT_MS_MAX} ms", vm=name)
        with self.context() as ctx, ctx.lock():
            if vms.row(ctx, name)["state"] == "running":
                raise LabStateError(f"VM {name} is running: stop it before changing its "
                                    f"heartbeat period", vm=name)
            ctx.inv.update("vms", {"name": name}, heartbeat_ms=period_ms)

    async def vm_console(self, name: str, command: str) -> str:
        """Send a console command to the test guest (``rate N``, ``wss N``, ``read``, ``sync``)."""
        with self.context() as ctx:
            async with ctx.host_client(vms.running_host(ctx, name)) as c:
                return (await hp.VM_CONSOLE.call(c, hp.ConsoleCommand(name, command),
                                                 timeout=30)).answer

    async def vm_console_tail(self, name: str, lines: int = 20) -> list[str]:
        """The last console lines of a running VM, as its host agent read them."""
        with self.context() as ctx:
            async with ctx.host_client(vms.running_host(ctx, name)) as c:
                return (await hp.VM_CONSOLE_TAIL.call(c, hp.ConsoleTailRequest(name, lines),
                                                      timeout=30)).lines

    # ------------------------------------------------------------------ migration
    async def migrate(self, vm: str, to: str, policy: str | Policy | None = None,
                      late_storage: bool | None = None,
                      measure_dirty_rate: bool = False) -> dict[str, Any]:
        """Live-migrate ``vm`` to host ``to`` (see labctl/migration/)."""
        with self.context() as ctx, ctx.lock():
            row = vms.row(ctx, vm)
            store = row["datastore"]
            sharing = datastores.mapping(ctx.inv, store).hosts if store else None
            dest_disk = (vms.disk(ctx, store, to)
                         if store and ctx.inv.row("hosts", name=to) is not None else None)
            return await inlab.migrate(ctx, vm, to, sharing=sharing, dest_disk=dest_disk,
                                       policy=policy, late_storage=late_storage,
                                       measure_dirty_rate=measure_dirty_rate)

    def migrations(self, mid: int | None = None) -> Any:
        """Recorded migrations (a list), or one with its passes and decisions."""
        with self.context() as ctx:
            return list_migrations(ctx.inv) if mid is None else get_migration(ctx.inv, mid)

    # ------------------------------------------------------------------ status
    async def status(self) -> dict[str, Any]:
        with self.context() as ctx:
            return await self._status(ctx)

    async def _status(self, ctx: LabContext) -> dict[str, Any]:
        inv = ctx.inv
        hosts = inv.rows("hosts")
        vm_live: dict[str, dict[str, Any]] = {}
        agent_state: dict[str, str] = {}

        async def probe(host: dict[str, Any]) -> None:
            try:
                async with ctx.host_client(host["name"], timeout=2.0) as c:
                    await hp.PING.call(c, timeout=3)
                    agent_state[host["name"]] = "up"
                    for v in (await hp.VM_LIST.call(c, timeout=5)).vms:
                        vm_live[v.name] = {**v.to_wire(), "host": host["name"]}
            except AgentError as exc:
                agent_state[host["name"]] = f"unreachable: {exc.message}"

        node_state: dict[str, str] = {}

        async def probe_node(node: dict[str, Any]) -> None:
            try:
                async with ctx.storage_client(node["name"], timeout=2.0) as c:
                    up = await sp.PING.call(c, timeout=3)
                    node_state[node["name"]] = f"up {up.uptime_s:.0f} s"
            except AgentError as exc:
                node_state[node["name"]] = f"unreachable: {exc.message}"

        await asyncio.gather(*(probe(h) for h in hosts if h["state"] == "up"),
                             *(probe_node(n) for n in inv.rows("storage_nodes") if n["state"] == "up"))
        out_hosts = [{"name": h["name"], "site": h["site"], "address": h["address"],
                      "initiator_iqn": h["initiator_iqn"], "netns": h["netns"],
                      "agent": agent_state.get(h["name"], h["state"])} for h in hosts]
        nodes = [{"name": n["name"], "site": n["site"], "address": n["address"],
                  "target_iqn": n["target_iqn"], "domain": n["domain"], "state": n["state"],
                  "agent": node_state.get(n["name"], n["state"])}
                 for n in inv.rows("storage_nodes")]
        stores = []
        for d in inv.rows("datastores"):
            shares = inv.rows("datastore_hosts", datastore=d["name"])
            seen = {s["seen_naa"] for s in shares if s["seen_naa"]}
            stores.append({
                "name": d["name"], "node": d["node"], "naa": seen.pop() if len(seen) == 1 else d["naa"],
                "lun": d["lun"], "size_bytes": d["size_bytes"], "state": d["state"],
                "hosts": [s["host"] for s in shares],
                "seen_by": {s["host"]: {"naa": s["seen_naa"], "size_bytes": s["seen_size"]}
                            for s in shares},
            })
        vms = []
        for v in inv.rows("vms"):
            live = vm_live.get(v["name"])
            entry: dict[str, Any] = {"name": v["name"], "host": v["host"], "datastore": v["datastore"],
                                     "memory_bytes": v["memory"], "state": v["state"],
                                     "heartbeat_ms": v["heartbeat_ms"]}
            if live is not None:
                entry.update(host=live["host"], state=live.get("state", "running"),
                             pid=live.get("pid"), heartbeat=live.get("heartbeat"),
                             qmp_check_socket=live.get("qmp_check_socket"),
                             console_log=live.get("console_log"),
                             disk_counter=live.get("disk_counter"))
            elif v["state"] == "running":
                entry["state"] = "unknown (its host agent does not report it)"
            vms.append(entry)
        return {"lab": self.name, "state": inv.get_meta("state"), "accel": inv.get_meta("accel"),
                "topology": inv.get_meta("topology_source"), "hosts": out_hosts,
                "storage_nodes": nodes, "datastores": stores, "vms": vms,
                "steps": [{"name": s["name"], "seconds": round(s["seconds"], 3)}
                          for s in inv.rows("steps")]}

    # ------------------------------------------------------------------ down
    async def down(self) -> list[str]:
        """Remove exactly what this lab owns. Works after a crash mid-up; says so when nothing is up."""
        if not self.dir.path.exists():
            raise LabStateError(f"lab {self.name} is not up: nothing to tear down", lab=self.name)
        with self.dir.lock():
            removed: list[str] = []
            if self.dir.exists():
                inv = self.dir.inventory(SCHEMAS)
                try:
                    removed = await teardown.teardown(
                        LabContext(self.name, self.dir, inv, self.progress))
                finally:
                    inv.close()
        shutil.rmtree(self.dir.path, ignore_errors=True)
        self.progress(f"lab {self.name} is down")
        return removed
