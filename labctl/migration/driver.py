"""Live migration, controller side: policies, orchestration over the host agents, the
convergence policy, recording, and verification that the guest survived.

The order of work (idea 6: early preparation)::

    checks (same host? VM running? destination shares the datastore? memory?)
    destination: QEMU -incoming defer, same machine and devices, disks opened and read,
                 LUN scanned (NAA, capacity)             <- all before the source is asked
    source:      capabilities + parameters from the policy, events listened to, migrate
    loop:        record each pass; detect non-convergence and act (raise the downtime limit
                 in steps, arm auto-converge, switch to post-copy, cancel); detect a stalled
                 stream (no bytes for ``stall_timeout_s``) and cancel; keep the destination's
                 lease; with late storage preparation, do it in the pre-switchover window
    completed:   wait for the guest's next heartbeat on the destination (counter continues),
                 read its disk counter back there (>= the last one seen on the source), stop
                 the source QEMU, move the VM in the inventory
    otherwise:   migrate_cancel, the source runs again (checked by its heartbeat), the
                 destination's QEMU and run directory are dropped

Blackout is measured on the host: the console lines of both QEMUs are timestamped with
``time.monotonic()`` by their host agents (one clock on this machine): first heartbeat on
the destination minus last heartbeat on the source. The guest beats every ``heartbeat_ms``
(the VM's ``labctl.hb_ms``: ``vms[].heartbeat_ms`` in the topology, default 100 ms).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass, replace

from labctl.core.errors import AgentError, LabError, MigrationError, ProtocolError, RemoteError
from labctl.core.rpc import RpcClient
from labctl.core.wire import Json, WallTime
from labctl.guest.protocol import DEFAULT_HEARTBEAT_MS, heartbeat_ms_of, parse_disk_counter
from labctl.hosts import protocol as hp
from labctl.hosts.protocol import FileDisk, IscsiDisk, VmName
from labctl.migration import protocol as mp
from labctl.migration.convergence import ConvergencePolicy, Decision
from labctl.migration.policy import Policy
from labctl.migration.protocol import PassRecord, SourceStatus, qmp_float, qmp_int, qmp_str
from labctl.migration.records import Recorder
from labctl.migration.report import pass_line, recovery_line
from labctl.migration.result import (
    Beat,
    DiskCheck,
    HeartbeatCheck,
    LateWindow,
    MigrationResult,
    MirrorRecord,
    PrepareRecord,
    Record,
    Recovery,
    SideStamps,
    SourceCheck,
    Switchover,
)
from labctl.state.context import Progress, quiet

RECOVER_WAIT_S = 10.0  # how long a cancelled migration waits to see the source guest beat
#: a mirror over a slow link shows progress late (QEMU counts an op once its write is
#: acknowledged, with up to 16 MiB in flight): its stall limit is at least this
MIRROR_STALL_S = 30.0


@dataclass
class Endpoint:
    """One side of a migration: its host name, an RPC client to its agent, its address."""

    host: str
    client: RpcClient
    address: str


class Migration:
    """One migration between two connected host agents. ``await run()`` once."""

    def __init__(self, vm: str, src: Endpoint, dst: Endpoint, policy: Policy,
                 dest_disk: IscsiDisk | FileDisk | None = None,
                 recorder: Recorder | None = None,
                 progress: Progress = quiet, measure_dirty_rate: bool = False,
                 heartbeat_ms: int | None = None, mirror: bool = False) -> None:
        self.vm = vm
        #: the storage is not shared: the source mirrors the disk into the destination's
        #: NBD export before migrating, and completes the mirror at the switchover
        self.mirror = mirror
        self._mirror_target: str | None = None
        self._mirror_sync_s: float | None = None
        #: why the destination gave up (it refused to renew its lease), once it has
        self._dest_gave_up: str | None = None
        #: the guest's heartbeat period; None: read from the source QEMU's kernel command line
        self.heartbeat_ms = heartbeat_ms
        self.measure_dirty_rate = measure_dirty_rate
        self.src = src
        self.dst = dst
        self.policy = policy
        #: the disk as the destination reaches it (None: as the source's spec says)
        self.dest_disk = dest_disk
        self.rec = recorder or Recorder(None)
        self.progress = progress
        self.passes: list[PassRecord] = []
        self.decisions: list[Decision] = []
        self.result = MigrationResult(
            id=None, vm=vm, source=src.host, dest=dst.host, policy=policy.name,
            storage=policy.storage, started_at=WallTime(time.time()), heartbeat_period_ms=self.period_ms)
        #: when ``migrate`` was sent, on the source agent's monotonic clock: the origin of
        #: the record's time axis (every ``t_rel``); it never leaves this process
        self._t0: float | None = None
        self._wake = asyncio.Event()
        self._lease_failures = 0
        self._started = False
        self._postcopy = False
        self._source_died = False
        self._src_status: SourceStatus | None = None
        #: the destination agent's monotonic clock minus the source's (0 on one machine):
        #: the destination's stamps are moved onto the source's axis by it
        self._dst_shift = 0.0

    @property
    def period_ms(self) -> int:
        return self.heartbeat_ms or DEFAULT_HEARTBEAT_MS

    def _on_event(self, event: str, data: Json) -> None:
        if event != mp.EVENT_PROGRESS:
            return
        try:
            vm = mp.MigrationProgress.from_wire(data, f"{event} event from {self.src.host}").vm
        except ProtocolError:
            vm = self.vm  # a malformed event can only wake the driver early
        if vm == self.vm:
            self._wake.set()

    async def run(self) -> Record:
        """Migrate; the record as stored (:class:`MigrationResult` as JSON)."""
        t_wall = time.time()
        if self.src.host == self.dst.host:
            raise MigrationError(f"VM {self.vm} already runs on {self.dst.host}: nothing to migrate",
                                 vm=self.vm, host=self.dst.host)
        info = await mp.MIG_SOURCE_INFO.call(self.src.client, VmName(self.vm), timeout=15)
        if info.status != "running":
            raise MigrationError(f"VM {self.vm} is not running on {self.src.host} "
                                 f"(QEMU reports {info.status}): nothing to migrate",
                                 vm=self.vm, status=info.status)
        if info.migrating:
            raise MigrationError(f"VM {self.vm} is already migrating", vm=self.vm)
        spec = info.spec
        if self.heartbeat_ms is None:
            self.heartbeat_ms = heartbeat_ms_of(spec.append)
        if self.dest_disk is not None:
            spec = replace(spec, disk=self.dest_disk)
        measured = None
        if self.measure_dirty_rate:  # before anything starts: it uses QEMU's dirty tracking too
            measured = await mp.MIG_DIRTY_RATE.call(
                self.src.client, mp.DirtyRateRequest(self.vm, calc_time_s=1, sample_pages=8192),
                timeout=30)
            self.progress(f"{self.src.host}: calc-dirty-rate: {self.vm} dirties "
                          f"{measured.dirty_rate_mib_s} MiB/s")
        self._dst_shift = await clock_shift(self.src.client, self.dst.client)
        self.rec.start(self.vm, self.src.host, self.dst.host, self.policy)
        self.result = replace(self.result, id=self.rec.id, started_at=WallTime(t_wall),
                              heartbeat_period_ms=self.period_ms, dirty_rate_measured=measured)
        lease: asyncio.Task[None] | None = None
        try:
            self.progress(f"{self.dst.host}: starting the incoming QEMU"
                          f"{' and opening the disk' if self.policy.storage == 'early' else ''}")
            t = time.monotonic()
            prep = await mp.MIG_PREPARE.call(self.dst.client, mp.Prepare(
                spec=spec, listen=self.dst.address, storage=self.policy.storage,
                capabilities=self.capabilities(), parameters=self.policy.parameters(),
                disk_size=info.disk_size, lease_s=self.policy.lease_s,
                export_disk=self.mirror), timeout=90)
            if self.mirror and prep.nbd is None:
                raise MigrationError(f"{self.dst.host} exported no disk for the mirror",
                                     host=self.dst.host)
            self._mirror_target = prep.nbd
            self.result = replace(self.result,
                                  prepare=PrepareRecord.of(prep, time.monotonic() - t))
            lease = asyncio.ensure_future(self._keep_lease())
            await self.src.client.subscribe(self._on_event)
            self.progress(f"{self.src.host}: migrating to {prep.uri} (policy {self.policy.name})")
            self._started = True
            if self.mirror:
                self.progress(f"{self.src.host}: mirroring the disk into {prep.nbd} first")
            start = await mp.MIG_START.call(self.src.client, mp.Start(
                self.vm, prep.uri, capabilities=self.capabilities(),
                parameters=self.policy.parameters(), mirror_to=prep.nbd if self.mirror
                else None), timeout=30)
            self._t0 = start.t0
            final = await self._drive()
            await self._finish_success(final)
            self.result = replace(self.result, finished_at=WallTime(time.time()))
            self.rec.finish("completed", self.result)
            return self.result.to_wire()
        except BaseException as exc:
            cancelled = isinstance(exc, asyncio.CancelledError | KeyboardInterrupt)
            error = ("cancelled by the user" if cancelled
                     else getattr(exc, "message", None) or repr(exc))
            recovery = await self._recover()
            src_status = self._src_status.status if self._src_status is not None else ""
            state = "cancelled" if cancelled or "cancel" in src_status else "failed"
            self.result = replace(self.result, state=state, error=error, recovery=recovery,
                                  finished_at=WallTime(time.time()),
                                  passes=len(self.passes), pass_records=list(self.passes),
                                  decisions=list(self.decisions))
            self.rec.finish(state, self.result)
            if cancelled:
                raise
            if isinstance(exc, MigrationError):
                exc.evidence.setdefault("recovery", recovery.to_wire())
                exc.evidence.setdefault("migration_id", self.rec.id)
                raise
            if isinstance(exc, LabError):
                raise MigrationError(f"migration of {self.vm} to {self.dst.host} failed: "
                                     f"{exc.message}", recovery=recovery.to_wire(),
                                     cause=exc.evidence, migration_id=self.rec.id) from exc
            raise
        finally:
            if lease is not None:
                lease.cancel()
                with contextlib.suppress(BaseException):
                    await lease

    def capabilities(self) -> mp.Capabilities:
        """The policy's capabilities; a mirror completes in the pre-switchover window."""
        caps = self.policy.capabilities()
        if self.mirror:
            caps["pause-before-switchover"] = True
        return caps

    async def _keep_lease(self) -> None:
        while True:
            await asyncio.sleep(min(2.0, self.policy.lease_s / 4))
            try:
                await mp.MIG_RENEW.call(self.dst.client, mp.Renew(self.vm, self.policy.lease_s),
                                        timeout=1.5)
                self._lease_failures = 0
            except RemoteError as exc:  # it answered, and said no: it has given up
                self._dest_gave_up = exc.message
                self._wake.set()
                return
            except AgentError:  # no answer (yet): the stall limit judges
                self._lease_failures += 1

    def _add_pass(self, rec: PassRecord) -> None:
        if self.passes:  # pages dirtied during the previous pass, over its duration
            prev = self.passes[-1]
            dt = rec.t_rel - prev.t_rel
            est = (float(rec.remaining) / dt
                   if dt > 0 and rec.remaining is not None and prev.pass_ >= 1 else None)
            rec = replace(rec, prev_pass_s=dt, dirty_rate_est_bytes=est)
        self.passes.append(rec)
        self.rec.add_pass(rec)
        self.progress(pass_line(rec))

    async def _drive(self) -> SourceStatus:
        conv = ConvergencePolicy(self.policy)
        last_bytes = -1
        last_move = time.monotonic()
        t_start = time.monotonic()
        late_done = False
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):
                    await self._wake.wait()
            self._wake.clear()
            if self._dest_gave_up is not None:
                raise MigrationError(f"migration of {self.vm} failed: the destination "
                                     f"{self.dst.host} gave up: {self._dest_gave_up}",
                                     host=self.dst.host)
            st = await mp.MIG_STATUS.call(
                self.src.client, mp.StatusRequest(self.vm, since=len(self.passes)), timeout=10)
            self._src_status = st
            for rec in st.passes:
                self._add_pass(rec)
            status = st.status
            if st.process in ("failed", "stopped") and status != "completed":
                self._source_died = True
                raise MigrationError(
                    f"the source QEMU of {self.vm} on {self.src.host} exited during the "
                    f"migration (exit status {st.returncode}): the guest is gone with it, "
                    f"nothing is left to move; the destination is dropped",
                    vm=self.vm, host=self.src.host, returncode=st.returncode, status=status)
            if status == "completed":
                return st
            if status in ("failed", "cancelled"):
                raise MigrationError(
                    f"migration of {self.vm} {status} on {self.src.host} "
                    f"({_why_failed(st)})", status=status, final=st.final)
            now = time.monotonic()
            if status == "pre-switchover" and not late_done:
                late_done = True
                await self._late_window(st)
                continue
            # a mirror's disk bytes are progress too (no RAM moves while it copies)
            moved = (qmp_int(st.now, "ram", "transferred") or 0) + (
                qmp_int(st.now, "disk", "transferred") or 0)
            if self.mirror and self._mirror_sync_s is None and status != "mirror":
                self._mirror_sync_s = round(now - t_start, 3)
            at_pass = self.passes[-1].pass_ if self.passes else None
            if moved > last_bytes or status in ("setup", "pre-switchover", "device"):
                last_bytes, last_move = moved, now
            elif now - last_move > (self.policy.stall_timeout_s if status != "mirror" else
                                    max(self.policy.stall_timeout_s, MIRROR_STALL_S)) \
                    and not self._postcopy:
                d = Decision("cancel", f"no migration progress for {now - last_move:.1f} s "
                             f"({moved} bytes sent; destination unreachable? "
                             f"{self._lease_failures} lease renewals failed)",
                             at_pass, now - t_start)
                await self._apply(d)
                raise MigrationError(f"migration of {self.vm} stalled: {d.reason}; cancelled",
                                     decision=d.to_wire())
            if now - t_start > self.policy.timeout_s and not self._postcopy:
                d = Decision("cancel", f"migration took longer than {self.policy.timeout_s:g} s",
                             at_pass, now - t_start)
                await self._apply(d)
                raise MigrationError(f"migration of {self.vm} timed out: cancelled",
                                     decision=d.to_wire())
            if not self._postcopy and status == "active":
                d2 = conv.decide(self.passes, now - t_start)
                if d2 is not None:
                    await self._apply(d2)
                    if d2.action == "cancel":
                        raise MigrationError(f"migration of {self.vm} did not converge: {d2.reason}",
                                             decision=d2.to_wire(), passes=len(self.passes))

    async def _apply(self, d: Decision) -> None:
        self.decisions.append(d)
        self.rec.add_decision(len(self.decisions), d)
        self.progress(f"decision at pass {d.at_pass}: {d.action}: {d.reason}")
        if d.action in ("raise_downtime", "auto_converge"):
            await mp.MIG_SET.call(self.src.client, mp.SetParameters(self.vm, d.detail), timeout=10)
        elif d.action == "postcopy":
            await mp.MIG_POSTCOPY.call(self.src.client, VmName(self.vm), timeout=10)
            self._postcopy = True
        # "cancel" is carried out by _recover

    async def _late_window(self, st: SourceStatus) -> None:
        """The pre-switchover window (the source is stopped): the mirror completes, late
        storage is prepared, then the source goes on."""
        if self.mirror:
            done = await mp.MIG_MIRROR_COMPLETE.call(self.src.client, VmName(self.vm),
                                                     timeout=150)
            self.result = replace(self.result, mirror=MirrorRecord(
                target=self._mirror_target or "", bytes=done.bytes,
                sync_s=self._mirror_sync_s, complete_s=done.took_s))
            if self.policy.storage != "late":
                await mp.MIG_CONTINUE.call(self.src.client, VmName(self.vm), timeout=10)
                return
        t = time.monotonic()
        self.progress(f"source stopped; {self.dst.host}: preparing storage in the window")
        late = await mp.MIG_LATE_STORAGE.call(self.dst.client, VmName(self.vm), timeout=60)
        t_storage = time.monotonic() - t
        await mp.MIG_CONTINUE.call(self.src.client, VmName(self.vm), timeout=10)
        self.result = replace(self.result, late_window=LateWindow(
            storage_s=t_storage, window_s=time.monotonic() - t,
            detected_after_stop_s=t - (st.stop_t or t), dest=late))

    async def _finish_success(self, st: SourceStatus) -> None:
        final = st.final if st.final is not None else {}
        # the last source heartbeat (console lines may arrive just after the STOP event)
        src_hb = st.heartbeat
        fin = on_source_clock(await mp.MIG_DEST_FINISH.call(self.dst.client, mp.DestFinish(
            self.vm, after_counter=None if src_hb is None else src_hb.counter,
            source_heartbeat=src_hb), timeout=60), self._dst_shift)
        first = fin.first_heartbeat
        blackout = (first.t - src_hb.t) * 1000 if first and src_hb else None
        disk_read = _disk_value(fin.disk_read)
        src_disk = src_hb.disk_counter if src_hb else None
        continues = plausible = False
        if first is not None and src_hb is not None:
            continues = first.counter > src_hb.counter
            plausible = continues and blackout is not None and \
                first.counter - src_hb.counter <= math.ceil(blackout / self.period_ms) + 2
        disk_ok = disk_read is not None and (src_disk is None or src_disk < 0 or disk_read >= src_disk)
        sw = switchover_breakdown(SideStamps(st.stop_t, st.stop_qemu_t, st.checkpoints),
                                  SideStamps(fin.resume_t, fin.resume_qemu_t, fin.checkpoints),
                                  src_hb.t if src_hb else None, first.t if first else None,
                                  self.period_ms)
        rates = [p.dirty_rate_bytes for p in self.passes if p.dirty_rate_bytes]
        # pages dirtied during a pass / its duration; short passes say little (timer noise)
        est = [p.dirty_rate_est_bytes for p in self.passes[1:]
               if p.dirty_rate_est_bytes and (p.prev_pass_s or 0) >= 0.3]
        heartbeat = HeartbeatCheck(source_last=self._beat(src_hb), dest_first=self._beat(first),
                                   continues=continues and plausible)
        disk = DiskCheck(source_last=src_disk, dest_read=disk_read, ok=disk_ok)
        self.result = replace(
            self.result, state="completed",
            setup_ms=qmp_int(final, "setup-time"), total_ms=qmp_int(final, "total-time"),
            downtime_ms=qmp_int(final, "downtime"), blackout_ms=blackout,
            passes=max(qmp_int(final, "ram", "dirty-sync-count") or 0, len(self.passes)),
            bytes_sent=qmp_int(final, "ram", "transferred"), mbps=qmp_float(final, "ram", "mbps"),
            dirty_rate_max_bytes=max(rates) if rates else 0.0,
            dirty_rate_est_bytes=sorted(est)[len(est) // 2] if est else None,
            stop_t_rel=self._rel(st.stop_t), resume_t_rel=self._rel(fin.resume_t),
            stop_to_resume_ms=sw.stop_to_resume_ms,
            switchover=sw, heartbeat=heartbeat, disk=disk,
            dest_status=fin.status, dest_pid=fin.pid,
            dest_prepare=mp.DestStorage(timings=fin.timings, checks=fin.checks),
            statuses=st.statuses, final=final, pass_records=list(self.passes),
            decisions=list(self.decisions), postcopy=self._postcopy)
        if not (heartbeat.continues and disk_ok and fin.status == "running"):
            raise MigrationError(
                f"{self.vm}: QEMU says completed but the guest did not verify on {self.dst.host}: "
                f"heartbeat {src_hb.counter if src_hb else None} -> "
                f"{first.counter if first else None}, disk "
                f"{src_disk} -> {disk_read}, status {fin.status}",
                heartbeat=heartbeat.to_wire(), disk=disk.to_wire())
        await mp.MIG_SOURCE_FINISH.call(self.src.client, mp.SourceFinish(self.vm, dest=fin),
                                        timeout=30)

    def _rel(self, t: float | None) -> float | None:
        """A monotonic stamp of an agent as seconds since ``migrate`` was sent."""
        return None if t is None or self._t0 is None else round(t - self._t0, 4)

    def _beat(self, hb: mp.HeartbeatStamp | None) -> Beat | None:
        if hb is None:
            return None
        rel = self._rel(hb.t)  # _finish_success runs after mig_start: the origin is known
        return Beat(counter=hb.counter, disk_counter=hb.disk_counter,
                    t_rel=0.0 if rel is None else rel)

    async def _source_beats_again(self) -> SourceCheck:
        """Whether the guest beats on the source again: a few beats, longer if needed (a
        guest that was throttled hard or starved of CPU takes a moment to catch up)."""
        def counter(st: hp.VmStatus) -> int | None:
            return None if st.heartbeat is None else st.heartbeat.counter

        before = counter(await hp.VM_STATUS.call(self.src.client, VmName(self.vm), timeout=10))
        await asyncio.sleep(max(0.5, 2.5 * self.period_ms / 1000))
        deadline = time.monotonic() + RECOVER_WAIT_S
        while True:
            st = await hp.VM_STATUS.call(self.src.client, VmName(self.vm), timeout=10)
            after = counter(st)
            alive = (st.state == "running" and before is not None and after is not None
                     and after > before)
            if alive or st.state != "running" or time.monotonic() > deadline:
                return SourceCheck(status=st.state, heartbeat_before=before,
                                   heartbeat_after=after, alive=alive)
            await asyncio.sleep(0.25)

    async def _recover(self) -> Recovery:
        """Cancel on the source, check the guest runs there, drop the destination's leftovers.
        Runs even when the migration task was cancelled (Ctrl-C)."""
        out = Recovery()
        if self._postcopy:
            out = replace(out, note="post-copy had started: the guest's state is split between "
                          "hosts; QEMU cannot go back to the source")
        if self._source_died:
            out = replace(out, note="the source QEMU had exited: no source to go back to")
        else:
            try:
                if self._started and not self._postcopy:
                    out = replace(out, cancel=await mp.MIG_CANCEL.call(
                        self.src.client, mp.Cancel(self.vm), timeout=30))
                out = replace(out, source=await self._source_beats_again())
            except LabError as exc:
                out = replace(out, source_error=exc.message)
        for attempt in range(2):  # an unreachable destination drops itself when its lease lapses
            try:
                out = replace(out, dest=await mp.MIG_DEST_ABORT.call(
                    self.dst.client, VmName(self.vm), timeout=2))
                break
            except AgentError as exc:
                out = replace(out, dest_error=(
                    f"{exc.message} (attempt {attempt + 1}); the destination's agent drops the "
                    f"incoming VM itself when its lease ({self.policy.lease_s:g} s) lapses"))
                await asyncio.sleep(0.5)
        self.progress("recovered: " + recovery_line(out, self.src.host, self.dst.host))
        return out


def switchover_breakdown(src: SideStamps, dst: SideStamps, last_src_hb_t: float | None,
                         first_dst_hb_t: float | None,
                         period_ms: float = DEFAULT_HEARTBEAT_MS) -> Switchover:
    """Where the guest's blackout goes, in ms, all on one time.monotonic() axis:

    blackout = hb_before_stop + stop_to_resume + after_resume, exactly, where
    hb_before_stop = source STOP - last source heartbeat, stop_to_resume = the source QEMU's
    STOP event to the destination QEMU's RESUME event (each timestamped by its host agent on
    arrival), after_resume = RESUME - first destination heartbeat. The guest keeps its
    heartbeat deadlines in guest time, which does not advance while the VM is stopped, so
    hb_before_stop + after_resume = one period + restart_overhead (the time the resumed guest
    needs beyond its own schedule: TCG translation cache refill, timer catch-up, console).

    ``src`` is the source's STOP (``mig_status``: ``stop_t``, ``stop_qemu_t``,
    ``checkpoints``), ``dst`` the destination's RESUME (``mig_dest_finish``: ``resume_t``,
    ``resume_qemu_t``, ``checkpoints``); checkpoints are QEMU's own
    ``vmstate_downtime_checkpoint`` trace points, given relative to QEMU's STOP stamp."""
    stop, resume = src.t, dst.t

    def ms(a: float | None, b: float | None) -> float | None:
        return round((b - a) * 1000, 2) if a is not None and b is not None else None

    hb_before_stop = ms(last_src_hb_t, stop)
    after_resume = ms(resume, first_dst_hb_t)
    overhead = (round(hb_before_stop + after_resume - period_ms, 2)
                if hb_before_stop is not None and after_resume is not None else None)
    zero = src.qemu_t or stop
    points = {**src.checkpoints, **dst.checkpoints}
    checkpoints = {k: ms(zero, v) for k, v in sorted(points.items(), key=lambda kv: kv[1])}
    if dst.qemu_t is not None:
        checkpoints["RESUME (QEMU stamp)"] = ms(zero, dst.qemu_t)
    return Switchover(period_ms=period_ms, stop_to_resume_ms=ms(stop, resume),
                      stop_to_resume_qemu_ms=ms(src.qemu_t, dst.qemu_t),
                      hb_before_stop_ms=hb_before_stop, after_resume_ms=after_resume,
                      restart_overhead_ms=overhead, checkpoints_ms=checkpoints)


async def _clock_offset(client: RpcClient) -> tuple[float, float] | None:
    """(the agent's monotonic clock minus this process's, the round trip it was read in),
    from the quickest of three pings; None when the agent does not say its clock."""
    best: tuple[float, float] | None = None
    for _ in range(3):
        t0 = time.monotonic()
        ping = await hp.PING.call(client, timeout=10)
        t1 = time.monotonic()
        if ping.monotonic is None:
            return None
        if best is None or t1 - t0 < best[1]:
            best = (ping.monotonic - (t0 + t1) / 2, t1 - t0)
    return best


async def clock_shift(src: RpcClient, dst: RpcClient) -> float:
    """The destination agent's monotonic clock minus the source's, in seconds: 0 where the
    difference is within the reading's own uncertainty (two hosts of one machine share the
    clock), else the measured difference (two machines: their boot times apart)."""
    a, b = await _clock_offset(src), await _clock_offset(dst)
    if a is None or b is None:
        return 0.0
    shift = b[0] - a[0]
    return shift if abs(shift) > a[1] + b[1] else 0.0


def on_source_clock(fin: mp.DestFinished, shift: float) -> mp.DestFinished:
    """The destination's stamps in ``fin`` moved onto the source agent's clock."""
    if not shift:
        return fin

    def beat(hb: mp.HeartbeatStamp | None) -> mp.HeartbeatStamp | None:
        return None if hb is None else hb.replace(t=hb.t - shift)

    return fin.replace(
        first_heartbeat=beat(fin.first_heartbeat), heartbeat=beat(fin.heartbeat),
        resume_t=None if fin.resume_t is None else fin.resume_t - shift,
        resume_qemu_t=None if fin.resume_qemu_t is None else fin.resume_qemu_t - shift,
        checkpoints={k: v - shift for k, v in fin.checkpoints.items()})


def _why_failed(st: SourceStatus) -> str:
    return qmp_str(st.final, "error-desc") or "the destination went away?"


def _disk_value(text: str) -> int | None:
    return parse_disk_counter(text) if text.startswith("DISK read ") else None
