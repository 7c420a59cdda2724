"""Workload VMs: QEMU processes driven over QMP, with the test guest's serial console.

* :class:`VmSpec` (with :class:`IscsiDisk` or :class:`FileDisk`) is pure
  description; :func:`build_argv` turns it into QEMU's argument list (never a
  shell string).
* :class:`QemuVm` runs one QEMU process: it starts it, connects QMP (event
  listener registered before anything is asked of QEMU) and the console
  socket, timestamps every console line, tracks the guest's heartbeat, answers
  console commands, and stops QEMU softly (QMP ``quit``) then hard (SIGTERM,
  SIGKILL to the PID it started), cleaning up in ``finally``.
* :func:`kvm_usable` says, honestly and once, whether ``-accel kvm`` boots the
  test guest here.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import hashlib
import ipaddress
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient
from qemu.qmp.error import QMPError
from qemu.qmp.qmp_client import ExecuteError

from labctl.core.chap import Chap
from labctl.core.errors import LabError, MissingDependency, VmError
from labctl.core.names import QEMU_BINARY
from labctl.core.proc import cmdline_names, run, which
from labctl.core.secret import write_private
from labctl.guest import protocol as guest
from labctl.hosts.protocol import FileDisk, IscsiDisk, NfsChainDisk, NfsLayer, VmSpec

log = logging.getLogger(__name__)

_SUN_PATH_MAX = 107
CONSOLE_RING = 2000
#: the QEMU ``secret`` object holding the disk's CHAP secret, and the 0600 file it is read
#: from at start (removed once QEMU answers QMP: from then on the secret lives in QEMU only)
CHAP_SECRET_ID = "disk0-chap"
CHAP_SECRET_FILE = "chap.secret"


#: QEMU's words for a LUN that could not be opened *for now* (the portal not reachable yet,
#: a session being torn down); an ACL refusal or a wrong LUN is permanent
TRANSIENT_OPEN = ("Can not reconnect", "No route to host", "Network is unreachable",
                  "Connection refused", "Connection timed out", "Failed to connect to")
PERMANENT_OPEN = ("Authorization failure", "Authentication failure",
                  "LOGICAL_UNIT_NOT_SUPPORTED", "Login failed", "not found")


def last_error_line(lines: list[str]) -> str | None:
    """The last line QEMU wrote that names an error, without QEMU's time stamp prefix."""
    for line in reversed(lines):
        text = line.strip()
        if not text:
            continue
        # "-msg timestamp=on": "2026-12-01T12:00:00.123456Z qemu-system-x86_64: ..."
        head, _, rest = text.partition(" ")
        if head[:4].isdigit() and "T" in head:
            text = rest
        if "qemu-system" in text or "error" in text.lower() or "fail" in text.lower():
            return text
    return None


def transient_open_failure(error: str | None) -> bool:
    """Whether QEMU's error is one a retry can cure (see TRANSIENT_OPEN)."""
    if not error or any(p in error for p in PERMANENT_OPEN):
        return False
    return any(p in error for p in TRANSIENT_OPEN)


def _opt(value: str) -> str:
    """Escape a value for QEMU's key=value,... option syntax (a comma is doubled)."""
    return value.replace(",", ",,")


def socket_arg(run_dir: Path, name: str) -> str:
    """The socket path QEMU is given: absolute when it fits in sun_path, else relative to
    ``run_dir`` (QEMU runs with ``run_dir`` as its working directory)."""
    full = str(run_dir.absolute() / name)
    return full if len(full) <= _SUN_PATH_MAX else name


def disk_node(disk: IscsiDisk | FileDisk, node_name: str,
              chap: Chap | None = None) -> dict[str, Any]:
    """The VM disk's protocol node as QMP ``blockdev-add`` options (the LUN through QEMU's
    own libiscsi driver, or a file), named ``node_name``. With ``chap``, the LUN is opened
    as ``chap.user`` with the password of the ``secret`` object :data:`CHAP_SECRET_ID`
    (QEMU's iscsi driver has no option for mutual CHAP: the target is not checked)."""
    if isinstance(disk, IscsiDisk):
        auth = {} if chap is None else {"user": chap.user, "password-secret": CHAP_SECRET_ID}
        return {"driver": "iscsi", "transport": "tcp", "portal": disk.portal,
                "target": disk.target_iqn, "lun": disk.lun,
                "initiator-name": disk.initiator_iqn, **auth, "node-name": node_name,
                "cache": {"direct": True}}
    return {"driver": "file", "filename": str(disk.path.absolute()), "node-name": node_name,
            "cache": {"direct": disk.direct}}


def chain_nodes(disk: NfsChainDisk, top: str = "disk0") -> list[dict[str, Any]]:
    """A chain on NFS as ``blockdev-add`` options, base first: per layer an ``nfs`` protocol
    node and a format node whose backing is the node below (the base's: none); the top's
    format node is named ``top``."""
    nodes: list[dict[str, Any]] = []
    below: str | None = None
    for i, layer in enumerate(reversed(disk.layers)):
        name = top if i == len(disk.layers) - 1 else f"{top}-l{len(disk.layers) - 1 - i}"
        nodes.append(nfs_node(disk.server, layer.path, f"{name}-file"))
        fmt: dict[str, Any] = {"node-name": name, "driver": layer.format, "file": f"{name}-file"}
        if layer.format == "qcow2":
            fmt["backing"] = below
        nodes.append(fmt)
        below = name
    return nodes


def nfs_node(server: str, path: str, node_name: str) -> dict[str, Any]:
    return {"node-name": node_name, "driver": "nfs",
            "server": {"type": "inet", "host": server}, "path": path}


async def nfs_image_size(server: str, path: str) -> tuple[int | None, str | None]:
    """(virtual size, None) of the image at ``path`` on NFS server ``server`` as QEMU's own
    NFS client reads it from this host (``qemu-img info``), or (None, why not)."""
    url = f"nfs://{server}{path}"
    res = await run(["qemu-img", "info", "--output=json", "-U", url], check=False, timeout=30,
                    what=f"qemu-img info {url}")
    if res.ok:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            return int(json.loads(res.stdout)["virtual-size"]), None
    lines = (res.stderr or res.stdout).strip().splitlines()
    return None, lines[-1] if lines else f"qemu-img info exited with status {res.returncode}"


def blockdev_arg(node: dict[str, Any]) -> str:
    """The same node as a ``-blockdev`` key=value string."""
    def val(v: Any) -> str:
        return ("on" if v else "off") if isinstance(v, bool) else _opt(str(v))

    parts = []
    for k, v in node.items():
        if isinstance(v, dict):
            parts += [f"{k}.{kk}={val(vv)}" for kk, vv in v.items()]
        else:
            parts.append(f"{k}={val(v)}")
    return ",".join(parts)


def tap_name(vm: str) -> str:
    """The tap QEMU makes for VM ``vm``'s NIC in its host's namespace (it goes with QEMU)."""
    return "lt" + hashlib.sha1(vm.encode()).hexdigest()[:10]


async def route_tap(ifname: str, address: ipaddress.IPv4Address, alias: str) -> None:
    """A VM's tap (QEMU made it, in this process's namespace) routed: up, labelled, a /32
    route to the guest's ``address`` through it, forwarding on and proxy ARP on every link
    of the namespace, so its other links answer ARP for the guest on the site's bridge and
    the tap answers the guest for everything else (the host is its router)."""
    await run(["ip", "link", "set", "dev", ifname, "up", "alias", alias], timeout=10,
              what=f"ip link set {ifname} up")
    await run(["ip", "route", "replace", f"{address}/32", "dev", ifname], timeout=10,
              what=f"ip route replace {address}/32 dev {ifname}")
    try:
        for knob in ("ip_forward", "conf/all/proxy_arp", f"conf/{ifname}/proxy_arp"):
            Path("/proc/sys/net/ipv4", knob).write_text("1")
    except OSError as exc:
        raise LabError(f"cannot turn on forwarding and proxy ARP for {ifname}: {exc}",
                       ifname=ifname) from exc


def build_argv(spec: VmSpec, run_dir: Path, incoming: str | None = None,
               qemu: str = QEMU_BINARY, blockdevs: list[str] | None = None,
               chap: Chap | None = None, paused: bool = False) -> list[str]:
    """QEMU's argument list for ``spec``, with its sockets and files in ``run_dir``.

    ``incoming`` is passed to ``-incoming`` (e.g. ``"defer"`` for a migration target). A
    target also gets ``-mem-prealloc``: its guest RAM is faulted in while it is being
    prepared, before the source is asked, instead of page by page as the stream arrives
    (measured: fresh RAM made the same migration take 100 ms or 400-580 ms, by chance).
    ``blockdevs``, when given, replaces the disk's own ``-blockdev`` node: a block graph
    whose top node is ``disk0`` (a migration target uses this to put a placeholder there).
    ``chap`` (for an iSCSI disk) adds the ``secret`` object read from
    :data:`CHAP_SECRET_FILE` in ``run_dir`` and logs in with it: the secret itself is never
    in the argument list.
    """
    run_dir = run_dir.absolute()
    argv = [
        qemu, "-nodefaults", "-display", "none", "-no-user-config",
        "-name", f"{spec.name},process=labctl-{spec.name}",
        "-machine", spec.machine,
        "-accel", spec.accel,
        "-cpu", "max" if spec.accel == "tcg" else "host",
        "-m", str(spec.memory_mib),
        "-smp", str(spec.vcpus),
        "-kernel", str(spec.kernel),
        *(["-initrd", str(spec.initrd)] if spec.initrd is not None else []),
        "-append", spec.append,
        "-chardev", f"socket,id=qmp0,path={_opt(socket_arg(run_dir, 'qmp.sock'))},"
                    "server=on,wait=off",
        "-mon", "chardev=qmp0,mode=control",
        # a second QMP monitor for outside checks (tests, an operator's qmp-shell): a QMP
        # socket serves one client at a time and the host agent holds qmp.sock
        "-chardev", f"socket,id=qmp1,path={_opt(socket_arg(run_dir, 'qmp-check.sock'))},"
                    "server=on,wait=off",
        "-mon", "chardev=qmp1,mode=control",
        "-chardev", f"socket,id=con0,path={_opt(socket_arg(run_dir, 'console.sock'))},"
                    f"server=on,wait=off,logfile={_opt(str(run_dir / 'console.log'))},"
                    "logappend=on",
        "-serial", "chardev:con0",
        "-pidfile", str(run_dir / "qemu.pid"),
        "-msg", "timestamp=on",
    ]
    disk = spec.disk
    if chap is not None and isinstance(disk, IscsiDisk):
        argv += ["-object", f"secret,id={CHAP_SECRET_ID},format=raw,"
                            f"file={_opt(str(run_dir / CHAP_SECRET_FILE))}"]
    else:
        chap = None
    if disk is not None and blockdevs is not None:
        for node in blockdevs:
            argv += ["-blockdev", node]
    elif isinstance(disk, NfsChainDisk):
        for chain_node in chain_nodes(disk):
            argv += ["-blockdev", json.dumps(chain_node, separators=(",", ":"))]
    elif disk is not None:
        argv += ["-blockdev", blockdev_arg(disk_node(disk, "disk0", chap))]
    if disk is not None and spec.disk_bus == "nvme":
        argv += ["-device", "nvme,drive=disk0,id=vda,serial=labctl-root"]
    elif disk is not None:
        argv += ["-device", "virtio-blk-pci,drive=disk0,id=vda"]
    if spec.nic is not None:
        argv += ["-netdev", f"tap,id=net0,ifname={tap_name(spec.name)},script=no,downscript=no",
                 "-device", f"virtio-net-pci,netdev=net0,mac={spec.nic.mac},romfile="]
    if incoming is not None:
        argv += ["-mem-prealloc", "-incoming", incoming]
    if paused:  # it waits for "cont" (an incoming VM whose disk is still an NBD export)
        argv += ["-S"]
    return argv


# ---- a running VM -------------------------------------------------------------

class VmState(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"  # the QEMU process runs (the guest may be paused: see query_status)
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"  # QEMU died without being asked to


@dataclass(frozen=True)
class ConsoleLine:
    t: float  # time.monotonic() on arrival
    text: str


@dataclass(frozen=True)
class Heartbeat:
    counter: int
    disk_counter: int | None  # None: the guest has no disk
    t: float  # time.monotonic() on arrival


@dataclass
class _Waiter:
    pred: Callable[[ConsoleLine], bool]
    fut: asyncio.Future[ConsoleLine] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class _Adopted:
    """A QEMU this process did not start (an earlier host agent did, and died): its exit is
    seen through a pidfd; its exit status is not ours to learn, so it reads -1."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._fd = os.pidfd_open(pid)
        self._exited = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._on_exit)

    def _on_exit(self) -> None:
        self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self.returncode = -1
        self._exited.set()

    async def wait(self) -> int:
        await self._exited.wait()
        return -1


class QemuVm:
    """One QEMU process. Construct, then ``await start()``; always ``await stop()``."""

    def __init__(self, spec: VmSpec, run_dir: Path, qemu: str = QEMU_BINARY,
                 chap: Chap | None = None) -> None:
        self.spec = spec
        self.run_dir = run_dir.absolute()
        self.qemu = qemu
        #: CHAP credentials for an iSCSI disk (see :func:`build_argv`)
        self.chap = chap if isinstance(spec.disk, IscsiDisk) else None
        self.state = VmState.NEW
        self.pid: int | None = None
        self.returncode: int | None = None
        self.started_at: float | None = None
        self.first_heartbeat_s: float | None = None
        self.last_heartbeat: Heartbeat | None = None
        self.disk_counter: int | None = None
        self.lines: collections.deque[ConsoleLine] = collections.deque(maxlen=CONSOLE_RING)
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=500)
        self.qmp = QMPClient(spec.name)
        self._proc: asyncio.subprocess.Process | _Adopted | None = None
        self._keep_sockets = False  # an adoption that failed leaves the QEMU as it was
        self._con_sock: socket.socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._waiters: list[_Waiter] = []
        self._dead: asyncio.Event | None = None
        self._console_lock: asyncio.Lock | None = None
        self._events = EventListener()
        self._dirfds: list[int] = []
        #: called once if QEMU exits without being asked to (e.g. to report an event)
        self.on_unexpected_exit: Callable[[QemuVm], None] | None = None
        #: called with each QMP event as it arrives (after it is recorded in ``events``)
        self.on_event: Callable[[QemuVm, dict[str, Any]], None] | None = None

    # -- paths
    @property
    def qmp_path(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def console_path(self) -> Path:
        return self.run_dir / "console.sock"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "qemu.log"

    # -- evidence
    def console_tail(self, n: int = 30) -> list[str]:
        return [ln.text for ln in list(self.lines)[-n:]]

    def stderr_tail(self, n: int = 30) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()[-n:]
        except OSError:
            return []

    def _error(self, message: str, **more: Any) -> VmError:
        return VmError(f"{self.spec.name}: {message}", vm=self.spec.name, pid=self.pid,
                       returncode=self.returncode, state=self.state.value,
                       console_tail=self.console_tail(), stderr=self.stderr_tail(), **more)

    # -- start
    async def start(self, incoming: str | None = None, timeout: float = 30.0,
                    blockdevs: list[str] | None = None, paused: bool = False) -> None:
        """Launch QEMU and connect QMP and the console. Does not wait for the guest:
        see :meth:`wait_heartbeat`. Raises VmError (QEMU cleaned up) on failure."""
        if self.state is not VmState.NEW:
            raise self._error(f"cannot start a VM in state {self.state.value}")
        try:
            qemu_path = which(self.qemu, "install qemu-system-x86 (scripts/setup.sh)")
        except MissingDependency:
            self.state = VmState.FAILED
            raise
        self.state = VmState.STARTING
        self._dead = asyncio.Event()
        self._console_lock = asyncio.Lock()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for name in ("qmp.sock", "console.sock", "qemu.pid"):
            (self.run_dir / name).unlink(missing_ok=True)
        argv = build_argv(self.spec, self.run_dir, incoming, qemu=qemu_path, blockdevs=blockdevs,
                          chap=self.chap, paused=paused)
        (self.run_dir / "argv.json").write_text(json.dumps(argv, indent=1) + "\n")
        secret_file = self.run_dir / CHAP_SECRET_FILE
        secret_file.unlink(missing_ok=True)
        if self.chap is not None:
            write_private(secret_file, self.chap.password.encode())
        # what a later agent needs to adopt this QEMU if this one dies
        self.save_spec()
        try:
            with open(self.log_path, "ab") as logf:
                self.started_at = time.monotonic()
                self._proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=logf,
                    cwd=self.run_dir, start_new_session=True)
            self.pid = self._proc.pid
            self._tasks.append(asyncio.create_task(self._watch_process()))
            async with asyncio.timeout(timeout):
                await self._connect_qmp()
                secret_file.unlink(missing_ok=True)  # QEMU has read it: it answers QMP
                await self._connect_console()
                if self.spec.nic is not None:  # QEMU made the tap: route the guest to it
                    await route_tap(tap_name(self.spec.name),
                                    ipaddress.IPv4Interface(self.spec.nic.address).ip,
                                    f"labctl-vm:{self.spec.name}")
        except BaseException as exc:
            secret_file.unlink(missing_ok=True)
            err = exc
            if isinstance(exc, TimeoutError):
                err = self._error(f"QEMU did not open its sockets within {timeout:g} s")
            elif isinstance(exc, OSError | QMPError):
                err = self._error(f"cannot start QEMU: {exc}")
            await self._teardown(hard=True)
            if self.state is not VmState.FAILED:
                self.state = VmState.FAILED
            if err is exc:
                raise
            raise err from exc
        self.state = VmState.RUNNING

    async def _sock_ready(self, path: Path) -> str:
        """Wait for QEMU to create ``path``; return an address short enough to connect to."""
        while not path.exists():
            self._check_alive()
            await asyncio.sleep(0.02)
        full = str(path)
        if len(full) <= _SUN_PATH_MAX:
            return full
        # too long for sun_path: reach it through our own open directory descriptor
        fd = os.open(path.parent, os.O_PATH)
        self._dirfds.append(fd)
        return f"/proc/self/fd/{fd}/{path.name}"

    async def _connect_qmp(self) -> None:
        addr = await self._sock_ready(self.qmp_path)
        self.qmp.register_listener(self._events)  # before anything can cause an event
        self._tasks.append(asyncio.create_task(self._watch_events()))
        while True:
            try:
                await self.qmp.connect(addr)
                return
            except QMPError:
                self._check_alive()
                await asyncio.sleep(0.05)

    async def _connect_console(self) -> None:
        addr = await self._sock_ready(self.console_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await asyncio.to_thread(sock.connect, addr)
        except OSError:
            sock.close()
            raise
        self._con_sock = sock
        # A thread of its own reads the console and stamps each line the moment it arrives,
        # so a busy event loop (QMP events at switchover) does not delay the heartbeat stamps.
        threading.Thread(target=self._read_console, args=(sock, asyncio.get_running_loop()),
                         name=f"console-{self.spec.name}", daemon=True).start()

    async def adopt(self, pid: int, timeout: float = 10.0) -> None:
        """Take over a running QEMU of this VM that an earlier agent started: connect its QMP
        and console sockets and track its heartbeat again. VmError if ``pid`` is not this
        VM's QEMU or it does not answer; the QEMU is left as it was then."""
        if self.state is not VmState.NEW:
            raise self._error(f"cannot adopt into a VM in state {self.state.value}")
        if not cmdline_names(pid, self.run_dir):
            raise self._error(f"process {pid} is not the QEMU of this VM (its command line "
                              f"does not name {self.run_dir})")
        self.state = VmState.STARTING
        self._dead = asyncio.Event()
        self._console_lock = asyncio.Lock()
        self._proc = _Adopted(pid)
        self.pid = pid
        self.started_at = time.monotonic()
        self._tasks.append(asyncio.create_task(self._watch_process()))
        try:
            async with asyncio.timeout(timeout):
                await self._connect_qmp()
                await self._connect_console()
        except BaseException as exc:
            self._keep_sockets = True
            await self._teardown(hard=False)
            self.state = VmState.FAILED
            if isinstance(exc, LabError):
                raise
            raise self._error(f"cannot adopt QEMU pid {pid}: {exc!r}") from exc
        self.state = VmState.RUNNING
        log.info("%s: adopted QEMU pid %s", self.spec.name, pid)

    def last_error(self) -> str | None:
        """QEMU's own last error line from its log (without its time stamp), if any."""
        return last_error_line(self.stderr_tail(40))

    def _check_alive(self) -> None:
        if self._proc is not None and self._proc.returncode is not None:
            self.returncode = self._proc.returncode
            why = self.last_error()
            raise self._error(f"QEMU exited with status {self.returncode}"
                              + (f": {why}" if why else ""), qemu_error=why)

    async def _watch_process(self) -> None:
        assert self._proc is not None and self._dead is not None
        rc = await self._proc.wait()
        self.returncode = rc
        if self.state in (VmState.STARTING, VmState.RUNNING):
            self.state = VmState.FAILED
            log.warning("%s: QEMU (pid %s) exited unexpectedly with status %s",
                        self.spec.name, self.pid, rc)
            if self.on_unexpected_exit is not None:
                try:
                    self.on_unexpected_exit(self)
                except Exception:
                    log.exception("%s: exit callback failed", self.spec.name)
        self._dead.set()
        await asyncio.sleep(0.2)  # let the console reader drain the last lines
        for w in self._waiters:
            if not w.fut.done():
                w.fut.set_exception(self._error(f"QEMU exited with status {rc}"))

    async def _watch_events(self) -> None:
        async for event in self._events:
            t = time.monotonic()
            ts = event.get("timestamp")
            # "t": arrival here (time.monotonic()); "qemu_time": QEMU's own stamp (CLOCK_REALTIME)
            rec = {"t": t, "event": event.get("event"), "data": event.get("data", {}),
                   "qemu_time": float(ts["seconds"]) + float(ts["microseconds"]) / 1e6
                   if isinstance(ts, dict) and "seconds" in ts else None}
            self.events.append(rec)
            if self.on_event is not None:
                try:
                    self.on_event(self, rec)
                except Exception:
                    log.exception("%s: event callback failed", self.spec.name)

    def _read_console(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        buf = b""
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            t = time.monotonic()
            *lines, buf = (buf + data).split(b"\n")
            for raw in lines:
                line = ConsoleLine(t, raw.decode(errors="replace").rstrip("\r"))
                try:
                    loop.call_soon_threadsafe(self._on_line, line)
                except RuntimeError:  # the loop is gone
                    return

    def _on_line(self, line: ConsoleLine) -> None:
        self.lines.append(line)
        beat = guest.parse_heartbeat(line.text)
        if beat is not None:
            hb = Heartbeat(beat.counter, beat.disk_counter, line.t)
            if self.last_heartbeat is None and self.started_at is not None:
                self.first_heartbeat_s = line.t - self.started_at
            self.last_heartbeat = hb
            self.disk_counter = hb.disk_counter
        else:
            counter = guest.parse_disk_counter(line.text)
            if counter is not None:
                self.disk_counter = counter
        for w in list(self._waiters):
            if not w.fut.done() and w.pred(line):
                w.fut.set_result(line)

    # -- waiting on the console
    async def wait_line(self, pred: Callable[[ConsoleLine], bool], timeout: float,
                        what: str) -> ConsoleLine:
        """The next console line for which ``pred`` holds. Raises VmError on timeout or
        if QEMU dies meanwhile."""
        if self._dead is None:
            raise self._error("the VM was never started")
        if self._dead.is_set():
            raise self._error(f"QEMU is not running (waiting for {what})")
        w = _Waiter(pred)
        self._waiters.append(w)
        try:
            async with asyncio.timeout(timeout):
                return await w.fut
        except TimeoutError:
            raise self._error(f"no {what} within {timeout:g} s", waited_for=what) from None
        finally:
            self._waiters.remove(w)

    async def wait_heartbeat(self, timeout: float = 10.0, after: int | None = None) -> Heartbeat:
        """The next heartbeat (with a counter above ``after`` when given)."""
        def is_hb(line: ConsoleLine) -> bool:
            beat = guest.parse_heartbeat(line.text)
            return beat is not None and (after is None or beat.counter > after)
        await self.wait_line(is_hb, timeout, "heartbeat")
        assert self.last_heartbeat is not None
        return self.last_heartbeat

    async def console_command(self, command: str, expect_prefix: str | tuple[str, ...],
                              timeout: float = 10.0) -> str:
        """Send ``command`` to the guest and return its answer line (one starting with
        ``expect_prefix``). An ``ERR`` answer raises VmError."""
        if "\n" in command or "\r" in command or not command.strip():
            raise ValueError(f"bad console command {command!r}")
        if self._con_sock is None or self._console_lock is None:
            raise self._error("the console is not connected")
        prefixes = (expect_prefix,) if isinstance(expect_prefix, str) else expect_prefix
        async with self._console_lock:
            w = _Waiter(lambda ln: ln.text.startswith((*prefixes, *guest.ERROR_PREFIXES)))
            self._waiters.append(w)
            try:
                self._con_sock.sendall(command.encode() + b"\n")  # a few bytes: never blocks
                async with asyncio.timeout(timeout):
                    line = await w.fut
            except TimeoutError:
                raise self._error(f"no answer to console command {command!r} within "
                                  f"{timeout:g} s", command=command) from None
            except OSError as exc:
                raise self._error(f"console lost during {command!r}: {exc}") from exc
            finally:
                self._waiters.remove(w)
        if not line.text.startswith(prefixes):
            raise self._error(f"guest refused {command!r}: {line.text}", command=command,
                              answer=line.text)
        return line.text

    # -- QMP
    async def snapshot_onto(self, layer: NfsLayer) -> float:
        """External snapshot of a VM on an NFS chain: ``layer`` (an empty qcow2 file backed
        by the current top) is opened and becomes the active layer (QMP ``blockdev-add`` then
        ``blockdev-snapshot``); the spec, and its copy in ``spec.json``, say so. Returns how
        long the snapshot itself took, ms."""
        disk = self.spec.disk
        if not isinstance(disk, NfsChainDisk):
            raise self._error("a snapshot needs a disk on a file datastore")
        top = await self._active_node()
        name = f"snap-{uuid.uuid4().hex[:12]}"
        try:
            await self.execute("blockdev-add", nfs_node(disk.server, layer.path,
                                                        f"{name}-file"))
            await self.execute("blockdev-add", {"node-name": name, "driver": "qcow2",
                                                "file": f"{name}-file", "backing": None})
            t0 = time.monotonic()
            await self.execute("blockdev-snapshot", {"node": top, "overlay": name})
        except VmError:
            for node in (name, f"{name}-file"):
                with contextlib.suppress(VmError):
                    await self.execute("blockdev-del", {"node-name": node})
            raise
        # switched: from here on nothing may fail the call (the caller would undo it)
        took = (time.monotonic() - t0) * 1000
        self.spec = self.spec.replace(disk=disk.replace(layers=[layer, *disk.layers]))
        try:
            self.save_spec()
        except OSError as exc:
            log.error("%s: could not record the new top layer in spec.json: %s",
                      self.spec.name, exc)
        return took

    def save_spec(self) -> None:
        """``spec.json`` in the run directory (how a restarted host agent adopts the VM),
        replaced atomically."""
        tmp = self.run_dir / "spec.json.tmp"
        tmp.write_text(json.dumps(self.spec.to_wire(), indent=1) + "\n")
        os.replace(tmp, self.run_dir / "spec.json")

    async def _active_node(self) -> str:
        """The node the guest's disk (device ``vda``) writes to now."""
        for dev in await self.execute("query-block"):
            if "/vda/" in str(dev.get("qdev", "")) or dev.get("device") == "vda":
                inserted = dev.get("inserted") or {}
                if inserted.get("node-name"):
                    return str(inserted["node-name"])
        raise self._error("no disk device vda in query-block")

    async def execute(self, cmd: str, args: dict[str, Any] | None = None,
                      timeout: float = 30.0) -> Any:
        """Run a QMP command; errors become VmError with what was sent and received."""
        try:
            async with asyncio.timeout(timeout):
                return await self.qmp.execute(cmd, args)
        except ExecuteError as exc:
            raise self._error(f"QMP {cmd} failed: {exc.error.error.desc}", qmp_sent=str(exc.sent),
                              qmp_received=str(exc.received)) from exc
        except TimeoutError:
            raise self._error(f"QMP {cmd} gave no answer within {timeout:g} s") from None
        except (QMPError, OSError, EOFError) as exc:
            self._check_alive()
            raise self._error(f"QMP {cmd}: {exc!r}") from exc

    async def query_status(self, timeout: float = 30.0) -> dict[str, Any]:
        """QMP ``query-status``: {"status": "running"|"paused"|..., "running": bool, ...}."""
        res = await self.execute("query-status", timeout=timeout)
        assert isinstance(res, dict)
        return res

    # -- stop
    async def stop(self, timeout: float = 10.0) -> None:
        """Quit QEMU softly (QMP ``quit``), then SIGTERM, then SIGKILL. Idempotent."""
        if self.state in (VmState.NEW, VmState.STOPPED):
            self.state = VmState.STOPPED
            return
        if self.state is not VmState.FAILED:
            self.state = VmState.STOPPING
        try:
            if self._proc is not None and self._proc.returncode is None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(min(timeout, 5.0)):
                        await self.qmp.execute("quit")
                await self._wait_exit(timeout)
        finally:
            await self._teardown(hard=True)
            if self.state is VmState.STOPPING:
                self.state = VmState.STOPPED

    async def _wait_exit(self, timeout: float) -> bool:
        if self._proc is None:
            return True
        try:
            async with asyncio.timeout(timeout):
                await self._proc.wait()
            return True
        except TimeoutError:
            return False

    async def _teardown(self, hard: bool) -> None:
        """Make sure our QEMU is gone and every resource is released."""
        proc = self._proc
        try:
            if proc is not None and proc.returncode is None and hard:
                for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, sig)  # the PID we started, nothing else
                    if await self._wait_exit(wait):
                        break
                    log.warning("%s: QEMU pid %s ignored %s", self.spec.name, proc.pid, sig.name)
        finally:
            if proc is not None and proc.returncode is not None:
                self.returncode = proc.returncode
            with contextlib.suppress(Exception):
                await self.qmp.disconnect()
            with contextlib.suppress(Exception):
                self.qmp.remove_listener(self._events)
            if self._con_sock is not None:
                with contextlib.suppress(OSError):
                    self._con_sock.shutdown(socket.SHUT_RDWR)  # ends the reader thread
                self._con_sock.close()
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(BaseException):
                    await task
            self._tasks.clear()
            for fd in self._dirfds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._dirfds = []
            for name in (() if self._keep_sockets else
                         ("qmp.sock", "qmp-check.sock", "console.sock")):
                (self.run_dir / name).unlink(missing_ok=True)

    async def __aenter__(self) -> QemuVm:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
