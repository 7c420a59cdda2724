"""The controller: builds a lab from its topology, reports on it, tears it down by ownership.

``Lab`` is the Python API behind the CLI. All methods are coroutines; the CLI
runs each command in one event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from labctl import netns
from labctl.datastores import attach_for_vm, export_lun, hand_mappings, mapping, register
from labctl.errors import (
    AgentError,
    AgentUnreachable,
    LabError,
    LabStateError,
    MissingDependency,
    ProvisionError,
    RemoteError,
    TopologyError,
)
from labctl.guestimage import guest_append
from labctl.inventory import Inventory
from labctl.labdir import LabDir, existing_labs, pid_owned_by
from labctl.proc import netns_argv, which
from labctl.rpc import RpcClient
from labctl.topology import Topology

HOST_AGENT_PORT = 7600
LIBVIRT_QEMU_LOGS = Path("/var/log/libvirt/qemu")
STORAGE_AGENT_PORT = 7700
Progress = Callable[[str], None]
_T = TypeVar("_T")


def _quiet(_: str) -> None:
    pass


class Lab:
    """One lab, found by name. Cheap to construct: nothing happens until a method is called."""

    def __init__(self, name: str, root: Path | None = None, progress: Progress = _quiet) -> None:
        self.dir = LabDir(name, root)
        self.name = name
        self.progress = progress

    @classmethod
    def find(cls, name: str | None, root: Path | None = None, progress: Progress = _quiet) -> Lab:
        """The lab called ``name``; without a name, the only lab that exists."""
        if name is not None:
            return cls(name, root, progress)
        labs = existing_labs(root)
        if len(labs) == 1:
            return cls(labs[0], root, progress)
        if not labs:
            raise LabStateError("no lab is up (start one with: labctl up)")
        raise LabStateError(f"several labs exist ({', '.join(labs)}): say which with --lab NAME")

    # ------------------------------------------------------------------ names
    def bridge_name(self, site_index: int) -> str:
        return f"lc{self.dir.tag}b{site_index}"

    def veth_name(self, host_index: int) -> str:
        return f"lc{self.dir.tag}h{host_index}"

    def tap_name(self, node_index: int) -> str:
        return f"lc{self.dir.tag}s{node_index}"

    def netns_name(self, host: str) -> str:
        return f"labctl-{self.name}-{host}"

    def domain_name(self, node: str) -> str:
        return f"labctl-{self.name}-{node}"

    # ------------------------------------------------------------------ helpers
    def open_inventory(self) -> Inventory:
        """The lab's inventory (the caller closes it); a clear error when the lab is not up."""
        if not self.dir.exists():
            raise LabStateError(f"lab {self.name} is not up (start it with: labctl up)", lab=self.name)
        return self.dir.inventory()

    async def _step(self, inv: Inventory, name: str, work: Awaitable[_T]) -> _T:
        start = time.monotonic()
        result = await work
        took = time.monotonic() - start
        inv.record_step(name, took)
        self.progress(f"{name} ({took:.1f} s)")
        return result

    def host_client(self, inv: Inventory, host: str,
                    timeout: float = 5.0) -> AbstractAsyncContextManager[RpcClient]:
        """An authenticated connection to ``host``'s agent (closed on exit)."""
        return self._agent_client(inv, "hosts", "host", host, timeout)

    def storage_client(self, inv: Inventory, node: str,
                       timeout: float = 5.0) -> AbstractAsyncContextManager[RpcClient]:
        """An authenticated connection to storage node ``node``'s agent (closed on exit)."""
        return self._agent_client(inv, "storage_nodes", "storage node", node, timeout)

    @asynccontextmanager
    async def _agent_client(self, inv: Inventory, table: str, kind: str, name: str,
                            timeout: float) -> AsyncIterator[RpcClient]:
        row = inv.row(table, name=name)
        if row is None:
            names = ", ".join(r["name"] for r in inv.rows(table)) or "none"
            raise LabStateError(f"unknown {kind} {name!r} ({kind}s: {names})", name=name)
        client = await RpcClient.connect(row["address"], row["agent_port"], self.dir.secret(),
                                         timeout=timeout, peer=f"{kind} {name}")
        try:
            yield client
        finally:
            await client.close()

    # ------------------------------------------------------------------ up
    async def up(self, topo: Topology) -> dict[str, Any]:
        """Bring the lab up. Idempotent for the same topology; refuses a different one."""
        if topo.name != self.name:
            raise TopologyError(topo.source, "name", f"names lab {topo.name}, not {self.name}")
        _preflight()
        with self.dir.lock():
            if self.dir.exists():
                inv = self.dir.inventory()
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
            self._check_host_network(topo)
            _check_disk_space(topo, self.dir.path.parent)
            self.dir.create()
            inv = self.dir.inventory()
            try:
                await self._build(inv, topo)
            finally:
                inv.close()
        return await self.status()

    def _check_host_network(self, topo: Topology) -> None:
        for i, site in enumerate(topo.sites):
            clash = netns.overlapping_routes(site.subnet)
            if clash:
                raise TopologyError(
                    topo.source, f"sites[{i}].subnet",
                    f"{site.subnet} overlaps a network this machine already uses ({'; '.join(clash)}); "
                    "pick another subnet")

    async def _build(self, inv: Inventory, topo: Topology) -> None:
        from labctl import guestimage, images, storagenode
        from labctl.qemu import kvm_usable

        inv.set_meta("state", "creating")
        inv.set_meta("topology_digest", topo.digest)
        inv.set_meta("topology_source", str(Path(topo.source).resolve()))
        inv.set_meta("created", str(time.time()))
        (self.dir.path / "topology.json").write_text(json.dumps(topo.raw, indent=2, default=str))
        t_start = time.monotonic()

        # 1. images (cached by recipe) and the accelerator probe, side by side
        simg, gimg = await self._step(inv, "images ready", asyncio.gather(
            images.ensure_storage_image(progress=self.progress),
            guestimage.ensure_guest_image(),
        ))
        accel = await self._step(inv, "accelerator probe", asyncio.to_thread(kvm_usable))
        accel_name = "kvm" if accel else "tcg"
        inv.set_meta("accel", accel_name)

        # 2. network: one bridge per site, the controller holds .1 on it
        t_net = time.monotonic()
        for i, site in enumerate(topo.sites):
            br = self.bridge_name(i)
            inv.own("link", br, alias=netns.alias_for(self.name, "bridge", site.name))
            netns.ensure_bridge(br, netns.alias_for(self.name, "bridge", site.name),
                                ipaddress.IPv4Interface(f"{site.gateway}/{site.subnet.prefixlen}"))
            inv.upsert("sites", name=site.name, subnet=str(site.subnet), bridge=br)
        inv.record_step("network", time.monotonic() - t_net)

        # 3. storage nodes (VMs through libvirt) and host agents, in parallel
        await storagenode.ensure_libvirtd()
        site_index = {s.name: i for i, s in enumerate(topo.sites)}
        node_jobs = [self._start_storage_node(inv, topo, i, simg, accel_name, site_index)
                     for i in range(len(topo.storage_nodes))]
        host_jobs = [self._start_host(inv, topo, i, site_index) for i in range(len(topo.hosts))]
        await self._step(inv, "storage nodes and hosts ready", _gather_all(*node_jobs, *host_jobs))

        # 4. LUNs with ACLs, then every sharing host checks what it sees
        await self._step(inv, "datastores exported", _gather_all(
            *(export_lun(self, inv, d.name) for d in topo.datastores)))
        await self._step(inv, "mappings handed to hosts, each scanned its LUNs",
                         self._hand_mappings_checked(inv))
        await self._step(inv, "rescan service subscribed", self._start_rescan(inv, topo))

        # 5. VMs
        inv.set_meta("guest_kernel", str(gimg.kernel))
        inv.set_meta("guest_initrd", str(gimg.initrd))
        for vm in topo.vms:
            inv.upsert("vms", name=vm.name, host=vm.host, datastore=vm.datastore,
                       memory=vm.memory, vcpus=vm.vcpus, dirty_rate=vm.dirty_rate,
                       working_set=vm.working_set, state="stopped", pid=None, started_at=None,
                       heartbeat_ms=vm.heartbeat_ms)
        for vm in topo.vms:
            if vm.autostart:
                await self._step(inv, f"VM {vm.name} first heartbeat", self._vm_start(inv, vm.name))
        inv.set_meta("state", "up")
        total = time.monotonic() - t_start
        inv.record_step("lab ready", total)
        self.progress(f"lab {self.name} is up ({total:.1f} s)")

    async def _start_storage_node(self, inv: Inventory, topo: Topology, i: int, image: Any,
                                  accel: str, site_index: dict[str, int]) -> None:
        from labctl import storagenode

        node = topo.storage_nodes[i]
        site = topo.site(node.site)
        domain = self.domain_name(node.name)
        tap = self.tap_name(i)
        inv.upsert("storage_nodes", name=node.name, site=node.site, address=str(node.address),
                   target_iqn=node.target_iqn, domain=domain, tap=tap,
                   agent_port=STORAGE_AGENT_PORT, capacity=node.capacity, state="starting")
        disks = []
        for ds in topo.datastores:
            if ds.node != node.name:
                continue
            # its ID: a unit serial never issued before, hence the LUN's NAA ID
            _naa, disk = register(self, inv, node.name, ds.name, ds.size, list(ds.hosts),
                                  "allocated")
            disks.append(disk)
        inv.own("domain", domain, lab_dir=str(self.dir.path))
        spec = storagenode.StorageNodeSpec(
            lab=self.name, name=node.name, lab_dir=self.dir.path,
            address_cidr=f"{node.address}/{site.subnet.prefixlen}",
            bridge=self.bridge_name(site_index[node.site]), tap=tap,
            mac=_mac_for(self.dir.tag, "s", i), memory_mib=node.memory >> 20,
            data_disks=disks, secret=self.dir.secret(), target_iqn=node.target_iqn,
            agent_port=STORAGE_AGENT_PORT,
        )
        t0 = time.monotonic()
        await storagenode.start(spec, image, accel="kvm" if accel == "kvm" else "qemu")
        # libvirt made the tap; label it like every other link of the lab
        netns.label_link(tap, netns.alias_for(self.name, "tap", node.name))
        inv.record_step(f"storage node {node.name} boot to agent ready", time.monotonic() - t0)
        inv.update("storage_nodes", {"name": node.name}, state="up")
        self.progress(f"storage node {node.name} is serving at {node.address}")

    async def _start_host(self, inv: Inventory, topo: Topology, i: int,
                          site_index: dict[str, int]) -> None:
        host = topo.hosts[i]
        site = topo.site(host.site)
        ns = self.netns_name(host.name)
        veth = self.veth_name(i)
        inv.upsert("hosts", name=host.name, site=host.site, address=str(host.address),
                   initiator_iqn=host.initiator_iqn, netns=ns, veth=veth,
                   agent_port=HOST_AGENT_PORT, memory=host.memory, agent_pid=None, state="starting")
        inv.own("netns", ns)
        netns.ensure_netns(ns)
        alias = netns.alias_for(self.name, "veth", host.name)
        inv.own("link", veth, alias=alias)
        netns.ensure_veth(netns.VethSpec(
            outer=veth, netns=ns, bridge=self.bridge_name(site_index[host.site]),
            address=ipaddress.IPv4Interface(f"{host.address}/{site.subnet.prefixlen}"), alias=alias))
        t0 = time.monotonic()
        hdir = self.dir.host_dir(host.name)
        hdir.mkdir(parents=True, exist_ok=True)
        argv = netns_argv(ns, [sys.executable, "-m", "labctl.agents.host",
                               "--lab-dir", str(self.dir.path), "--host", host.name,
                               "--listen", f"{host.address}:{HOST_AGENT_PORT}"])
        with open(hdir / "agent.out", "ab") as out:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True, env={**os.environ, "LABCTL_LAB": self.name})
        inv.own("process", f"host-agent:{host.name}", pid=proc.pid)
        inv.update("hosts", {"name": host.name}, agent_pid=proc.pid)
        deadline = time.monotonic() + 15
        while True:
            if proc.returncode is not None:
                tail = (hdir / "agent.out").read_text(errors="replace")[-1500:]
                raise ProvisionError(f"the host agent of {host.name} exited at start "
                                     f"(exit {proc.returncode})", host=host.name, log_tail=tail)
            try:
                async with self.host_client(inv, host.name, timeout=1.0) as c:
                    await c.call("ping", timeout=5)
                break
            except AgentUnreachable:
                if time.monotonic() > deadline:
                    raise ProvisionError(f"the host agent of {host.name} did not answer within 15 s",
                                         host=host.name) from None
                await asyncio.sleep(0.1)
        inv.record_step(f"host {host.name} namespace and agent ready", time.monotonic() - t0)
        inv.update("hosts", {"name": host.name}, state="up")

    async def _start_rescan(self, inv: Inventory, topo: Topology) -> None:
        """The lab's rescan service (labctl/rescan.py), a process owned by the lab."""
        from labctl.rescan import set_lookup

        set_lookup(inv, str((topo.raw.get("rescan") or {}).get("lookup", "inventory")))
        log = self.dir.path / "rescan.out"
        argv = [sys.executable, "-m", "labctl.rescan", "--lab-dir", str(self.dir.path),
                "--lab", self.name]
        with open(log, "ab") as out:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True)
        inv.own("process", "rescan-service", pid=proc.pid)
        deadline = time.monotonic() + 20
        while inv.get_meta("rescan_ready") is None:
            if proc.returncode is not None or time.monotonic() > deadline:
                raise ProvisionError("the rescan service did not subscribe to every agent "
                                     "within 20 s" if proc.returncode is None else
                                     f"the rescan service exited (status {proc.returncode})",
                                     log_tail=log.read_text(errors="replace")[-1500:])
            await asyncio.sleep(0.05)

    async def _hand_mappings_checked(self, inv: Inventory) -> None:
        """Each host takes the mappings of the datastores it shares and scans them by ID from
        its namespace; a host that cannot see one, or sees another ID, stops the bring-up."""
        seen = await hand_mappings(self, inv)
        for host, units in seen.items():
            for unit in units:
                if unit.get("state") != "ok":
                    raise ProvisionError(
                        f"host {host} cannot use datastore {unit.get('datastore')} "
                        f"({unit.get('id')}): {unit.get('error') or unit.get('state')}",
                        host=host, unit=unit)

    # ------------------------------------------------------------------ VMs
    async def vm_start(self, name: str) -> dict[str, Any]:
        inv = self.open_inventory()
        try:
            with self.dir.lock():
                return await self._vm_start(inv, name)
        finally:
            inv.close()

    def vm_spec(self, inv: Inventory, name: str, host: str) -> dict[str, Any]:
        vm = inv.row("vms", name=name)
        assert vm is not None
        disk = None
        if vm["datastore"]:
            m = mapping(inv, vm["datastore"], host)
            disk = {"kind": "iscsi", "portal": m["portal"], "target_iqn": m["target_iqn"],
                    "lun": m["lun"], "initiator_iqn": m["initiator_iqn"], "naa": m["id"]}
        append = guest_append(round(vm["dirty_rate"]), vm["working_set"] >> 20,
                              extra=[f"labctl.vm={name}", f"labctl.hb_ms={vm['heartbeat_ms']}"])
        return {"name": name, "memory_mib": vm["memory"] >> 20, "vcpus": vm["vcpus"],
                "kernel": inv.get_meta("guest_kernel"), "initrd": inv.get_meta("guest_initrd"),
                "append": append, "accel": inv.get_meta("accel", "tcg"), "disk": disk}

    async def _vm_start(self, inv: Inventory, name: str) -> dict[str, Any]:
        vm = self.vm_row(inv, name)
        spec = self.vm_spec(inv, name, vm["host"])
        async with self.host_client(inv, vm["host"]) as c:
            if vm["state"] == "running":  # as far as the inventory knows: ask its host
                try:
                    live = await c.call("vm_status", name=name, timeout=15)
                except RemoteError:
                    live = {"process": "gone"}
                if live.get("process") in ("starting", "running"):
                    raise LabStateError(f"VM {name} is already running on {vm['host']}",
                                        vm=name)
                self.progress(f"VM {name} had died on {vm['host']} (QEMU "
                              f"{live.get('process')}, exit status {live.get('returncode')}): "
                              f"starting it again")
            if vm["datastore"]:  # the host attaches by ID: hand it the mapping, it checks the LUN
                await attach_for_vm(c, inv, vm["datastore"], vm["host"])
            res = await c.call("vm_start", spec=spec, timeout=120)
        inv.update("vms", {"name": name}, state="running", pid=res.get("pid"), started_at=time.time())
        return dict(res)

    def vm_set_heartbeat(self, name: str, period_ms: int) -> None:
        """Set a stopped VM's heartbeat period (``labctl.hb_ms`` on its next start); the
        migration code reads the period from the inventory."""
        from labctl.guestimage import HEARTBEAT_MS_MAX, HEARTBEAT_MS_MIN, valid_heartbeat_ms

        if not valid_heartbeat_ms(period_ms):
            raise LabError(f"heartbeat period {period_ms!r}: an integer from {HEARTBEAT_MS_MIN} "
                           f"to {HEARTBEAT_MS_MAX} ms", vm=name)
        inv = self.open_inventory()
        try:
            with self.dir.lock():
                vm = self.vm_row(inv, name)
                if vm["state"] == "running":
                    raise LabStateError(f"VM {name} is running: stop it before changing its "
                                        f"heartbeat period", vm=name)
                inv.update("vms", {"name": name}, heartbeat_ms=period_ms)
        finally:
            inv.close()

    async def vm_stop(self, name: str) -> None:
        inv = self.open_inventory()
        try:
            with self.dir.lock():
                vm = self.vm_row(inv, name)
                if vm["state"] != "running":
                    raise LabStateError(f"VM {name} is not running", vm=name)
                async with self.host_client(inv, vm["host"]) as c:
                    await c.call("vm_stop", name=name, timeout=60)
                inv.update("vms", {"name": name}, state="stopped", pid=None)
        finally:
            inv.close()

    async def migrate(self, vm: str, to: str, policy: Any = None,
                      late_storage: bool | None = None) -> dict[str, Any]:
        """Live-migrate ``vm`` to host ``to`` (see labctl/migration.py)."""
        from labctl.migration import migrate_in_lab

        return await migrate_in_lab(self, vm, to, policy, late_storage)

    def migrations(self, mid: int | None = None) -> Any:
        """Recorded migrations (a list), or one with its passes and decisions."""
        from labctl.migration import get_migration, list_migrations

        inv = self.open_inventory()
        try:
            return list_migrations(inv) if mid is None else get_migration(inv, mid)
        finally:
            inv.close()

    async def vm_console(self, name: str, command: str) -> str:
        """Send a console command to the test guest (``rate N``, ``wss N``, ``read``, ``sync``)."""
        return str(await self._call_vm_host(name, "vm_console", name=name, command=command))

    async def vm_console_tail(self, name: str, lines: int = 20) -> list[str]:
        """The last console lines of a running VM, as its host agent read them."""
        return [str(x) for x in await self._call_vm_host(name, "vm_console_tail", name=name,
                                                         lines=lines)]

    async def _call_vm_host(self, vm_name: str, method: str, **params: Any) -> Any:
        inv = self.open_inventory()
        try:
            vm = self.vm_row(inv, vm_name)
            if vm["state"] != "running":
                raise LabStateError(f"VM {vm_name} is not running", vm=vm_name)
            async with self.host_client(inv, vm["host"]) as c:
                return await c.call(method, timeout=30, **params)
        finally:
            inv.close()

    def vm_row(self, inv: Inventory, name: str) -> dict[str, Any]:
        vm = inv.row("vms", name=name)
        if vm is None:
            names = ", ".join(r["name"] for r in inv.rows("vms")) or "none"
            raise LabStateError(f"unknown VM {name!r} (VMs: {names})", vm=name)
        return vm

    # ------------------------------------------------------------------ status
    async def status(self) -> dict[str, Any]:
        inv = self.open_inventory()
        try:
            return await self._status(inv)
        finally:
            inv.close()

    async def _status(self, inv: Inventory) -> dict[str, Any]:
        hosts = inv.rows("hosts")
        vm_live: dict[str, dict[str, Any]] = {}
        agent_state: dict[str, str] = {}

        async def probe(host: dict[str, Any]) -> None:
            try:
                async with self.host_client(inv, host["name"], timeout=2.0) as c:
                    await c.call("ping", timeout=3)
                    agent_state[host["name"]] = "up"
                    for v in await c.call("vm_list", timeout=5):
                        vm_live[v["name"]] = {**v, "host": host["name"]}
            except AgentError as exc:
                agent_state[host["name"]] = f"unreachable: {exc.message}"

        node_state: dict[str, str] = {}

        async def probe_node(node: dict[str, Any]) -> None:
            try:
                async with self.storage_client(inv, node["name"], timeout=2.0) as c:
                    up = await c.call("ping", timeout=3)
                    node_state[node["name"]] = f"up {up.get('uptime_s', 0):.0f} s"
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
            removed = await self._teardown()
        shutil.rmtree(self.dir.path, ignore_errors=True)
        self.progress(f"lab {self.name} is down")
        return removed

    async def _teardown(self) -> list[str]:
        from labctl import storagenode

        removed: list[str] = []
        inv = self.dir.inventory() if self.dir.exists() else None
        owned = inv.owned() if inv is not None else []
        # processes first (host agents stop their VMs softly on SIGTERM), then any QEMU left
        agents = [(n, d["pid"]) for k, n, d in owned if k == "process" and "pid" in d]
        await _gather_all(*(self._stop_process(name, pid, removed) for name, pid in agents))
        for pidfile in sorted(self.dir.path.glob("hosts/*/vms/*/*.pid")):
            with contextlib.suppress(ValueError, OSError):
                await self._stop_process(f"qemu:{pidfile.parent.name}",
                                         int(pidfile.read_text().split()[0]), removed)
        try:
            for dom in await storagenode.destroy_owned(self.name, self.dir.path):
                removed.append(f"domain {dom}")
                # libvirt keeps the domain's QEMU log after undefine; it is this lab's file
                log = LIBVIRT_QEMU_LOGS / f"{dom}.log"
                if log.exists():
                    log.unlink()
                    removed.append(f"file {log}")
        except LabError as exc:
            self.progress(f"warning: {exc.message}")
        for kind, name, detail in owned:
            if kind == "link" and netns.delete_link(name, detail["alias"]):
                removed.append(f"link {name}")
            elif kind == "netns" and netns.delete_netns(name):
                removed.append(f"netns {name}")
            if inv is not None:
                inv.disown(kind, name)
        if inv is not None:
            inv.close()
        for item in removed:
            self.progress(f"removed {item}")
        return removed

    async def _stop_process(self, name: str, pid: int, removed: list[str]) -> None:
        if not pid_owned_by(pid, self.dir.path):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            await asyncio.sleep(0.05)
            if not pid_owned_by(pid, self.dir.path):
                removed.append(f"process {name} (pid {pid})")
                return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        removed.append(f"process {name} (pid {pid}, killed)")


async def _gather_all(*jobs: Awaitable[Any]) -> list[Any]:
    """Run jobs together; if one fails, cancel the rest and raise the first error."""
    tasks = [asyncio.ensure_future(j) for j in jobs]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _check_disk_space(topo: Topology, where: Path) -> None:
    """Datastores are sparse files in the lab directory: refuse a lab whose datastores could
    not all be filled on the filesystem that holds it (plus room for the node's overlay)."""
    where.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(where).free
    need = sum(d.size for d in topo.datastores) + len(topo.storage_nodes) * (256 << 20)
    if need > free:
        raise TopologyError(
            topo.source, "datastores",
            f"the datastores need {need >> 20} MiB but the filesystem of {where} has "
            f"{free >> 20} MiB free", need=need, free=free)


def _preflight() -> None:
    if os.geteuid() != 0:
        raise MissingDependency("labctl needs root to create network namespaces and bridges "
                                "(run it with sudo)")
    from labctl.qemu import QEMU_BINARY

    if shutil.which(QEMU_BINARY) is None:
        raise MissingDependency(f"QEMU ({QEMU_BINARY}) is not installed; run scripts/setup.sh",
                                program=QEMU_BINARY)
    for tool in ("iscsi-inq", "iscsi-ls", "mmdebstrap", "nsenter"):
        which(tool)


def _mac_for(tag: str, role: str, index: int) -> str:
    return f"52:54:{tag[:2]}:{tag[2:4]}:{ord(role):02x}:{index:02x}"

