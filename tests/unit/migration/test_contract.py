"""The migration driver against the migration protocol, no QEMU: two fake host agents
(real RpcServers on 127.0.0.1, handlers built from the protocol's Method objects) play the
source and the destination in memory, and the real :class:`Migration` drives them.

The fakes are strict about order: a call that a real host could not answer at that point
(mig_start before the destination listens, mig_dest_finish before the source completed,
mig_source_finish before the guest was verified on the destination...) is recorded as a
violation, answered with an error, and fails the test."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import pytest

from labctl.core.errors import LabStateError, MigrationError, ProtocolError, RemoteError
from labctl.core.rpc import Handler, RpcClient, RpcServer
from labctl.core.wire import Json, Method, handlers
from labctl.hosts import protocol as hp
from labctl.migration import protocol as mp
from labctl.migration.driver import Endpoint, Migration
from labctl.migration.policy import Policy, load_policy
from labctl.migration.records import Recorder
from labctl.migration.tables import MIGRATIONS
from labctl.state.inventory import Inventory

SECRET = b"c" * 32
MIB = 1 << 20
VM = "vm1"
SPEC = hp.VmSpec(name=VM, memory_mib=256, vcpus=1, kernel=Path("/fake/vmlinuz"),
                 initrd=Path("/fake/initrd.img"), append="console=ttyS0 labctl.hb_ms=100",
                 disk=hp.FileDisk(Path("/fake/vm1.raw")))
DISK_SIZE = 4 * MIB
SRC_COUNTER, SRC_DISK = 500, 42  # the guest's heartbeat and disk counter when it stops


@dataclass
class Behaviour:
    """How the fake migration goes: one pass per ``mig_status`` call with these remaining
    sizes, then ``then``: complete, stay flat (repeat the last pass for ever), the source
    QEMU dies, or pause before switchover (late storage) and complete after mig_continue."""

    remaining_mib: list[float]
    then: Literal["complete", "flat", "die", "pre-switchover"] = "complete"
    #: the destination's first heartbeat counter minus the source's last one
    dest_counter_step: int = 1
    #: the disk counter the guest reads back on the destination
    dest_disk_read: int = SRC_DISK
    #: method name -> what to do to the encoded reply (an agent that sends a bad answer)
    mangle: dict[str, Callable[[dict[str, Json]], dict[str, Json]]] = field(default_factory=dict)
    #: the destination refuses renewals after this many (it gave up: a mobility agent whose
    #: peer site went silent)
    dest_gives_up_after: int | None = None
    #: the destination's monotonic clock ahead of the source's, seconds (two machines)
    dest_clock: float = 0.0


@dataclass
class _Job:
    t0: float
    late: bool
    postcopy_ok: bool
    status: str = "setup"
    passes: list[mp.PassRecord] = field(default_factory=list)
    statuses: list[mp.StatusChange] = field(default_factory=list)
    final: Json = None
    stop_t: float | None = None
    transferred: int = 0


class World:
    """What the two fake hosts share: the calls in order and every protocol violation."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.b = behaviour
        self.calls: list[tuple[str, str]] = []
        self.violations: list[str] = []
        self.hosts: dict[str, FakeHost] = {}

    def require(self, ok: bool, what: str) -> None:
        if not ok:
            self.violations.append(what)
            raise LabStateError(f"fake host: protocol violation: {what}")

    def called(self, host: str, method: str) -> bool:
        return (host, method) in self.calls

    def count(self, method: str) -> int:
        return sum(1 for _, m in self.calls if m == method)

    def methods(self) -> list[str]:
        return [m for _, m in self.calls]


class FakeHost:
    """One host agent: its VM (if any), an incoming VM (destination), a migration job (source)."""

    def __init__(self, world: World, name: str, runs_vm: bool) -> None:
        self.w = world
        self.name = name
        self.running = runs_vm  # the source QEMU process runs
        self.returncode: int | None = None
        self.vm_status_counter = SRC_COUNTER
        self.incoming: Literal["none", "prepared", "storage-ready", "finished", "aborted"] = "none"
        self.prepare_req: mp.Prepare | None = None
        self.uri = ""
        self.job: _Job | None = None
        self.dead_status_calls = 0
        #: this host's clock ahead of the test's (the destination's: ``dest_clock``)
        self.clock = 0.0 if runs_vm else world.b.dest_clock
        self.server = RpcServer(SECRET, self._handlers(), name=f"fake {name}")
        world.hosts[name] = self

    def other(self) -> FakeHost:
        return next(h for n, h in self.w.hosts.items() if n != self.name)

    # -- plumbing ---------------------------------------------------------------------------
    def _handlers(self) -> dict[str, Handler]:
        entries: list[tuple[str, Handler]] = [
            self._entry(mp.MIG_PREPARE, self.mig_prepare), self._entry(mp.MIG_RENEW, self.mig_renew),
            self._entry(mp.MIG_LATE_STORAGE, self.mig_late_storage),
            self._entry(mp.MIG_DEST_FINISH, self.mig_dest_finish),
            self._entry(mp.MIG_DEST_ABORT, self.mig_dest_abort),
            self._entry(mp.MIG_SOURCE_INFO, self.mig_source_info),
            self._entry(mp.MIG_DIRTY_RATE, self.mig_dirty_rate),
            self._entry(mp.MIG_START, self.mig_start), self._entry(mp.MIG_STATUS, self.mig_status),
            self._entry(mp.MIG_SET, self.mig_set), self._entry(mp.MIG_CONTINUE, self.mig_continue),
            self._entry(mp.MIG_POSTCOPY, self.mig_postcopy),
            self._entry(mp.MIG_CANCEL, self.mig_cancel),
            self._entry(mp.MIG_SOURCE_FINISH, self.mig_source_finish),
            self._entry(hp.VM_STATUS, self.vm_status)]
        return {**handlers(*entries), **handlers(hp.PING.serve(self.ping))}

    async def ping(self, _: Any) -> hp.HostPing:
        # not in the world's record: the driver reads each clock before it starts
        return hp.HostPing(host=self.name, pid=1, qemu_version="10.0.0", accel="tcg",
                           mem_available=None, monotonic=time.monotonic() + self.clock)

    def _entry(self, method: Method[Any, Any], fn: Callable[[Any], Awaitable[Any]]
               ) -> tuple[str, Handler]:
        name, served = method.serve(fn)

        async def logged(**params: Json) -> Json:
            self.w.calls.append((self.name, name))
            out = await served(**params)
            mangle = self.w.b.mangle.get(name)
            return mangle(out) if mangle is not None else out

        return name, logged

    def _publish(self, **kw: Any) -> None:
        self.server.publish(mp.EVENT_PROGRESS, mp.MigrationProgress(vm=VM, t=time.monotonic(),
                                                                    **kw).to_wire())

    # -- destination ------------------------------------------------------------------------
    async def mig_prepare(self, req: mp.Prepare) -> mp.Prepared:
        src = self.other()
        self.w.require(self.w.called(src.name, "mig_source_info"),
                       "mig_prepare before the source was asked for the VM's spec")
        self.w.require(self.incoming in ("none", "aborted"), "mig_prepare twice")
        self.w.require(req.spec == SPEC, f"the destination got another spec: {req.spec}")
        self.w.require(req.listen == "127.0.0.1", f"listen on {req.listen}")
        if req.storage == "late":
            self.w.require(req.disk_size == DISK_SIZE, "late storage without the disk size")
        self.prepare_req = req
        self.incoming = "prepared" if req.storage == "late" else "storage-ready"
        self.uri = f"tcp:127.0.0.1:{49152 + len(self.w.calls)}"
        checks = mp.StorageChecks()
        if req.storage == "early":
            checks = mp.StorageChecks(
                datastore=mp.FileDatastoreCheck(path="/fake/vm1.raw", size_bytes=DISK_SIZE),
                read=mp.ReadCheck(bytes=512, disk_counter=SRC_DISK - 1))
        return mp.Prepared(uri=self.uri, pid=4242, storage=req.storage,
                           timings={"qemu_start_s": 0.01, "prepare_s": 0.02}, checks=checks,
                           run_dir="/fake/run/vm1")

    def _require_incoming(self, method: str) -> None:
        self.w.require(self.incoming in ("prepared", "storage-ready"),
                       f"{method} on {self.name} with no incoming VM (state {self.incoming})")

    async def mig_renew(self, req: mp.Renew) -> mp.Renewed:
        self.w.require(self.prepare_req is not None, "mig_renew before mig_prepare")
        assert self.prepare_req is not None
        self.w.require(req.lease_s == self.prepare_req.lease_s,
                       "the lease renewed for another time than prepared")
        if self.incoming not in ("prepared", "storage-ready"):  # a real agent has no lease now
            raise LabStateError(f"host {self.name} has no incoming migration of {req.name!r}")
        limit = self.w.b.dest_gives_up_after
        if limit is not None and self.w.count("mig_renew") > limit:
            raise MigrationError("no word from the peer site for 10 s")
        return mp.Renewed(lease_until=time.monotonic() + req.lease_s)

    async def mig_late_storage(self, req: hp.VmName) -> mp.DestStorage:
        self._require_incoming("mig_late_storage")
        self.w.require(self.prepare_req is not None and self.prepare_req.storage == "late",
                       "mig_late_storage on an incoming VM prepared with early storage")
        job = self.other().job
        self.w.require(job is not None and job.status == "pre-switchover",
                       "mig_late_storage while the source is not paused before switchover")
        self.incoming = "storage-ready"
        return mp.DestStorage(
            timings={"qemu_start_s": 0.01, "qemu_open_s": 0.003, "late_storage_s": 0.004},
            checks=mp.StorageChecks(
                datastore=mp.FileDatastoreCheck(path="/fake/vm1.raw", size_bytes=DISK_SIZE),
                read=mp.ReadCheck(bytes=512, disk_counter=SRC_DISK)))

    async def mig_dest_finish(self, req: mp.DestFinish) -> mp.DestFinished:
        self._require_incoming("mig_dest_finish")
        job = self.other().job
        self.w.require(job is not None and job.status == "completed",
                       "mig_dest_finish before the source said completed")
        self.w.require(self.incoming == "storage-ready",
                       "mig_dest_finish with the late storage never prepared")
        self.w.require(req.after_counter == SRC_COUNTER,
                       f"after_counter {req.after_counter}, the source's last beat was {SRC_COUNTER}")
        assert job is not None and job.stop_t is not None
        self.incoming = "finished"  # the VM is this host's own from now on
        resume = job.stop_t + 0.1 + self.clock  # on this host's own clock
        first = mp.HeartbeatStamp(counter=SRC_COUNTER + self.w.b.dest_counter_step,
                                  disk_counter=self.w.b.dest_disk_read, t=resume + 0.05)
        return mp.DestFinished(
            first_heartbeat=first, heartbeat=first, resume_t=resume, resume_qemu_t=resume - 0.001,
            checkpoints={"dst-precopy-loadvm-completed": resume - 0.002},
            disk_read=f"DISK read {self.w.b.dest_disk_read}", status="running", pid=4242,
            timings={"prepare_s": 0.02}, checks=mp.StorageChecks(
                read=mp.ReadCheck(bytes=512, disk_counter=SRC_DISK)))

    async def mig_dest_abort(self, req: hp.VmName) -> mp.DestAborted:
        self.w.require(req.name == VM, f"mig_dest_abort of {req.name}")
        removed = self.incoming in ("prepared", "storage-ready")
        if removed:
            self.incoming = "aborted"
        return mp.DestAborted(name=req.name, removed=removed)

    # -- source -----------------------------------------------------------------------------
    def _require_vm(self, method: str) -> None:
        self.w.require(self.running, f"{method} on {self.name}, which runs no live VM")

    async def mig_source_info(self, req: hp.VmName) -> mp.SourceInfo:
        self._require_vm("mig_source_info")
        hb = mp.HeartbeatStamp(counter=SRC_COUNTER, disk_counter=SRC_DISK, t=time.monotonic())
        return mp.SourceInfo(spec=SPEC, status="running", disk_size=DISK_SIZE, heartbeat=hb,
                             pid=1000, process="running", migrating=False)

    async def mig_dirty_rate(self, req: mp.DirtyRateRequest) -> mp.DirtyRate:
        self._require_vm("mig_dirty_rate")
        self.w.require(self.job is None, "mig_dirty_rate while migrating")
        return mp.DirtyRate(dirty_rate_mib_s=12, mode="page-sampling",
                            calc_time_s=req.calc_time_s, sample_pages=req.sample_pages, took_s=1.0)

    async def mig_start(self, req: mp.Start) -> mp.Started:
        self._require_vm("mig_start")
        dest = self.other()
        self.w.require(self.w.called(self.name, "mig_source_info"), "mig_start before mig_source_info")
        self.w.require(self.job is None, "mig_start twice")
        self.w.require(dest.incoming in ("prepared", "storage-ready") and req.uri == dest.uri,
                       f"mig_start to {req.uri} before the destination listens there")
        self.w.require(req.capabilities.get("events") is True, "migration events not asked for")
        late = bool(dest.prepare_req and dest.prepare_req.storage == "late")
        self.w.require(req.capabilities.get("pause-before-switchover", False) == late,
                       "pause-before-switchover must be on exactly with late storage")
        self.w.require(isinstance(req.parameters.get("downtime-limit"), int),
                       "no downtime limit given")
        self.job = _Job(t0=time.monotonic(), late=late,
                        postcopy_ok=bool(req.capabilities.get("postcopy-ram")))
        self._set_status("active")
        return mp.Started(t0=self.job.t0)

    def _set_status(self, status: str) -> None:
        assert self.job is not None
        t = time.monotonic()
        self.job.status = status
        self.job.statuses.append(mp.StatusChange(t_rel=round(t - self.job.t0, 4),
                                                 status=status))
        self._publish(status=status)

    def _advance(self, job: _Job) -> None:
        """One step of the fake migration (each mig_status call)."""
        b = self.w.b
        t = time.monotonic()
        n = len(job.passes)
        if n < len(b.remaining_mib) or b.then == "flat":
            rem = b.remaining_mib[min(n, len(b.remaining_mib) - 1)]
            job.transferred += 64 * MIB
            job.passes.append(mp.PassRecord(
                pass_=n + 1, t_rel=round(t - job.t0, 4), status="active",
                dirty_sync_count=n + 1, transferred=job.transferred, remaining=int(rem * MIB),
                total=256 * MIB, dirty_pages_rate=0.0, dirty_rate_bytes=0.0,
                expected_downtime_ms=int(rem * 20), throttle_pct=0, mbps=400.0))
            return
        if b.then == "die":
            self.running = False
            self.returncode = -9
            return
        if b.then == "pre-switchover" and job.status == "active":
            job.stop_t = t
            self._set_status("pre-switchover")
            return
        if job.status in ("active", "device"):
            job.stop_t = job.stop_t or t - 0.06
            job.transferred += 8 * MIB
            self._set_status("completed")
            job.final = {"status": "completed", "setup-time": 3, "total-time": 900,
                         "downtime": 45, "ram": {"transferred": job.transferred, "mbps": 400.5,
                                                 "dirty-sync-count": len(job.passes) + 1}}

    async def mig_status(self, req: mp.StatusRequest) -> mp.SourceStatus:
        job = self.job
        self.w.require(job is not None, "mig_status before mig_start")
        assert job is not None
        self.w.require(0 <= req.since <= len(job.passes),
                       f"mig_status since {req.since}, only {len(job.passes)} passes")
        if self.running:
            self._advance(job)
        if not self.running:
            self.dead_status_calls += 1
        hb = mp.HeartbeatStamp(counter=SRC_COUNTER, disk_counter=SRC_DISK,
                               t=(job.stop_t or time.monotonic()) - 0.04)
        now = {"status": job.status, "ram": {"transferred": job.transferred}} if self.running \
            else None
        return mp.SourceStatus(
            status=job.status, t0=job.t0, passes=job.passes[req.since:],
            statuses=list(job.statuses), now=now, final=job.final, stop_t=job.stop_t,
            stop_qemu_t=None if job.stop_t is None else job.stop_t + 0.001,
            checkpoints={"src-downtime-end": job.stop_t + 0.09} if job.final else {},
            heartbeat=hb, process="running" if self.running else "failed",
            returncode=self.returncode, t=time.monotonic())

    def _require_active(self, method: str) -> _Job:
        job = self.job
        self.w.require(job is not None and job.final is None and self.running,
                       f"{method} with no migration running")
        assert job is not None
        return job

    async def mig_set(self, req: mp.SetParameters) -> mp.Stamp:
        self._require_active("mig_set")
        return mp.Stamp(t=time.monotonic())

    async def mig_continue(self, req: hp.VmName) -> mp.Stamp:
        job = self._require_active("mig_continue")
        self.w.require(job.status == "pre-switchover", "mig_continue when not paused")
        self.w.require(self.other().incoming == "storage-ready",
                       "mig_continue before the destination's storage was ready")
        self._set_status("device")
        return mp.Stamp(t=time.monotonic())

    async def mig_postcopy(self, req: hp.VmName) -> mp.Stamp:
        job = self._require_active("mig_postcopy")
        self.w.require(job.postcopy_ok, "mig_postcopy without the postcopy-ram capability")
        return mp.Stamp(t=time.monotonic())

    async def mig_cancel(self, req: mp.Cancel) -> mp.Cancelled:
        self.w.require(self.running, "mig_cancel to a source whose QEMU is gone")
        job = self.job
        status = "none"
        if job is not None:
            if job.final is None:
                self._set_status("cancelled")
                job.final = {"status": "cancelled"}
            status = job.status
        return mp.Cancelled(status=status, vm_status="postmigrate" if status == "completed"
                            else "running", resumed_by_us=False, took_s=0.01)

    async def mig_source_finish(self, req: hp.VmName) -> hp.VmStopped:
        self._require_vm("mig_source_finish")
        self.w.require(self.job is not None and self.job.status == "completed",
                       "mig_source_finish before the migration completed")
        self.w.require(self.other().incoming == "finished",
                       "mig_source_finish before the guest was verified on the destination")
        self.running = False
        return hp.VmStopped(name=VM, pid=1000, returncode=0)

    async def vm_status(self, req: hp.VmName) -> hp.VmStatus:
        self._require_vm("vm_status")
        self.vm_status_counter += 1  # the guest beats on
        done = self.job is not None and self.job.status == "completed"
        return hp.VmStatus(
            name=VM, state="postmigrate" if done else "running", process="running", pid=1000,
            returncode=None, heartbeat=hp.HeartbeatAge(counter=self.vm_status_counter, age_s=0.05),
            disk_counter=SRC_DISK, first_heartbeat_s=1.0, qmp_check_socket="/fake/qmp-check.sock",
            console_log="/fake/console.log")


@dataclass
class Rig:
    world: World
    inv: Inventory
    clients: dict[str, RpcClient] = field(default_factory=dict)

    def migration(self, policy: Policy, **kw: Any) -> Migration:
        """The real driver, from host a (running the VM) to host b."""
        return Migration(VM, Endpoint("a", self.clients["a"], "127.0.0.1"),
                         Endpoint("b", self.clients["b"], "127.0.0.1"), policy,
                         recorder=Recorder(self.inv), **kw)


@contextlib.asynccontextmanager
async def rig(behaviour: Behaviour, tmp_path: Path) -> AsyncIterator[Rig]:
    world = World(behaviour)
    hosts = [FakeHost(world, "a", runs_vm=True), FakeHost(world, "b", runs_vm=False)]
    inv = Inventory.open(tmp_path / "migrations.db", [MIGRATIONS])
    r = Rig(world, inv)
    try:
        for h in hosts:
            await h.server.start("127.0.0.1", 0)
            assert h.server._server is not None
            port = h.server._server.sockets[0].getsockname()[1]
            r.clients[h.name] = await RpcClient.connect("127.0.0.1", port, SECRET,
                                                        peer=f"host {h.name}")
        yield r
    finally:
        for c in r.clients.values():
            await c.close()
        await asyncio.sleep(0.05)  # the servers see the connections end
        for h in hosts:
            await h.server.close()
        inv.close()
        if world.violations:
            pytest.fail(f"the driver broke the protocol: {world.violations}")


def _policy(name: str) -> Policy:
    # a short lease: the driver renews it every lease_s / 4 while it drives the migration
    return replace(load_policy(name), lease_s=1.0)


# --- the cases -------------------------------------------------------------------------------

@pytest.mark.asyncio
@pytest.mark.parametrize("storage", ["early", "late"])
async def test_completed_migration_is_verified_and_recorded(tmp_path: Path, storage: str) -> None:
    b = Behaviour([256, 120, 60, 20, 5], then="pre-switchover" if storage == "late" else "complete")
    async with rig(b, tmp_path) as r:
        res = await r.migration(_policy("late" if storage == "late" else "default"),
                                measure_dirty_rate=True).run()
        w = r.world
        calls = w.methods()
        # the order a real pair of hosts needs
        order = ["mig_source_info", "mig_dirty_rate", "mig_prepare", "mig_start"]
        assert [m for m in calls if m in order] == order
        assert calls.index("mig_dest_finish") < calls.index("mig_source_finish")
        assert "mig_cancel" not in calls and "mig_dest_abort" not in calls
        if storage == "late":
            assert calls.index("mig_late_storage") < calls.index("mig_continue")
            assert res["late_window"]["dest"]["checks"]["read"]["bytes"] == 512
            assert "qemu_open_s" in res["late_window"]["dest"]["timings"]
        else:
            assert "mig_late_storage" not in calls
            assert res["prepare"]["checks"]["read"]["bytes"] == 512
        assert w.count("mig_renew") >= 1  # the lease was kept while it ran
        row = r.inv.rows("migrations")[-1]
        stored = json.loads(row["result"])
        assert row["state"] == "completed" and row["passes"] == 6 and row["downtime_ms"] == 45
        assert len(r.inv.rows("migration_passes", migration=row["id"])) == 5
    # the record, as returned and as stored
    assert res["state"] == "completed" and res["source"] == "a" and res["dest"] == "b"
    assert res["heartbeat"]["continues"]
    assert res["heartbeat"]["source_last"]["counter"] == SRC_COUNTER
    assert res["heartbeat"]["dest_first"]["counter"] == SRC_COUNTER + 1
    assert res["disk"] == {"source_last": SRC_DISK, "dest_read": SRC_DISK, "ok": True}
    assert res["passes"] == 6 and [p["pass"] for p in res["pass_records"]] == [1, 2, 3, 4, 5]
    assert res["pass_records"][1]["prev_pass_s"] > 0  # computed by the driver
    assert res["downtime_ms"] == 45 and res["total_ms"] == 900 and res["bytes_sent"] > 0
    assert res["dirty_rate_measured"]["dirty_rate_mib_s"] == 12
    assert res["blackout_ms"] == pytest.approx(190, abs=1)
    sw = res["switchover"]
    assert sw["hb_before_stop_ms"] + sw["stop_to_resume_ms"] + sw["after_resume_ms"] == \
        pytest.approx(res["blackout_ms"], abs=0.05)
    assert res["dest_status"] == "running" and res["dest_pid"] == 4242 and not res["decisions"]
    json.dumps(res)  # plain JSON
    assert res["storage"] == storage
    assert stored["heartbeat"] == res["heartbeat"] and "pass_records" not in stored


@pytest.mark.asyncio
async def test_non_converging_migration_is_cancelled_by_the_policy(tmp_path: Path) -> None:
    async with rig(Behaviour([256, 60, 61, 60, 62, 60], then="flat"), tmp_path) as r:
        with pytest.raises(MigrationError, match="did not converge") as info:
            await r.migration(_policy("strict")).run()
        calls = r.world.methods()
        assert calls.index("mig_cancel") < calls.index("mig_dest_abort")
        assert "mig_dest_finish" not in calls and "mig_source_finish" not in calls
        assert r.world.hosts["b"].incoming == "aborted"
        row = r.inv.rows("migrations")[-1]
        decisions = r.inv.rows("migration_decisions", migration=row["id"])
    recovery = info.value.evidence["recovery"]
    assert recovery["cancel"]["status"] == "cancelled"
    assert recovery["source"]["alive"] and recovery["dest"]["removed"]
    assert row["state"] == "failed" and "did not converge" in row["error"]
    assert [d["action"] for d in decisions] == ["cancel"]
    assert decisions[0]["at_pass"] <= 5
    assert "not falling" in decisions[0]["reason"]


@pytest.mark.asyncio
async def test_a_destination_that_gives_up_stops_the_migration(tmp_path: Path) -> None:
    """A destination that answers a renewal with a refusal (not silence) has given up: the
    driver cancels at once instead of waiting for the stall limit."""
    async with rig(Behaviour([256 - i * 0.5 for i in range(400)], then="flat",
                             dest_gives_up_after=1),
                   tmp_path) as r:
        with pytest.raises(MigrationError, match=r"the destination b gave up: .*mig_renew: no "
                                                 r"word from the peer site") as info:
            await r.migration(_policy("default")).run()
        calls = r.world.methods()
        # stopped for what it said, not by the stall limit or the convergence policy
        assert "cancel" not in [d["action"] for d in r.inv.rows("migration_decisions")]
        assert calls.index("mig_cancel") < calls.index("mig_dest_abort")
        assert "mig_dest_finish" not in calls
    assert info.value.evidence["recovery"]["source"]["alive"]


@pytest.mark.asyncio
async def test_source_qemu_dying_is_reported_at_once(tmp_path: Path) -> None:
    async with rig(Behaviour([256, 90], then="die"), tmp_path) as r:
        t = time.monotonic()
        with pytest.raises(MigrationError, match="exited during the migration") as info:
            await r.migration(_policy("default")).run()
        assert time.monotonic() - t < 3.0
        src, dst = r.world.hosts["a"], r.world.hosts["b"]
        assert src.dead_status_calls == 1  # noticed on the first answer that said so
        assert dst.incoming == "aborted"  # the destination dropped
        assert "mig_cancel" not in r.world.methods()
    assert info.value.evidence["returncode"] == -9
    recovery = info.value.evidence["recovery"]
    assert "source QEMU had exited" in recovery["note"] and recovery["dest"]["removed"]


@pytest.mark.asyncio
@pytest.mark.parametrize("what", ["heartbeat", "disk"])
async def test_guest_that_does_not_verify_fails_the_migration(tmp_path: Path, what: str) -> None:
    b = Behaviour([256, 40, 5])
    if what == "heartbeat":
        b.dest_counter_step = 0  # no new beat on the destination
    else:
        b.dest_disk_read = SRC_DISK - 3  # the destination reads an older disk
    async with rig(b, tmp_path) as r:
        with pytest.raises(MigrationError, match="did not verify") as info:
            await r.migration(_policy("default")).run()
        calls = r.world.methods()
        assert "mig_dest_finish" in calls
        assert "mig_source_finish" not in calls  # the source QEMU is kept
        assert r.inv.rows("migrations")[-1]["state"] == "failed"
    ev = info.value.evidence
    assert (not ev["heartbeat"]["continues"]) if what == "heartbeat" else (not ev["disk"]["ok"])


@pytest.mark.asyncio
async def test_a_destination_on_another_machines_clock(tmp_path: Path) -> None:
    """Two machines' monotonic clocks are their boot times apart: the destination's stamps
    are moved onto the source's clock, so the guest verifies and the blackout is the real
    one (not the clocks' difference)."""
    async with rig(Behaviour([256, 40, 5], dest_clock=5000.0), tmp_path) as r:
        res = await r.migration(_policy("default")).run()
    assert res["state"] == "completed" and res["heartbeat"]["continues"], res["heartbeat"]
    assert 100 < res["blackout_ms"] < 300, res["blackout_ms"]
    assert 90 < res["switchover"]["stop_to_resume_ms"] < 110, res["switchover"]


@pytest.mark.asyncio
async def test_malformed_status_reply_is_a_protocol_error(tmp_path: Path) -> None:
    def drop_passes(reply: dict[str, Json]) -> dict[str, Json]:
        return {k: v for k, v in reply.items() if k != "passes"}

    async with rig(Behaviour([256, 40, 5], mangle={"mig_status": drop_passes}), tmp_path) as r:
        with pytest.raises(MigrationError) as info:
            await r.migration(_policy("default")).run()
        # recovered as any failure after the start: source cancelled, destination dropped
        calls = r.world.methods()
        assert "mig_cancel" in calls and r.world.hosts["b"].incoming == "aborted"
    cause = info.value.__cause__
    assert isinstance(cause, ProtocolError)
    assert "mig_status reply from host a" in cause.message and "missing field 'passes'" in \
        cause.message
    assert cause.message in info.value.message


@pytest.mark.asyncio
async def test_malformed_source_info_is_a_protocol_error(tmp_path: Path) -> None:
    def bad_size(reply: dict[str, Json]) -> dict[str, Json]:
        return {**reply, "disk_size": "4M"}

    async with rig(Behaviour([256], mangle={"mig_source_info": bad_size}), tmp_path) as r:
        with pytest.raises(ProtocolError, match=r"mig_source_info reply from host a\.disk_size"):
            await r.migration(_policy("default")).run()
        assert r.world.methods() == ["mig_source_info"]  # nothing else was started


def test_pass_is_pass_on_the_wire() -> None:
    rec = mp.PassRecord(pass_=3, t_rel=0.5, status="active", dirty_sync_count=3,
                        transferred=1, remaining=2, total=3, dirty_pages_rate=0.0,
                        dirty_rate_bytes=0.0, expected_downtime_ms=None, throttle_pct=0, mbps=None)
    wire = rec.to_wire()
    assert wire["pass"] == 3 and "pass_" not in wire
    assert mp.PassRecord.from_wire(wire) == rec
    with pytest.raises(ProtocolError, match="missing field 'pass'"):
        mp.PassRecord.from_wire({k: v for k, v in wire.items() if k != "pass"})
    with pytest.raises(ProtocolError, match="unknown field 'pass_'"):
        mp.PassRecord.from_wire({**wire, "pass_": 3})


@pytest.mark.asyncio
async def test_the_fakes_refuse_a_wrong_order(tmp_path: Path) -> None:
    """The fakes are honest: calls a real host could not answer at that point fail, and a
    driver that makes them fails its test."""
    async with rig(Behaviour([256]), tmp_path) as r:
        a, b = r.clients["a"], r.clients["b"]
        with pytest.raises(RemoteError, match="mig_start before mig_source_info"):
            await mp.MIG_START.call(a, mp.Start(VM, "tcp:127.0.0.1:1", {"events": True}))
        with pytest.raises(RemoteError, match="with no incoming VM"):
            await mp.MIG_DEST_FINISH.call(b, mp.DestFinish(VM, SRC_COUNTER))
        with pytest.raises(RemoteError, match="before the migration completed"):
            await mp.MIG_SOURCE_FINISH.call(a, hp.VmName(VM))
        assert len(r.world.violations) == 3
        r.world.violations.clear()

    class Hasty(Migration):
        """Stops the source QEMU before the guest is verified on the destination."""

        async def _finish_success(self, st: mp.SourceStatus) -> None:
            await mp.MIG_SOURCE_FINISH.call(self.src.client, hp.VmName(self.vm))
            await super()._finish_success(st)

    with pytest.raises(pytest.fail.Exception, match="before the guest was verified"):
        async with rig(Behaviour([256, 5]), tmp_path) as r:
            with contextlib.suppress(MigrationError):
                await Hasty(VM, Endpoint("a", r.clients["a"], "127.0.0.1"),
                            Endpoint("b", r.clients["b"], "127.0.0.1"), _policy("default")).run()


def test_the_host_agent_serves_every_migration_method(tmp_path: Path) -> None:
    from labctl.core.wire import methods
    from labctl.hosts.agent import HostAgent
    from labctl.migration.hostside import MigrationHandlers

    async def probe(disk: hp.IscsiDisk) -> tuple[str, int]:
        raise AssertionError("not probed")

    served = MigrationHandlers(HostAgent(tmp_path, "h"), probe).handlers()
    assert set(served) == {m.name for m in methods(vars(mp).values())}
    assert len(served) == 15
