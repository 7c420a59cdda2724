"""The host agent's VM protocol: what the controller may ask a host about its VMs.

Imports only ``labctl.core``: the controller, the host agent and anything that poses as a
host (a mobility agent) share these types. The host's storage methods are in
:mod:`labctl.datastores.protocol`, its migration methods in :mod:`labctl.migration.protocol`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from labctl.core.wire import Empty, Message, Method

DEFAULT_MACHINE = "pc-q35-10.0"  # pinned: source and destination of a migration must agree
ACCELS = ("tcg", "kvm")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_IQN_RE = re.compile(r"^(iqn\.[0-9]{4}-[0-9]{2}\.[^\s,/]+|eui\.[0-9A-Fa-f]{16}|naa\.[0-9A-Fa-f]+)$")
_PORTAL_RE = re.compile(r"^([0-9A-Za-z.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?$")


# --- VM description --------------------------------------------------------------------------

@dataclass(frozen=True)
class IscsiDisk(Message):
    """A LUN reached with QEMU's own libiscsi driver."""

    portal: str  # "ip:port"
    target_iqn: str
    lun: int
    initiator_iqn: str
    naa: str | None = None  # the LUN's NAA ID as the array presents it, when known
    kind: Literal["iscsi"] = "iscsi"

    def __post_init__(self) -> None:
        if not _PORTAL_RE.match(self.portal):
            raise ValueError(f"bad iSCSI portal {self.portal!r} (want ip:port)")
        for what, iqn in (("target", self.target_iqn), ("initiator", self.initiator_iqn)):
            if not _IQN_RE.match(iqn):
                raise ValueError(f"bad iSCSI {what} name {iqn!r}")
        if not 0 <= self.lun < 16384:
            raise ValueError(f"bad LUN {self.lun}")

    @property
    def url(self) -> str:
        return f"iscsi://{self.portal}/{self.target_iqn}/{self.lun}"


@dataclass(frozen=True)
class FileDisk(Message):
    """A raw file on the host (tests, the migration testbed)."""

    path: Path
    direct: bool = True  # O_DIRECT on the host (not on tmpfs)
    kind: Literal["file"] = "file"


_NFS_PATH_RE = re.compile(r"^/[A-Za-z0-9_./+-]+$")
_IPV4_RE = re.compile(r"^[0-9]{1,3}(\.[0-9]{1,3}){3}$")


@dataclass(frozen=True)
class NfsLayer(Message):
    """One layer of a chain on a file datastore: its path on the NFS server, its format."""

    path: str
    format: str = "qcow2"

    def __post_init__(self) -> None:
        if not _NFS_PATH_RE.match(self.path) or "/../" in self.path + "/":
            raise ValueError(f"bad NFS path {self.path!r}")
        if self.format not in ("qcow2", "raw"):
            raise ValueError(f"bad image format {self.format!r} (qcow2 or raw)")


@dataclass(frozen=True)
class NfsChainDisk(Message):
    """A qcow2 chain on a file datastore, opened with QEMU's own NFS client as an explicit
    block graph (each layer's backing the next node: QEMU cannot resolve a relative backing
    name of an image opened by its nfs:// URL). ``layers``: top first."""

    server: str
    layers: list[NfsLayer]
    kind: Literal["nfs-chain"] = "nfs-chain"

    def __post_init__(self) -> None:
        if not _IPV4_RE.match(self.server):
            raise ValueError(f"bad NFS server address {self.server!r}")
        if not 1 <= len(self.layers) <= 64:
            raise ValueError(f"a chain has 1 to 64 layers, not {len(self.layers)}")


Disk = IscsiDisk | FileDisk | NfsChainDisk


_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


@dataclass(frozen=True)
class Nic(Message):
    """A VM's network interface, routed by its host: QEMU's tap in the host's namespace
    gets a /32 route to ``address`` and the namespace answers ARP for it (proxy ARP), so
    the guest is reachable on its site's subnet at an address of its own."""

    mac: str
    #: the guest's address and prefix in the site's subnet ("10.236.1.50/24")
    address: str

    def __post_init__(self) -> None:
        if not _MAC_RE.match(self.mac):
            raise ValueError(f"bad MAC address {self.mac!r} (six lower-case hex pairs)")
        try:
            ipaddress.IPv4Interface(self.address)
        except ValueError as exc:
            raise ValueError(f"bad guest address {self.address!r}: {exc}") from None


@dataclass(frozen=True)
class VmSpec(Message):
    """A workload VM, complete: what QEMU is started with."""

    name: str
    memory_mib: int
    vcpus: int
    kernel: Path
    #: None: the kernel boots without one (the server guest's root is its NVMe disk)
    initrd: Path | None
    append: str
    disk: IscsiDisk | FileDisk | NfsChainDisk | None = None
    machine: str = DEFAULT_MACHINE
    accel: str = "tcg"
    #: the disk's controller: virtio-blk (the test guest), or NVMe (a root disk for a
    #: kernel without an initrd: the cloud kernel has NVMe built in)
    disk_bus: Literal["virtio", "nvme"] = "virtio"
    nic: Nic | None = None

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise ValueError(f"bad VM name {self.name!r} (letters, digits, _ . -; max 63)")
        if not 64 <= self.memory_mib <= 65536:
            raise ValueError(f"bad memory size {self.memory_mib} MiB")
        if not 1 <= self.vcpus <= 64:
            raise ValueError(f"bad vCPU count {self.vcpus}")
        if self.accel not in ACCELS:
            raise ValueError(f"bad accelerator {self.accel!r} (one of {', '.join(ACCELS)})")
        if not re.match(r"^[A-Za-z0-9_.-]+$", self.machine):
            raise ValueError(f"bad machine type {self.machine!r}")


@dataclass(frozen=True)
class VmStartSpec(Message):
    """What ``vm_start`` takes: a VM spec whose boot files may be left out for the test
    guest (the host uses its own cached image, booted with ``rate_mib_s``, ``wss_mib``
    and ``heartbeat_ms``); ``accel`` may be ``auto`` (the host's own probe decides);
    ``incoming`` (e.g. ``defer``) starts a migration target, which is not waited for."""

    name: str
    memory_mib: int = 256
    vcpus: int = 1
    #: None: the test guest's own kernel and initrd; a kernel given alone boots without an
    #: initrd
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    disk: IscsiDisk | FileDisk | NfsChainDisk | None = None
    machine: str = DEFAULT_MACHINE
    disk_bus: Literal["virtio", "nvme"] = "virtio"
    nic: Nic | None = None
    accel: Literal["auto", "tcg", "kvm"] = "auto"
    rate_mib_s: int = 0
    wss_mib: int = 64
    heartbeat_ms: int = 100
    incoming: str | None = None


# --- requests and replies --------------------------------------------------------------------

@dataclass(frozen=True)
class VmStart(Message):
    spec: VmStartSpec
    heartbeat_timeout: float = 60.0


@dataclass(frozen=True)
class VmStarted(Message):
    name: str
    pid: int | None
    run_dir: str
    first_heartbeat_s: float | None
    accel: str


@dataclass(frozen=True)
class VmName(Message):
    name: str


@dataclass(frozen=True)
class VmSnapshot(Message):
    """Request of ``vm_snapshot``: a running VM on a file datastore writes into ``layer``
    from now on (an empty qcow2 file whose backing file is the VM's top layer; QMP
    ``blockdev-snapshot``)."""

    name: str
    layer: NfsLayer


@dataclass(frozen=True)
class VmSnapshotted(Message):
    name: str
    #: the VM's chain now, top first
    disk: NfsChainDisk
    #: how long the guest's writes were held (the QMP commands), ms
    took_ms: float


@dataclass(frozen=True)
class VmStop(Message):
    name: str
    timeout: float = 10.0


@dataclass(frozen=True)
class VmStopped(Message):
    name: str
    pid: int | None
    returncode: int | None


@dataclass(frozen=True)
class HeartbeatAge(Message):
    counter: int
    age_s: float


@dataclass(frozen=True)
class VmStatus(Message):
    name: str
    #: QEMU's run state (``running``, ``paused``, ``postmigrate``...) or the process state
    state: str
    #: the QEMU process: new, starting, running, stopping, stopped, failed
    process: str
    pid: int | None
    returncode: int | None
    heartbeat: HeartbeatAge | None
    disk_counter: int | None
    first_heartbeat_s: float | None
    #: for checks from outside labctl: a free QMP monitor and the console log
    qmp_check_socket: str
    console_log: str


@dataclass(frozen=True)
class VmList(Message):
    vms: list[VmStatus] = field(default_factory=list)


@dataclass(frozen=True)
class ConsoleCommand(Message):
    name: str
    command: str
    timeout: float = 10.0


@dataclass(frozen=True)
class ConsoleAnswer(Message):
    answer: str


@dataclass(frozen=True)
class ConsoleTailRequest(Message):
    name: str
    lines: int = 50


@dataclass(frozen=True)
class ConsoleTail(Message):
    lines: list[str]


@dataclass(frozen=True)
class HostPing(Message):
    host: str
    pid: int
    qemu_version: str | None
    #: "kvm" or "tcg" once the host's own probe has answered, "probing" before
    accel: str
    #: the machine's MemAvailable in bytes (what a new QEMU can really get)
    mem_available: int | None
    #: the agent's time.monotonic() when it answered: every stamp an agent sends is on
    #: that clock, and two machines' clocks differ (the migration driver measures by how
    #: much); None from an agent that does not say
    monotonic: float | None = None


@dataclass(frozen=True)
class VmExited(Message):
    """Event ``vm_exited``: a VM's QEMU exited without being asked to."""

    host: str
    name: str
    returncode: int | None
    console_tail: list[str]


PING = Method("ping", Empty, HostPing)
VM_START = Method("vm_start", VmStart, VmStarted)
VM_STOP = Method("vm_stop", VmStop, VmStopped)
VM_STATUS = Method("vm_status", VmName, VmStatus)
VM_LIST = Method("vm_list", Empty, VmList)
VM_CONSOLE = Method("vm_console", ConsoleCommand, ConsoleAnswer)
VM_CONSOLE_TAIL = Method("vm_console_tail", ConsoleTailRequest, ConsoleTail)
VM_SNAPSHOT = Method("vm_snapshot", VmSnapshot, VmSnapshotted)
EVENT_VM_EXITED = "vm_exited"
