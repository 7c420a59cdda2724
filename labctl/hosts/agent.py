"""The host agent's VM registry: the workload VMs of one host and the RPC methods over them.

Agent side. The agent process (:mod:`labctl.agents.host`) runs inside the host's network
namespace (or on the machine an SSH provider reached), so QEMU runs there too. The
features that live on a host (its storage cache, the host side of live migration) are
handed this registry and use only its public methods: :meth:`HostAgent.vm`,
:meth:`~HostAgent.lock`, :meth:`~HostAgent.adopt`, :meth:`~HostAgent.forget`,
:meth:`~HostAgent.publish`, ...

State lives in the agent's own directory (``--state-dir``): ``agent.pid``,
``agent.log`` and ``vms/<vm>/`` (QEMU's pidfile, qmp.sock, console.sock, console.log,
qemu.log). Events pushed to subscribers: ``vm_exited``
(:class:`labctl.hosts.protocol.VmExited`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from labctl.core.chap import Chap, chap_for
from labctl.core.errors import LabError, LabStateError, MissingDependency, ProtocolError, VmError
from labctl.core.names import QEMU_BINARY
from labctl.core.proc import which
from labctl.core.rpc import Handler, RpcServer
from labctl.core.wire import Empty, Json, Message, handlers
from labctl.drivers.iscsi import wait_portal
from labctl.drivers.qemu import QemuVm, VmState, transient_open_failure
from labctl.guest import protocol as guest
from labctl.guest.image import ensure_guest_image
from labctl.hosts import protocol as p
from labctl.hosts.accel import boot_wait, kvm_usable
from labctl.hosts.accelcache import qemu_version

log = logging.getLogger("labctl.agents.host")

OPEN_TRIES = 4  # QEMU starts that may meet a transient open failure of an iSCSI disk

#: a QMP event of one of the host's VMs, as QemuVm records it
VmEventHook = Callable[[QemuVm, dict[str, Json]], None]


def _mem_available() -> int | None:
    """The machine's MemAvailable in bytes (what a new QEMU can really get), if known."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class HostAgent:
    """The VMs of one host and the RPC methods over them."""

    def __init__(self, state_dir: Path, host: str, lab_secret: bytes | None = None) -> None:
        if not p.NAME_RE.match(host):
            raise LabError(f"bad host name {host!r}", host=host)
        self.host = host
        self._lab_secret = lab_secret
        self.state_dir = state_dir
        self.server: RpcServer | None = None
        #: called with every QMP event of every VM of this host (e.g. the storage cache
        #: turns BLOCK_IO_ERROR into a storage event)
        self.vm_event_hooks: list[VmEventHook] = []
        self._vms: dict[str, QemuVm] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._accel_task: asyncio.Task[str] | None = None

    def handlers(self) -> dict[str, Handler]:
        return handlers(
            p.PING.serve(self.ping), p.VM_START.serve(self.vm_start),
            p.VM_STOP.serve(self.vm_stop), p.VM_STATUS.serve(self.vm_status),
            p.VM_LIST.serve(self.vm_list), p.VM_CONSOLE.serve(self.vm_console),
            p.VM_CONSOLE_TAIL.serve(self.vm_console_tail), p.VM_SNAPSHOT.serve(self.vm_snapshot))

    def chap(self, initiator_iqn: str, target_iqn: str) -> Chap | None:
        """This host's CHAP credentials at a target (None: the agent runs without a lab
        secret, as in unit tests, and logs in without CHAP)."""
        if self._lab_secret is None:
            return None
        return chap_for(self._lab_secret, initiator_iqn, target_iqn)

    def disk_chap(self, disk: p.Disk | None) -> Chap | None:
        """The credentials a VM's disk logs in with (None for a file)."""
        if not isinstance(disk, p.IscsiDisk):
            return None
        return self.chap(disk.initiator_iqn, disk.target_iqn)

    # -- the registry, for the features that live on this host ------------------------------
    def vm(self, name: str) -> QemuVm:
        """The VM called ``name``; LabStateError if this host has none."""
        if name not in self._vms:
            raise LabStateError(f"host {self.host} has no VM named {name!r}", host=self.host,
                                vm=name, known=sorted(self._vms))
        return self._vms[name]

    def vms(self) -> list[QemuVm]:
        return [self._vms[n] for n in sorted(self._vms)]

    def lock(self, name: str) -> asyncio.Lock:
        """The lock that serialises every change of VM ``name`` on this host."""
        return self._locks.setdefault(name, asyncio.Lock())

    def run_dir(self, name: str) -> Path:
        return self.state_dir / "vms" / name

    def adopt(self, vm: QemuVm, on_exit: Callable[[QemuVm], None] | None = None) -> None:
        """Register ``vm`` (before it starts): its QMP events go to the hooks, an unexpected
        exit to ``on_exit`` (default: publish ``vm_exited``)."""
        vm.on_unexpected_exit = on_exit or self.vm_exited
        vm.on_event = self._on_vm_event
        self._vms[vm.spec.name] = vm

    def forget(self, vm: QemuVm) -> None:
        """Drop ``vm`` from the registry if it is still the one registered under its name."""
        if self._vms.get(vm.spec.name) is vm:
            del self._vms[vm.spec.name]

    def keep_failed_logs(self, vm: QemuVm) -> Path | None:
        """Copy a failed VM's logs (QEMU's stderr, the console, its command line) to
        ``<state dir>/failed/<vm>-<UTC time>/`` before its run directory goes: kept with the
        lab until it is purged, named in the agent's log."""
        dest = self.state_dir / "failed" / (f"{vm.spec.name}-"
                                            f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
        try:
            dest.mkdir(parents=True, exist_ok=True)
            for name in ("qemu.log", "console.log", "argv.json"):
                src = vm.run_dir / name
                if src.is_file():
                    shutil.copy2(src, dest / name)
        except OSError as exc:
            log.warning("could not keep the logs of %s: %s", vm.spec.name, exc)
            return None
        log.warning("VM %s failed (%s): its logs are kept in %s", vm.spec.name,
                    vm.last_error() or f"status {vm.returncode}", dest)
        return dest

    def publish(self, event: str, data: Message) -> None:
        if self.server is not None:
            self.server.publish(event, data.to_wire())

    def vm_exited(self, vm: QemuVm) -> None:
        """Report that ``vm``'s QEMU exited without being asked to."""
        self.publish(p.EVENT_VM_EXITED, p.VmExited(host=self.host, name=vm.spec.name,
                                                   returncode=vm.returncode,
                                                   console_tail=vm.console_tail(10)))

    async def own_boot_files(self, spec: p.VmSpec) -> p.VmSpec:
        """``spec`` with this host's copy of the test guest where the paths it names (the
        source host's: another machine's directory, or the controller's cache) are not
        here. Every host of a lab boots the test guest the controller built (handed to a
        machine over SSH); a spec naming other boot files is left as it is."""
        if spec.kernel is None or spec.kernel.is_file():
            return spec
        image = await ensure_guest_image()
        theirs = (spec.kernel.name, spec.initrd.name if spec.initrd else None)
        if theirs != (image.kernel.name, image.initrd.name):
            return spec
        log.info("VM %s: the test guest's boot files are %s here (the source's %s)",
                 spec.name, image.kernel.parent, spec.kernel.parent)
        return spec.replace(kernel=image.kernel, initrd=image.initrd)

    def check_spec(self, spec: p.VmSpec, method: str) -> p.VmSpec:
        """``spec``, if its kernel and initrd are present on this host."""
        for path in (spec.kernel, spec.initrd):
            if path is not None and not path.is_file():
                raise LabError(f"{method}: {path} does not exist on host {self.host}")
        return spec

    def check_not_running(self, name: str) -> None:
        """Refuse a second QEMU for VM ``name`` here (call with its lock held)."""
        old = self._vms.get(name)
        if old is not None and old.state in (VmState.STARTING, VmState.RUNNING):
            raise LabStateError(f"VM {name} already runs on host {self.host}", vm=name,
                                pid=old.pid)

    async def accel(self) -> str:
        """"kvm" when this host's probe showed KVM really runs the test guest, else "tcg"."""
        return await asyncio.shield(self._accel_probe())

    def _accel_probe(self) -> asyncio.Task[str]:
        """The KVM probe, started on first use and run once."""
        if self._accel_task is None:
            self._accel_task = asyncio.ensure_future(self._probe_accel())
        return self._accel_task

    async def _probe_accel(self) -> str:
        try:
            return "kvm" if await asyncio.to_thread(kvm_usable) else "tcg"
        except LabError as exc:
            log.warning("KVM probe failed (%s): using TCG", exc)
            return "tcg"

    def _on_vm_event(self, vm: QemuVm, event: dict[str, Json]) -> None:
        for hook in self.vm_event_hooks:
            hook(vm, event)

    # -- RPC methods ------------------------------------------------------------------------
    async def ping(self, _: Empty) -> p.HostPing:
        try:
            version: str | None = await asyncio.to_thread(qemu_version)
        except MissingDependency:
            version = None
        probe = self._accel_probe()
        return p.HostPing(host=self.host, pid=os.getpid(), qemu_version=version,
                          accel=probe.result() if probe.done() else "probing",
                          mem_available=_mem_available(), monotonic=time.monotonic())

    async def vm_spec(self, start: p.VmStartSpec) -> p.VmSpec:
        """The complete spec of a ``vm_start`` request: the accelerator resolved, the test
        guest's own boot files filled in when left out."""
        if start.rate_mib_s < 0 or start.wss_mib < 1:
            raise LabError("vm_start: rate_mib_s and wss_mib must be integers (>= 0, >= 1)",
                           rate_mib_s=start.rate_mib_s, wss_mib=start.wss_mib)
        if not guest.valid_heartbeat_ms(start.heartbeat_ms):
            raise LabError(f"vm_start: heartbeat_ms must be an integer {guest.HEARTBEAT_MS_MIN}.."
                           f"{guest.HEARTBEAT_MS_MAX}", heartbeat_ms=start.heartbeat_ms)
        if start.incoming is not None and not start.incoming:
            raise LabError("vm_start: incoming must be a string such as 'defer'")
        accel = await self.accel() if start.accel == "auto" else start.accel
        which(QEMU_BINARY, "install qemu-system-x86 (scripts/setup.sh) on this host")
        kernel, initrd, append = start.kernel, start.initrd, start.append
        if kernel is None:
            image = await ensure_guest_image()
            kernel, initrd = image.kernel, initrd or image.initrd
            if append is None:
                append = guest.boot_args(start.rate_mib_s, start.wss_mib,
                                         extra=[f"labctl.hb_ms={start.heartbeat_ms}"])
        if append is None:
            raise ProtocolError("vm_start: a spec with its own kernel needs append too")
        try:
            spec = p.VmSpec(name=start.name, memory_mib=start.memory_mib, vcpus=start.vcpus,
                            kernel=kernel, initrd=initrd, append=append, disk=start.disk,
                            machine=start.machine, accel=accel, disk_bus=start.disk_bus,
                            nic=start.nic)
        except ValueError as exc:
            raise LabError(f"vm_start: bad VM spec: {exc}", spec=start.to_wire()) from exc
        return self.check_spec(spec, "vm_start")

    async def vm_start(self, req: p.VmStart) -> p.VmStarted:
        """Start a VM and wait (bounded) for its first heartbeat (not for a migration
        target, started with ``incoming``)."""
        if req.heartbeat_timeout <= 0:
            raise LabError("vm_start: heartbeat_timeout must be a positive number")
        spec = await self.vm_spec(req.spec)
        name = spec.name
        async with self.lock(name):
            self.check_not_running(name)
            vm = await self.start_qemu(spec, incoming=req.spec.incoming)
            try:
                if req.spec.incoming is None:
                    await vm.wait_heartbeat(boot_wait(spec.accel, req.heartbeat_timeout))
            except BaseException:
                self.keep_failed_logs(vm)
                await vm.stop(timeout=5.0)
                raise
            log.info("started VM %s (pid %s, first heartbeat after %s s)", name, vm.pid,
                     vm.first_heartbeat_s)
            return p.VmStarted(name=name, pid=vm.pid, run_dir=str(vm.run_dir),
                               first_heartbeat_s=vm.first_heartbeat_s, accel=spec.accel)

    async def start_qemu(self, spec: p.VmSpec, *, incoming: str | None = None,
                         blockdevs: list[str] | None = None,
                         on_exit: Callable[[QemuVm], None] | None = None,
                         wait_for_portal: bool = True, paused: bool = False) -> QemuVm:
        """QEMU for ``spec``, started and registered (see :meth:`adopt`; call with the VM's
        lock held). An iSCSI disk's portal must answer first (unless ``wait_for_portal`` is
        False: QEMU does not open the disk at start), and a failure to open the disk that
        QEMU reports as transient is retried a few times (a permanent one fails at once); a
        failed QEMU's logs are kept. ``vm start`` and a migration's incoming QEMU both start
        here."""
        for attempt in range(1, OPEN_TRIES + 1):
            if wait_for_portal and isinstance(spec.disk, p.IscsiDisk):
                await wait_portal(spec.disk.portal)
            vm = QemuVm(spec, self.run_dir(spec.name), chap=self.disk_chap(spec.disk))
            self.adopt(vm, on_exit=on_exit)
            try:
                await vm.start(incoming=incoming, blockdevs=blockdevs, paused=paused)
                return vm
            except VmError as exc:
                self.keep_failed_logs(vm)
                await vm.stop(timeout=5.0)
                self.forget(vm)
                why = exc.evidence.get("qemu_error")
                if attempt == OPEN_TRIES or not transient_open_failure(why):
                    raise
                log.warning("VM %s: QEMU could not open its disk (%s): retrying (%d/%d)",
                            spec.name, why, attempt, OPEN_TRIES)
                await asyncio.sleep(0.5 * attempt)
            except BaseException:
                self.keep_failed_logs(vm)
                await vm.stop(timeout=5.0)
                self.forget(vm)
                raise
        raise AssertionError("unreachable")

    async def vm_snapshot(self, req: p.VmSnapshot) -> p.VmSnapshotted:
        """The VM writes into ``req.layer`` from now on (see :meth:`QemuVm.snapshot_onto`)."""
        vm = self.vm(req.name)
        async with self.lock(req.name):
            took = await vm.snapshot_onto(req.layer)
        disk = vm.spec.disk
        assert isinstance(disk, p.NfsChainDisk)
        log.info("VM %s: snapshot, now writing %s (%.1f ms)", req.name, req.layer.path, took)
        return p.VmSnapshotted(name=req.name, disk=disk, took_ms=round(took, 2))

    async def vm_stop(self, req: p.VmStop) -> p.VmStopped:
        vm = self.vm(req.name)
        async with self.lock(req.name):
            await vm.stop(timeout=req.timeout)
            self.forget(vm)
        log.info("stopped VM %s (status %s)", req.name, vm.returncode)
        return p.VmStopped(name=req.name, pid=vm.pid, returncode=vm.returncode)

    async def vm_status(self, req: p.VmName) -> p.VmStatus:
        vm = self.vm(req.name)
        state = vm.state.value
        if vm.state is VmState.RUNNING:
            try:
                state = str((await vm.query_status(timeout=5.0))["status"])
            except VmError as exc:
                state = f"unknown ({exc.message})"
        hb = vm.last_heartbeat
        return p.VmStatus(
            name=req.name, state=state, process=vm.state.value, pid=vm.pid,
            returncode=vm.returncode,
            heartbeat=None if hb is None else p.HeartbeatAge(
                counter=hb.counter, age_s=round(time.monotonic() - hb.t, 3)),
            disk_counter=vm.disk_counter, first_heartbeat_s=vm.first_heartbeat_s,
            qmp_check_socket=str(vm.run_dir / "qmp-check.sock"),
            console_log=str(vm.run_dir / "console.log"))

    async def vm_list(self, _: Empty) -> p.VmList:
        return p.VmList(vms=[await self.vm_status(p.VmName(vm.spec.name)) for vm in self.vms()])

    async def vm_console(self, req: p.ConsoleCommand) -> p.ConsoleAnswer:
        vm = self.vm(req.name)
        try:
            command, answer = guest.check_command(req.command)
        except ValueError as exc:
            raise LabError(str(exc), command=req.command) from None
        return p.ConsoleAnswer(await vm.console_command(command, answer, req.timeout))

    async def vm_console_tail(self, req: p.ConsoleTailRequest) -> p.ConsoleTail:
        if not 0 < req.lines <= 2000:
            raise LabError("vm_console_tail: lines must be 1..2000")
        return p.ConsoleTail(self.vm(req.name).console_tail(req.lines))

    async def adopt_running(self) -> list[str]:
        """At start: take over the QEMUs an earlier agent of this host left running (it was
        killed): each run directory with a ``spec.json`` whose ``qemu.pid`` is a live QEMU of
        that directory. Returns the VMs adopted; their heartbeats are tracked again without
        a restart."""
        adopted = []
        for run_dir in sorted((self.state_dir / "vms").glob("*")):
            try:
                spec = p.VmSpec.from_wire(json.loads((run_dir / "spec.json").read_text()),
                                          f"{run_dir}/spec.json")
                pid = int((run_dir / "qemu.pid").read_text().split()[0])
            except (OSError, ValueError, IndexError, LabError):
                continue
            if spec.name != run_dir.name:
                continue
            vm = QemuVm(spec, run_dir)
            self.adopt(vm)
            try:
                await vm.adopt(pid)
            except VmError as exc:
                self.forget(vm)
                log.warning("could not adopt VM %s (QEMU pid %s): %s", spec.name, pid, exc)
                continue
            adopted.append(spec.name)
            log.info("adopted VM %s (QEMU pid %s) left by an earlier agent", spec.name, pid)
        return adopted

    async def stop_all(self) -> None:
        """Stop every VM: softly (QMP quit), then hard (QemuVm.stop does both)."""
        await asyncio.gather(*(vm.stop(timeout=10.0) for vm in self._vms.values()),
                             return_exceptions=True)
        self._vms.clear()
