"""Storage node lifecycle on the controller: a libvirt domain booted from the storage image.

The node boots the cached kernel directly with a per-lab qcow2 overlay of the
cached root filesystem on an emulated NVMe disk (built into the cloud kernel,
so no initramfs), a small read-only **config disk** carrying config.json and the
storage agent's code, and one virtio-blk data disk per datastore (identified in
the guest by its ``<serial>``). Its NIC is a tap that libvirt puts on the lab
bridge, which must exist before :func:`start`.

Every domain carries a ``<metadata>`` element in the labctl namespace naming its
lab and lab directory: teardown removes exactly the domains that say they belong
to the lab, never by name pattern alone.

libvirt-python is blocking: every libvirt call here runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import ipaddress
import json
import os
import stat
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labctl.core import names
from labctl.core.errors import (
    AgentUnreachable,
    AuthenticationFailed,
    CommandFailed,
    StorageNodeError,
)
from labctl.core.paths import repo_root
from labctl.core.proc import run, which
from labctl.core.rpc import RpcClient
from labctl.core.wire import Message, Method
from labctl.drivers.debian import make_config_disk
from labctl.storage.domains import LIBVIRT_URI, DirectBoot, direct_boot_xml
from labctl.storage.domains import Nic as Nic
from labctl.storage.domains import disk_element as _disk_element
from labctl.storage.domains import in_thread as _in_thread
from labctl.storage.domains import libvirt_module as _libvirt
from labctl.storage.domains import open_conn as _open
from labctl.storage.domains import owned_domain as _owned_domain
from labctl.storage.domains import owner as _owner
from labctl.storage.domains import vd_name as _vd_name
from labctl.storage.image import StorageImage
from labctl.storage.protocol import STATUS, NodeConfig

METADATA_NS = names.LIBVIRT_METADATA_NS
METADATA_PREFIX = "labctl"
CONFIG_DISK_SERIAL = "labctl-config"
ROOT_DISK_SERIAL = "labctl-root"
KERNEL_CMDLINE = ("console=ttyS0 cryptomgr.notests root=/dev/nvme0n1 rootfstype=ext4 rw "
                  "init=/sbin/labctl-init panic=1 random.trust_cpu=on loglevel=4")
AGENT_FILES = ("labctl/__init__.py", "labctl/core/__init__.py", "labctl/core/chap.py",
               "labctl/core/errors.py",
               "labctl/core/rpc.py", "labctl/core/ids.py", "labctl/core/names.py",
               "labctl/core/wire.py", "labctl/storage/__init__.py", "labctl/storage/agent.py",
               "labctl/storage/protocol.py", "labctl/drivers/__init__.py",
               "labctl/drivers/lio.py", "labctl/drivers/nfsd.py", "labctl/drivers/qcow2.py",
               "labctl/drivers/sparse.py",
               "labctl/core/proc.py", "labctl/storage/files.py", "labctl/storage/machine.py",
               "labctl/agents/__init__.py",
               "labctl/agents/storage.py", "labctl/core/secret.py")
"""The python pieces the storage agent needs, copied onto the config disk."""

@dataclass(frozen=True)
class DataDisk:
    """A datastore's backing disk: a sparse raw file on the controller, virtio-blk in the node."""

    serial: str  # virtio serial (at most 20 characters), how the agent finds the disk
    path: Path
    size_bytes: int


@dataclass
class StorageNodeSpec:
    lab: str
    name: str
    address_cidr: str  # e.g. "10.99.0.2/24"
    bridge: str  # must exist before start()
    tap: str  # Linux ifname (at most 15 characters) libvirt gives the node's tap
    mac: str
    lab_dir: Path
    secret: bytes
    target_iqn: str
    memory_mib: int = 256
    #: the key storage nodes of every site share to copy files between them (file_send only)
    peer_secret: bytes | None = field(default=None, repr=False)
    vcpus: int = 1
    data_disks: list[DataDisk] = field(default_factory=list)
    agent_port: int = names.STORAGE_AGENT_PORT
    gateway: str | None = None
    #: what the node is (its domain's ownership record says it): a storage node, or the
    #: WAN router, booted from the same image with another agent
    role: str = "storage-node"
    #: NICs after the first (the router's other legs)
    extra_nics: list[Nic] = field(default_factory=list)
    #: config.json for another agent than the storage agent, and the files that agent needs
    agent_config: Message | None = None
    agent_files: tuple[str, ...] = AGENT_FILES
    #: where under the lab directory its files go (``storage/<name>``, ``wan/<name>``)
    subdir: str = "storage"
    #: the method whose answer says the agent is ready (the storage agent's ``status``)
    ready: Method[Any, Any] = STATUS
    #: segmentation offloads between the NICs and the host (TSO/ECN/UFO both ways); off,
    #: every packet crosses a NIC at wire size (the WAN router's ``packet`` loss mode)
    nic_offload: bool = True

    @property
    def domain_name(self) -> str:
        return names.domain(self.lab, self.name)

    @property
    def ip(self) -> str:
        return str(ipaddress.IPv4Interface(self.address_cidr).ip)

    @property
    def node_dir(self) -> Path:
        return self.lab_dir / self.subdir / self.name


@dataclass(frozen=True)
class StorageNodeHandle:
    """A running storage node whose agent answered."""

    lab: str
    name: str
    domain: str
    address: str  # IP of the agent and of the iSCSI portal
    agent_port: int
    target_iqn: str
    console_log: Path
    boot_s: float  # from domain start to the agent answering
    secret: bytes = field(repr=False)

    async def client(self, timeout: float = 10.0) -> RpcClient:
        return await RpcClient.connect(self.address, self.agent_port, self.secret,
                                       timeout=timeout, peer=f"storage node {self.name}")


# --- libvirt plumbing ---------------------------------------------------------------------

def _try_connect() -> str | None:
    """None when libvirtd answers, else why not."""
    lv = _libvirt()
    try:
        conn = lv.open(LIBVIRT_URI)
    except lv.libvirtError as exc:
        return str(exc)
    conn.close()
    return None


async def ensure_libvirtd(timeout: float = 30.0) -> None:
    """Make sure libvirtd answers at qemu:///system, starting the daemons by hand if needed.

    There is no systemd here: ``virtlogd -d`` then ``libvirtd -d``. They are system
    services, not lab objects, and stay running after the lab is gone.
    """
    _fix_kvm_node()
    if await _in_thread(_try_connect) is None:
        return
    for daemon in ("virtlogd", "libvirtd"):
        which(daemon, "libvirt-daemon from bookworm-backports")
    # An already running virtlogd refuses a second copy: that is fine.
    vlog = await run(["virtlogd", "-d"], check=False, timeout=30, what="virtlogd -d")
    start = await run(["libvirtd", "-d"], check=False, timeout=30, what="libvirtd -d")
    deadline = time.monotonic() + timeout
    why: str | None = "not tried"
    while time.monotonic() < deadline:
        why = await _in_thread(_try_connect)
        if why is None:
            return
        await asyncio.sleep(0.25)
    raise StorageNodeError(
        f"libvirtd did not answer at {LIBVIRT_URI} within {timeout:g} s after starting it: {why}",
        uri=LIBVIRT_URI, virtlogd_rc=vlog.returncode, virtlogd_stderr=vlog.stderr[-2000:],
        libvirtd_rc=start.returncode, libvirtd_stderr=start.stderr[-2000:])


def _fix_kvm_node(dev: Path = Path("/dev/kvm")) -> None:
    """Give /dev/kvm the owner and mode udev gives it on Debian (root:kvm 0660).

    Without udev the node stays root:root 0600. libvirt then finds KVM in its QEMU
    probe but not for the QEMU user, declares its capability cache stale on every
    lookup and re-probes QEMU (~4 s each; ~56 s per domain define, measured). We do
    not use KVM for TCG domains either way; this only keeps libvirt's cache valid.
    """
    try:
        st = dev.stat()
        kvm_gid = grp.getgrnam("kvm").gr_gid
    except (OSError, KeyError):
        return
    if not stat.S_ISCHR(st.st_mode) or (st.st_gid == kvm_gid and st.st_mode & 0o060 == 0o060):
        return
    try:
        os.chown(dev, -1, kvm_gid)
        os.chmod(dev, 0o660)
    except OSError as exc:
        raise StorageNodeError(
            f"{dev} is not usable by group kvm and cannot be fixed ({exc}); libvirt would re-probe "
            "QEMU on every call (about a minute per domain): run as root or fix the node",
            device=str(dev)) from exc


def _metadata_xml(spec: StorageNodeSpec) -> str:
    el = ET.Element(f"{METADATA_PREFIX}:owner", {f"xmlns:{METADATA_PREFIX}": METADATA_NS})
    for key, value in (("lab", spec.lab), ("lab_dir", str(spec.lab_dir.resolve())),
                       ("node", spec.name), ("role", spec.role)):
        ET.SubElement(el, f"{METADATA_PREFIX}:{key}").text = value
    return ET.tostring(el, encoding="unicode")


def domain_xml(spec: StorageNodeSpec, image: StorageImage, overlay: Path, config_disk: Path,
               console_log: Path, accel: str = "qemu") -> str:
    """The libvirt domain of a storage node (pure: no I/O)."""
    return direct_boot_xml(DirectBoot(
        name=spec.domain_name, metadata=_metadata_xml(spec), memory_mib=spec.memory_mib,
        vcpus=spec.vcpus, kernel=image.kernel, cmdline=KERNEL_CMDLINE, root=overlay,
        root_serial=ROOT_DISK_SERIAL,
        disks=[(config_disk, CONFIG_DISK_SERIAL, True),
               *((dd.path, dd.serial, False) for dd in spec.data_disks)],
        nics=[Nic(spec.bridge, spec.tap, spec.mac), *spec.extra_nics],
        console_log=console_log, nic_offload=spec.nic_offload), accel)


def _find_disk(root: ET.Element, serial: str) -> ET.Element | None:
    """The ``<disk>`` with ``serial`` in a domain's XML, or None."""
    return next((d for d in root.iter("disk") if d.findtext("serial") == serial), None)


def console_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no console log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


# --- lifecycle ----------------------------------------------------------------------------

def _agent_files(config: Message, agent_files: tuple[str, ...]) -> dict[str, bytes]:
    root = repo_root()
    files = {"config.json": json.dumps(config.to_wire(), indent=1).encode()}
    for rel in agent_files:
        files[f"python/{rel}"] = (root / rel).read_bytes()
    return files


def _node_config(spec: StorageNodeSpec) -> NodeConfig:
    return NodeConfig(lab=spec.lab, node=spec.name, address=spec.address_cidr,
                      gateway=spec.gateway, mac=spec.mac, secret=spec.secret.hex(),
                      target_iqn=spec.target_iqn, agent_port=spec.agent_port,
                      peer_secret=spec.peer_secret.hex() if spec.peer_secret else None)


def _ensure_data_disk(dd: DataDisk) -> None:
    """Create the sparse backing file if missing; never shrink or truncate an existing one."""
    dd.path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(dd.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    try:
        os.ftruncate(fd, dd.size_bytes)
    finally:
        os.close(fd)


def _check_serial(dd: DataDisk) -> None:
    if not 1 <= len(dd.serial) <= 20 or dd.serial == CONFIG_DISK_SERIAL:
        raise StorageNodeError(f"data disk serial {dd.serial!r} must be 1-20 characters and "
                               f"not {CONFIG_DISK_SERIAL!r}", serial=dd.serial)


def _what(spec: StorageNodeSpec) -> str:
    return "WAN router" if spec.role == "wan-router" else "storage node"


def _check_spec(spec: StorageNodeSpec) -> None:
    for nic in (Nic(spec.bridge, spec.tap, spec.mac), *spec.extra_nics):
        if not 1 <= len(nic.tap) <= 15:
            raise StorageNodeError(f"tap name {nic.tap!r} must be 1-15 characters", tap=nic.tap)
        if not Path("/sys/class/net", nic.bridge).exists():
            raise StorageNodeError(f"bridge {nic.bridge} does not exist: create it before "
                                   "starting node " + spec.name, bridge=nic.bridge)
    for dd in spec.data_disks:
        _check_serial(dd)
    try:
        ipaddress.IPv4Interface(spec.address_cidr)
    except ValueError as exc:
        raise StorageNodeError(f"bad node address {spec.address_cidr!r}: {exc}") from exc


def _remove_domain(dom: Any) -> None:
    lv = _libvirt()
    with contextlib.suppress(lv.libvirtError):
        if dom.isActive():
            dom.destroy()
    with contextlib.suppress(lv.libvirtError):
        dom.undefine()


def _replace_and_start(spec: StorageNodeSpec, xml: str) -> None:
    lv = _libvirt()
    conn = _open()
    try:
        with contextlib.suppress(lv.libvirtError):
            old = conn.lookupByName(spec.domain_name)
            owner = _owner(old) or {}
            if owner.get("lab") != spec.lab or owner.get("lab_dir") != str(spec.lab_dir.resolve()):
                raise StorageNodeError(
                    f"a domain named {spec.domain_name} exists and is not owned by lab "
                    f"{spec.lab} at {spec.lab_dir}: refusing to touch it",
                    domain=spec.domain_name, owner=owner)
            _remove_domain(old)
        try:
            dom = conn.defineXML(xml)
            dom.create()
        except lv.libvirtError as exc:
            raise StorageNodeError(f"libvirt could not start {spec.domain_name}: {exc}",
                                   domain=spec.domain_name, xml=xml) from exc
    finally:
        conn.close()


def _is_active(name: str) -> bool:
    lv = _libvirt()
    conn = _open()
    try:
        return bool(conn.lookupByName(name).isActive())
    except lv.libvirtError:
        return False
    finally:
        conn.close()


async def start(spec: StorageNodeSpec, image: StorageImage, accel: str = "qemu",
                timeout: float = 90.0) -> StorageNodeHandle:
    """Boot storage node ``spec`` and return once its agent answers an authenticated status."""
    _check_spec(spec)
    which("qemu-img", "qemu-utils")
    node_dir = spec.node_dir
    node_dir.mkdir(parents=True, exist_ok=True)
    overlay = node_dir / "root.qcow2"
    config_disk = node_dir / "config.img"
    console_log = node_dir / "console.log"
    # The node's root holds nothing of value (LIO state is re-ensured by the controller):
    # a fresh overlay per boot, so a rebuilt base image is never mixed with an old overlay.
    overlay.unlink(missing_ok=True)
    try:
        await run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image.rootfs),
                   "-F", "raw", str(overlay)], what="qemu-img create (storage node overlay)")
    except CommandFailed as exc:
        raise StorageNodeError(f"cannot create the root overlay of {spec.name}: {exc.message}",
                               **exc.evidence) from exc
    await make_config_disk(config_disk, _agent_files(spec.agent_config or _node_config(spec),
                                                     spec.agent_files))
    for dd in spec.data_disks:
        _ensure_data_disk(dd)
    console_log.unlink(missing_ok=True)
    xml = domain_xml(spec, image, overlay, config_disk, console_log, accel)
    (node_dir / "domain.xml").write_text(xml)
    t0 = time.monotonic()
    await _in_thread(_replace_and_start, spec, xml)
    deadline = t0 + timeout
    last: Exception | None = None
    while True:
        try:
            client = await RpcClient.connect(spec.ip, spec.agent_port, spec.secret, timeout=1.0,
                                             peer=f"storage node {spec.name}")
        except AuthenticationFailed:
            raise
        except AgentUnreachable as exc:
            last = exc
        else:
            try:
                await spec.ready.call(client, timeout=max(5.0, deadline - time.monotonic()))
            finally:
                await client.close()
            break
        if not await _in_thread(_is_active, spec.domain_name):
            raise StorageNodeError(
                f"{_what(spec)} {spec.name} stopped before its agent answered",
                domain=spec.domain_name, console_tail=console_tail(console_log))
        if time.monotonic() > deadline:
            raise StorageNodeError(
                f"{_what(spec)} {spec.name}: no agent at {spec.ip}:{spec.agent_port} within "
                f"{timeout:g} s", domain=spec.domain_name, last_error=str(last),
                console_tail=console_tail(console_log))
        await asyncio.sleep(0.2)
    return StorageNodeHandle(lab=spec.lab, name=spec.name, domain=spec.domain_name,
                             address=spec.ip, agent_port=spec.agent_port,
                             target_iqn=spec.target_iqn, console_log=console_log,
                             boot_s=time.monotonic() - t0, secret=spec.secret)


def _destroy_owned(lab: str, lab_dir: Path) -> list[str]:
    conn = _open()
    removed: list[str] = []
    want_dir = str(lab_dir.resolve())
    try:
        for dom in conn.listAllDomains(0):
            owner = _owner(dom)
            if owner is None or owner.get("lab") != lab or owner.get("lab_dir") != want_dir:
                continue
            name = dom.name()
            _remove_domain(dom)
            removed.append(name)
    finally:
        conn.close()
    return removed


async def destroy_owned(lab: str, lab_dir: Path) -> list[str]:
    """Destroy and undefine every domain whose metadata says it belongs to ``lab`` at ``lab_dir``.

    Returns the names removed; a second call returns []. If libvirtd is not running
    there is nothing of ours to remove either.
    """
    if await _in_thread(_try_connect) is not None:
        return []
    return await _in_thread(_destroy_owned, lab, lab_dir)


def _disk_target(dom: Any, serial: str) -> str:
    root = ET.fromstring(dom.XMLDesc(0))
    disk = _find_disk(root, serial)
    tgt = disk.find("target") if disk is not None else None
    if tgt is None:
        raise StorageNodeError(f"domain {dom.name()} has no disk with serial {serial!r}",
                               domain=dom.name(),
                               serials=[d.findtext("serial") for d in root.iter("disk")
                                        if d.find("target") is not None])
    return str(tgt.get("dev"))


def _resize(lab: str, name: str, serial: str, new_size: int) -> None:
    lv = _libvirt()
    conn = _open()
    try:
        dom = _owned_domain(conn, lab, name)
        target = _disk_target(dom, serial)
        try:
            dom.blockResize(target, new_size, lv.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
        except lv.libvirtError as exc:
            raise StorageNodeError(f"resizing disk {serial} ({target}) of {dom.name()} to "
                                   f"{new_size} bytes failed: {exc}", domain=dom.name(),
                                   serial=serial, size_bytes=new_size) from exc
    finally:
        conn.close()


async def resize_data_disk(lab: str, name: str, serial: str, new_size_bytes: int) -> None:
    """Grow a data disk of a running node (libvirt blockResize); LIO's iblock LUN follows."""
    await _in_thread(_resize, lab, name, serial, new_size_bytes)


# --- hot-plug of data disks (datastores created or deleted while the node runs) -----------

def _attach(lab: str, name: str, dd: DataDisk) -> str:
    lv = _libvirt()
    conn = _open()
    try:
        dom = _owned_domain(conn, lab, name)
        root = ET.fromstring(dom.XMLDesc(0))
        have = _find_disk(root, dd.serial)
        tgt = have.find("target") if have is not None else None
        if tgt is not None:
            return str(tgt.get("dev"))  # already attached
        used = {t.get("dev") for t in (d.find("target") for d in root.iter("disk")) if t is not None}
        target = next(_vd_name(i) for i in range(1, 700) if _vd_name(i) not in used)
        xml = ET.tostring(_disk_element(dd.path, target, dd.serial), encoding="unicode")
        try:
            dom.attachDeviceFlags(xml, lv.VIR_DOMAIN_AFFECT_LIVE)
        except lv.libvirtError as exc:
            raise StorageNodeError(f"hot-plugging disk {dd.serial} into {dom.name()} failed: {exc}",
                                   domain=dom.name(), serial=dd.serial) from exc
        return target
    finally:
        conn.close()


def _detach(lab: str, name: str, serial: str) -> bool:
    lv = _libvirt()
    conn = _open()
    try:
        dom = _owned_domain(conn, lab, name)
        disk = _find_disk(ET.fromstring(dom.XMLDesc(0)), serial)
        if disk is None:
            return False
        try:
            dom.detachDeviceFlags(ET.tostring(disk, encoding="unicode"), lv.VIR_DOMAIN_AFFECT_LIVE)
        except lv.libvirtError as exc:
            raise StorageNodeError(f"unplugging disk {serial} from {dom.name()} failed: {exc}",
                                   domain=dom.name(), serial=serial) from exc
        return True
    finally:
        conn.close()


async def attach_data_disk(lab: str, name: str, dd: DataDisk) -> str:
    """Create ``dd``'s sparse file if needed and hot-plug it into the running node (virtio-blk on
    the node's PCI bus, ACPI hotplug); returns the libvirt target. Idempotent by serial."""
    _check_serial(dd)
    _ensure_data_disk(dd)
    return await _in_thread(_attach, lab, name, dd)


async def detach_data_disk(lab: str, name: str, serial: str) -> bool:
    """Hot-unplug the data disk with ``serial`` (libvirt waits for the guest to release it)."""
    return await _in_thread(_detach, lab, name, serial)


# --- the node's domain state: what libvirt says, and its changes as they happen -----------

#: lifecycle event codes (virDomainEventType) in words
_EVENTS = {0: "defined", 1: "undefined", 2: "started", 3: "suspended", 4: "resumed",
           5: "stopped", 6: "shutdown", 7: "pmsuspended", 8: "crashed"}
_SUSPENDED_DETAIL = {0: "user", 1: "migrated", 2: "I/O error", 3: "watchdog", 4: "restored",
                     5: "from snapshot", 6: "API error", 7: "post-copy", 8: "post-copy failed"}
_STOPPED_DETAIL = {0: "shutdown", 1: "destroyed", 2: "crashed", 3: "migrated", 4: "saved",
                   5: "failed", 6: "from snapshot"}


#: (node, event, detail, role) for each lifecycle event of one of the lab's node domains
#: (role: ``storage-node`` or ``wan-router``)
NodeEventSink = Callable[[str, str, str | None, str], None]


class DomainWatch:
    """libvirt's lifecycle events of one lab's storage node domains, as they happen: a
    thread runs libvirt's default event loop; each event of a domain whose metadata names
    the lab is handed to ``sink`` in the asyncio loop that started the watch."""

    def __init__(self, lab: str, lab_dir: Path, sink: NodeEventSink) -> None:
        self.lab = lab
        self.lab_dir = str(lab_dir.resolve())
        self.sink = sink
        self._loop = asyncio.get_running_loop()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Any = None
        self._cb: int | None = None

    def start(self) -> None:
        lv = _libvirt()
        _event_impl(lv)
        self._conn = _open()
        self._cb = self._conn.domainEventRegisterAny(
            None, lv.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_event, None)
        self._thread = threading.Thread(target=self._run, name="libvirt-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        lv = _libvirt()
        while not self._stop.is_set():
            with contextlib.suppress(lv.libvirtError):
                lv.virEventRunDefaultImpl()

    def _on_event(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        owner = _owner(dom) or {}
        if owner.get("lab") != self.lab or owner.get("lab_dir") != self.lab_dir:
            return
        kind = _EVENTS.get(event, f"event {event}")
        why = (_SUSPENDED_DETAIL if event == 3 else _STOPPED_DETAIL if event == 5 else {}
               ).get(detail)
        node = owner.get("node") or dom.name()
        role = owner.get("role") or "storage-node"
        self._loop.call_soon_threadsafe(self.sink, node, kind, why, role)

    def close(self) -> None:
        self._stop.set()
        if self._conn is not None:
            with contextlib.suppress(Exception):
                if self._cb is not None:
                    self._conn.domainEventDeregisterAny(self._cb)
                self._conn.close()


_event_impl_done = False


def _event_impl(lv: Any) -> None:
    """libvirt's default event loop, registered once per process (before any connection
    whose events are wanted)."""
    global _event_impl_done
    if not _event_impl_done:
        lv.virEventRegisterDefaultImpl()
        _event_impl_done = True
