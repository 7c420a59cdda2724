"""Bring-up: a topology becomes a running lab.

images (cached) and the accelerator probe -> one bridge per site -> storage node VMs
(libvirt) in parallel with the hosts (through the host provider) -> LUNs exported with
ACLs -> each sharing host handed its mappings, scanning each LUN by ID -> the rescan
service -> VMs. Each step's time is recorded in the inventory (``steps``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import shutil
import sys
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

from labctl.core import names
from labctl.core.errors import AgentError, MissingDependency, ProvisionError, TopologyError
from labctl.core.names import QEMU_BINARY
from labctl.core.proc import run, which
from labctl.datastores import filestores, rescan
from labctl.datastores import service as datastores
from labctl.drivers import netlink
from labctl.guest.image import GuestImage, ensure_guest_image
from labctl.hosts import accelcache
from labctl.hosts import protocol as hp
from labctl.hosts.provider import HostPlan, NamespaceHosts, spawn_owned
from labctl.hosts.sshhosts import SshHosts
from labctl.lab import clouds, vms
from labctl.lab.topology import Site, StorageNode, Topology, Vm
from labctl.replication.image import ensure_server_image
from labctl.state.context import LabContext
from labctl.state.pki import LabPki
from labctl.storage import node as storagenode
from labctl.storage import protocol as sp
from labctl.storage.image import StorageImage, ensure_storage_image
from labctl.wan import service as wan

_T = TypeVar("_T")


async def step(ctx: LabContext, name: str, work: Awaitable[_T]) -> _T:
    """Run one bring-up step, record and report how long it took."""
    start = time.monotonic()
    result = await work
    took = time.monotonic() - start
    ctx.inv.record_step(name, took)
    ctx.progress(f"{name} ({took:.1f} s)")
    return result


async def gather_all(*jobs: Awaitable[Any]) -> list[Any]:
    """Run jobs together; if one fails, cancel the rest and raise the first error."""
    tasks = [asyncio.ensure_future(j) for j in jobs]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def preflight() -> None:
    """What the local provider needs on this machine, refused with one clear line."""
    if os.geteuid() != 0:
        raise MissingDependency("labctl needs root to create network namespaces and bridges "
                                "(run it with sudo)")
    if shutil.which(QEMU_BINARY) is None:
        raise MissingDependency(f"QEMU ({QEMU_BINARY}) is not installed; run scripts/setup.sh",
                                program=QEMU_BINARY)
    for tool in ("iscsi-inq", "iscsi-ls", "mmdebstrap", "nsenter"):
        which(tool)


def check_machine(topo: Topology, labs: Path) -> None:
    """Every check of ``topo`` against this machine that builds nothing: its subnets against
    the machine's networks (read access to the routes is enough) and its datastores against
    the free space where its directory goes (under ``labs``). ``labctl up`` runs it before
    building and ``labctl validate`` after the file's own checks, so the two cannot drift
    apart; one TopologyError lists every problem."""
    problems = _network_problems(topo, names.lab_tag(topo.name, labs / topo.name))
    machines = [(f"hosts[{i}]", h.ssh) for i, h in enumerate(topo.hosts)] + [
        (f"storage_nodes[{i}]", n.ssh) for i, n in enumerate(topo.storage_nodes)]
    for where, ssh in machines:
        if ssh is not None:  # a Vagrant machine's host key is checked only now
            problems += [(f"{where}.ssh.{f}", p) for f, p in ssh.problems()
                         if f == "key" or ssh.vagrant]
    free = shutil.disk_usage(_existing(labs)).free
    # a machine's datastores are its files, not this machine's
    local = {n.name for n in topo.storage_nodes if n.ssh is None}
    need = sum(d.size for d in topo.datastores if d.node in local) + len(local) * (256 << 20)
    evidence: dict[str, Any] = {}
    if need > free:
        # datastores are sparse files in the lab directory: refuse a lab whose datastores
        # could not all be filled (plus room for each node's overlay)
        problems.append(("datastores", f"the datastores need {need >> 20} MiB but the filesystem "
                                       f"of {labs} has {free >> 20} MiB free"))
        evidence.update(need=need, free=free)
    if problems:
        raise TopologyError.listing(topo.source, problems, **evidence)


def _network_problems(topo: Topology, tag: str) -> list[tuple[str, str]]:
    """Site subnets that overlap a network of this machine. The site's own bridge (the lab is
    up, ``tag`` is its directory's) is no clash: up would take it as it is, and validate must
    not refuse a file for its lab being up."""
    problems = []
    for i, site in enumerate(topo.sites):
        if site.external:
            problems += _external_problems(i, site)
            continue
        own = (names.bridge(tag, i), names.alias(topo.name, "bridge", site.name))
        clash = netlink.overlapping_routes(site.subnet, own)
        if clash:
            problems.append((f"sites[{i}].subnet",
                             f"{site.subnet} overlaps a network this machine already uses "
                             f"({'; '.join(clash)}); pick another subnet"))
    return problems


def _external_problems(i: int, site: Site) -> list[tuple[str, str]]:
    """A site whose network someone else made: the controller must already be on it (the
    bridge named, holding an address in the subnet) or have a route to it (SSH hosts)."""
    routes = netlink.overlapping_routes(site.subnet)
    if site.bridge is not None:
        if not Path("/sys/class/net", site.bridge).exists():
            return [(f"sites[{i}].bridge", f"there is no link {site.bridge} on this machine")]
        if not any(r.endswith(f" on {site.bridge}") for r in routes):
            return [(f"sites[{i}].bridge", f"{site.bridge} holds no address in {site.subnet}: "
                                           "the controller reaches the site's agents through it")]
        return []
    if not routes:
        return [(f"sites[{i}].subnet", f"this machine has no route to {site.subnet}, where the "
                                       "site's SSH hosts' agents answer")]
    return []


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (whose filesystem ``path`` will be on)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


async def probe_accel() -> str:
    """"kvm" or "tcg" for the storage node's libvirt domain: the probe's cached answer for
    this boot, else asked of an agent-side probe process (the controller never runs a QEMU
    guest itself)."""
    known = await asyncio.to_thread(accelcache.cached)
    if known is not None:
        return "kvm" if known else "tcg"
    res = await run([sys.executable, "-m", "labctl.agents.probe"], timeout=60,
                    what="accelerator probe")
    answer = json.loads(res.stdout)
    return "kvm" if answer.get("accel") == "kvm" else "tcg"


async def build(ctx: LabContext, topo: Topology) -> None:
    """Build the lab described by ``topo`` (its directory exists and is locked). ``ctx`` is
    the lab's own context: it makes the bridges and the WAN links; each site's hosts,
    storage nodes, datastores, rescan service and VMs are made by that site's context, in
    its own inventory and with its own secret."""
    inv = ctx.inv
    inv.set_meta("state", "creating")
    inv.set_meta("topology_digest", topo.digest)
    inv.set_meta("topology_source", str(Path(topo.source).resolve()))
    inv.set_meta("created", str(time.time()))
    (ctx.dir.path / "topology.json").write_text(json.dumps(topo.raw, indent=2, default=str))
    t_start = time.monotonic()

    # 1. images (cached by recipe) and the accelerator probe, side by side
    # the storage image boots node VMs and WAN routers; machines need none
    needs_simg = bool(topo.wan) or any(n.ssh is None for n in topo.storage_nodes)
    simg, gimg = await step(ctx, "images ready", asyncio.gather(
        ensure_storage_image(progress=ctx.progress) if needs_simg else _nothing(),
        ensure_guest_image()))
    if any(vm.guest == "server" for vm in topo.vms):
        server = await step(ctx, "server guest image ready",
                            ensure_server_image(progress=ctx.progress))
        inv.set_meta("server_kernel", str(server.kernel))
        inv.set_meta("server_initrd", str(server.initrd))
        inv.set_meta("server_rootfs", str(server.rootfs))
    accel = await step(ctx, "accelerator probe", probe_accel())
    inv.set_meta("accel", accel)
    if accel != "kvm":
        ctx.progress("KVM not usable here (no /dev/kvm, or a guest did not boot under it); "
                     "using TCG")

    # 2. network: one bridge per site, the controller holds .1 on it; each site its own
    # management domain (inventory, secret)
    t_net = time.monotonic()
    for i, site in enumerate(topo.sites):
        br = site_bridge(ctx, topo, i)
        if not site.external:  # a given network is someone else's: attached to, never made
            alias = names.alias(ctx.name, "bridge", site.name)
            inv.own("link", br, alias=alias)
            netlink.ensure_bridge(br, alias, ipaddress.IPv4Interface(
                f"{site.gateway}/{site.subnet.prefixlen}"))
        inv.upsert("sites", name=site.name, subnet=str(site.subnet), bridge=br,
                   provider=site.provider)
        ctx.dir.create_site(site.name)
        own = ctx.in_site(site.name)
        own.inv.upsert("sites", name=site.name, subnet=str(site.subnet), bridge=br,
                       provider=site.provider)
        if site.quota is not None:
            own.inv.set_meta("quota", json.dumps(site.quota))
        own.inv.set_meta("accel", accel)
    inv.record_step("network", time.monotonic() - t_net)

    # 3. storage nodes (VMs through libvirt) and hosts (through the provider), in parallel
    await storagenode.ensure_libvirtd()
    providers = {s.name: NamespaceHosts(ctx.name, ctx.dir.path, ctx.in_site(s.name).inv)
                 for s in topo.sites}
    node_jobs = [_start_storage_node(ctx.in_site(n.site), topo, i, simg, accel)
                 for i, n in enumerate(topo.storage_nodes)]
    host_jobs = [_start_host(ctx.in_site(h.site), topo, i) for i, h in enumerate(topo.hosts)]
    api_jobs = [clouds.start_api(ctx, topo, i) for i, s in enumerate(topo.sites)
                if s.api is not None]
    await step(ctx, "storage nodes and hosts ready",
               gather_all(*node_jobs, *host_jobs, *api_jobs))
    if topo.wan:
        assert simg is not None
        await step(ctx, "WAN links up", _start_wan(ctx, topo, simg, accel))
    if topo.mobility:
        await step(ctx, "mobility agents ready", gather_all(
            *(start_mobility(ctx, topo, i, providers[a.site])
              for i, a in enumerate(topo.mobility))))
        await wan.route_hosts(ctx)  # their routes to the other sites

    # 4. LUNs with ACLs, then every sharing host checks what it sees
    nodes = {n.name: n.site for n in topo.storage_nodes}
    await step(ctx, "datastores exported", gather_all(
        *(datastores.export_lun(ctx.in_site(nodes[d.node]), d.name)
          for d in topo.datastores if d.kind == "block"),
        *(filestores.export(ctx.in_site(nodes[d.node]), d.name)
          for d in topo.datastores if d.kind == "file")))
    await step(ctx, "mappings handed to hosts, each scanned its LUNs", gather_all(
        *(_hand_mappings_checked(s) for s in ctx.all_sites())))
    files = [d for d in topo.datastores if d.kind == "file"]
    if files:
        await step(ctx, "each host read its file datastores over NFS", gather_all(
            *(filestores.check_hosts(ctx.in_site(nodes[d.node]), d.name) for d in files)))
    ours = {s.name for s in topo.sites if s.provider == "labctl"}  # libvirt's: no agents
    await step(ctx, "rescan services subscribed", gather_all(
        *(_start_rescan(s, topo) for s in ctx.all_sites() if s.site in ours)))

    # 5. VMs
    hosts = {h.name: h.site for h in topo.hosts}
    for here in ctx.all_sites():
        _record_vms(here, [(i, vm) for i, vm in enumerate(topo.vms)
                           if hosts[vm.host] == here.site], gimg)
    for vm in topo.vms:
        if vm.autostart:
            await step(ctx, f"VM {vm.name} first heartbeat",
                       vms.start(ctx.in_site(hosts[vm.host]), vm.name))
    inv.set_meta("state", "up")
    total = time.monotonic() - t_start
    inv.record_step("lab ready", total)
    ctx.progress(f"lab {ctx.name} is up ({total:.1f} s)")


async def _nothing() -> None:
    return None


def _record_vms(ctx: LabContext, vms_here: list[tuple[int, Vm]], gimg: GuestImage) -> None:
    inv = ctx.inv
    inv.set_meta("guest_kernel", str(gimg.kernel))
    inv.set_meta("guest_initrd", str(gimg.initrd))
    # what a server guest boots from
    for name in ("server_kernel", "server_initrd", "server_rootfs"):
        value = ctx.shared.get_meta(name)
        if value is not None:
            inv.set_meta(name, value)
    site = inv.row("sites", name=ctx.site)
    prefix = ipaddress.IPv4Network(site["subnet"]).prefixlen if site else 24
    for i, vm in vms_here:
        server = vm.guest == "server"
        inv.upsert("vms", name=vm.name, host=vm.host, datastore=vm.datastore,
                   memory=vm.memory, vcpus=vm.vcpus, dirty_rate=vm.dirty_rate,
                   working_set=vm.working_set, state="stopped", pid=None, started_at=None,
                   heartbeat_ms=vm.heartbeat_ms, base=vm.base, disk_file=None, guest=vm.guest,
                   address=f"{vm.address}/{prefix}" if server else None,
                   mac=names.mac(ctx.dir.tag, "v", i) if server else None,
                   app_rate=vm.app_rate, disk_size=vm.disk_size)


async def _restart_machine_node(ctx: LabContext, topo: Topology, i: int) -> None:
    """Storage node ``i``'s agent on its machine started again (``up`` of a lab that is
    up): its LUNs are still in the machine's LIO and its disks on their loop devices (made
    again after a reboot of the machine, file datastores mounted and exported again); each
    is ensured again, so the new agent watches it and publishes its storage events."""
    node = topo.storage_nodes[i]
    await _machine_agent(ctx, topo, node)
    await datastores.serve_again(ctx, node.name)


async def _machine_agent(ctx: LabContext, topo: Topology, node: StorageNode) -> None:
    """The storage agent of ``node`` (a machine) started over SSH, unless it answers."""
    assert node.ssh is not None
    await SshHosts(ctx.name, ctx.dir.path, ctx.inv).provision_storage(
        node.name, str(node.address), topo.site(node.site).subnet.prefixlen,
        node.target_iqn, ctx.secret(), ctx.storage_peer_key(), node.ssh)


async def _start_machine_node(ctx: LabContext, topo: Topology, i: int) -> None:
    """Storage node ``i``, a machine reached over SSH: its agent started there, then a data
    disk per datastore, LUN or file datastore (a sparse file on a loop device) made by the
    agent."""
    inv = ctx.inv
    node = topo.storage_nodes[i]
    assert node.ssh is not None
    inv.upsert("storage_nodes", name=node.name, site=node.site, address=str(node.address),
               target_iqn=node.target_iqn, domain="", tap="",
               agent_port=node.ssh.port_for("storage"), capacity=node.capacity,
               state="starting", memory=0, domain_type="machine", mac="",
               ssh=node.ssh.to_json())
    disks = [filestores.register(ctx, node.name, ds.name, ds.size, list(ds.hosts),
                                 "allocated") if ds.kind == "file" else
             datastores.register(ctx, node.name, ds.name, ds.size, list(ds.hosts),
                                 "allocated")[1]
             for ds in topo.datastores if ds.node == node.name]
    t0 = time.monotonic()
    await _machine_agent(ctx, topo, node)
    for disk in disks:
        await datastores.attach_disk(ctx, node.name, disk)
    inv.record_step(f"storage node {node.name} ({node.ssh.where()}) agent ready",
                    time.monotonic() - t0)
    inv.update("storage_nodes", {"name": node.name}, state="up")
    ctx.progress(f"storage node {node.name} is serving at {node.address} "
                 f"({node.ssh.where()})")


async def _start_storage_node(ctx: LabContext, topo: Topology, i: int,
                              image: StorageImage | None, accel: str) -> None:
    inv = ctx.inv
    node = topo.storage_nodes[i]
    if node.ssh is not None:
        await _start_machine_node(ctx, topo, i)
        return
    assert image is not None
    site = topo.site(node.site)
    site_index = [s.name for s in topo.sites].index(node.site)
    domain = names.domain(ctx.name, node.name)
    tap = names.tap(ctx.dir.tag, i)
    domain_type = "kvm" if accel == "kvm" else "qemu"
    inv.upsert("storage_nodes", name=node.name, site=node.site, address=str(node.address),
               target_iqn=node.target_iqn, domain=domain, tap=tap,
               agent_port=names.STORAGE_AGENT_PORT, capacity=node.capacity, state="starting",
               memory=node.memory, domain_type=domain_type, mac=names.mac(ctx.dir.tag, "s", i))
    disks = []
    for ds in topo.datastores:
        if ds.node != node.name:
            continue
        if ds.kind == "file":
            disks.append(filestores.register(ctx, node.name, ds.name, ds.size, list(ds.hosts),
                                             "allocated"))
            continue
        # its ID: a unit serial never issued before, hence the LUN's NAA ID
        _naa, disk = datastores.register(ctx, node.name, ds.name, ds.size, list(ds.hosts),
                                         "allocated")
        disks.append(disk)
    inv.own("domain", domain, lab_dir=str(ctx.dir.path))
    spec = storagenode.StorageNodeSpec(
        lab=ctx.name, name=node.name, lab_dir=ctx.dir.path,
        address_cidr=f"{node.address}/{site.subnet.prefixlen}",
        bridge=site_bridge(ctx, topo, site_index), tap=tap,
        mac=names.mac(ctx.dir.tag, "s", i), memory_mib=node.memory >> 20,
        data_disks=disks, secret=ctx.secret(), target_iqn=node.target_iqn,
        peer_secret=ctx.storage_peer_key(),
        agent_port=names.STORAGE_AGENT_PORT,
    )
    t0 = time.monotonic()
    await storagenode.start(spec, image, accel=domain_type)
    # libvirt made the tap; label it like every other link of the lab
    netlink.label_link(tap, names.alias(ctx.name, "tap", node.name))
    inv.record_step(f"storage node {node.name} boot to agent ready", time.monotonic() - t0)
    inv.update("storage_nodes", {"name": node.name}, state="up")
    ctx.progress(f"storage node {node.name} is serving at {node.address}")


async def _start_wan(ctx: LabContext, topo: Topology, image: StorageImage, accel: str) -> None:
    """Each WAN link's router (netem on each leg's egress), then every host's route to the
    other site through it; a link is checked by a real round trip across it."""
    for i, w in enumerate(topo.wan):
        a, b = topo.site(w.sites[0]), topo.site(w.sites[1])
        wan.record(ctx, i, w.name, w.sites, w.addresses,
                   (a.subnet.prefixlen, b.subnet.prefixlen), w.params)
    boots = await gather_all(*(wan.start_router(ctx, w.name, image, accel) for w in topo.wan))
    await wan.route_hosts(ctx)
    await wan.route_nodes(ctx)
    for w, boot_s in zip(topo.wan, boots, strict=True):
        ctx.inv.record_step(f"WAN router {w.name} boot to agent ready", boot_s)
        row = wan.link(ctx.inv, w.name)
        if row.up and any(h.site == w.sites[0] for h in topo.hosts) and any(
                h.site == w.sites[1] for h in topo.hosts):
            await wan.wait_round_trip(ctx, row, 20.0)
        ctx.progress(f"WAN link {w.name} ({w.sites[0]} <-> {w.sites[1]}): "
                     f"{row.params.describe()}")


def site_bridge(ctx: LabContext, topo: Topology, i: int) -> str:
    """The bridge of site ``i``: the one given (a network labctl did not make), else the
    lab's own; "" for a site reached by a route alone (SSH hosts)."""
    site = topo.sites[i]
    if site.external:
        return site.bridge or ""
    return names.bridge(ctx.dir.tag, i)


async def _start_host(ctx: LabContext, topo: Topology, i: int) -> None:
    inv = ctx.inv
    host = topo.hosts[i]
    site = topo.site(host.site)
    site_index = [s.name for s in topo.sites].index(host.site)
    ssh = host.ssh
    inv.upsert("hosts", name=host.name, site=host.site, address=str(host.address),
               initiator_iqn=host.initiator_iqn,
               netns="" if ssh else names.netns(ctx.name, host.name),
               veth="" if ssh else names.veth(ctx.dir.tag, i),
               agent_port=ssh.port_for("host") if ssh else names.HOST_AGENT_PORT,
               memory=host.memory, agent_pid=None, state="starting",
               ssh=ssh.to_json() if ssh else None)
    t0 = time.monotonic()
    plan = HostPlan(
        name=host.name, index=i,
        address=ipaddress.IPv4Interface(f"{host.address}/{site.subnet.prefixlen}"),
        bridge=site_bridge(ctx, topo, site_index),
        state_dir=ctx.dir.host_dir(host.name))
    if ssh is not None:
        got = await SshHosts(ctx.name, ctx.dir.path, inv).provision(plan, ctx.secret(), ssh)
        what = f"host {host.name} ({ssh.where()}) agent ready"
    else:
        got = await NamespaceHosts(ctx.name, ctx.dir.path, inv).provision(plan, ctx.secret())
        what = f"host {host.name} namespace and agent ready"
    inv.record_step(what, time.monotonic() - t0)
    inv.update("hosts", {"name": host.name}, state="up", agent_pid=got.agent_pid,
               address=got.address, agent_port=got.agent_port)


async def start_mobility(ctx: LabContext, topo: Topology, i: int,
                         provider: NamespaceHosts) -> None:
    """Site mobility agent ``i`` of the topology: a gateway namespace on its site's bridge
    (a host of kind ``mobility`` in the site's inventory), its certificate from the lab's
    CA (the key 0600 in its own directory; the CA's key never leaves the lab's)."""
    agent = topo.mobility[i]
    site = ctx.in_site(agent.site)
    net = topo.site(agent.site)
    state_dir = ctx.dir.host_dir(agent.name)
    tls = state_dir / "tls"
    if not (tls / f"{agent.name}.pem").exists():
        LabPki(ctx.name, ctx.dir.path / "pki").issue(agent.name, [str(agent.address)], tls)
    index = len(topo.hosts) + i  # its link's name follows the hosts'
    site.inv.upsert("hosts", name=agent.name, site=agent.site, address=str(agent.address),
                    initiator_iqn="", netns=names.netns(ctx.name, agent.name),
                    veth=names.veth(ctx.dir.tag, index), agent_port=names.HOST_AGENT_PORT,
                    memory=0, agent_pid=None, state="starting", kind="mobility")
    t0 = time.monotonic()
    got = await provider.provision(HostPlan(
        name=agent.name, index=index,
        address=ipaddress.IPv4Interface(f"{agent.address}/{net.subnet.prefixlen}"),
        bridge=names.bridge(ctx.dir.tag, [s.name for s in topo.sites].index(agent.site)),
        state_dir=state_dir, kind="mobility",
        agent_args=("--relay-port", str(names.MOBILITY_RELAY_PORT), "--tls-dir", str(tls))),
        site.secret())
    site.inv.record_step(f"mobility agent {agent.name} ready", time.monotonic() - t0)
    site.inv.update("hosts", {"name": agent.name}, state="up", agent_pid=got.agent_pid)
    ctx.progress(f"mobility agent {agent.name} of {agent.site} is serving at {agent.address}")


async def _answers(site: LabContext, name: str, what: str, storage: bool = False) -> bool:
    """Whether the agent ``name`` (a host's, a mobility agent, a storage node's with
    ``storage``) answers its site's controller; says so when it does not."""
    try:
        if storage:
            async with site.storage_client(name, timeout=2.0) as c:
                await sp.PING.call(c, timeout=3)
        else:
            async with site.host_client(name, timeout=2.0) as c:
                await hp.PING.call(c, timeout=3)
        return True
    except AgentError as exc:
        site.progress(f"the {what} of {name} does not answer ({exc.message}): starting it "
                      "again")
        return False


async def recover(ctx: LabContext, topo: Topology) -> list[str]:
    """``up`` of a lab that is already up (``ctx`` the lab's own context): every host agent
    (and storage machine's agent) that does not answer its site's controller is started
    again by its provider (a host agent takes over the VMs its predecessor left running);
    returns what was restarted."""
    restarted = []
    for i, node in enumerate(topo.storage_nodes):  # a node VM is restarted on its own
        if node.ssh is not None and not await _answers(ctx.in_site(node.site), node.name,
                                                       "storage agent", storage=True):
            await _restart_machine_node(ctx.in_site(node.site), topo, i)
            restarted.append(node.name)
    for i, host in enumerate(topo.hosts):
        site = ctx.in_site(host.site)
        if not await _answers(site, host.name, "host agent"):
            await _start_host(site, topo, i)
            restarted.append(host.name)
    for i, agent in enumerate(topo.mobility):
        site = ctx.in_site(agent.site)
        if not await _answers(site, agent.name, "mobility agent"):
            await start_mobility(ctx, topo, i, NamespaceHosts(ctx.name, ctx.dir.path, site.inv))
            restarted.append(agent.name)
    for i, cloud in enumerate(topo.sites):
        if cloud.api is not None and not await _answers(ctx.in_site(cloud.name),
                                                        cloud.api_name, "cloud API"):
            await clouds.start_api(ctx, topo, i)
            restarted.append(cloud.api_name)
    routers = [s for s in await wan.show(ctx) if s.state not in ("up", "down")]
    image = await ensure_storage_image(progress=ctx.progress) if routers else None
    for w in routers:
        assert image is not None
        ctx.progress(f"the WAN router of {w.name} is {w.state}: starting it again with its "
                     "settings")
        await wan.start_router(ctx, w.name, image, ctx.inv.get_meta("accel", "tcg") or "tcg")
        restarted.append(f"wan {w.name}")
    if restarted:
        await wan.route_hosts(ctx)  # a host started again has a fresh namespace
        await wan.route_nodes(ctx)
    return restarted


async def _start_rescan(ctx: LabContext, topo: Topology) -> None:
    """A site's rescan service (labctl/datastores/rescan.py), a process owned by the site:
    it follows the site's agents alone, with the site's secret."""
    inv = ctx.inv
    assert ctx.site is not None
    rescan.set_lookup(inv, str((topo.raw.get("rescan") or {}).get("lookup", "inventory")))
    log = ctx.dir.site_dir(ctx.site) / "rescan.out"
    argv = [sys.executable, "-m", "labctl.agents.rescan", "--lab-dir", str(ctx.dir.path),
            "--lab", ctx.name, "--site", ctx.site]
    proc = spawn_owned(inv, f"rescan-service-{ctx.site}", argv, log)
    deadline = time.monotonic() + 20
    while inv.get_meta("rescan_ready") is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise ProvisionError(f"the rescan service of site {ctx.site} did not subscribe to "
                                 "every agent within 20 s" if proc.returncode is None else
                                 f"the rescan service of site {ctx.site} exited (status "
                                 f"{proc.returncode})",
                                 log_tail=log.read_text(errors="replace")[-1500:])
        await asyncio.sleep(0.05)


async def _hand_mappings_checked(ctx: LabContext) -> None:
    """Each host takes the mappings of the datastores it shares and scans them by ID from
    its namespace; a host that cannot see one, or sees another ID, stops the bring-up."""
    seen = await datastores.hand_mappings(ctx)
    for host, units in seen.items():
        for unit in units:
            if unit.state != "ok":
                raise ProvisionError(
                    f"host {host} cannot use datastore {unit.datastore} "
                    f"({unit.naa}): {unit.error or unit.state}",
                    host=host, unit=unit.to_wire())
