"""The host agent's side of a live migration (registered into the host agent's handler table).

Destination (``mig_prepare`` ... ``mig_dest_finish`` / ``mig_dest_abort``):

* ``mig_prepare`` starts QEMU with ``-incoming defer`` and the source's exact machine and
  devices. The disk's block graph is ``raw`` (node ``disk0``, what the virtio-blk device uses)
  over a protocol node. With *early* storage preparation the protocol node is the real disk
  (iSCSI LUN / file), the host-level datastore check (LUN scan: NAA and capacity through
  libiscsi) is done, and QEMU's own open node is read (``qemu-io`` on the inactive node;
  sector 0 holds the guest's disk counter record) -- all before the source is asked to
  migrate. With *late* preparation the protocol node is a ``null-co`` placeholder of the
  same size, and all that work happens in ``mig_late_storage``, called in the
  ``pause-before-switchover`` window: ``blockdev-add`` of the real node, ``blockdev-reopen``
  of ``disk0`` onto it, the read check, the LUN scan.
* With ``export_disk`` (storage that is not shared: another site) the opened disk is also
  an NBD export of the incoming QEMU (``nbd-server-start``, ``block-export-add``,
  writable): the source's block mirror writes into it. The export goes in
  ``mig_dest_finish``.
* The incoming VM holds a *lease*: the controller renews it while it drives the migration;
  if it lapses (controller gone, link cut) before the migration completed, the agent drops
  the incoming QEMU and its run directory by itself.

Source (``mig_source_info``, ``mig_start``, ``mig_status``, ``mig_set``, ``mig_continue``,
``mig_postcopy``, ``mig_cancel``, ``mig_source_finish``): with ``mirror_to`` the job first
mirrors the disk into the destination's NBD export (``blockdev-mirror``, status ``mirror``)
and sends ``migrate`` once the mirror is in sync (``BLOCK_JOB_READY``); the mirror is
completed in the pre-switchover window (``mig_mirror_complete``: ``block-job-cancel`` of a
ready job, which waits until the target has every write). The job registers its QMP event
listener before any command, records a pass (``query-migrate`` right after each
``MIGRATION_PASS``), every status change with its time (``time.monotonic()``, the same
clock as the console timestamps), and pushes ``migration`` events to RPC subscribers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import re
import shutil
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from qemu.qmp import EventListener

from labctl.core.errors import LabError, LabStateError, MigrationError, VmError
from labctl.core.rpc import Handler
from labctl.core.wire import Json, handlers
from labctl.drivers.qemu import (
    QemuVm,
    VmState,
    blockdev_arg,
    chain_nodes,
    disk_node,
    nfs_image_size,
)
from labctl.guest.protocol import decode_disk_record, parse_heartbeat
from labctl.hosts.agent import HostAgent
from labctl.hosts.protocol import (
    FileDisk,
    IscsiDisk,
    NfsChainDisk,
    VmName,
    VmSpec,
    VmStop,
    VmStopped,
)
from labctl.migration import protocol as mp
from labctl.migration.protocol import (
    EVENT_PROGRESS,
    FINAL_STATUSES,
    StorageMode,
    qmp_float,
    qmp_get,
    qmp_int,
    qmp_str,
)

DiskProbe = Callable[[IscsiDisk], Awaitable[tuple[str, int]]]
#: how long a final status waits for the event follower to take in the last passes
FOLLOW_CATCH_UP_S = 2.0
log = logging.getLogger("labctl.migration.hostside")

FINAL = FINAL_STATUSES
#: capabilities that must be set on the destination too, before migrate-incoming
DEST_CAPS = ("multifd", "postcopy-ram")
DEST_PARAMS = ("multifd-channels",)
_HEX_LINE = re.compile(r"^[0-9a-f]{8}:((?:\s+[0-9a-f]{2}){1,16})")
#: QEMU's own switchover checkpoints (QEMU >= 8.2, "log" trace backend: to QEMU's stderr)
CHECKPOINT_EVENT = "vmstate_downtime_checkpoint"
_CHECKPOINT_LINE = re.compile(r"^\d+@(\d+\.\d+):vmstate_downtime_checkpoint\s+(\S+)")


def parse_qemu_io_dump(text: str) -> tuple[bytes, str | None]:
    """Bytes from ``qemu-io read -v`` output, and the error line if the read failed."""
    data = bytearray()
    for line in text.splitlines():
        if "failed" in line:
            return bytes(data), line.strip()
        m = _HEX_LINE.match(line)
        if m:
            data += bytes(int(x, 16) for x in m.group(1).split())
    return bytes(data), None


def _now() -> float:
    return time.monotonic()


def _mono(realtime: float | None) -> float | None:
    """A CLOCK_REALTIME stamp (QEMU's event and trace stamps) on the time.monotonic() axis."""
    return None if realtime is None else realtime - (time.time() - time.monotonic())


async def enable_checkpoints(vm: QemuVm) -> int | None:
    """Turn on QEMU's switchover checkpoint trace; the offset in QEMU's log where its lines
    will start, or None if this QEMU cannot trace (then there is no breakdown, nothing else)."""
    try:
        offset = vm.log_path.stat().st_size
    except OSError:
        offset = 0
    try:
        await vm.execute("trace-event-set-state", {"name": CHECKPOINT_EVENT, "enable": True},
                         timeout=5.0)
    except VmError as exc:
        log.info("%s: no switchover checkpoints: %s", vm.spec.name, exc.message)
        return None
    return offset


def parse_checkpoints(text: str) -> dict[str, float]:
    """``{checkpoint: CLOCK_REALTIME seconds}`` from QEMU's trace lines (first of each)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _CHECKPOINT_LINE.match(line)
        if m:
            out.setdefault(m.group(2), float(m.group(1)))
    return out


def read_checkpoints(vm: QemuVm, offset: int | None) -> dict[str, float]:
    """QEMU's switchover checkpoints logged since ``offset``, on the time.monotonic() axis."""
    if offset is None:
        return {}
    try:
        with open(vm.log_path, "rb") as f:
            f.seek(offset)
            text = f.read(1 << 20).decode(errors="replace")
    except OSError:
        return {}
    shift = time.time() - time.monotonic()
    return {k: v - shift for k, v in parse_checkpoints(text).items()}


def event_time(vm: QemuVm, name: str, after: float) -> tuple[float | None, float | None]:
    """(arrival at this agent, QEMU's own stamp), both time.monotonic(), of the first QMP
    event ``name`` that arrived after ``after``. The arrival is taken by the VM's own event
    listener, which never waits on a command, so it is not delayed by the migration job."""
    for e in vm.events:
        if e["event"] == name and e["t"] >= after:
            return float(e["t"]), _mono(e.get("qemu_time"))
    return None, None


@dataclass
class _Incoming:
    vm: QemuVm
    mode: StorageMode
    real_node: dict[str, Json]  # the disk's blockdev-add options
    lease_until: float
    uri: str = ""
    storage_ready: bool = False
    completed: bool = False
    log_offset: int | None = None
    t_prepared: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    datastore: mp.IscsiDatastoreCheck | mp.FileDatastoreCheck | None = None
    read: mp.ReadCheck | None = None
    died: mp.QemuDied | None = None
    #: the disk's NBD export (the mirror's target), until mig_dest_finish removes it
    nbd: str | None = None

    def checks(self) -> mp.StorageChecks:
        return mp.StorageChecks(datastore=self.datastore, read=self.read, died=self.died)


@dataclass
class _Job:
    vm: QemuVm
    listener: EventListener
    t0: float
    passes: list[mp.PassRecord] = field(default_factory=list)
    statuses: list[mp.StatusChange] = field(default_factory=list)
    status: str = "setup"
    #: QEMU's last query-migrate once the migration ended
    final: Json = None
    stop_t: float | None = None
    task: asyncio.Task[None] | None = None
    #: the QMP commands sent for this job, with their answers (evidence of a failure)
    sent: list[dict[str, Json]] = field(default_factory=list)
    log_offset: int | None = None
    checkpoints: dict[str, float] | None = None
    #: the block mirror into the destination's NBD export (None: the storage is shared)
    mirror: _Mirror | None = None
    #: sends ``migrate`` once the mirror is in sync
    mirror_task: asyncio.Task[None] | None = None


@dataclass
class _Mirror:
    target: str  # the NBD export, as mig_start named it
    #: the job's and the target node's names in QEMU (new ones per migration: a node of
    #: a mirror given up may linger for a moment)
    job_id: str = ""
    node: str = ""
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    #: the job's end: None while it runs, "" completed, else QEMU's error
    ended: str | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    bytes: int = 0
    total: int = 0


_JOB_EVENTS = ("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED",
               "BLOCK_JOB_ERROR")
MIRROR_JOB = "mig-mirror"
MIRROR_NODE = "mig-mirror-target"
_mirrors = itertools.count(1)
EXPORT_ID = "mig-disk0"
_NBD_URI = re.compile(r"^nbd:([0-9.]+):([0-9]{1,5}):exportname=([A-Za-z0-9_.-]+)$")


def parse_nbd(uri: str) -> tuple[str, int, str]:
    """(host, port, export) of ``nbd:HOST:PORT:exportname=NAME``."""
    m = _NBD_URI.match(uri)
    if m is None or not 0 < int(m.group(2)) < 65536:
        raise LabError(f"bad NBD URI {uri!r} (want nbd:IP:PORT:exportname=NAME)", uri=uri)
    return m.group(1), int(m.group(2)), m.group(3)


def free_port(address: str) -> int:
    """A TCP port free on ``address`` now (the NBD server of an incoming QEMU listens there;
    QEMU does not report the port it bound for a port of 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def _hb(vm: QemuVm) -> mp.HeartbeatStamp | None:
    hb = vm.last_heartbeat
    return None if hb is None else mp.HeartbeatStamp(counter=hb.counter,
                                                     disk_counter=hb.disk_counter, t=hb.t)


def pass_record(q: Json, t: float, t0: float, pass_no: int) -> mp.PassRecord:
    """One pre-copy pass from a ``query-migrate`` answer taken at the pass start."""
    page = qmp_int(q, "ram", "page-size") or 4096
    rate_pages = qmp_float(q, "ram", "dirty-pages-rate") or 0.0
    return mp.PassRecord(
        pass_=pass_no, t_rel=round(t - t0, 4), status=qmp_str(q, "status"),
        dirty_sync_count=qmp_int(q, "ram", "dirty-sync-count"),
        transferred=qmp_int(q, "ram", "transferred"), remaining=qmp_int(q, "ram", "remaining"),
        total=qmp_int(q, "ram", "total"),
        dirty_pages_rate=rate_pages, dirty_rate_bytes=rate_pages * page,
        expected_downtime_ms=qmp_int(q, "expected-downtime"),
        throttle_pct=qmp_int(q, "cpu-throttle-percentage") or 0,
        mbps=qmp_float(q, "ram", "mbps"))


class MigrationHandlers:
    """Migration RPC methods of one host agent."""

    def __init__(self, agent: HostAgent, probe_disk: DiskProbe) -> None:
        self.agent = agent
        #: what a VM's iSCSI disk reports to this host now: (NAA ID, capacity); the host's
        #: storage cache provides it, so there is one view of a host's LUNs
        self.probe_disk = probe_disk
        self.incoming: dict[str, _Incoming] = {}
        #: why this host dropped an incoming VM on its own (its QEMU died, its lease
        #: lapsed), kept until the next prepare of that VM: a late ``mig_renew`` is told so
        self.dropped: dict[str, str] = {}
        self.jobs: dict[str, _Job] = {}
        self._watchdog: asyncio.Task[None] | None = None

    def handlers(self) -> dict[str, Handler]:
        return handlers(*mp.served_by(self))

    # ================================================================ destination
    async def mig_prepare(self, req: mp.Prepare) -> mp.Prepared:
        """Start the incoming QEMU and (early) make its storage ready. Returns the URI the
        source must migrate to and what each step took."""
        t_start = _now()
        storage, listen = req.storage, req.listen
        if not re.match(r"^[0-9.]+$", listen):
            raise LabError(f"mig_prepare: listen must be an IPv4 address, not {listen!r}")
        if not 1 <= req.lease_s <= 600:
            raise LabError("mig_prepare: lease_s must be 1..600 seconds")
        vmspec = self.agent.check_spec(await self.agent.own_boot_files(req.spec),
                                       "mig_prepare")
        if isinstance(vmspec.disk, NfsChainDisk) and storage == "late":
            raise LabError("mig_prepare: late storage preparation is for a LUN; a VM on a "
                           "file datastore opens its chain early", vm=vmspec.name)
        if req.export_disk and (storage != "early" or vmspec.disk is None
                                or isinstance(vmspec.disk, NfsChainDisk)):
            raise LabError("mig_prepare: export_disk needs a disk (a LUN or a file) opened "
                           "early", vm=vmspec.name)
        name = vmspec.name
        async with self.agent.lock(name):
            self.agent.check_not_running(name)
            disk = vmspec.disk
            real = disk_node(disk, "disk0-file", self.agent.disk_chap(disk)
                             ) if disk is not None and not isinstance(disk, NfsChainDisk) \
                else {}
            if isinstance(disk, NfsChainDisk):  # the same files the source has open
                graph = [json.dumps(n, separators=(",", ":")) for n in chain_nodes(disk)]
            elif vmspec.disk is not None and storage == "late":
                size = req.disk_size if req.disk_size is not None and req.disk_size > 0 else None
                if size is None:
                    raise LabError("mig_prepare: late storage preparation needs disk_size")
                graph = [f"driver=null-co,node-name=disk0-ph,size={size}",
                         "driver=raw,node-name=disk0,file=disk0-ph"]
            elif vmspec.disk is not None:
                graph = [blockdev_arg(real), "driver=raw,node-name=disk0,file=disk0-file"]
            else:
                graph = None
            t = _now()
            inc = await self._start_incoming(vmspec, real, storage, graph, req.lease_s,
                                             paused=req.export_disk)
            vm = inc.vm
            try:
                inc.timings["qemu_start_s"] = _now() - t
                caps = [{"capability": c, "state": v}
                        for c, v in req.capabilities.items() if c in DEST_CAPS]
                if caps:
                    await vm.execute("migrate-set-capabilities", {"capabilities": caps})
                params = {k: v for k, v in req.parameters.items() if k in DEST_PARAMS}
                if params:
                    await vm.execute("migrate-set-parameters", params)
                inc.log_offset = await enable_checkpoints(vm)
                if vmspec.disk is not None and storage == "early":
                    await self._storage_work(inc, attach=False)
                if req.export_disk:
                    t = _now()
                    inc.nbd = await self._export_disk(vm, listen)
                    inc.timings["export_s"] = _now() - t
                t = _now()
                await vm.execute("migrate-incoming", {"uri": f"tcp:{listen}:0"})
                q = await vm.execute("query-migrate")
                addrs = qmp_get(q, "socket-address")
                # QMP's InetSocketAddress carries the port as a string
                port = qmp_get(addrs[0], "port") if isinstance(addrs, list) and addrs else None
                if not (isinstance(port, str) and port.isdigit()):
                    raise vm._error("the incoming QEMU reports no listening address", answer=q)
                inc.uri = f"tcp:{listen}:{port}"
                inc.timings["listen_s"] = _now() - t
            except BaseException:
                await self._drop(name, keep_logs=True)
                raise
            inc.timings["prepare_s"] = _now() - t_start
            inc.t_prepared = t_start
            self._ensure_watchdog()
            log.info("incoming %s ready at %s (storage %s, %.3f s)", name, inc.uri, storage,
                     inc.timings["prepare_s"])
            return mp.Prepared(uri=inc.uri, pid=vm.pid, storage=storage,
                               timings=dict(inc.timings), checks=inc.checks(),
                               run_dir=str(vm.run_dir), nbd=inc.nbd)

    async def _export_disk(self, vm: QemuVm, listen: str) -> str:
        """The incoming QEMU's disk as a writable NBD export on ``listen``: its URI."""
        port = free_port(listen)
        await vm.execute("nbd-server-start", {"addr": {"type": "inet", "data": {
            "host": listen, "port": str(port)}}})
        await vm.execute("block-export-add", {"type": "nbd", "id": EXPORT_ID,
                                              "node-name": "disk0", "name": "disk0",
                                              "writable": True})
        return f"nbd:{listen}:{port}:exportname=disk0"

    async def _unexport_disk(self, vm: QemuVm) -> None:
        with contextlib.suppress(VmError):
            await vm.execute("block-export-del", {"id": EXPORT_ID})
        for _ in range(50):  # deleted once its last client is gone (BLOCK_EXPORT_DELETED)
            with contextlib.suppress(VmError):
                if not any(isinstance(e, dict) and e.get("id") == EXPORT_ID
                           for e in await vm.execute("query-block-exports") or []):
                    break
            await asyncio.sleep(0.02)
        with contextlib.suppress(VmError):
            await vm.execute("nbd-server-stop")

    async def _start_incoming(self, spec: VmSpec, real: dict[str, Json],
                              storage: mp.StorageMode,
                              graph: list[str] | None, lease_s: float,
                              paused: bool = False) -> _Incoming:
        """The incoming QEMU, started with ``-incoming defer``. Opening an iSCSI disk waits for
        its portal to answer first, and a failure QEMU reports as transient (the portal not
        reachable yet, a session still being torn down) is retried a few times; a permanent
        one (ACL, no such LUN) fails at once. A failed QEMU's logs are kept."""
        try:
            # with late preparation the disk is a placeholder: nothing to wait for at start
            vm = await self.agent.start_qemu(spec, incoming="defer", blockdevs=graph,
                                             on_exit=self._incoming_died,
                                             wait_for_portal=storage == "early", paused=paused)
        except BaseException:
            shutil.rmtree(self.agent.run_dir(spec.name), ignore_errors=True)  # logs kept
            raise
        inc = _Incoming(vm=vm, mode=storage, real_node=real, lease_until=_now() + lease_s)
        self.incoming[spec.name] = inc
        self.dropped.pop(spec.name, None)
        return inc

    async def _storage_work(self, inc: _Incoming, attach: bool) -> None:
        """Make the datastore usable on this host and prove QEMU can read the disk:
        LUN scan (NAA, capacity) or file check; for late preparation, open the real node
        in QEMU and swap it under ``disk0``; then read sector 0 through QEMU's node."""
        vm = inc.vm
        disk = vm.spec.disk
        assert disk is not None
        t = _now()
        inc.datastore = await (self._chain_check(disk) if isinstance(disk, NfsChainDisk)
                               else self._datastore_check(disk))
        inc.timings["datastore_check_s"] = _now() - t
        if attach:
            t = _now()
            await vm.execute("blockdev-add", inc.real_node)
            await vm.execute("blockdev-reopen", {"options": [
                {"driver": "raw", "node-name": "disk0", "file": "disk0-file"}]})
            await vm.execute("blockdev-del", {"node-name": "disk0-ph"})
            inc.timings["qemu_open_s"] = _now() - t
        t = _now()
        inc.read = await self._read_check(vm)
        inc.timings["read_check_s"] = _now() - t
        inc.storage_ready = True

    async def _datastore_check(self, disk: IscsiDisk | FileDisk
                               ) -> mp.IscsiDatastoreCheck | mp.FileDatastoreCheck:
        if isinstance(disk, IscsiDisk):
            naa, size = await self.probe_disk(disk)
            if disk.naa and naa.lower() != disk.naa.lower():
                raise MigrationError(
                    f"host {self.agent.host} sees NAA {naa} at {disk.url}, the VM's datastore "
                    f"is {disk.naa}: refusing to open another LUN", naa_seen=naa, naa_want=disk.naa)
            return mp.IscsiDatastoreCheck(naa=naa, size_bytes=size)
        try:
            size = disk.path.stat().st_size
            with open(disk.path, "rb") as f:
                f.read(512)
        except OSError as exc:
            raise MigrationError(f"host {self.agent.host} cannot read {disk.path}: {exc}") from exc
        return mp.FileDatastoreCheck(path=str(disk.path), size_bytes=size)

    async def _chain_check(self, disk: NfsChainDisk) -> mp.FileDatastoreCheck:
        """This host reads the chain's top over NFS with QEMU's own client (its size)."""
        url = f"nfs://{disk.server}{disk.layers[0].path}"
        size, why = await nfs_image_size(disk.server, disk.layers[0].path)
        if size is None:
            raise MigrationError(f"host {self.agent.host} cannot read {url}: {why}", url=url)
        return mp.FileDatastoreCheck(path=url, size_bytes=size)

    async def _read_check(self, vm: QemuVm) -> mp.ReadCheck:
        """Read sector 0 through QEMU's own (inactive) node; qemu-io prints to QEMU's stdout."""
        try:
            offset = vm.log_path.stat().st_size
        except OSError:
            offset = 0
        answer = await vm.execute("human-monitor-command",
                                  {"command-line": 'qemu-io disk0 "read -v 0 512"'})
        out = ""
        for _ in range(50):
            with open(vm.log_path, "rb") as f:
                f.seek(offset)
                out = f.read().decode(errors="replace")
            if "bytes at offset" in out or "failed" in out:
                break
            await asyncio.sleep(0.01)
        data, error = parse_qemu_io_dump(out)
        if error or str(answer).strip() or len(data) < 512:
            raise MigrationError(
                f"{vm.spec.name}: QEMU on host {self.agent.host} cannot read the VM's disk: "
                f"{error or str(answer).strip() or 'no data'}", qemu_io=out[-2000:], answer=answer)
        return mp.ReadCheck(bytes=len(data), disk_counter=decode_disk_record(data))

    async def mig_renew(self, req: mp.Renew) -> mp.Renewed:
        inc = self._inc(req.name)
        inc.lease_until = _now() + req.lease_s
        return mp.Renewed(lease_until=inc.lease_until)

    async def mig_late_storage(self, req: VmName) -> mp.DestStorage:
        """Late storage preparation, in the pre-switchover window (the source is stopped)."""
        inc = self._inc(req.name)
        t = _now()
        if inc.mode != "late":
            raise LabStateError(f"incoming {req.name} was prepared with early storage")
        if not inc.storage_ready and inc.vm.spec.disk is not None:
            await self._storage_work(inc, attach=True)
        inc.timings["late_storage_s"] = _now() - t
        return mp.DestStorage(timings=dict(inc.timings), checks=inc.checks())

    async def mig_dest_finish(self, req: mp.DestFinish) -> mp.DestFinished:
        """After completion: wait for the guest's next heartbeat here and read its disk."""
        inc = self._inc(req.name)
        vm = inc.vm
        after = req.after_counter
        inc.completed = True
        inc.lease_until = float("inf")
        if inc.nbd is not None:
            # the mirror completed in the switchover window: no writer is left; the export
            # goes before the guest runs (it would hold the disk's write permission), then
            # the guest, started with -S for this, is let go
            t = _now()
            await self._unexport_disk(vm)
            inc.nbd = None
            await vm.execute("cont")
            inc.timings["unexport_cont_s"] = _now() - t
        try:
            await vm.wait_heartbeat(req.timeout, after=after)
        except VmError:
            if vm.last_heartbeat is None or (after is not None
                                              and vm.last_heartbeat.counter <= after):
                raise
        first_hb = None
        for ln in vm.lines:
            beat = parse_heartbeat(ln.text)
            if beat is not None:
                first_hb = mp.HeartbeatStamp(counter=beat.counter,
                                             disk_counter=beat.disk_counter, t=ln.t)
                break
        resume_t, resume_qemu_t = event_time(vm, "RESUME", inc.t_prepared)
        read = await vm.console_command("read", "DISK read", timeout=10.0)
        status = await vm.query_status(timeout=5.0)
        vm.on_unexpected_exit = self.agent.vm_exited
        self.incoming.pop(req.name, None)
        return mp.DestFinished(
            first_heartbeat=first_hb, heartbeat=_hb(vm), resume_t=resume_t,
            resume_qemu_t=resume_qemu_t, checkpoints=read_checkpoints(vm, inc.log_offset),
            disk_read=read, status=qmp_str(status, "status"), pid=vm.pid,
            timings=dict(inc.timings), checks=inc.checks())

    async def mig_dest_abort(self, req: VmName) -> mp.DestAborted:
        """Drop an incoming VM: stop its QEMU and remove its run directory. Idempotent."""
        if req.name not in self.incoming:
            return mp.DestAborted(name=req.name, removed=False)
        await self._drop(req.name)
        return mp.DestAborted(name=req.name, removed=True)

    def _inc(self, name: str) -> _Incoming:
        if name not in self.incoming:
            why = self.dropped.get(name)
            if why is not None:
                raise LabStateError(f"host {self.agent.host} dropped the incoming {name!r}: {why}",
                                    vm=name, host=self.agent.host)
            raise LabStateError(f"host {self.agent.host} has no incoming migration of {name!r}",
                                vm=name, host=self.agent.host)
        return self.incoming[name]

    async def _drop(self, name: str, keep_logs: bool = False) -> None:
        """Stop an incoming VM and remove its run directory; with ``keep_logs`` (it failed)
        its logs move to ``<state dir>/failed/<vm>-<time>/`` instead, kept with the lab."""
        inc = self.incoming.pop(name, None)
        if inc is None:
            return
        vm = inc.vm
        vm.on_unexpected_exit = None
        await vm.stop(timeout=3.0)
        self.agent.forget(vm)
        if keep_logs:
            self.agent.keep_failed_logs(vm)
        shutil.rmtree(vm.run_dir, ignore_errors=True)
        log.info("dropped incoming %s (QEMU pid %s, status %s)", name, vm.pid, vm.returncode)

    def _incoming_died(self, vm: QemuVm) -> None:
        name = vm.spec.name
        log.warning("incoming QEMU of %s died (status %s): cleaning up", name, vm.returncode)
        inc = self.incoming.get(name)
        if inc is not None:
            inc.died = mp.QemuDied(returncode=vm.returncode, stderr=vm.stderr_tail(10))
            self.dropped[name] = (f"its QEMU exited (exit status {vm.returncode}): "
                                  f"the migration failed")
        self.agent.vm_exited(vm)
        asyncio.get_running_loop().call_soon(
            lambda: asyncio.ensure_future(self._drop(name, keep_logs=True)))

    def _ensure_watchdog(self) -> None:
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.ensure_future(self._watch_leases())

    async def _watch_leases(self) -> None:
        while self.incoming:
            await asyncio.sleep(0.5)
            now = _now()
            for name, inc in list(self.incoming.items()):
                if not inc.completed and now > inc.lease_until:
                    log.warning("incoming %s: lease lapsed (controller gone?): dropping it", name)
                    self.dropped[name] = "its lease lapsed (no renewal from the controller)"
                    with contextlib.suppress(Exception):
                        await self._drop(name)

    # ================================================================ source
    def _migrating(self, name: str) -> bool:
        return name in self.jobs and self.jobs[name].final is None

    async def mig_source_info(self, req: VmName) -> mp.SourceInfo:
        vm = self.agent.vm(req.name)
        st = await vm.query_status(timeout=5.0)
        size = None
        if vm.spec.disk is not None:
            nodes = await vm.execute("query-named-block-nodes", {"flat": True})
            for n in nodes:
                if qmp_str(n, "node-name") == "disk0":
                    size = qmp_int(n, "image", "virtual-size")
        return mp.SourceInfo(spec=vm.spec, status=qmp_str(st, "status"), disk_size=size,
                             heartbeat=_hb(vm), pid=vm.pid, process=vm.state.value,
                             migrating=self._migrating(req.name))

    async def mig_dirty_rate(self, req: mp.DirtyRateRequest) -> mp.DirtyRate:
        """The guest's dirty rate as QEMU measures it (``calc-dirty-rate``, page sampling):
        QEMU hashes ``sample_pages`` sampled pages per GiB and counts those that changed over
        ``calc_time_s``. QEMU's unit is MiB/s. Not while the VM migrates (both use dirty
        tracking)."""
        name, calc_time_s = req.name, req.calc_time_s
        vm = self.agent.vm(name)
        if self._migrating(name):
            raise LabStateError(f"VM {name} is migrating: measure its dirty rate before", vm=name)
        if not 1 <= calc_time_s <= 60:
            raise LabError("mig_dirty_rate: calc_time_s must be 1..60 seconds")
        if not 128 <= req.sample_pages <= 1048576:
            raise LabError("mig_dirty_rate: sample_pages must be 128..1048576")
        t = _now()
        await vm.execute("calc-dirty-rate", {"calc-time": calc_time_s, "mode": "page-sampling",
                                             "sample-pages": req.sample_pages})
        await asyncio.sleep(calc_time_s)
        q: Json = {}
        while _now() - t < calc_time_s + 15:
            q = await vm.execute("query-dirty-rate", timeout=5.0)
            if qmp_str(q, "status") == "measured":
                return mp.DirtyRate(dirty_rate_mib_s=qmp_int(q, "dirty-rate"),
                                    mode=qmp_str(q, "mode"), calc_time_s=qmp_int(q, "calc-time"),
                                    sample_pages=qmp_int(q, "sample-pages"), took_s=_now() - t)
            await asyncio.sleep(0.05)
        raise MigrationError(f"{name}: calc-dirty-rate did not finish within "
                             f"{calc_time_s + 15} s", answer=q)

    async def mig_start(self, req: mp.Start) -> mp.Started:
        name, uri = req.name, req.uri
        vm = self.agent.vm(name)
        if self._migrating(name):
            raise LabStateError(f"VM {name} is already migrating", vm=name)
        if not uri.startswith("tcp:"):
            raise LabError(f"mig_start: bad URI {uri!r}")
        if req.mirror_to is not None:
            target = parse_nbd(req.mirror_to)
            if not req.capabilities.get("pause-before-switchover"):
                raise LabError("mig_start: a mirror needs pause-before-switchover (it "
                               "completes in that window)", vm=name)
            if vm.spec.disk is None:  # a chain is mirrored from its top: flattened
                raise LabError(f"mig_start: VM {name} has no disk to mirror", vm=name)
        listener = EventListener(("MIGRATION", "MIGRATION_PASS", "STOP", *_JOB_EVENTS))
        vm.qmp.register_listener(listener)  # before anything that can cause these events
        job = _Job(vm=vm, listener=listener, t0=_now())
        self.jobs[name] = job
        job.task = asyncio.ensure_future(self._follow(name, job))
        try:
            caps = [{"capability": c, "state": v} for c, v in req.capabilities.items()]
            await self._exec(job, "migrate-set-capabilities", {"capabilities": caps})
            if req.parameters:
                await self._exec(job, "migrate-set-parameters", dict(req.parameters))
            job.log_offset = await enable_checkpoints(vm)
            job.t0 = _now()
            if req.mirror_to is None:
                await self._exec(job, "migrate", {"uri": uri})
            else:
                host, port, export = target
                n = next(_mirrors)
                job.mirror = m = _Mirror(target=req.mirror_to, job_id=f"{MIRROR_JOB}-{n}",
                                         node=f"{MIRROR_NODE}-{n}")
                job.status = "mirror"
                await self._exec(job, "blockdev-add", {
                    "driver": "nbd", "node-name": m.node, "export": export,
                    "server": {"type": "inet", "host": host, "port": str(port)}})
                await self._exec(job, "blockdev-mirror", {
                    "job-id": m.job_id, "device": "disk0", "target": m.node,
                    "sync": "full"})
                job.mirror_task = asyncio.ensure_future(self._migrate_when_ready(name, job, uri))
        except BaseException:
            await self._end_job(job)
            job.final = {"status": "failed"}
            raise
        return mp.Started(t0=job.t0)

    async def _migrate_when_ready(self, name: str, job: _Job, uri: str) -> None:
        """Send ``migrate`` once the mirror is in sync; a mirror that fails first ends the
        job as failed (the guest runs on, the source's disk untouched)."""
        m = job.mirror
        assert m is not None
        ready = asyncio.ensure_future(m.ready.wait())
        done = asyncio.ensure_future(m.done.wait())
        try:
            await asyncio.wait({ready, done}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            done.cancel()
        why = m.ended if m.done.is_set() else None
        if why is None:
            try:
                await self._exec(job, "migrate", {"uri": uri})
                if job.status == "mirror":  # QEMU's MIGRATION events take it from here
                    job.status = "setup"
                return
            except MigrationError as exc:
                why = exc.message
        job.status = "failed"
        job.final = {"status": "failed", "error-desc": f"the disk mirror failed: {why}"}
        job.statuses.append(mp.StatusChange(t_rel=round(_now() - job.t0, 4), status="failed"))
        self.agent.publish(EVENT_PROGRESS, mp.MigrationProgress(vm=name, t=_now(),
                                                                status="failed"))

    async def _mirror_state(self, job: _Job) -> Json:
        """The mirror's progress (``query-block-jobs``) as ``{"transferred", "total",
        "ready"}``; None once it is gone."""
        m = job.mirror
        if m is None:
            return None
        with contextlib.suppress(VmError):
            for j in await job.vm.execute("query-block-jobs", timeout=5.0) or []:
                if isinstance(j, dict) and j.get("device") == m.job_id:
                    m.bytes, m.total = int(j.get("offset", 0)), int(j.get("len", 0))
        return {"transferred": m.bytes, "total": m.total, "ready": m.ready.is_set()}

    async def mig_mirror_complete(self, req: VmName) -> mp.MirrorCompleted:
        """Complete the mirror in the pre-switchover window: the guest is stopped, so once
        ``block-job-cancel`` of the ready job ends, the destination's disk is the source's."""
        job = self._job(req.name)
        m = job.mirror
        if m is None:
            raise LabStateError(f"the migration of {req.name} has no disk mirror", vm=req.name)
        t = _now()
        if not m.done.is_set():
            await self._exec(job, "block-job-cancel", {"device": m.job_id})
            try:
                await asyncio.wait_for(m.done.wait(), 120)
            except TimeoutError:
                raise MigrationError(f"{req.name}: the disk mirror did not complete within "
                                     "120 s of the switchover", vm=req.name) from None
        if m.ended:
            raise MigrationError(f"{req.name}: the disk mirror did not complete: {m.ended}",
                                 vm=req.name)
        with contextlib.suppress(MigrationError):
            await self._exec(job, "blockdev-del", {"node-name": m.node})
        return mp.MirrorCompleted(t=_now(), bytes=m.bytes, took_s=round(_now() - t, 4))

    async def _drop_mirror(self, job: _Job) -> None:
        """A mirror of a migration given up: cancelled (force), its target node removed; the
        source's own disk is untouched."""
        m = job.mirror
        if m is None:
            return
        if job.mirror_task is not None:
            job.mirror_task.cancel()
        if not m.done.is_set():
            with contextlib.suppress(VmError, MigrationError):
                await self._exec(job, "block-job-cancel", {"device": m.job_id, "force": True})
            for _ in range(100):  # the job is gone once QEMU has stopped its requests
                with contextlib.suppress(VmError):
                    jobs = await job.vm.execute("query-block-jobs", timeout=5.0) or []
                    if not any(isinstance(j, dict) and j.get("device") == m.job_id
                               for j in jobs):
                        break
                await asyncio.sleep(0.1)
        for _ in range(20):  # the job lets go of its target a moment after it is gone
            try:
                await self._exec(job, "blockdev-del", {"node-name": m.node})
                break
            except (VmError, MigrationError):
                await asyncio.sleep(0.1)

    async def _exec(self, job: _Job, cmd: str, args: dict[str, Json] | None = None) -> Json:
        entry: dict[str, Json] = {"t": _now(), "cmd": cmd, "args": args}
        job.sent.append(entry)
        try:
            res = await job.vm.execute(cmd, args)
        except VmError as exc:
            entry["error"] = exc.message
            raise MigrationError(exc.message, qmp_log=job.sent[-20:], **{
                k: v for k, v in exc.evidence.items() if k != "qmp_log"}) from exc
        entry["result"] = res
        return res

    async def _follow(self, name: str, job: _Job) -> None:
        """Record passes and status changes as QEMU reports them."""
        try:
            async for ev in job.listener:
                t = _now()
                kind = ev.get("event")
                data = ev.get("data")
                if kind in _JOB_EVENTS:
                    self._on_job_event(job, str(kind), data)
                elif kind == "STOP" and job.stop_t is None:
                    job.stop_t = t
                elif kind == "MIGRATION_PASS":
                    try:
                        q = await job.vm.execute("query-migrate", timeout=5.0)
                    except VmError:
                        continue
                    pass_no = qmp_int(data, "pass")
                    if pass_no is None:
                        pass_no = len(job.passes) + 1
                    rec = pass_record(q, t, job.t0, pass_no)
                    job.passes.append(rec)
                    self.agent.publish(EVENT_PROGRESS,
                                       mp.MigrationProgress(vm=name, t=t, pass_no=rec.pass_))
                elif kind == "MIGRATION":
                    status = str(qmp_get(data, "status"))
                    job.status = status
                    job.statuses.append(mp.StatusChange(t_rel=round(t - job.t0, 4),
                                                        status=status))
                    self.agent.publish(EVENT_PROGRESS,
                                       mp.MigrationProgress(vm=name, t=t, status=status))
                    if status in FINAL:
                        with contextlib.suppress(VmError):
                            job.final = await job.vm.execute("query-migrate", timeout=5.0)
                        if job.final is None:
                            job.final = {"status": status}
                        break
        finally:
            with contextlib.suppress(Exception):
                job.vm.qmp.remove_listener(job.listener)

    def _on_job_event(self, job: _Job, kind: str, data: Json) -> None:
        m = job.mirror
        if m is None or qmp_str(data, "device") != m.job_id:
            return
        m.bytes = qmp_int(data, "offset") or m.bytes
        m.total = qmp_int(data, "len") or m.total
        if kind == "BLOCK_JOB_READY":
            m.ready.set()
        elif kind in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
            m.ended = qmp_str(data, "error") or ("" if kind == "BLOCK_JOB_COMPLETED"
                                                  else "cancelled")
            m.done.set()
        elif kind == "BLOCK_JOB_ERROR":
            log.warning("%s: the disk mirror reports an I/O error (%s)", job.vm.spec.name,
                        qmp_str(data, "operation"))

    async def _end_job(self, job: _Job) -> None:
        if job.mirror_task is not None and not job.mirror_task.done():
            job.mirror_task.cancel()
        if job.task is not None and not job.task.done():
            job.task.cancel()
            with contextlib.suppress(BaseException):
                await job.task
        with contextlib.suppress(Exception):
            job.vm.qmp.remove_listener(job.listener)

    def _job(self, name: str) -> _Job:
        if name not in self.jobs:
            raise LabStateError(f"host {self.agent.host} has no migration of {name!r}", vm=name)
        return self.jobs[name]

    async def mig_status(self, req: mp.StatusRequest) -> mp.SourceStatus:
        job = self._job(req.name)
        vm = job.vm
        now: Json = None
        if vm.state is VmState.RUNNING and job.status == "mirror":
            # no migrate sent yet: query-migrate still tells of this QEMU's last migration
            # (a VM that came here by one reads "completed")
            now = {"status": "mirror", "disk": await self._mirror_state(job)}
        elif vm.state is VmState.RUNNING:
            with contextlib.suppress(VmError):
                now = await vm.execute("query-migrate", timeout=5.0)
            if job.mirror is not None and not job.mirror.done.is_set():
                # the disk's bytes count as progress too (a mirror moves no RAM)
                now = {**(now if isinstance(now, dict) else {}),
                       "disk": await self._mirror_state(job)}
        if job.final is None and qmp_str(now, "status") in FINAL:
            job.final = now  # QEMU's answer is final even if the event is still on its way
        if job.final is not None:
            status = qmp_str(job.final, "status") or job.status
        else:  # the event said final, its query-migrate is not back yet: not final for us
            status = job.status if job.status not in FINAL else "device"
        if status in FINAL and job.task is not None and not job.task.done():
            # QEMU answered final before the events of the last passes were taken in (the
            # follower awaits a query-migrate per MIGRATION_PASS): let it catch up, or a
            # quick migration would be reported with passes but no pass records
            await asyncio.wait({job.task}, timeout=FOLLOW_CATCH_UP_S)
        # the STOP as the VM's own listener timestamped it (job.stop_t is taken by _follow,
        # which may be waiting on a query-migrate when the STOP comes)
        stop_t, stop_qemu_t = event_time(vm, "STOP", job.t0)
        if status in FINAL and job.checkpoints is None:
            job.checkpoints = read_checkpoints(vm, job.log_offset)
        return mp.SourceStatus(
            status=status, t0=job.t0, passes=job.passes[max(0, req.since):],
            statuses=list(job.statuses), now=now, final=job.final,
            stop_t=stop_t if stop_t is not None else job.stop_t, stop_qemu_t=stop_qemu_t,
            checkpoints=job.checkpoints or {}, heartbeat=_hb(vm), process=vm.state.value,
            returncode=vm.returncode, t=_now())

    async def mig_set(self, req: mp.SetParameters) -> mp.Stamp:
        job = self._job(req.name)
        await self._exec(job, "migrate-set-parameters", dict(req.parameters))
        return mp.Stamp(t=_now())

    async def mig_continue(self, req: VmName) -> mp.Stamp:
        job = self._job(req.name)
        await self._exec(job, "migrate-continue", {"state": "pre-switchover"})
        return mp.Stamp(t=_now())

    async def mig_postcopy(self, req: VmName) -> mp.Stamp:
        job = self._job(req.name)
        await self._exec(job, "migrate-start-postcopy")
        return mp.Stamp(t=_now())

    async def mig_cancel(self, req: mp.Cancel) -> mp.Cancelled:
        """migrate_cancel, then wait until QEMU says the migration is over and the guest runs
        again (``cont`` if QEMU left it paused). Safe to call when nothing runs."""
        name, timeout = req.name, req.timeout
        job = self.jobs.get(name)
        vm = self.agent.vm(name)
        t = _now()
        if job is not None and job.status != "mirror":
            live = None  # what QEMU says now, whatever the job recorded
            with contextlib.suppress(VmError):
                live = qmp_str(await vm.execute("query-migrate", timeout=5.0), "status")
            if job.final is None or (live is not None and live not in (*FINAL, "none")):
                with contextlib.suppress(MigrationError):
                    await self._exec(job, "migrate_cancel")
        if job is not None:
            await self._drop_mirror(job)
        deadline = _now() + timeout
        status = "none"
        while _now() < deadline:
            q = await vm.execute("query-migrate", timeout=5.0)
            status = qmp_str(q, "status") or "none"
            if status in (*FINAL, "none"):
                break
            await asyncio.sleep(0.05)
        else:
            raise MigrationError(f"{name}: migration still {status} {timeout:g} s after cancel",
                                 status=status, qmp_log=job.sent[-20:] if job else [])
        run = await vm.query_status(timeout=5.0)
        resumed_by_us = False
        if not run.get("running") and run.get("status") not in ("postmigrate", "shutdown"):
            await vm.execute("cont")
            resumed_by_us = True
            run = await vm.query_status(timeout=5.0)
        if job is not None:
            await self._end_job(job)
            if job.final is None:
                job.final = {"status": status}
        return mp.Cancelled(status=status, vm_status=qmp_str(run, "status"),
                            resumed_by_us=resumed_by_us, took_s=_now() - t)

    async def mig_source_finish(self, req: mp.SourceFinish) -> VmStopped:
        """The migration completed: stop the (paused) source QEMU and forget the VM here."""
        name = req.name
        job = self.jobs.pop(name, None)
        vm = self.agent.vm(name)
        st = await vm.query_status(timeout=5.0)
        if st.get("status") != "postmigrate":
            raise LabStateError(f"{name} on {self.agent.host} is {st.get('status')}, not "
                                "postmigrate: refusing to stop it", vm=name)
        if job is not None:
            await self._end_job(job)
        return await self.agent.vm_stop(VmStop(name, timeout=5.0))
