"""The lab's libvirt domains (storage nodes, WAN routers, a libvirt cloud's VMs), seen
from the controller: the connection to libvirtd, the domains a lab owns (by the ownership
recorded in their metadata), their state in words, and the XML of a VM booted straight
into a kernel with its root on NVMe. Apart from :mod:`labctl.storage.node` so that
``labctl status`` asks libvirt without importing how nodes are built."""

from __future__ import annotations

import asyncio
import json
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from labctl.core import names
from labctl.core.errors import MissingDependency, StorageNodeError

LIBVIRT_URI = "qemu:///system"
#: where libvirt keeps each domain's QEMU log (after undefine too: the lab removes its own)
LIBVIRT_QEMU_LOGS = Path("/var/log/libvirt/qemu")
METADATA_NS = names.LIBVIRT_METADATA_NS

T = TypeVar("T")


def libvirt_module() -> Any:
    try:
        import libvirt  # noqa: PLC0415 (optional heavy module: only where libvirt runs)
    except ImportError as exc:
        raise MissingDependency("libvirt-python is not installed (run scripts/setup.sh)",
                                error=str(exc)) from exc
    # libvirt prints every error to stderr by default; we raise them with evidence instead
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


def open_conn(uri: str = LIBVIRT_URI) -> Any:
    """A connection to libvirt at ``uri`` (this machine's system daemon by default)."""
    lv = libvirt_module()
    try:
        return lv.open(uri)
    except lv.libvirtError as exc:
        raise StorageNodeError(f"cannot connect to libvirt at {uri}: {exc}", uri=uri,
                               libvirt_error=str(exc)) from exc


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.to_thread(fn, *args)


def owner(dom: Any) -> dict[str, str] | None:
    """The labctl ownership recorded in a domain's metadata, or None."""
    lv = libvirt_module()
    try:
        xml = dom.metadata(lv.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS, 0)
    except lv.libvirtError:
        return None
    try:
        el = ET.fromstring(xml)
    except ET.ParseError:
        return None
    return {child.tag.split("}")[-1]: (child.text or "") for child in el}


def owned_domain(conn: Any, lab: str, name: str) -> Any:
    lv = libvirt_module()
    try:
        dom = conn.lookupByName(names.domain(lab, name))
    except lv.libvirtError as exc:
        raise StorageNodeError(f"no storage node domain {names.domain(lab, name)}",
                               domain=names.domain(lab, name)) from exc
    if (owner(dom) or {}).get("lab") != lab:
        raise StorageNodeError(f"domain {dom.name()} is not owned by lab {lab}", domain=dom.name())
    return dom


#: libvirt's state and reason codes (virDomainState, virDomainPausedReason, ...) in words
_STATES = {0: "nostate", 1: "running", 2: "blocked", 3: "paused", 4: "shutdown", 5: "shutoff",
           6: "crashed", 7: "pmsuspended"}
_PAUSED = {1: "user", 2: "migration", 3: "save", 4: "dump", 5: "I/O error", 6: "watchdog",
           7: "from snapshot", 8: "shutting down", 9: "snapshot", 10: "crashed",
           11: "starting up", 12: "post-copy", 13: "post-copy failed"}
_SHUTOFF = {1: "shutdown", 2: "destroyed", 3: "crashed", 4: "migrated", 5: "saved",
            6: "failed", 7: "from snapshot", 8: "daemon"}


@dataclass(frozen=True)
class DomainState:
    """A storage node's domain as libvirt sees it: ``state`` (running, paused, shutoff,
    crashed, ...) and why (``reason``: for a pause "user", "I/O error", ...)."""

    state: str
    reason: str | None

    def __str__(self) -> str:
        return self.state + (f" ({self.reason})" if self.reason else "")


def state_of(dom: Any) -> DomainState:
    code, reason = dom.state()
    state = _STATES.get(code, f"state {code}")
    words = _PAUSED if code == 3 else _SHUTOFF if code == 5 else {}
    return DomainState(state, words.get(reason) if words else None)


def state_in(conn: Any, lab: str, name: str) -> DomainState:
    """Lab ``lab``'s domain ``name`` as connection ``conn`` reports it ("absent" if it has
    none)."""
    try:
        return state_of(owned_domain(conn, lab, name))
    except StorageNodeError:
        return DomainState("absent", None)


def _domain_state(lab: str, name: str) -> DomainState:
    conn = open_conn()
    try:
        return state_in(conn, lab, name)
    finally:
        conn.close()


async def domain_state(lab: str, name: str) -> DomainState:
    """What libvirt says of storage node ``name``'s domain now ("absent" if it has none)."""
    return await in_thread(_domain_state, lab, name)


def _resume(lab: str, name: str) -> DomainState:
    lv = libvirt_module()
    conn = open_conn()
    try:
        dom = owned_domain(conn, lab, name)
        if dom.state()[0] == 3:
            try:
                dom.resume()
            except lv.libvirtError as exc:
                raise StorageNodeError(f"libvirt could not resume {dom.name()}: {exc}",
                                       domain=dom.name()) from exc
        return state_of(dom)
    finally:
        conn.close()


async def resume(lab: str, name: str) -> DomainState:
    """Resume a paused storage node (after its cause, e.g. a full disk, is gone)."""
    return await in_thread(_resume, lab, name)


@dataclass(frozen=True)
class Nic:
    """A NIC on a bridge: the tap libvirt makes for it, its MAC."""

    bridge: str
    tap: str
    mac: str


@dataclass(frozen=True)
class DirectBoot:
    """A VM libvirt boots straight into ``kernel`` with ``cmdline``: its root a qcow2 or raw
    file on an NVMe controller (the cloud kernel has NVMe built in; libvirt 11.3 has no
    NVMe disk bus, so it goes to QEMU directly), then virtio-blk ``disks`` (path, serial,
    read-only), its NICs, its console into a file."""

    name: str
    metadata: str
    memory_mib: int
    vcpus: int
    kernel: Path
    cmdline: str
    root: Path
    root_serial: str
    console_log: Path
    disks: list[tuple[Path, str, bool]] = field(default_factory=list)
    nics: list[Nic] = field(default_factory=list)
    nic_offload: bool = True
    root_format: str = "qcow2"
    initrd: Path | None = None


def direct_boot_xml(vm: DirectBoot, accel: str = "qemu") -> str:
    """The libvirt domain of ``vm`` (pure: no I/O)."""
    if accel not in ("qemu", "kvm"):
        raise StorageNodeError(f"unknown accelerator {accel!r} (qemu or kvm)", accel=accel)
    qemu_ns = "http://libvirt.org/schemas/domain/qemu/1.0"
    ET.register_namespace("qemu", qemu_ns)
    dom = ET.Element("domain", {"type": accel})
    ET.SubElement(dom, "name").text = vm.name
    meta = ET.SubElement(dom, "metadata")
    meta.append(ET.fromstring(vm.metadata))
    ET.SubElement(dom, "memory", {"unit": "MiB"}).text = str(vm.memory_mib)
    ET.SubElement(dom, "vcpu").text = str(vm.vcpus)
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", {"arch": "x86_64", "machine": "pc"}).text = "hvm"
    qboot = Path("/usr/share/qemu/qboot.rom")
    if qboot.exists():  # minimal firmware for direct kernel boot: faster than SeaBIOS
        ET.SubElement(os_el, "loader", {"type": "rom", "readonly": "yes"}).text = str(qboot)
    ET.SubElement(os_el, "kernel").text = str(vm.kernel)
    if vm.initrd is not None:
        ET.SubElement(os_el, "initrd").text = str(vm.initrd)
    ET.SubElement(os_el, "cmdline").text = vm.cmdline
    feats = ET.SubElement(dom, "features")
    ET.SubElement(feats, "acpi")  # acpi=off stalls boots (DESIGN); needed for power-off
    if accel == "kvm":
        ET.SubElement(dom, "cpu", {"mode": "host-passthrough", "check": "none"})
    else:
        ET.SubElement(dom, "cpu", {"mode": "maximum", "check": "none"})
    ET.SubElement(dom, "clock", {"offset": "utc"})
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        ET.SubElement(dom, event).text = "destroy"  # a dead VM stays visibly dead
    devs = ET.SubElement(dom, "devices")
    for i, (path, serial, readonly) in enumerate(vm.disks):
        devs.append(disk_element(path, vd_name(i), serial, readonly=readonly))
    for one in vm.nics:
        nic = ET.SubElement(devs, "interface", {"type": "bridge"})
        ET.SubElement(nic, "source", {"bridge": one.bridge})
        ET.SubElement(nic, "target", {"dev": one.tap})
        ET.SubElement(nic, "mac", {"address": one.mac})
        ET.SubElement(nic, "model", {"type": "virtio"})
        if not vm.nic_offload:
            drv = ET.SubElement(nic, "driver")
            off = {"csum": "off", "tso4": "off", "tso6": "off", "ecn": "off", "ufo": "off"}
            ET.SubElement(drv, "host", off)
            ET.SubElement(drv, "guest", {k: v for k, v in off.items() if k != "csum"})
        # no iPXE option ROM: with it SeaBIOS tries a network boot (DHCP timeouts, ~60 s)
        # before the direct kernel boot
        ET.SubElement(nic, "rom", {"enabled": "no"})
    ser = ET.SubElement(devs, "serial", {"type": "file"})
    ET.SubElement(ser, "source", {"path": str(vm.console_log)})
    ET.SubElement(ser, "target", {"port": "0"})
    ET.SubElement(devs, "memballoon", {"model": "none"})
    video = ET.SubElement(devs, "video")
    ET.SubElement(video, "model", {"type": "none"})
    # QEMU runs as root for this domain: the cached image may sit under a private home
    sec = ET.SubElement(dom, "seclabel", {"type": "static", "model": "dac", "relabel": "no"})
    ET.SubElement(sec, "label").text = "+0:+0"
    # the root disk on NVMe, in a PCI slot libvirt does not hand out (it fills slots from 2)
    root_node = {"driver": vm.root_format, "node-name": "lcroot",
                 "file": {"driver": "file", "filename": str(vm.root)}}
    cmd = ET.SubElement(dom, f"{{{qemu_ns}}}commandline")
    for arg in ("-blockdev", json.dumps(root_node, separators=(",", ":")),
                "-device", f"nvme,drive=lcroot,serial={vm.root_serial},bus=pci.0,addr=0x1f"):
        ET.SubElement(cmd, f"{{{qemu_ns}}}arg", {"value": arg})
    return ET.tostring(dom, encoding="unicode")


def disk_element(path: Path, target: str, serial: str, readonly: bool = False) -> ET.Element:
    """A raw file as a virtio-blk ``<disk>`` the guest finds by ``serial``."""
    d = ET.Element("disk", {"type": "file", "device": "disk"})
    ET.SubElement(d, "driver", {"name": "qemu", "type": "raw", "discard": "unmap"})
    ET.SubElement(d, "source", {"file": str(path)})
    ET.SubElement(d, "target", {"dev": target, "bus": "virtio"})
    ET.SubElement(d, "serial").text = serial
    if readonly:
        ET.SubElement(d, "readonly")
    return d


def vd_name(i: int) -> str:
    letters = ""
    i += 1
    while i:
        i, rem = divmod(i - 1, 26)
        letters = chr(ord("a") + rem) + letters
    return "vd" + letters


