"""A throwaway two-host testbed for migration: two real host agents in two network
namespaces on their own bridge, one VM whose disk is a raw file both QEMUs open.

It is what the agent-level migration tests and ``bench/migration`` use when no lab with
shared iSCSI storage is up. Every name starts with ``lctest`` and every link carries an
alias naming the testbed, so cleanup removes exactly what it created.

    async with PairTestbed(work_dir) as tb:
        await tb.start_vm(rate_mib_s=10)
        result = await tb.migrate(policy)       # a -> b
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any

from labctl.core import names
from labctl.core.errors import AgentUnreachable, LabError
from labctl.core.proc import cmdlines, netns_argv
from labctl.core.rpc import RpcClient
from labctl.core.secret import write_secret
from labctl.drivers import netlink as netns
from labctl.hosts import protocol as hp
from labctl.migration.driver import Endpoint, Migration
from labctl.migration.policy import Policy
from labctl.migration.records import Recorder
from labctl.migration.result import Record
from labctl.migration.tables import MIGRATIONS
from labctl.state.context import Progress, quiet
from labctl.state.inventory import Inventory

PORT = names.HOST_AGENT_PORT


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 of 10.232.16.0 to 10.232.215.0, tried in random order, that no route or address
    of this machine overlaps: not another testbed's (a second test run at the same time) nor
    a lab's."""
    octets = list(range(16, 216))
    secrets.SystemRandom().shuffle(octets)
    for octet in octets:
        net = ipaddress.IPv4Network(f"10.232.{octet}.0/24")
        if not netns.overlapping_routes(net):
            return net
    raise LabError("no /24 of 10.232.16.0 to 10.232.215.0 is free on this machine for a testbed")


class PairTestbed:
    def __init__(self, work_dir: Path, memory_mib: int = 256, progress: Progress = quiet) -> None:
        self.work_dir = work_dir
        self.tag = secrets.token_hex(2)
        self.name = f"lctest{self.tag}"
        self.subnet = _free_subnet()
        self.bridge = f"lct{self.tag}br"
        self.hosts = {"a": str(self.subnet[2]), "b": str(self.subnet[3])}
        self.veths = {h: f"lct{self.tag}{h}" for h in self.hosts}
        self.memory_mib = memory_mib
        self.progress = progress
        self.lab_dir = work_dir / "lab"
        self.disk = work_dir / "vm1.raw"
        self.secret = secrets.token_bytes(32)
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.clients: dict[str, RpcClient] = {}
        self.inv: Inventory | None = None
        self.vm = "vm1"
        self.vm_host = "a"

    def alias(self, role: str, name: str) -> str:
        return names.alias(self.name, role, name)

    def netns_name(self, host: str) -> str:
        return f"{self.name}-{host}"

    async def __aenter__(self) -> PairTestbed:
        try:
            await self._up()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _up(self) -> None:
        self.lab_dir.mkdir(parents=True, exist_ok=True)
        write_secret(self.lab_dir / "secret", self.secret)
        self.disk.write_bytes(bytes(4 << 20))
        self.inv = Inventory.open(self.work_dir / "migrations.db", [MIGRATIONS])
        await asyncio.to_thread(self._network)
        for h, addr in self.hosts.items():
            log = open(self.work_dir / f"agent-{h}.out", "ab")
            try:
                self.procs[h] = await asyncio.create_subprocess_exec(
                    *netns_argv(self.netns_name(h), [
                        sys.executable, "-m", "labctl.agents.host",
                        "--state-dir", str(self.lab_dir / "hosts" / h),
                        "--secret-file", str(self.lab_dir / "secret"), "--host", h,
                        "--listen", f"{addr}:{PORT}"]),
                    stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)
            finally:
                log.close()
        for h in self.hosts:
            self.clients[h] = await self._connect(h)

    def _network(self) -> None:
        # pyroute2's sync face runs its own event loop: keep it off ours (to_thread)
        netns.ensure_bridge(self.bridge, self.alias("bridge", "br"),
                            ipaddress.IPv4Interface(f"{self.subnet[1]}/24"))
        for h, addr in self.hosts.items():
            ns = self.netns_name(h)
            netns.ensure_netns(ns, self.alias("netns", h))
            netns.ensure_veth(netns.VethSpec(outer=self.veths[h], netns=ns, bridge=self.bridge,
                                             address=ipaddress.IPv4Interface(f"{addr}/24"),
                                             alias=self.alias("veth", h)))

    def _unnetwork(self) -> None:
        for h in self.hosts:
            with contextlib.suppress(LabError, OSError):
                netns.delete_link(self.veths[h], self.alias("veth", h))
            with contextlib.suppress(LabError, OSError):
                netns.delete_netns(self.netns_name(h), self.alias("netns", h))
        with contextlib.suppress(LabError, OSError):
            netns.delete_link(self.bridge, self.alias("bridge", "br"))

    async def _connect(self, h: str, wait: float = 20.0) -> RpcClient:
        deadline = time.monotonic() + wait
        while True:
            proc = self.procs[h]
            if proc.returncode is not None:
                raise LabError(f"testbed agent {h} exited ({proc.returncode})")
            try:
                return await RpcClient.connect(self.hosts[h], PORT, self.secret, timeout=2,
                                               peer=f"host {h}")
            except AgentUnreachable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)

    async def reconnect(self, h: str) -> RpcClient:
        with contextlib.suppress(Exception):
            await self.clients[h].close()
        self.clients[h] = await self._connect(h)
        return self.clients[h]

    async def start_vm(self, rate_mib_s: int = 0, wss_mib: int = 64,
                       heartbeat_ms: int = 100) -> hp.VmStarted:
        return await hp.VM_START.call(self.clients[self.vm_host], hp.VmStart(hp.VmStartSpec(
            name=self.vm, memory_mib=self.memory_mib, accel="tcg", rate_mib_s=rate_mib_s,
            wss_mib=wss_mib, heartbeat_ms=heartbeat_ms, disk=hp.FileDisk(self.disk))),
            timeout=120)

    def other(self, h: str) -> str:
        return "b" if h == "a" else "a"

    def migration(self, policy: Policy, to: str | None = None, **kw: Any) -> Migration:
        """A migration of the testbed's VM (``kw``: more Migration arguments)."""
        src = self.vm_host
        dst = to or self.other(src)
        return Migration(self.vm, Endpoint(src, self.clients[src], self.hosts[src]),
                         Endpoint(dst, self.clients[dst], self.hosts[dst]), policy,
                         recorder=Recorder(self.inv), progress=self.progress, **kw)

    async def migrate(self, policy: Policy, to: str | None = None) -> Record:
        res = await self.migration(policy, to).run()
        self.vm_host = res["dest"]
        return res

    async def set_link(self, h: str, up: bool) -> None:
        await asyncio.to_thread(netns.set_link_state, self.veths[h], up, self.alias("veth", h))

    async def close(self) -> None:
        for c in self.clients.values():
            with contextlib.suppress(Exception):
                await c.close()
        for h, proc in self.procs.items():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)  # the PID we started; it stops its VMs
                try:
                    async with asyncio.timeout(30):
                        await proc.wait()
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
            self.progress(f"testbed agent {h} stopped ({proc.returncode})")
        await asyncio.to_thread(self._unnetwork)
        if self.inv is not None:
            self.inv.close()


def qemu_pids_under(path: Path) -> list[int]:
    """PIDs of processes whose command line mentions ``path`` (outside checks in tests)."""
    key = str(path).encode()
    return [pid for pid, cmd in cmdlines() if key in cmd and b"qemu-system" in cmd]
