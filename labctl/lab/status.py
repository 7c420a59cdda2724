"""``labctl status``: the lab as the inventory records it and its agents report it now.

The reply is typed (:class:`LabStatus`); ``labctl status --json`` prints its wire form, so
these messages are the JSON contract of that command: every key is always present (null
when unknown, e.g. a stopped VM's heartbeat).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from labctl.core.errors import AgentError, LabError
from labctl.core.wire import Message
from labctl.hosts import protocol as hp
from labctl.hosts.sshhosts import SshAccess
from labctl.lab.clouds import CloudVm, LibvirtCloud, cloud_of
from labctl.state.context import LabContext
from labctl.storage import domains as node_domains
from labctl.storage import protocol as sp
from labctl.wan.protocol import WanShown


@dataclass(frozen=True)
class SiteState(Message):
    name: str
    subnet: str
    bridge: str


@dataclass(frozen=True)
class HostState(Message):
    name: str
    site: str
    address: str
    initiator_iqn: str
    netns: str
    #: ``up``, ``unreachable`` (``agent_reason`` says why and the cure), or the inventory's
    #: state when the agent was not asked (``starting``)
    agent: str
    agent_reason: str | None = None
    #: ``host``, or ``mobility``: the site's mobility agent (it runs no VM)
    kind: str = "host"
    #: a machine reached over SSH: ``user@address:port`` (None: a namespace here; ``netns``
    #: is then its name)
    ssh: str | None = None


@dataclass(frozen=True)
class NodeState(Message):
    name: str
    site: str
    address: str
    target_iqn: str
    domain: str
    state: str
    #: ``up``, ``unreachable`` (``agent_reason`` says why), or the inventory's state
    agent: str
    #: seconds since the node booted, as its agent says (None when it did not answer)
    agent_uptime_s: float | None = None
    agent_reason: str | None = None
    #: the node's domain as libvirt sees it: running, paused, shutoff, crashed, absent...
    domain_state: str | None = None
    #: libvirt's reason for it (a pause: ``user``, ``I/O error``...)
    domain_reason: str | None = None
    #: ``user@address:port`` of a node that is a machine reached over SSH (no domain)
    ssh: str | None = None


@dataclass(frozen=True)
class Seen(Message):
    """What one host last read of a datastore over iSCSI."""

    naa: str | None
    size_bytes: int | None


@dataclass(frozen=True)
class DatastoreState(Message):
    name: str
    node: str
    #: the NAA ID the sharing hosts saw (the inventory's when they disagree or saw nothing)
    naa: str | None
    lun: int | None
    size_bytes: int
    state: str
    hosts: list[str]
    seen_by: dict[str, Seen]
    #: ``block`` (an iSCSI LUN) or ``file`` (an NFS export of image files)
    kind: str = "block"


@dataclass(frozen=True)
class VmState(Message):
    name: str
    host: str
    datastore: str | None
    memory_bytes: int
    #: QEMU's run state when the host reports the VM ("stalled" when it runs but its guest has
    #: not beaten for a while), else the inventory's
    state: str
    heartbeat_ms: int
    pid: int | None = None
    heartbeat: hp.HeartbeatAge | None = None
    disk_counter: int | None = None
    #: for checks from outside labctl: a QMP monitor labctl never uses, the console log
    qmp_check_socket: str | None = None
    console_log: str | None = None
    #: why the state is what it is, for people ("no heartbeat for 6.2 s")
    reason: str | None = None
    #: ``test`` (the heartbeat guest) or ``server`` (Debian with SSH at ``address``)
    guest: str = "test"
    address: str | None = None


@dataclass(frozen=True)
class Step(Message):
    name: str
    seconds: float


@dataclass(frozen=True)
class LabStatus(Message):
    lab: str
    state: str | None
    accel: str | None
    topology: str | None
    hosts: list[HostState] = field(default_factory=list)
    storage_nodes: list[NodeState] = field(default_factory=list)
    datastores: list[DatastoreState] = field(default_factory=list)
    vms: list[VmState] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    #: WAN links between sites: asked parameters, the router's state (``wan_down`` when
    #: its VM stopped)
    wan: list[WanShown] = field(default_factory=list)
    sites: list[SiteState] = field(default_factory=list)
    #: the VMs of the lab's libvirt clouds (``provider: libvirt``), as their cloud shows them
    cloud_vms: list[CloudVm] = field(default_factory=list)

    def only_site(self, site: str) -> LabStatus:
        """This status with only what is in ``site``: its hosts and storage nodes, the
        datastores on those nodes, the VMs on those hosts, the WAN links that reach it."""
        nodes = [n for n in self.storage_nodes if n.site == site]
        hosts = [h for h in self.hosts if h.site == site]
        names = {n.name for n in nodes}
        here = {h.name for h in hosts}
        return self.replace(
            sites=[s for s in self.sites if s.name == site], hosts=hosts,
            storage_nodes=nodes, datastores=[d for d in self.datastores if d.node in names],
            vms=[v for v in self.vms if v.host in here],
            wan=[w for w in self.wan if site in w.sites],
            cloud_vms=[v for v in self.cloud_vms if v.cloud == site])

    def vm(self, name: str) -> VmState:
        return next(v for v in self.vms if v.name == name)

    def datastore(self, name: str | None) -> DatastoreState | None:
        return next((d for d in self.datastores if d.name == name), None)


def _dom(domains: dict[str, node_domains.DomainState], name: str) -> node_domains.DomainState:
    return domains.get(name) or node_domains.DomainState("", None)


def stall_after(heartbeat_ms: int) -> float:
    """Seconds without a heartbeat after which a running VM counts as stalled: ten of its
    periods, at least two seconds (a TCG guest under load beats late, not never)."""
    return max(2.0, 10 * heartbeat_ms / 1000)


async def status(lab: LabContext) -> LabStatus:
    """The lab's own context's view: every site's status (each asked by its own context,
    with its own secret), the WAN links between them, in parallel (2-5 s bounds)."""
    inv = lab.inv
    links: list[WanShown] = []

    async def probe_wan() -> None:
        if inv.rows("wan_links"):  # the WAN service (and netlink) only for a lab with links
            from labctl.wan import service as wan

            links.extend(await wan.show(lab))

    clouds: list[CloudVm] = []

    async def probe_clouds() -> None:
        for site in lab.all_sites():
            cloud = cloud_of(site)
            if isinstance(cloud, LibvirtCloud):
                clouds.extend(await asyncio.gather(*(cloud.show(str(r["name"]), strict=False)
                                                     for r in site.inv.rows("cloud_vms"))))

    parts, _, _ = await asyncio.gather(
        asyncio.gather(*(site_status(s) for s in lab.all_sites())), probe_wan(), probe_clouds())
    steps = sorted([(s["at"], s) for s in inv.rows("steps")]
                   + [(s["at"], s) for site in lab.all_sites() for s in site.inv.rows("steps")],
                   key=lambda x: float(x[0]))
    return LabStatus(
        lab=lab.name, state=inv.get_meta("state"), accel=inv.get_meta("accel"),
        topology=inv.get_meta("topology_source"),
        hosts=[h for p in parts for h in p.hosts],
        storage_nodes=[n for p in parts for n in p.storage_nodes],
        datastores=[d for p in parts for d in p.datastores], vms=[v for p in parts for v in p.vms],
        steps=[Step(s["name"], round(s["seconds"], 3)) for _, s in steps], wan=links,
        sites=[SiteState(str(r["name"]), str(r["subnet"]), str(r["bridge"]))
               for r in inv.rows("sites")], cloud_vms=clouds)


async def site_status(ctx: LabContext) -> LabStatus:
    """One site's hosts, storage nodes, datastores and VMs: its controller asks every host
    and storage agent of the site that should be up, in parallel."""
    inv = ctx.inv
    hosts = inv.rows("hosts")
    nodes = inv.rows("storage_nodes")
    live: dict[str, tuple[str, hp.VmStatus]] = {}
    agent: dict[str, tuple[str, str | None]] = {}
    node_agent: dict[str, tuple[str, float | None, str | None]] = {}
    domains: dict[str, node_domains.DomainState] = {}

    async def probe_host(name: str) -> None:
        try:
            async with ctx.host_client(name, timeout=2.0) as c:
                listed = await hp.VM_LIST.call(c, timeout=5)  # its answer says the agent is up
                agent[name] = ("up", None)
                for v in listed.vms:
                    live[v.name] = (name, v)
        except AgentError as exc:
            agent[name] = ("unreachable", f"{exc.message} (labctl up starts it again)")

    machines = {str(n["name"]) for n in nodes if n["ssh"]}

    async def probe_node(name: str) -> None:
        try:
            async with ctx.storage_client(name, timeout=2.0) as c:
                node_agent[name] = ("up", (await sp.PING.call(c, timeout=3)).uptime_s, None)
            # an agent that answers runs in a running domain: libvirt (its module and a
            # connection, ~20 ms) is asked only when the agent does not answer
            if name not in machines:
                domains[name] = node_domains.DomainState("running", None)
        except AgentError as exc:
            node_agent[name] = ("unreachable", None, exc.message)
            if name in machines:  # no domain: the machine is not this one's libvirt's
                return
            with contextlib.suppress(LabError):
                domains[name] = await node_domains.domain_state(ctx.name, name)

    await asyncio.gather(*(probe_host(h["name"]) for h in hosts if h["state"] == "up"),
                         *(probe_node(n["name"]) for n in nodes if n["state"] == "up"))
    stores = []
    for d in inv.rows("datastores"):
        shares = inv.rows("datastore_hosts", datastore=d["name"])
        seen = {s["seen_naa"] for s in shares if s["seen_naa"]}
        stores.append(DatastoreState(
            name=d["name"], node=d["node"], naa=seen.pop() if len(seen) == 1 else d["naa"],
            lun=d["lun"], size_bytes=d["size_bytes"], state=d["state"],
            hosts=[s["host"] for s in shares],
            seen_by={s["host"]: Seen(s["seen_naa"], s["seen_size"]) for s in shares}))
    for f in inv.rows("file_datastores"):
        stores.append(DatastoreState(
            name=f["name"], node=f["node"], naa=f["naa"], lun=None, size_bytes=f["size_bytes"],
            state=f["state"], kind="file", seen_by={},
            hosts=[s["host"] for s in inv.rows("file_datastore_hosts", datastore=f["name"])]))
    vms = []
    for v in inv.rows("vms"):
        base = VmState(name=v["name"], host=v["host"], datastore=v["datastore"],
                       memory_bytes=v["memory"], state=v["state"],
                       heartbeat_ms=v["heartbeat_ms"], guest=v["guest"], address=v["address"])
        if v["name"] in live:
            host, st = live[v["name"]]
            base = base.replace(host=host, state=st.state, pid=st.pid, heartbeat=st.heartbeat,
                                disk_counter=st.disk_counter,
                                qmp_check_socket=st.qmp_check_socket, console_log=st.console_log)
            silent = stall_after(v["heartbeat_ms"])
            if st.state == "running" and st.heartbeat and st.heartbeat.age_s > silent:
                base = base.replace(state="stalled",
                                    reason=f"no heartbeat for {st.heartbeat.age_s:.1f} s")
        elif v["state"] == "running":
            base = base.replace(state="unknown", reason="its host agent does not report it")
        vms.append(base)
    return LabStatus(
        lab=ctx.name, state=None, accel=None, topology=None,
        hosts=[HostState(name=h["name"], site=h["site"], address=h["address"],
                         initiator_iqn=h["initiator_iqn"], netns=h["netns"],
                         agent=agent.get(h["name"], (h["state"], None))[0],
                         agent_reason=agent.get(h["name"], (h["state"], None))[1],
                         kind=str(h["kind"]),
                         ssh=SshAccess.from_json(h["ssh"]).where() if h.get("ssh") else None)
               for h in hosts],
        storage_nodes=[NodeState(name=n["name"], site=n["site"], address=n["address"],
                                 target_iqn=n["target_iqn"], domain=n["domain"],
                                 state=n["state"],
                                 agent=node_agent.get(n["name"], (n["state"], None, None))[0],
                                 agent_uptime_s=node_agent.get(n["name"], ("", None, None))[1],
                                 agent_reason=node_agent.get(n["name"], ("", None, None))[2],
                                 domain_state=_dom(domains, n["name"]).state or None,
                                 domain_reason=_dom(domains, n["name"]).reason,
                                 ssh=SshAccess.from_json(n["ssh"]).where() if n["ssh"]
                                 else None)
                       for n in nodes],
        datastores=stores, vms=vms)
