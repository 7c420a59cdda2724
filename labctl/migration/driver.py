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
import json
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

from labctl.core.errors import AgentError, LabError, MigrationError
from labctl.core.rpc import RpcClient
from labctl.guest.protocol import DEFAULT_HEARTBEAT_MS, heartbeat_ms_of, parse_disk_counter
from labctl.migration.convergence import ConvergencePolicy, Decision
from labctl.migration.policy import Policy
from labctl.migration.records import Recorder
from labctl.migration.report import pass_line
from labctl.state.context import Progress, quiet

RECOVER_WAIT_S = 10.0  # how long a cancelled migration waits to see the source guest beat


@dataclass
class Endpoint:
    """One side of a migration: its host name, an RPC client to its agent, its address."""

    host: str
    client: RpcClient
    address: str


class Migration:
    """One migration between two connected host agents. ``await run()`` once."""

    def __init__(self, vm: str, src: Endpoint, dst: Endpoint, policy: Policy,
                 dest_disk: dict[str, Any] | None = None, recorder: Recorder | None = None,
                 progress: Progress = quiet, measure_dirty_rate: bool = False,
                 heartbeat_ms: int | None = None) -> None:
        self.vm = vm
        #: the guest's heartbeat period; None: read from the source QEMU's kernel command line
        self.heartbeat_ms = heartbeat_ms
        self.measure_dirty_rate = measure_dirty_rate
        self.src = src
        self.dst = dst
        self.policy = policy
        self.dest_disk = dest_disk
        self.rec = recorder or Recorder(None)
        self.progress = progress
        self.passes: list[dict[str, Any]] = []
        self.decisions: list[Decision] = []
        self.result: dict[str, Any] = {}
        self._wake = asyncio.Event()
        self._lease_failures = 0
        self._started = False
        self._postcopy = False
        self._source_died = False
        self._src_status: dict[str, Any] = {}

    @property
    def period_ms(self) -> int:
        return self.heartbeat_ms or DEFAULT_HEARTBEAT_MS

    def _on_event(self, event: str, data: Any) -> None:
        if event == "migration" and isinstance(data, dict) and data.get("vm") == self.vm:
            self._wake.set()

    async def run(self) -> dict[str, Any]:
        t_wall = time.time()
        if self.src.host == self.dst.host:
            raise MigrationError(f"VM {self.vm} already runs on {self.dst.host}: nothing to migrate",
                                 vm=self.vm, host=self.dst.host)
        info = await self.src.client.call("mig_source_info", name=self.vm, timeout=15)
        if info["status"] != "running":
            raise MigrationError(f"VM {self.vm} is not running on {self.src.host} "
                                 f"(QEMU reports {info['status']}): nothing to migrate",
                                 vm=self.vm, status=info["status"])
        if info.get("migrating"):
            raise MigrationError(f"VM {self.vm} is already migrating", vm=self.vm)
        spec = dict(info["spec"])
        if self.heartbeat_ms is None:
            self.heartbeat_ms = heartbeat_ms_of(str(spec.get("append") or ""))
        if self.dest_disk is not None:
            spec["disk"] = self.dest_disk
        measured = None
        if self.measure_dirty_rate:  # before anything starts: it uses QEMU's dirty tracking too
            measured = await self.src.client.call("mig_dirty_rate", timeout=30, name=self.vm,
                                                  calc_time_s=1, sample_pages=8192)
            self.progress(f"{self.src.host}: calc-dirty-rate: {self.vm} dirties "
                          f"{measured['dirty_rate_mib_s']} MiB/s")
        self.rec.start(self.vm, self.src.host, self.dst.host, self.policy)
        self.result = {"id": self.rec.id, "vm": self.vm, "source": self.src.host,
                       "dest": self.dst.host, "policy": self.policy.name,
                       "storage": self.policy.storage, "started": t_wall,
                       "heartbeat_period_ms": self.period_ms,
                       "dirty_rate_measured": measured}
        lease: asyncio.Task[None] | None = None
        try:
            self.progress(f"{self.dst.host}: starting the incoming QEMU"
                          f"{' and opening the disk' if self.policy.storage == 'early' else ''}")
            t = time.monotonic()
            prep = await self.dst.client.call(
                "mig_prepare", timeout=90, spec=spec, listen=self.dst.address,
                storage=self.policy.storage, capabilities=self.policy.capabilities(),
                parameters=self.policy.parameters(), disk_size=info.get("disk_size"),
                lease_s=self.policy.lease_s)
            self.result["prepare"] = {"wall_s": time.monotonic() - t, **prep}
            lease = asyncio.ensure_future(self._keep_lease())
            await self.src.client.subscribe(self._on_event)
            self.progress(f"{self.src.host}: migrating to {prep['uri']} (policy {self.policy.name})")
            self._started = True
            start = await self.src.client.call(
                "mig_start", timeout=30, name=self.vm, uri=prep["uri"],
                capabilities=self.policy.capabilities(), parameters=self.policy.parameters())
            self.result["t0"] = start["t0"]
            final = await self._drive()
            await self._finish_success(final)
            self.rec.finish("completed", self.result)
            return self.result
        except BaseException as exc:
            cancelled = isinstance(exc, asyncio.CancelledError | KeyboardInterrupt)
            self.result["error"] = ("cancelled by the user" if cancelled
                                    else getattr(exc, "message", None) or repr(exc))
            recovery = await self._recover()
            self.result["recovery"] = recovery
            self.result["passes"] = len(self.passes)
            self.result["pass_records"] = self.passes
            self.result["decisions"] = [asdict(d) for d in self.decisions]
            state = "cancelled" if cancelled or "cancel" in str(self._src_status.get("status")) \
                else "failed"
            self.rec.finish(state, self.result)
            if cancelled:
                raise
            if isinstance(exc, MigrationError):
                exc.evidence.setdefault("recovery", recovery)
                exc.evidence.setdefault("migration_id", self.rec.id)
                raise
            if isinstance(exc, LabError):
                raise MigrationError(f"migration of {self.vm} to {self.dst.host} failed: "
                                     f"{exc.message}", recovery=recovery, cause=exc.evidence,
                                     migration_id=self.rec.id) from exc
            raise
        finally:
            if lease is not None:
                lease.cancel()
                with contextlib.suppress(BaseException):
                    await lease

    async def _keep_lease(self) -> None:
        while True:
            await asyncio.sleep(min(2.0, self.policy.lease_s / 4))
            try:
                await self.dst.client.call("mig_renew", timeout=1.5, name=self.vm,
                                           lease_s=self.policy.lease_s)
                self._lease_failures = 0
            except AgentError:
                self._lease_failures += 1

    async def _drive(self) -> dict[str, Any]:
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
            st = await self.src.client.call("mig_status", timeout=10, name=self.vm,
                                            since=len(self.passes))
            self._src_status = st
            for rec in st["passes"]:
                if self.passes:  # pages dirtied during the previous pass, over its duration
                    prev = self.passes[-1]
                    dt = rec["t"] - prev["t"]
                    rec["prev_pass_s"] = dt
                    if dt > 0 and rec.get("remaining") is not None and prev.get("pass", 0) >= 1:
                        rec["dirty_rate_est_bytes"] = float(rec["remaining"]) / dt
                self.passes.append(rec)
                self.rec.add_pass(rec)
                self.progress(pass_line(rec))
            status = st["status"]
            if st.get("process") in ("failed", "stopped") and status != "completed":
                self._source_died = True
                raise MigrationError(
                    f"the source QEMU of {self.vm} on {self.src.host} exited during the "
                    f"migration (exit status {st.get('returncode')}): the guest is gone with it, "
                    f"nothing is left to move; the destination is dropped",
                    vm=self.vm, host=self.src.host, returncode=st.get("returncode"),
                    status=status)
            if status == "completed":
                return dict(st)
            if status in ("failed", "cancelled"):
                raise MigrationError(
                    f"migration of {self.vm} {status} on {self.src.host} "
                    f"({_why_failed(st)})", status=status, final=st.get("final"))
            now = time.monotonic()
            if status == "pre-switchover" and not late_done:
                late_done = True
                await self._late_window(st)
                continue
            ram = ((st.get("now") or {}).get("ram") or {})
            moved = int(ram.get("transferred") or 0)
            if moved > last_bytes or status in ("setup", "pre-switchover", "device"):
                last_bytes, last_move = moved, now
            elif now - last_move > self.policy.stall_timeout_s and not self._postcopy:
                d = Decision("cancel", f"no migration progress for {now - last_move:.1f} s "
                             f"({moved} bytes sent; destination unreachable? "
                             f"{self._lease_failures} lease renewals failed)",
                             self.passes[-1]["pass"] if self.passes else None, now - t_start)
                await self._apply(d)
                raise MigrationError(f"migration of {self.vm} stalled: {d.reason}; cancelled",
                                     decision=asdict(d))
            if now - t_start > self.policy.timeout_s and not self._postcopy:
                d = Decision("cancel", f"migration took longer than {self.policy.timeout_s:g} s",
                             self.passes[-1]["pass"] if self.passes else None, now - t_start)
                await self._apply(d)
                raise MigrationError(f"migration of {self.vm} timed out: cancelled",
                                     decision=asdict(d))
            if not self._postcopy and status == "active":
                d2 = conv.decide(self.passes, now - t_start)
                if d2 is not None:
                    await self._apply(d2)
                    if d2.action == "cancel":
                        raise MigrationError(f"migration of {self.vm} did not converge: {d2.reason}",
                                             decision=asdict(d2), passes=len(self.passes))

    async def _apply(self, d: Decision) -> None:
        self.decisions.append(d)
        self.rec.add_decision(len(self.decisions), d)
        self.progress(f"decision at pass {d.at_pass}: {d.action}: {d.reason}")
        if d.action in ("raise_downtime", "auto_converge"):
            await self.src.client.call("mig_set", timeout=10, name=self.vm, parameters=d.detail)
        elif d.action == "postcopy":
            await self.src.client.call("mig_postcopy", timeout=10, name=self.vm)
            self._postcopy = True
        # "cancel" is carried out by _recover

    async def _late_window(self, st: dict[str, Any]) -> None:
        """Late storage preparation: the source is stopped (pre-switchover)."""
        t = time.monotonic()
        self.progress(f"source stopped; {self.dst.host}: preparing storage in the window")
        late = await self.dst.client.call("mig_late_storage", timeout=60, name=self.vm)
        t_storage = time.monotonic() - t
        await self.src.client.call("mig_continue", timeout=10, name=self.vm)
        self.result["late_window"] = {"storage_s": t_storage, "window_s": time.monotonic() - t,
                                      "detected_after_stop_s": t - (st.get("stop_t") or t),
                                      "dest": late}

    async def _finish_success(self, st: dict[str, Any]) -> None:
        final = st.get("final") or {}
        # the last source heartbeat (console lines may arrive just after the STOP event)
        src_hb = st.get("heartbeat") or {}
        fin = await self.dst.client.call("mig_dest_finish", timeout=40, name=self.vm,
                                         after_counter=src_hb.get("counter"))
        first = fin.get("first_heartbeat") or {}
        ram = final.get("ram") or {}
        blackout = (first["t"] - src_hb["t"]) * 1000 if first and src_hb else None
        disk_read = _disk_value(fin.get("disk_read"))
        src_disk = src_hb.get("disk_counter")
        continues = bool(first) and first.get("counter", -1) > src_hb.get("counter", 1 << 62)
        plausible = continues and blackout is not None and \
            first["counter"] - src_hb["counter"] <= math.ceil(blackout / self.period_ms) + 2
        disk_ok = disk_read is not None and (src_disk is None or src_disk < 0 or disk_read >= src_disk)
        sw = switchover_breakdown(st, fin, src_hb.get("t"), first.get("t"), self.period_ms)
        rates = [p["dirty_rate_bytes"] for p in self.passes if p.get("dirty_rate_bytes")]
        # pages dirtied during a pass / its duration; short passes say little (timer noise)
        est = [p["dirty_rate_est_bytes"] for p in self.passes[1:]
               if p.get("dirty_rate_est_bytes") and p.get("prev_pass_s", 0) >= 0.3]
        self.result.update({
            "state": "completed",
            "setup_ms": final.get("setup-time"), "total_ms": final.get("total-time"),
            "downtime_ms": final.get("downtime"), "blackout_ms": blackout,
            "passes": max([int(ram.get("dirty-sync-count") or 0), len(self.passes)]),
            "bytes_sent": ram.get("transferred"), "mbps": ram.get("mbps"),
            "dirty_rate_max_bytes": max(rates) if rates else 0.0,
            "dirty_rate_est_bytes": sorted(est)[len(est) // 2] if est else None,
            "stop_t": st.get("stop_t"), "resume_t": fin.get("resume_t"),
            "stop_to_resume_ms": sw.get("stop_to_resume_ms"), "switchover": sw,
            "heartbeat": {"source_last": src_hb, "dest_first": first,
                          "continues": continues and plausible},
            "disk": {"source_last": src_disk, "dest_read": disk_read, "ok": disk_ok},
            "dest_status": fin.get("status"), "dest_pid": fin.get("pid"),
            "dest_prepare": {"timings": fin.get("timings"), "checks": fin.get("checks")},
            "statuses": st.get("statuses"), "final": final,
            "pass_records": self.passes, "decisions": [asdict(d) for d in self.decisions],
            "postcopy": self._postcopy,
        })
        if not (continues and plausible and disk_ok and fin.get("status") == "running"):
            raise MigrationError(
                f"{self.vm}: QEMU says completed but the guest did not verify on {self.dst.host}: "
                f"heartbeat {src_hb.get('counter')} -> {first.get('counter')}, disk "
                f"{src_disk} -> {disk_read}, status {fin.get('status')}",
                heartbeat=self.result["heartbeat"], disk=self.result["disk"])
        await self.src.client.call("mig_source_finish", timeout=30, name=self.vm)

    async def _source_beats_again(self) -> dict[str, Any]:
        """Whether the guest beats on the source again: a few beats, longer if needed (a
        guest that was throttled hard or starved of CPU takes a moment to catch up)."""
        def counter(st: dict[str, Any]) -> int | None:
            return (st.get("heartbeat") or {}).get("counter")

        before = counter(await self.src.client.call("vm_status", name=self.vm, timeout=10))
        await asyncio.sleep(max(0.5, 2.5 * self.period_ms / 1000))
        deadline = time.monotonic() + RECOVER_WAIT_S
        while True:
            st = await self.src.client.call("vm_status", name=self.vm, timeout=10)
            after = counter(st)
            alive = (st["state"] == "running" and before is not None and after is not None
                     and after > before)
            if alive or st["state"] != "running" or time.monotonic() > deadline:
                return {"status": st["state"], "heartbeat_before": before,
                        "heartbeat_after": after, "alive": alive}
            await asyncio.sleep(0.25)

    async def _recover(self) -> dict[str, Any]:
        """Cancel on the source, check the guest runs there, drop the destination's leftovers.
        Runs even when the migration task was cancelled (Ctrl-C)."""
        out: dict[str, Any] = {}
        if self._postcopy:
            out["note"] = ("post-copy had started: the guest's state is split between hosts; "
                           "QEMU cannot go back to the source")
        if self._source_died:
            out["note"] = "the source QEMU had exited: no source to go back to"
        else:
            try:
                if self._started and not self._postcopy:
                    out["cancel"] = await self.src.client.call("mig_cancel", timeout=30,
                                                               name=self.vm)
                out["source"] = await self._source_beats_again()
            except LabError as exc:
                out["source_error"] = exc.message
        for attempt in range(2):  # an unreachable destination drops itself when its lease lapses
            try:
                out["dest"] = await self.dst.client.call("mig_dest_abort", timeout=2, name=self.vm)
                break
            except AgentError as exc:
                out["dest_error"] = (f"{exc.message} (attempt {attempt + 1}); the destination's "
                                     f"agent drops the incoming VM itself when its lease "
                                     f"({self.policy.lease_s:g} s) lapses")
                await asyncio.sleep(0.5)
        self.progress("recovered: " + json.dumps({k: v for k, v in out.items()
                                                  if k in ("source", "dest", "dest_error")}))
        return out


def switchover_breakdown(src: dict[str, Any], dst: dict[str, Any], last_src_hb_t: float | None,
                         first_dst_hb_t: float | None,
                         period_ms: float = DEFAULT_HEARTBEAT_MS) -> dict[str, Any]:
    """Where the guest's blackout goes, in ms, all on one time.monotonic() axis:

    blackout = hb_before_stop + stop_to_resume + after_resume, exactly, where
    hb_before_stop = source STOP - last source heartbeat, stop_to_resume = the source QEMU's
    STOP event to the destination QEMU's RESUME event (each timestamped by its host agent on
    arrival), after_resume = RESUME - first destination heartbeat. The guest keeps its
    heartbeat deadlines in guest time, which does not advance while the VM is stopped, so
    hb_before_stop + after_resume = one period + restart_overhead (the time the resumed guest
    needs beyond its own schedule: TCG translation cache refill, timer catch-up, console).

    ``src``/``dst`` are the agents' answers (``stop_t``, ``stop_qemu_t``, ``checkpoints`` /
    ``resume_t``, ``resume_qemu_t``, ``checkpoints``); checkpoints are QEMU's own
    ``vmstate_downtime_checkpoint`` trace points, given relative to QEMU's STOP stamp."""
    stop, resume = src.get("stop_t"), dst.get("resume_t")
    out: dict[str, Any] = {"period_ms": period_ms}

    def ms(a: Any, b: Any) -> float | None:
        return round((float(b) - float(a)) * 1000, 2) if a is not None and b is not None else None

    out["stop_to_resume_ms"] = ms(stop, resume)
    out["stop_to_resume_qemu_ms"] = ms(src.get("stop_qemu_t"), dst.get("resume_qemu_t"))
    out["hb_before_stop_ms"] = ms(last_src_hb_t, stop)
    out["after_resume_ms"] = ms(resume, first_dst_hb_t)
    if out["hb_before_stop_ms"] is not None and out["after_resume_ms"] is not None:
        out["restart_overhead_ms"] = round(out["hb_before_stop_ms"] + out["after_resume_ms"]
                                           - out["period_ms"], 2)
    zero = src.get("stop_qemu_t") or stop
    points = {**{k: v for k, v in (src.get("checkpoints") or {}).items()},
              **{k: v for k, v in (dst.get("checkpoints") or {}).items()}}
    out["checkpoints_ms"] = {k: ms(zero, v) for k, v in sorted(points.items(), key=lambda kv: kv[1])}
    if dst.get("resume_qemu_t") is not None:
        out["checkpoints_ms"]["RESUME (QEMU stamp)"] = ms(zero, dst["resume_qemu_t"])
    return out


def _why_failed(st: dict[str, Any]) -> str:
    final = st.get("final") or {}
    return str(final.get("error-desc") or "the destination went away?")


def _disk_value(text: Any) -> int | None:
    return parse_disk_counter(text) if isinstance(text, str) and text.startswith("DISK read ") \
        else None


