"""Two clouds, two providers, one small interface: what a replication needs of a cloud
(create a VM with its disks, start, stop, its console, its management channel, delete),
as an operator reaches it through the cloud's own API, never through the hypervisor.

* :class:`LabctlCloud`: a site whose VMs labctl's host agents run (the source cloud): its
  server guests (``guest: server`` in the topology), on clones of the server image.
* :class:`LibvirtCloud`: a site whose VMs libvirt runs (``provider: libvirt``): each VM a
  libvirt domain on the site's bridge (``virsh list`` shows it), booted straight into the
  server image's kernel with its root on NVMe, its disks files in the lab directory; the
  domain carries the lab's ownership in its metadata, so teardown removes it with the
  lab's other domains.

A third provider implements :class:`Cloud`. Every VM of either cloud is a server guest:
an address of its own in its site's subnet, the lab's SSH key in its boot configuration,
its host key pinned from its console before anyone connects.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import shutil
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from labctl.core import names
from labctl.core.errors import LabError, LabStateError
from labctl.core.proc import run
from labctl.core.sizes import human_size
from labctl.core.wire import Message
from labctl.drivers.qcow2 import read_header
from labctl.drivers.ssh import SshMachine
from labctl.hosts import protocol as hp
from labctl.hosts.provider import HostPlan, NamespaceHosts
from labctl.lab import vms
from labctl.lab.topology import Topology
from labctl.replication.cloudapi import LIBVIRT_TLS_PORT
from labctl.replication.image import SERVER_CMDLINE, ensure_server_image
from labctl.state import sshkey
from labctl.state.context import LabContext
from labctl.state.pki import LabPki
from labctl.storage import domains
from labctl.storage.domains import DirectBoot, Nic, direct_boot_xml

#: a cloud VM's heartbeat period (its PID 1 prints one line per period)
HEARTBEAT_MS = 1000
#: the first host number a cloud VM gets in its site's subnet
FIRST_VM_HOST = 101
#: the common name of the operator's certificate, the one the endpoint serves
OPERATOR = "operator"


@dataclass(frozen=True)
class CloudDisk(Message):
    """A disk of a cloud VM: ``root`` boots it; ``data`` disks appear as ``/dev/vdX`` in
    the guest, in order (their serial is ``labctl-dN``)."""

    role: str
    size_bytes: int
    #: where the cloud keeps it (a file of the libvirt cloud, a datastore file of labctl's)
    where: str
    serial: str


@dataclass(frozen=True)
class CloudVm(Message):
    cloud: str
    provider: str
    name: str
    #: running, stopped, absent (libvirt's states in words for a libvirt domain)
    state: str
    #: the management channel: the guest's address (SSH, port 22)
    address: str
    disks: list[CloudDisk] = field(default_factory=list)
    #: the libvirt domain, or the labctl host the VM runs on
    runs_on: str | None = None
    #: why its state is "unknown" (the cloud's API did not answer)
    reason: str | None = None


@dataclass(frozen=True)
class Ran(Message):
    """``labctl vm ssh VM -- CMD``: a command run in a server VM, and what it said."""

    vm: str
    cloud: str
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class NewVm:
    """What :meth:`Cloud.create` makes: a VM booting ``root`` (``image``: a copy-on-write
    clone of the server image, a helper system; or a raw disk file the cloud takes over,
    as a replicated disk), with empty raw ``data_disks`` of these sizes."""

    name: str
    memory_mib: int = 256
    vcpus: int = 1
    root: str | Path = "image"
    data_disks: tuple[int, ...] = ()


class Cloud(Protocol):
    site: str
    provider: str

    async def create(self, vm: NewVm) -> CloudVm: ...
    async def start(self, name: str, timeout: float = 120.0) -> CloudVm: ...
    async def stop(self, name: str, timeout: float = 60.0) -> CloudVm: ...
    async def delete(self, name: str) -> None: ...
    async def show(self, name: str) -> CloudVm: ...
    async def console(self, name: str, lines: int = 50) -> list[str]: ...
    def ssh(self, name: str) -> SshMachine: ...


def _disk_bytes(row: dict[str, Any]) -> int:
    """The disks of a libvirt cloud's VM, in bytes its guest sees (a qcow2 root: its
    virtual size)."""
    root = Path(row["root"])
    size = 0
    if root.exists():
        size = read_header(str(root)).virtual_size if row["root_format"] == "qcow2" else \
            root.stat().st_size
    return size + sum(CloudDisk.from_wire(x).size_bytes for x in json.loads(row["disks"]))


def cloud_of(ctx: LabContext) -> Cloud:
    """Site ``ctx``'s cloud, by the provider the topology gave it."""
    row = ctx.shared.row("sites", name=ctx.site)
    provider = str(row["provider"]) if row is not None else "labctl"
    return LibvirtCloud(ctx) if provider == "libvirt" else LabctlCloud(ctx)


def credentials_dir(ctx: LabContext, site: str) -> Path:
    """The operator's credentials for libvirt cloud ``site``'s API, in libvirt's ``pkipath``
    layout (``cacert.pem``, ``clientcert.pem``, ``clientkey.pem`` 0600)."""
    return ctx.dir.site_dir(site) / "operator"


def api_uri(address: str, credentials: Path) -> str:
    return f"qemu+tls://{address}/system?pkipath={credentials}"


async def start_api(ctx: LabContext, topo: Topology, i: int) -> str:
    """Libvirt cloud ``topo.sites[i]``'s API endpoint (``ctx``: the lab's own context): a
    namespace on the site's bridge serving libvirt's TLS transport in front of this
    machine's libvirtd (:mod:`labctl.replication.cloudapi`), registered as a host of kind
    ``cloud-api`` in the site's inventory. The cloud has a CA of its own (not the lab's):
    it signs the endpoint's certificate and the operator's, whose credentials are written
    in libvirt's layout (:func:`credentials_dir`); the endpoint serves that operator and no
    one else. Returns the API's URI, also kept in the site's inventory."""
    site = topo.sites[i]
    assert site.api is not None
    here = ctx.in_site(site.name)
    name = site.api_name
    state_dir = ctx.dir.host_dir(name)
    tls = state_dir / "tls"
    pki = LabPki(f"{ctx.name} cloud {site.name}", ctx.dir.site_dir(site.name) / "cloud-ca")
    if not (tls / f"{name}.pem").exists():
        pki.issue(name, [str(site.api)], tls)
    creds = credentials_dir(ctx, site.name)
    if not (creds / "clientkey.pem").exists():
        issued = pki.issue(OPERATOR, [], creds)
        issued.ca.rename(creds / "cacert.pem")
        issued.cert.rename(creds / "clientcert.pem")
        issued.key.rename(creds / "clientkey.pem")
    index = len(topo.hosts) + len(topo.mobility) + i  # its link's name follows theirs
    here.inv.upsert("hosts", name=name, site=site.name, address=str(site.api),
                    initiator_iqn="", netns=names.netns(ctx.name, name),
                    veth=names.veth(ctx.dir.tag, index), agent_port=names.HOST_AGENT_PORT,
                    memory=0, agent_pid=None, state="starting", kind="cloud-api")
    t0 = time.monotonic()
    got = await NamespaceHosts(ctx.name, ctx.dir.path, here.inv).provision(HostPlan(
        name=name, index=index,
        address=ipaddress.IPv4Interface(f"{site.api}/{site.subnet.prefixlen}"),
        bridge=str((here.inv.row("sites", name=site.name) or {})["bridge"]),
        state_dir=state_dir,
        kind="cloud-api",
        agent_args=("--api-port", str(LIBVIRT_TLS_PORT), "--tls-dir", str(tls),
                    "--allow", OPERATOR)), here.secret())
    here.inv.record_step(f"cloud API {name} ready", time.monotonic() - t0)
    here.inv.update("hosts", {"name": name}, state="up", agent_pid=got.agent_pid)
    uri = api_uri(str(site.api), creds)
    here.inv.set_meta("api_uri", uri)
    ctx.progress(f"cloud {site.name}'s API answers at qemu+tls://{site.api}/system "
                 f"(operator credentials in {creds})")
    return uri


class LabctlCloud:
    """A site of labctl's host agents, as a cloud: its server guests."""

    provider = "labctl"

    def __init__(self, ctx: LabContext) -> None:
        assert ctx.site is not None
        self.ctx = ctx
        self.site = ctx.site

    def _row(self, name: str) -> dict[str, Any]:
        row = self.ctx.inv.row("vms", name=name)
        if row is None or row["guest"] != "server":
            known = [str(r["name"]) for r in self.ctx.inv.rows("vms", guest="server")]
            raise LabStateError(f"cloud {self.site} has no server VM {name!r} (server VMs: "
                                f"{', '.join(known) or 'none'})", vm=name, cloud=self.site)
        return row

    async def create(self, vm: NewVm) -> CloudVm:
        raise LabStateError(f"cloud {self.site}'s VMs are the topology's (guest: server): "
                            "declare the VM there", vm=vm.name, cloud=self.site)

    async def show(self, name: str) -> CloudVm:
        row = self._row(name)
        return CloudVm(cloud=self.site, provider=self.provider, name=name,
                       state=str(row["state"]), address=str(row["address"]),
                       disks=[CloudDisk("root", 0, f"{row['datastore']}:{row['disk_file']}",
                                        "labctl-root")], runs_on=str(row["host"]))

    async def start(self, name: str, timeout: float = 120.0) -> CloudVm:
        self._row(name)
        await vms.start(self.ctx, name)
        return await self.show(name)

    async def stop(self, name: str, timeout: float = 60.0) -> CloudVm:
        """A clean stop: the guest is asked to power off over its management channel (its
        PID 1 syncs and unmounts), then the host's QEMU is gone."""
        row = self._row(name)
        if row["state"] == "running":
            async with self.ssh(name) as m:
                await m.run(["kill", "-TERM", "1"])
            deadline = time.monotonic() + timeout
            async with self.ctx.host_client(str(row["host"])) as c:
                while time.monotonic() < deadline:
                    st = await hp.VM_STATUS.call(c, hp.VmName(name))
                    if st.process not in ("starting", "running"):
                        break
                    await asyncio.sleep(0.5)
                else:
                    raise LabError(f"VM {name} did not power off within {timeout:g} s",
                                   vm=name)
            with contextlib.suppress(LabError):  # the host forgets the exited QEMU
                await vms.stop(self.ctx, name)
            self.ctx.inv.update("vms", {"name": name}, state="stopped", pid=None)
        return await self.show(name)

    async def delete(self, name: str) -> None:
        raise LabStateError(f"cloud {self.site}'s VMs are the topology's: stop it instead",
                            vm=name)

    async def console(self, name: str, lines: int = 50) -> list[str]:
        row = self._row(name)
        async with self.ctx.host_client(str(row["host"])) as c:
            return (await hp.VM_CONSOLE_TAIL.call(c, hp.ConsoleTailRequest(name, lines))).lines

    def ssh(self, name: str) -> SshMachine:
        return vms.guest_ssh(self.ctx, name, str(self._row(name)["address"]))


class LibvirtCloud:
    """A site whose VMs are libvirt domains (``provider: libvirt``)."""

    provider = "libvirt"

    def __init__(self, ctx: LabContext) -> None:
        assert ctx.site is not None
        self.ctx = ctx
        self.site = ctx.site
        # read here: the API is called from worker threads, the inventory is this thread's
        self._uri = ctx.inv.get_meta("api_uri")

    # -- the cloud's API -------------------------------------------------------------------
    @property
    def uri(self) -> str:
        """Where the cloud's API answers, with the operator's credentials (libvirt's TLS
        transport: the cloud's CA and a client certificate it signed, in ``pkipath``)."""
        uri = self._uri
        if uri is None:
            raise LabStateError(f"cloud {self.site} has no API endpoint on record: bring the "
                                "lab up again", cloud=self.site)
        return uri

    def _conn(self) -> Any:
        try:
            return domains.open_conn(self.uri)
        except LabError as exc:
            why = str(exc.evidence.get("libvirt_error") or exc.message)
            raise LabError(f"cloud {self.site}'s API did not let us in: {why}",
                           cloud=self.site, uri=self.uri) from exc

    async def _state(self, name: str) -> domains.DomainState:
        """The VM's domain as the cloud's API reports it ("absent" when it has none)."""
        return await domains.in_thread(self._domain_state, name)

    def _domain_state(self, name: str) -> domains.DomainState:
        conn = self._conn()
        try:
            return domains.state_in(conn, self.ctx.name, name)
        finally:
            conn.close()

    # -- the cloud's own records ---------------------------------------------------------
    def _dir(self, name: str) -> Path:
        return self.ctx.dir.path / "sites" / self.site / "cloud" / name

    def _row(self, name: str) -> dict[str, Any]:
        row = self.ctx.inv.row("cloud_vms", name=name)
        if row is None:
            known = [str(r["name"]) for r in self.ctx.inv.rows("cloud_vms")]
            raise LabStateError(f"cloud {self.site} has no VM {name!r} (VMs: "
                                f"{', '.join(known) or 'none'})", vm=name, cloud=self.site)
        return row

    def _site_net(self) -> tuple[ipaddress.IPv4Network, str]:
        row = self.ctx.inv.row("sites", name=self.site)
        assert row is not None
        return ipaddress.IPv4Network(row["subnet"]), str(row["bridge"])

    def _gateway(self, net: ipaddress.IPv4Network) -> str:
        """The site's WAN router (the way to the other clouds), else the controller."""
        for link in self.ctx.shared.rows("wan_links"):
            for site, addr in ((link["site_a"], link["address_a"]),
                               (link["site_b"], link["address_b"])):
                if site == self.site:
                    return str(addr)
        return str(net.network_address + 1)

    def _free_address(self, net: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
        used = {ipaddress.IPv4Interface(r["address"]).ip for r in self.ctx.inv.rows("cloud_vms")}
        for link in self.ctx.shared.rows("wan_links"):
            used |= {ipaddress.IPv4Address(link["address_a"]),
                     ipaddress.IPv4Address(link["address_b"])}
        addr = net.network_address + FIRST_VM_HOST
        while addr in used:
            addr += 1
        if addr >= net.broadcast_address:
            raise LabStateError(f"cloud {self.site} has no free address left in {net}",
                                cloud=self.site)
        return addr

    def _room(self, vm: NewVm, root_bytes: int) -> None:
        """Refuse ``vm`` when it does not fit the cloud's quota (the topology's
        ``sites[].quota``): VMs, memory and disk, as a provider counts them at creation."""
        raw = self.ctx.inv.get_meta("quota")
        if not raw:
            return
        quota: dict[str, int] = json.loads(raw)
        rows = self.ctx.inv.rows("cloud_vms")
        used = {"vms": len(rows), "memory": sum(int(r["memory"]) << 20 for r in rows),
                "disk": sum(_disk_bytes(r) for r in rows)}
        asked = {"vms": 1, "memory": vm.memory_mib << 20,
                 "disk": root_bytes + sum(vm.data_disks)}
        for what, limit in sorted(quota.items()):
            if used[what] + asked[what] > limit:
                show = str if what == "vms" else human_size
                raise LabStateError(
                    f"cloud {self.site} has no room for {vm.name}: it asks {show(asked[what])} "
                    f"of {what}, {show(max(0, limit - used[what]))} of its quota "
                    f"{show(limit)} is free", cloud=self.site, vm=vm.name, quota=quota,
                    used=used, asked=asked)

    # -- the interface ---------------------------------------------------------------------
    async def create(self, vm: NewVm) -> CloudVm:
        """Define the VM (not started): its disks made, its address, MAC and domain."""
        if not hp.NAME_RE.match(vm.name) or len(vm.name) > 32:
            raise LabStateError(f"bad VM name {vm.name!r}", vm=vm.name)
        if self.ctx.inv.row("cloud_vms", name=vm.name) is not None:
            raise LabStateError(f"cloud {self.site} already has a VM {vm.name}", vm=vm.name)
        net, bridge = self._site_net()
        image = await ensure_server_image(progress=self.ctx.progress)
        given = None if vm.root == "image" else Path(vm.root)
        if given is not None and not given.is_file():
            raise LabStateError(f"no disk {given} to boot {vm.name} from", vm=vm.name)
        self._room(vm, (image.rootfs if given is None else given).stat().st_size)
        addr = self._free_address(net)
        d = self._dir(vm.name)
        d.mkdir(parents=True, exist_ok=True)
        made: list[Path] = []
        try:
            if given is None:
                root, root_format = d / "root.qcow2", "qcow2"
                await run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image.rootfs),
                           "-F", "raw", str(root)], what=f"the root disk of {vm.name}")
            else:  # a disk handed over (take_disk): the VM's from now on
                root, root_format = d / "root.raw", "raw"
                given.rename(root)
            made.append(root)
            data: list[CloudDisk] = []
            for i, size in enumerate(vm.data_disks):
                path = d / f"data{i}.raw"
                with open(path, "wb") as f:
                    f.truncate(size)
                made.append(path)
                data.append(CloudDisk("data", size, str(path), f"labctl-d{i}"))
            mac = names.mac(self.ctx.dir.tag, "c", int(addr) & 0xFF)  # unique in the /24
            row = {"name": vm.name, "domain": names.domain(self.ctx.name, vm.name),
                   "address": f"{addr}/{net.prefixlen}", "mac": mac, "memory": vm.memory_mib,
                   "vcpus": vm.vcpus, "root": str(root), "root_format": root_format,
                   "disks": json.dumps([x.to_wire() for x in data]), "created_at": time.time()}
            xml = self._xml(row, data, bridge, net)
            await domains.in_thread(self._define, row["domain"], xml)
            self.ctx.inv.upsert("cloud_vms", **row)
        except BaseException:
            for path in made:
                if path.parent == d:
                    path.unlink(missing_ok=True)
            raise
        return await self.show(vm.name)

    def _xml(self, row: dict[str, Any], data: list[CloudDisk], bridge: str,
             net: ipaddress.IPv4Network) -> str:
        key = sshkey.ensure_key(self.ctx.name, self.ctx.dir.path)
        image_kernel = self.ctx.shared.get_meta("server_kernel")
        image_initrd = self.ctx.shared.get_meta("server_initrd")
        if image_kernel is None or image_initrd is None:
            raise LabStateError("the lab has no server image kernel: bring it up again")
        kernel, initrd = Path(image_kernel), Path(image_initrd)
        cmdline = " ".join([SERVER_CMDLINE, f"labctl.vm={row['name']}",
                            f"labctl.ip={row['address']}", f"labctl.gw={self._gateway(net)}",
                            f"labctl.mac={row['mac']}", f"labctl.key={key.boot_arg()}",
                            f"labctl.hb_ms={HEARTBEAT_MS}"])
        meta = ET.Element("labctl:owner", {"xmlns:labctl": names.LIBVIRT_METADATA_NS})
        for k, v in (("lab", self.ctx.name), ("lab_dir", str(self.ctx.dir.path.resolve())),
                     ("node", str(row["name"])), ("role", "cloud-vm"), ("site", self.site)):
            ET.SubElement(meta, f"labctl:{k}").text = v
        d = self._dir(str(row["name"]))
        tap = f"lc{self.ctx.dir.tag[:6]}{int(row['mac'].split(':')[-1], 16):02x}"
        return direct_boot_xml(DirectBoot(
            name=str(row["domain"]), metadata=ET.tostring(meta, encoding="unicode"),
            memory_mib=int(row["memory"]), vcpus=int(row["vcpus"]), kernel=kernel,
            initrd=initrd, cmdline=cmdline, root=Path(row["root"]), root_serial="labctl-root",
            root_format=str(row["root_format"]), console_log=d / "console.log",
            disks=[(Path(x.where), x.serial, False) for x in data],
            nics=[Nic(bridge, tap, str(row["mac"]))]),
            (self.ctx.shared.get_meta("accel") == "kvm" and "kvm") or "qemu")

    def _define(self, domain: str, xml: str) -> None:
        lv = domains.libvirt_module()
        conn = self._conn()
        try:
            with contextlib.suppress(lv.libvirtError):
                conn.lookupByName(domain)
                raise LabStateError(f"a libvirt domain {domain} exists already: refusing to "
                                    "touch it", domain=domain)
            try:
                conn.defineXML(xml)
            except lv.libvirtError as exc:
                raise LabError(f"libvirt refused the domain {domain}: {exc}", domain=domain,
                               xml=xml) from exc
        finally:
            conn.close()

    def _domain_call(self, name: str, what: str) -> str:
        """``what`` (create, destroy, undefine) on the VM's domain; its state after."""
        lv = domains.libvirt_module()
        conn = self._conn()
        try:
            dom = domains.owned_domain(conn, self.ctx.name, name)
            try:
                if what == "create" and not dom.isActive():
                    dom.create()
                elif what == "destroy" and dom.isActive():
                    dom.destroy()
                elif what == "undefine":
                    if dom.isActive():
                        dom.destroy()
                    dom.undefine()
                    return "absent"
            except lv.libvirtError as exc:
                raise LabError(f"libvirt could not {what} {dom.name()}: {exc}",
                               domain=dom.name()) from exc
            return domains.state_of(dom).state
        finally:
            conn.close()

    async def show(self, name: str, strict: bool = True) -> CloudVm:
        """The VM as the cloud's API reports it; unless ``strict``, an API that does not
        answer gives its state as "unknown", with why."""
        row = self._row(name)
        reason = None
        try:
            state = (await self._state(name)).state
        except LabError as exc:
            if strict:
                raise
            state, reason = "unknown", exc.message
        root = CloudDisk("root", Path(row["root"]).stat().st_size if Path(row["root"]).exists()
                         else 0, str(row["root"]), "labctl-root")
        data = [CloudDisk.from_wire(x) for x in json.loads(row["disks"])]
        return CloudVm(cloud=self.site, provider=self.provider, name=name,
                       state="stopped" if state == "shutoff" else state,
                       address=str(row["address"]), disks=[root, *data],
                       runs_on=str(row["domain"]), reason=reason)

    async def start(self, name: str, timeout: float = 120.0) -> CloudVm:
        """Start the domain; return once the guest printed its host key (pinned) and
        answers SSH."""
        row = self._row(name)
        log = self._dir(name) / "console.log"
        if (await self._state(name)).state != "running":
            log.unlink(missing_ok=True)
        await domains.in_thread(self._domain_call, name, "create")
        deadline = time.monotonic() + timeout
        while True:
            key = vms.host_key_from(await self.console(name, 400))
            if key is not None:
                break
            if (await self._state(name)).state != "running":
                raise LabError(f"VM {name} stopped while booting", vm=name,
                               console_tail=await self.console(name, 20))
            if time.monotonic() > deadline:
                raise LabError(f"VM {name} printed no SSH host key within {timeout:g} s",
                               vm=name, console_tail=await self.console(name, 20))
            await asyncio.sleep(0.3)
        sshkey.pin_host_key(self.ctx.dir.path, name, key)
        async with vms.guest_ssh(self.ctx, name, str(row["address"])) as m:
            await m.run(["true"])
        return await self.show(name)

    async def stop(self, name: str, timeout: float = 60.0, force: bool = False) -> CloudVm:
        """A clean stop (the guest powers off when asked over SSH), else the domain is
        destroyed; ``force``: destroyed at once (a cloud's terminate: for a helper whose
        writes are all flushed)."""
        row = self._row(name)
        if force and (await self._state(name)).state != "shutoff":
            await domains.in_thread(self._domain_call, name, "destroy")
        elif (await self._state(name)).state == "running":
            with contextlib.suppress(LabError):
                async with vms.guest_ssh(self.ctx, name, str(row["address"])) as m:
                    await m.run(["kill", "-TERM", "1"])
            deadline = time.monotonic() + timeout
            # "shutdown" is libvirt's word for a domain on its way down: wait for shutoff
            while (await self._state(name)).state in ("running",
                                                                                "shutdown"):
                if time.monotonic() > deadline:
                    await domains.in_thread(self._domain_call, name, "destroy")
                    break
                await asyncio.sleep(0.3)
        return await self.show(name)

    def take_disk(self, name: str, path: Path) -> Path:
        """Keep disk ``path`` of VM ``name`` when the VM is deleted (a replicated disk that
        another VM will boot): moved out of the VM's directory, the cloud's still."""
        self._row(name)
        d = self._dir(name)
        if path.parent != d or not path.is_file():
            raise LabStateError(f"{path} is no disk of VM {name}", vm=name, path=str(path))
        kept = self._dir(".kept") / f"{name}-{path.name}"
        kept.parent.mkdir(parents=True, exist_ok=True)
        path.rename(kept)
        return kept

    async def delete(self, name: str) -> None:
        """The domain destroyed and undefined, its disks and records gone (a root disk the
        VM was given from elsewhere goes too: the cloud took it over)."""
        row = self._row(name)
        with contextlib.suppress(LabError):
            await domains.in_thread(self._domain_call, name, "undefine")
        # libvirt keeps the domain's QEMU log after undefine; it is this lab's file
        (domains.LIBVIRT_QEMU_LOGS / f"{row['domain']}.log").unlink(missing_ok=True)
        shutil.rmtree(self._dir(name), ignore_errors=True)
        self.ctx.inv.conn.execute("DELETE FROM cloud_vms WHERE name=?", (name,))

    async def console(self, name: str, lines: int = 50) -> list[str]:
        self._row(name)
        try:
            text = (self._dir(name) / "console.log").read_text(errors="replace")
        except OSError:
            return []
        return text.splitlines()[-lines:]

    def ssh(self, name: str) -> SshMachine:
        return vms.guest_ssh(self.ctx, name, str(self._row(name)["address"]))
