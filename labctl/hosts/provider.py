"""The host provider seam: how a lab gets its hosts.

A provider provisions a host (its network presence and a running host agent), delivers
the lab secret to it, and returns where its agent answers; it removes what it made when
the lab goes down. Controller side: it never touches QEMU itself; the agent it starts
does, and probes its own accelerator.

* :class:`NamespaceHosts` (the local provider): a network namespace on this machine with
  a veth on the site bridge, the agent started inside it with its own state directory
  and a 0600 copy of the secret.
* An SSH provider (hardware, a Vagrant lab) implements the same :class:`HostProvider`.

Every object is written to the lab's ownership journal *before* it is created, and
removed only if it still proves to be the lab's (link alias, the mark of a namespace,
process command line).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from labctl.core import names
from labctl.core.errors import AgentUnreachable, ProvisionError
from labctl.core.proc import cmdline_names, netns_argv
from labctl.core.rpc import RpcClient
from labctl.core.secret import write_secret
from labctl.drivers import netlink
from labctl.hosts import protocol as hp
from labctl.state.inventory import Inventory


@dataclass(frozen=True)
class HostPlan:
    """One host to provision, as the topology and the lab's names say."""

    name: str
    index: int  # position in the topology (interface names)
    address: ipaddress.IPv4Interface  # its address on the site network
    bridge: str  # the site bridge
    state_dir: Path  # the agent's own directory (on the host)
    #: "host"; "mobility": a site's mobility agent in its gateway namespace; "cloud-api": a
    #: libvirt cloud's API endpoint
    kind: str = "host"
    #: the agent's further arguments (a mobility agent's relay port and TLS directory)
    agent_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class ProvisionedHost:
    name: str
    address: str  # where its agent answers
    agent_port: int
    agent_pid: int | None
    netns: str | None


class HostProvider(Protocol):
    """Provision and remove the hosts of one lab."""

    async def provision(self, plan: HostPlan, secret: bytes) -> ProvisionedHost:
        """Bring the host up with a running agent that holds ``secret``; idempotent."""
        ...

    async def teardown(self, inv: Inventory, removed: list[str]) -> None:
        """Remove what this provider made for the lab (journal order), appending to
        ``removed`` what it removed."""
        ...


#: the program a namespace host of each kind runs
_AGENT_MODULES = {"host": "labctl.agents.host", "mobility": "labctl.agents.mobility",
                  "cloud-api": "labctl.agents.cloudapi"}


def spawn_owned(inv: Inventory, name: str, argv: list[str], log: Path,
                **detail: str) -> subprocess.Popen[bytes]:
    """Start a lab process (its own session, output to ``log``) and journal it.

    The journal entry is written *before* the process exists (with ``detail``, e.g. the
    state directory where it will write its pidfile) and completed with the PID right after
    the fork, with no await in between: a controller killed at any point leaves an entry
    that teardown can act on."""
    inv.own("process", name, **detail)
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)
    inv.own("process", name, pid=proc.pid, **detail)
    return proc


async def stop_owned_process(name: str, pid: int, lab_path: Path, removed: list[str]) -> None:
    """SIGTERM the process ``pid`` if it is the lab's (its command line names the lab
    directory), SIGKILL after 5 s; record it in ``removed``."""
    if not cmdline_names(pid, lab_path):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        await asyncio.sleep(0.05)
        if not cmdline_names(pid, lab_path):
            removed.append(f"process {name} (pid {pid})")
            return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    removed.append(f"process {name} (pid {pid}, killed)")


async def _agent_pids(detail: dict[str, Any], wait: float = 3.0) -> list[int]:
    """The PIDs a journalled agent may have: the one the controller saw, and the one the
    agent wrote to ``agent.pid`` in its state directory (waited for a moment: a controller
    killed right after the fork journalled no PID, and the agent writes its pidfile first)."""
    pids = {int(detail["pid"])} if "pid" in detail else set()
    state = detail.get("state_dir")
    pidfile = Path(state) / "agent.pid" if state else None
    deadline = time.monotonic() + (wait if not pids else 0.0)
    while pidfile is not None:
        with contextlib.suppress(OSError, ValueError):
            pids.add(int(pidfile.read_text().split()[0]))
            break
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.1)
    return sorted(pids)


class NamespaceHosts:
    """Hosts as network namespaces on this machine (the local provider)."""

    def __init__(self, lab: str, lab_path: Path, inv: Inventory) -> None:
        self.lab = lab
        self.lab_path = lab_path
        self.tag = names.lab_tag(lab, lab_path)
        self.inv = inv

    async def provision(self, plan: HostPlan, secret: bytes) -> ProvisionedHost:
        ns = names.netns(self.lab, plan.name)
        veth = names.veth(self.tag, plan.index)
        mark = names.netns_mark(self.lab, plan.name, self.tag)
        self.inv.own("netns", ns, role="host", mark=mark)
        await asyncio.to_thread(netlink.ensure_netns, ns, mark)
        alias = names.alias(self.lab, "veth", plan.name)
        self.inv.own("link", veth, alias=alias, role="host")
        await asyncio.to_thread(netlink.ensure_veth, netlink.VethSpec(
            outer=veth, netns=ns, bridge=plan.bridge, address=plan.address, alias=alias))
        plan.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        secret_file = plan.state_dir / "secret"
        if not secret_file.exists():
            write_secret(secret_file, secret)
        addr = str(plan.address.ip)
        module = _AGENT_MODULES[plan.kind]
        argv = netns_argv(ns, [sys.executable, "-m", module,
                               "--state-dir", str(plan.state_dir),
                               "--secret-file", str(secret_file), "--host", plan.name,
                               "--listen", f"{addr}:{names.HOST_AGENT_PORT}",
                               *plan.agent_args])
        proc = spawn_owned(self.inv, f"host-agent:{plan.name}", argv,
                           plan.state_dir / "agent.out", state_dir=str(plan.state_dir))
        await self._wait_agent(plan, addr, secret, proc)
        return ProvisionedHost(name=plan.name, address=addr, agent_port=names.HOST_AGENT_PORT,
                               agent_pid=proc.pid, netns=ns)

    async def _wait_agent(self, plan: HostPlan, addr: str, secret: bytes,
                          proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                tail = (plan.state_dir / "agent.out").read_text(errors="replace")[-1500:]
                raise ProvisionError(f"the host agent of {plan.name} exited at start "
                                     f"(exit {proc.returncode})", host=plan.name, log_tail=tail)
            try:
                client = await RpcClient.connect(addr, names.HOST_AGENT_PORT, secret,
                                                 timeout=1.0, peer=f"host {plan.name}")
                try:
                    await hp.PING.call(client, timeout=5)
                finally:
                    await client.close()
                return
            except AgentUnreachable:
                if time.monotonic() > deadline:
                    raise ProvisionError(f"the host agent of {plan.name} did not answer within "
                                         f"{timeout:g} s", host=plan.name) from None
                await asyncio.sleep(0.1)

    async def teardown(self, inv: Inventory, removed: list[str]) -> None:
        owned = inv.owned()
        agents = [(n, d) for k, n, d in owned if k == "process" and n.startswith("host-agent:")]
        # the agents stop their VMs softly on SIGTERM
        pids = [(n, pid) for n, d in agents for pid in await _agent_pids(d)]
        await asyncio.gather(*(stop_owned_process(n, pid, self.lab_path, removed)
                               for n, pid in pids))
        # a QEMU whose agent died without stopping it: its pidfile is in that agent's state
        # directory, which this provider made
        for _, d in agents:
            state = d.get("state_dir")
            if not state:
                continue
            for pidfile in sorted(Path(state).glob("vms/*/qemu.pid")):
                with contextlib.suppress(ValueError, OSError):
                    await stop_owned_process(f"qemu:{pidfile.parent.name}",
                                             int(pidfile.read_text().split()[0]),
                                             self.lab_path, removed)
        for kind, name, detail in owned:
            if detail.get("role") != "host" and not name.startswith("host-agent:"):
                continue
            if kind == "link":
                if await asyncio.to_thread(netlink.delete_link, name, detail["alias"]):
                    removed.append(f"link {name}")
                inv.disown(kind, name)
            elif kind == "netns":
                # only a namespace with the lab's mark; an entry without one (journalled
                # before namespaces were marked) proves nothing: that namespace is left
                mark = detail.get("mark")
                if mark and await asyncio.to_thread(netlink.delete_netns, name, mark):
                    removed.append(f"netns {name}")
                inv.disown(kind, name)
            elif kind == "process" and name.startswith("host-agent:"):
                inv.disown(kind, name)
