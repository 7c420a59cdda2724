"""``labctl replicate VM --to-cloud SITE``: a VM moved from one cloud to another by agents
in its guests, as AWS Application Migration Service or Azure Site Recovery do it, with a
switchover criterion you can state and test.

The operator holds both clouds' credentials and no hypervisor access: cloud A's VM is
reached over its management channel (SSH), cloud B's API (libvirt) makes the destination.

1. Refused before anything is made: the VM is not a running server guest of a labctl
   cloud, the target is not a libvirt cloud, no WAN link (or it is down), a criterion
   that does not read.
2. Cloud B makes the destination: a helper system (a clone of the server image) with an
   empty target disk the size of the source's.
3. The agents (``labctl/replication/agent.py`` and ``blocks.py``) and their TLS files (a
   certificate each from the lab's CA, naming its address) are copied into both guests'
   ``/run`` (tmpfs: they leave no trace on either disk) and the target agent started.
4. Passes: the source agent copies what changed (pass 1: every data block) straight to
   the target across the WAN. After each, the criterion is evaluated over what it saw;
   the pass, its numbers and the verdict are recorded. A pass that fails (a WAN cut, a
   killed agent) is recorded and run again: it resumes from its last flush.
5. When the criterion holds: the application is stopped (its last acknowledgement noted)
   and the filesystem frozen; the final pass; every block's digest compared on both sides;
   the source VM stopped; the helper system stopped and deleted, its target disk handed
   to a new VM of cloud B named like the source, which boots from it; the application's
   records verified there and the application started again: the outage is from its last
   acknowledgement on the source to its first on the destination.
6. When a limit is reached first (deadline, passes): the source is left as it was (its
   agent gone), the destination deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from labctl.core.errors import LabError, LabStateError
from labctl.core.proc import CommandResult, process_identity
from labctl.core.wire import Json, Message, WallTime
from labctl.drivers.ssh import SshError, SshMachine
from labctl.lab import vms
from labctl.lab.clouds import CloudVm, LabctlCloud, LibvirtCloud, NewVm, cloud_of
from labctl.replication import agent as agent_mod
from labctl.replication import blocks
from labctl.replication.switchover import DEFAULT_WHEN, PassView, SwitchoverPolicy, policy_from
from labctl.state.context import LabContext
from labctl.state.pki import LabPki
from labctl.wan import service as wan

#: where the agents live in each guest: tmpfs, so neither disk keeps a trace of them
AGENT_DIR = "/run/labctl-repl"
AGENT_PORT = 7900
#: the application as the source VM runs it (labctl/replication/app.py)
APP, APP_DIR = vms.APP, vms.APP_DIR
#: the source's root disk under the device-mapper map its initramfs made (dm-era goes there)
SOURCE_DISK = "/dev/mapper/root"
TARGET_DISK = "/dev/vda"
#: the file ``labctl replication approve`` leaves in a replication's directory
APPROVED = "approved"
#: a failed pass is run again this many times in a row before the replication gives up
PASS_RETRIES = 5
#: seconds the agents' channel may stall (a cut WAN) before a pass fails (``--stall``)
STALL_S = 30.0
#: how the cutover checks the replica (``--verify``): both disks read whole while the source
#: is frozen (full); both compared whole before the freeze and then only what the tracker
#: says was written since (tracked); or tracked, then full as its check (both)
VERIFY_MODES = ("full", "tracked", "both")


class ReplicationError(LabError):
    """A replication that could not start, or failed on its way (evidence: how far)."""


class CutoverUndone(ReplicationError):
    """The final pass, or its check's exchange with the target, failed with the source
    frozen: the source was thawed and its application started again, nothing was cut
    over; ``failed`` is the attempt's record (the replication goes on with a pass)."""

    def __init__(self, message: str, failed: PassRecord, cause: LabError) -> None:
        super().__init__(message, cause=cause.message)
        self.failed = failed
        self.cause = cause


@dataclass(frozen=True)
class PassRecord(Message):
    """One pass as the orchestrator saw it (a failed attempt too: ``how`` failed)."""

    #: the attempt's number (failed attempts count)
    n: int
    #: full (pass 1), map (the source's map of what the target holds), rehash (the map was
    #: lost: the target's digests asked), era (the write tracker's answer), final, failed;
    #: precheck: the comparison of both disks before the freeze, after which the criterion
    #: asked again did not hold (nothing sent; ``todo_blocks``: what it found to send)
    how: str
    started_at: WallTime
    seconds: float
    blocks: int
    bytes: int
    wire_bytes: int
    #: bytes the source agent read (its digest scan and the blocks sent)
    read_bytes: int
    cpu_seconds: float
    digest_seconds: float
    #: bytes per second the source changed since the previous pass began
    dirty_rate: float
    #: the disk's bytes per second this pass moved (what compression saved makes it faster)
    link_rate: float
    #: changed bytes not yet on the destination (the dirty rate over this pass's time)
    remaining: float
    #: the next pass's predicted time: the digest scan, the pass's fixed cost and the
    #: remaining bytes at this rate
    predicted_next_s: float
    #: what the switchover criterion said, and why
    decision: str
    why: str
    #: how old the newest data the destination holds is, when this pass ended: from the
    #: application's last acknowledgement before the pass began (``holds_acked_at``), else
    #: from the pass's start
    rpo_s: float
    error: str | None = None
    #: blocks this pass took over from a pass cut short (what that one's last flush had not
    #: made durable on the target)
    carried_blocks: int = 0
    #: blocks this pass set out to send (``blocks`` and ``bytes`` of a failed attempt are
    #: what its last flush made durable of them)
    todo_blocks: int = 0
    #: bytes free on the source's file system when the pass ended (None: not known)
    free_bytes: int | None = None
    #: the pass's fixed cost: its time neither scanning nor sending (the command's round
    #: trip over SSH, the agent's start in the guest, its connection to the target), which
    #: the next pass pays again
    fixed_seconds: float = 0.0
    #: the source application's last acknowledged record as the pass began, and when it
    #: acknowledged it (its own clock, as its acks.log says): the destination holds that
    #: record and every one before it once the pass ends (None: not read)
    holds_acked: int | None = None
    holds_acked_at: WallTime | None = None


@dataclass(frozen=True)
class Cutover(Message):
    """The switchover, step by step (seconds), and what the application said."""

    quiesced_at: WallTime
    source_last_acked: int | None
    source_acked_at: WallTime | None
    #: the final pass's predicted time when the source froze: the criterion's prediction
    #: from the last pass, or, after a comparison before the freeze (a tracked
    #: verification), the blocks the tracker had seen written by its end at the last
    #: pass's rate and fixed cost
    final_predicted_s: float
    final_s: float
    #: |actual - predicted| / actual
    final_prediction_error: float
    verify: Json
    steps: dict[str, float]
    dest_check: Json = None
    dest_first_acked: int | None = None
    dest_first_acked_at: WallTime | None = None
    #: last acknowledgement on the source to the first on the destination
    outage_s: float | None = None
    #: why there is no outage to measure: the application started on the destination
    #: with every record, but its disk (the source's, full) has no room for a new one
    outage_unmeasured: str | None = None
    #: what the criterion was told the final pass would take (the last pass's prediction),
    #: when ``final_predicted_s`` was made again after the comparison before the freeze
    criterion_predicted_s: float | None = None


@dataclass(frozen=True)
class Replication(Message):
    """``labctl replicate``: the whole record."""

    id: int
    vm: str
    from_site: str
    to_site: str
    #: the destination VM in cloud B (the helper while replicating, then the VM itself)
    dest: str
    state: str
    started_at: WallTime
    seconds: float
    tracking: str
    switchover: str
    disk_bytes: int
    passes: list[PassRecord] = field(default_factory=list)
    cutover: Cutover | None = None
    sent_bytes: int = 0
    wire_bytes: int = 0
    error: str | None = None
    #: the labctl process running it (``PID:START``, :func:`process_identity`): a record
    #: still "running" whose process is gone was cut short without an end on record
    controller: str | None = None


def gone(state: str, controller: str | None) -> str | None:
    """Why a record that says ``state`` is not really running (its labctl process ended
    without writing an end: killed, or the machine restarted), or None."""
    if state != "running" or not controller:
        return None
    pid = int(controller.split(":")[0])
    if process_identity(pid) == controller:
        return None
    return (f"its labctl (pid {pid}) ended without recording an end (killed?): the source "
            "may still be quiesced or carry the agents, the destination may still exist")


def _records(inv: Any, rid: int, rec: Replication, transaction: bool = True) -> None:
    """Replication ``rid``'s record and passes written (in a transaction of their own, or
    in the caller's)."""
    with inv.transaction() if transaction else contextlib.nullcontext():
        inv.conn.execute("UPDATE replications SET state=?, result=? WHERE id=?",
                         (rec.state, json.dumps(rec.to_wire(), default=str), rid))
        for p in rec.passes:
            inv.conn.execute("INSERT OR REPLACE INTO replication_passes(replication, n, record)"
                             " VALUES (?, ?, ?)", (rid, p.n, json.dumps(p.to_wire())))


async def install_agents(m: SshMachine, tls: dict[str, Path]) -> None:
    """The agents and their TLS files into the guest's /run (0700; keys 0600)."""
    await m.run(["mkdir", "-p", "-m", "0700", f"{AGENT_DIR}/tls"])
    await m.put(Path(agent_mod.__file__).read_bytes(), f"{AGENT_DIR}/agent.py", 0o700)
    await m.put(Path(blocks.__file__).read_bytes(), f"{AGENT_DIR}/blocks.py", 0o600)
    for name, path in tls.items():
        await m.put(path.read_bytes(), f"{AGENT_DIR}/tls/{name}", 0o600)


async def _agent(m: SshMachine, *args: str, timeout: float = 3600.0) -> dict[str, Any]:
    # -B: no bytecode written (the source's filesystem may be frozen)
    ran = await m.run(["python3", "-B", f"{AGENT_DIR}/agent.py", *args], timeout=timeout,
                      check=False)
    out = _last_json(ran.stdout)  # a cut pass says how far it got
    if ran.returncode not in (0, 1) or out is None:
        said = ran.stdout.strip().splitlines()
        said_why = ran.stderr.strip() or (said[-1] if said else "") or (
            f"the agent's session ended without a word (exit status {ran.returncode})")
        raise ReplicationError(f"{m.name}: {said_why}", machine=m.name,
                               returncode=ran.returncode, progress=out or {})
    return out


def _last_json(text: str) -> dict[str, Any] | None:
    """The JSON object a guest program prints as its output's last line; None when that
    line is missing or is not one."""
    lines = text.strip().splitlines()
    try:
        out = json.loads(lines[-1]) if lines else None
    except ValueError:
        return None
    return out if isinstance(out, dict) else None


async def _installed(m: SshMachine) -> bool:
    return (await m.run(["test", "-f", f"{AGENT_DIR}/agent.py"], check=False)).ok


async def replicate(whole: LabContext, vm: str, src_site: str, to_site: str,
                    switchover: str | dict[str, Any] | None = None, tracking: str = "era",
                    compress: bool = False, limit_bytes_s: float | None = None,
                    stall_s: float = STALL_S, verify: str = "full") -> Replication:
    """Replicate server VM ``vm`` of cloud ``src_site`` to cloud ``to_site`` and cut over;
    a pass whose channel stalls ``stall_s`` seconds (a cut WAN) fails and is run again."""
    if tracking not in ("era", "hash"):
        raise ReplicationError(f"--tracking {tracking}: era or hash", tracking=tracking)
    if verify not in VERIFY_MODES:
        raise ReplicationError(f"--verify {verify}: full, tracked or both", verify=verify)
    if verify != "full" and tracking != "era":
        raise ReplicationError(f"--verify {verify} reads what the write tracker saw: it needs "
                               "--tracking era", verify=verify)
    if to_site == src_site:
        raise ReplicationError(f"VM {vm} is already in cloud {to_site}", vm=vm)
    policy = policy_from(switchover if switchover is not None else DEFAULT_WHEN)
    a, b = whole.in_site(src_site), whole.in_site(to_site)
    ca, cb = cloud_of(a), cloud_of(b)
    if not isinstance(ca, LabctlCloud):
        raise ReplicationError(f"cloud {src_site} is not one of labctl's hosts", site=src_site)
    if not isinstance(cb, LibvirtCloud):
        raise ReplicationError(f"cloud {to_site} is not a libvirt cloud (provider: libvirt)",
                               site=to_site)
    _running_of(whole, vm)  # a replication of it under way (its cutover too) is said first
    src = await ca.show(vm)
    if src.state != "running":
        raise ReplicationError(f"VM {vm} is not running (state {src.state})", vm=vm)
    links = [w for w in await wan.show(whole) if {src_site, to_site} == set(w.sites)]
    if not links or links[0].state != "up":
        raise ReplicationError(f"no WAN link up between {src_site} and {to_site}", vm=vm)
    row = vms.row(a, vm)
    disk_bytes = await _disk_size(a, row)
    dest_name = f"{vm}-repl"
    inv = whole.inv
    t0, t_wall = time.monotonic(), time.time()
    with inv.transaction():  # one replication of a VM at a time, across labctl processes
        stale = _running_of(whole, vm)
        cur = inv.conn.execute("INSERT INTO replications(vm, from_site, to_site, started_at, "
                               "state) VALUES (?, ?, ?, ?, 'running')",
                               (vm, src_site, to_site, t_wall))
        rid = int(cur.lastrowid or 0)
        rec = Replication(id=rid, vm=vm, from_site=src_site, to_site=to_site, dest=dest_name,
                          state="running", started_at=WallTime(t_wall), seconds=0.0,
                          tracking=tracking, switchover=json.dumps(switchover) if isinstance(
                              switchover, dict) else (switchover or DEFAULT_WHEN),
                          disk_bytes=disk_bytes, controller=process_identity(os.getpid()))
        _records(inv, rid, rec, transaction=False)
    stage = Stage()
    try:
        for old in stale:
            await _clear_left(whole, ca, old, rid)
        whole.progress(f"{to_site}: a destination VM {dest_name} with an empty "
                       f"{disk_bytes >> 20} MiB target")
        try:
            there: CloudVm | None = await cb.show(dest_name)
        except LabStateError:
            there = None
        if there is not None:  # not this replication's: left alone
            raise ReplicationError(f"cloud {to_site} already has a VM {dest_name} ({there.state}"
                                   "), which this replication did not make: nothing was made",
                                   vm=vm, dest=dest_name)
        stage.dest_made = True  # from here a failure deletes what is there by that name
        await cb.create(NewVm(dest_name, data_disks=(disk_bytes,)))
        made = await cb.start(dest_name)
        rec = await _run(whole, ca, cb, vm, src, made, rec, policy, compress, limit_bytes_s,
                         stage, stall_s, verify)
    except (LabError, OSError) as exc:
        msg = exc.message if isinstance(exc, LabError) else str(exc)
        rec = replace(rec, state="failed", error=msg, passes=stage.passes or rec.passes)
    except asyncio.CancelledError:  # Ctrl-C: given back below like any failure, then said
        rec = replace(rec, state="failed", error="interrupted (Ctrl-C)",
                      passes=stage.passes or rec.passes)
        raise
    finally:
        rec = replace(rec, seconds=round(time.monotonic() - t0, 3),
                      sent_bytes=sum(p.bytes for p in rec.passes),
                      wire_bytes=sum(p.wire_bytes for p in rec.passes))
        if rec.state != "completed" and not stage.source_stopped:
            await _give_back(whole, ca, cb, vm, dest_name if stage.dest_made else None,
                             stage.app_stopped)
        elif rec.state != "completed":  # past the point of no return: keep what there is
            rec = replace(rec, state="failed after the source stopped",
                          error=f"{rec.error} (the source {vm} is stopped with its disk intact;"
                                f" the destination is kept as it is)")
        _records(inv, rid, rec)
    return rec


@dataclass
class Stage:
    """How far a replication got: what a failure must give back."""

    #: this replication went on to make its destination VM (none of that name was there):
    #: a failure deletes what is under that name; before, it deletes nothing in cloud B
    dest_made: bool = False
    app_stopped: bool = False
    source_stopped: bool = False
    passes: list[PassRecord] = field(default_factory=list)


async def _disk_size(a: LabContext, row: dict[str, Any]) -> int:
    from labctl.datastores import filestores  # noqa: PLC0415

    chain = await filestores.chain(a, str(row["datastore"]), str(row["disk_file"]))
    return int(chain.layers[0].virtual_size)


async def _give_back(whole: LabContext, ca: LabctlCloud, cb: LibvirtCloud, vm: str,
                     dest: str | None, app_stopped: bool) -> None:
    """A replication that did not complete: the source as it was (its agent gone, its
    filesystem thawed, its application running again), the destination deleted (``dest``:
    the one it made; None when it made none)."""
    with contextlib.suppress(LabError):
        async with ca.ssh(vm) as m:
            await m.run(["fsfreeze", "-u", "/"], check=False)
            if await _installed(m):  # a pass its caller left, then the write tracker
                await _stop_left(m)
                await m.run(["python3", "-B", f"{AGENT_DIR}/agent.py", "untrack", "--state",
                             f"{AGENT_DIR}/state"], check=False, timeout=120)
            await m.run(["rm", "-rf", AGENT_DIR], check=False)
            if app_stopped:
                await m.run(["python3", "-B", APP, "resume", "--dir", APP_DIR], check=False)
    if dest is None:
        whole.progress(f"the source {vm} is left as it was; no destination was made")
        return
    with contextlib.suppress(LabError):
        await cb.delete(dest)
    whole.progress(f"the source {vm} is left as it was; the destination {dest} is deleted")


def _running_of(whole: LabContext, vm: str) -> list[Replication]:
    """The replications of ``vm`` recorded as running whose labctl is gone (killed: what
    they left is for the next one to clear); one whose labctl runs is a refusal."""
    stale = []
    for r in whole.inv.rows("replications", vm=vm, state="running"):
        old = Replication.from_wire(json.loads(r["result"] or "{}"), f"replication {r['id']}")
        if gone(old.state, old.controller) is None:
            pid = (old.controller or "?").split(":")[0]
            raise ReplicationError(
                f"VM {vm} is being replicated to {old.to_site} (replication {old.id}, labctl "
                f"pid {pid}): one replication of a VM at a time; let it end, or stop it "
                "(Ctrl-C where it runs)", vm=vm, running=old.id)
        stale.append(old)
    return stale


async def _clear_left(whole: LabContext, ca: LabctlCloud, old: Replication, rid: int) -> None:
    """What replication ``old`` left when its labctl was killed mid-way cleared before
    replication ``rid`` of the same VM begins: its agent and write tracker out of the
    source (its filesystem thawed, its application started if it was stopped), its
    destination deleted (its record names it: made by the lab); recorded as failed. One
    killed past the source's stop left the source stopped: the new one is refused then."""
    why = gone(old.state, old.controller) or "ended without recording an end"
    whole.progress(f"replication {old.id} of {old.vm}: {why}; clearing what it left first")
    cb = cloud_of(whole.in_site(old.to_site))
    if isinstance(cb, LibvirtCloud):
        await _give_back(whole, ca, cb, old.vm, old.dest, app_stopped=True)
    _records(whole.inv, old.id, replace(old, state="failed", error=(
        f"{why}; what it left was cleared when replication {rid} began")))


async def _stop_left(m: SshMachine) -> None:
    """A pass or precheck still running in the source after its caller went away (Ctrl-C,
    a dropped SSH session), stopped by its pid: two never run on one state at once."""
    for left in ("pass", "precheck"):
        await m.run(["python3", "-B", f"{AGENT_DIR}/agent.py", "stop", "--name", left,
                     "--state", f"{AGENT_DIR}/state"], check=False, timeout=60)


async def _run(whole: LabContext, ca: LabctlCloud, cb: LibvirtCloud, vm: str, src: CloudVm,
               dest: CloudVm, rec: Replication, policy: SwitchoverPolicy, compress: bool,
               limit: float | None, stage: Stage, stall_s: float, verify: str
               ) -> Replication:
    dst_ip = dest.address.split("/")[0]
    src_ip = src.address.split("/")[0]
    work = whole.dir.path / "replications" / str(rec.id)
    pki = LabPki(whole.name, whole.dir.path / "pki")
    tls = {}
    for role, addr in (("src", src_ip), ("dst", dst_ip)):
        issued = pki.issue(f"repl-{rec.id}-{role}", [addr], work / role)
        tls[role] = {"cert.pem": issued.cert, "key.pem": issued.key, "ca.pem": issued.ca}
    async with ca.ssh(vm) as sm, cb.ssh(dest.name) as dm:
        if not (await sm.run(["test", "-b", SOURCE_DISK], check=False)).ok:
            raise ReplicationError(f"{vm} has no {SOURCE_DISK}: its root disk is not under "
                                   "device-mapper (a server image from before the write "
                                   "tracker: bring the lab up again)", vm=vm)
        await install_agents(sm, tls["src"])
        await install_agents(dm, tls["dst"])
        target_args = ["target", "--disk", TARGET_DISK, "--listen", f"0.0.0.0:{AGENT_PORT}",
                       "--tls", f"{AGENT_DIR}/tls", "--state", f"{AGENT_DIR}/state"]
        await _agent(dm, *target_args)
        to = f"{dst_ip}:{AGENT_PORT}"
        pass_args = ["--disk", SOURCE_DISK, "--to", to, "--tls", f"{AGENT_DIR}/tls",
                     "--state", f"{AGENT_DIR}/state", "--tracking", rec.tracking,
                     *(["--compress"] if compress else []),
                     *(["--limit", str(limit)] if limit else []), "--stall", f"{stall_s:g}"]
        t_begin = time.monotonic()
        prev_start: float | None = None
        failures = n = 0
        full = True  # pass 1 copies every data block; a retry resumes from the map
        # what the comparison before the freeze found (a tracked verification): it holds
        # while the source's tracker runs on (era passes), whatever passes come after it
        pre: dict[str, Any] | None = None
        pre_fresh = False  # no pass since it: the final pass is predicted from it

        def record_pass(one: PassRecord) -> None:
            """``one`` appended to the replication's passes, kept where a failure and the
            record see it."""
            nonlocal rec
            rec = replace(rec, passes=[*rec.passes, one])
            stage.passes = rec.passes
            _records(whole.inv, rec.id, rec)

        async def recover(exc: LabError, failed: PassRecord, what: str) -> None:
            """A failed attempt recorded; the replication ends if it cannot go on, else
            the next pass begins from the last flush."""
            nonlocal failures
            failures += 1
            record_pass(failed)
            if failures > PASS_RETRIES or time.monotonic() - t_begin > policy.deadline_s:
                raise ReplicationError(f"{what} failed {failures} times in a row: "
                                       f"{exc.message}", passes=len(rec.passes)) from exc
            # a destination its cloud stopped or lost is no pass to retry (each retry
            # would wait out its timeouts first)
            there = (await cb.show(dest.name)).state
            if there != "running":
                raise ReplicationError(
                    f"the destination VM {dest.name} in cloud {cb.site} is {there} (its "
                    f"cloud stopped or lost it) after {what} failed: {exc.message}",
                    passes=len(rec.passes), dest_state=there) from exc
            whole.progress(f"{what} failed ({exc.message}): a pass again, from its last "
                           "flush")
            await _reconnect(sm)
            with contextlib.suppress(LabError):
                await _stop_left(sm)
            await _revive(dm, target_args)

        while True:
            # the application's last acknowledgement so far: what this pass surely carries
            # (read before the pass's clock starts: not part of its time)
            acked = await _acked(sm)
            t_start, w_start = time.monotonic(), time.time()
            attempt = len(rec.passes) + 1
            try:
                if not await _installed(sm):  # the source rebooted: /run is empty again
                    await install_agents(sm, tls["src"])
                # the policy's deadline bounds a pass too: it stops there, its progress
                # flushed, rather than run on past it
                left = max(0.0, policy.deadline_s - (time.monotonic() - t_begin))
                args = [*pass_args, *(["--full"] if full else []), "--until", f"{left:.3f}"]
                full = False
                t_call = time.monotonic()
                # (a hash pass's scan comes before the deadline can stop it: an hour for
                # the scan, as before)
                got = await _agent(sm, "pass", *args, timeout=max(3600.0, left + stall_s))
                call_s = time.monotonic() - t_call
            except (ReplicationError, SshError) as exc:
                failed = _failed_pass(attempt, w_start, t_start, exc)
                progress = exc.evidence.get("progress") or {}
                if _new_tracker_maybe(exc):
                    pre = None
                if progress.get("deadline"):
                    why = (f"the deadline ({policy.deadline_s:g} s) came during this pass: it "
                           f"stopped with {failed.blocks} of {failed.todo_blocks} blocks sent")
                    record_pass(replace(failed, decision="give_up", why=why,
                                        free_bytes=progress.get("free_bytes")))
                    raise ReplicationError(f"the switchover criterion did not hold within the "
                                           f"policy's limits: {why}",
                                           passes=len(rec.passes)) from exc
                await recover(exc, failed, f"pass {n + 1}")
                continue
            failures = 0
            n += 1
            took = time.monotonic() - t_start
            # the age of the source's state the destination now holds: the application's
            # last acknowledgement before the pass began, else the pass's start
            holds_since = acked[1] if acked is not None else w_start
            view, record = _view(n, got, took, t_start, prev_start, t_begin, w_start,
                                 next((p.link_rate for p in reversed(rec.passes)
                                       if p.how != "failed"), 0.0), rec.tracking, call_s)
            view = replace(view, approved=1.0 if (work / APPROVED).exists() else 0.0)
            record = replace(record, n=attempt,
                             holds_acked=acked[0] if acked is not None else None,
                             holds_acked_at=WallTime(acked[1]) if acked is not None else None)
            decision, verdict = policy.decide(view)
            record = replace(record, decision=decision, why=verdict.why(),
                             rpo_s=round(w_start + took - holds_since, 3))
            record_pass(record)
            pre_fresh = False
            if pre is not None and (record.how != "era"
                                    or got.get("tracker") != pre.get("tracker")):
                pre = None  # the tracker began again (a reboot): compare again
            free_text = ("" if record.free_bytes is None else
                         f", {record.free_bytes / (1 << 20):.0f} MiB free on the source")
            whole.progress(f"pass {n} ({record.how}): {record.blocks} blocks, "
                           f"{record.bytes / (1 << 20):.1f} MiB in {record.seconds:.1f} s"
                           f"{free_text}; {decision}: {record.why}")
            prev_start = t_start
            if decision == "give_up":
                raise ReplicationError(f"the switchover criterion did not hold within the "
                                       f"policy's limits: {record.why}", passes=n)
            if decision != "switch":
                continue
            # a tracked verification: both disks compared whole before the freeze (once:
            # it holds while the tracker runs on). If that cannot run (the source rebooted
            # since the pass and lost its tracker, the WAN or the target agent failed),
            # nothing is frozen yet: a pass again (a rehash after a reboot, which starts a
            # tracker), then the criterion again
            if verify != "full" and pre is None:
                t_start, w_start = time.monotonic(), time.time()
                try:
                    pre = await _precheck(whole, sm, vm, tls["src"], to)
                except (ReplicationError, SshError) as exc:
                    if isinstance(exc, ReplicationError) and "precheck" in exc.evidence:
                        raise  # blocks differ that the tracker did not see written
                    failed = replace(
                        _failed_pass(len(rec.passes) + 1, w_start, t_start, exc),
                        why="the comparison of both disks before the freeze failed: nothing "
                            "frozen, a pass again")
                    await recover(exc, failed, "the comparison before the freeze")
                    continue
                pre_fresh = True
                # the application wrote all along (a minute for 2 GiB under TCG): the
                # criterion asked again, the final pass predicted from what the comparison
                # found still to send
                again = _after_precheck(view, record, pre, len(rec.passes) + 1, w_start,
                                        time.monotonic() - t_start, t_begin, holds_since)
                decision, verdict = policy.decide(again[0])
                if decision != "switch":
                    record_pass(replace(again[1], decision=decision, why=(
                        f"after the comparison before the freeze: {verdict.why()}")))
                    whole.progress(f"the criterion asked again after the comparison before "
                                   f"the freeze (the final pass predicted at "
                                   f"{again[1].predicted_next_s:.1f} s): {decision}")
                    if decision == "give_up":
                        raise ReplicationError(
                            "the switchover criterion did not hold within the policy's "
                            f"limits after the comparison before the freeze: {verdict.why()}",
                            passes=len(rec.passes))
                    continue
            try:
                cut = await _cutover(whole, ca, cb, vm, sm, dm, pass_args, rec,
                                     len(rec.passes) + 1, stage, verify, pre, pre_fresh)
            except CutoverUndone as exc:  # the source runs again: passes, then again
                if _new_tracker_maybe(exc.cause):
                    pre = None  # not a cut era pass (the check failed, or the agent was
                    # gone): compare again
                await recover(exc.cause, exc.failed, "the final pass")
                continue
            break
    return replace(rec, state="completed", dest=vm, cutover=cut[0],
                   passes=[*rec.passes, cut[1]])


def _after_precheck(view: PassView, last: PassRecord, pre: dict[str, Any], n: int,
                    w_start: float, took: float, t_begin: float, holds_since: float
                    ) -> tuple[PassView, PassRecord]:
    """The criterion's view after the comparison before the freeze, and its record
    (``precheck``, its decision still to be made): the last pass's, with what the
    comparison found still to send as the remaining delta and the final pass predicted
    from that."""
    to_send = int(pre.get("to_send") or 0)
    predicted = _final_predicted(last, pre)
    remaining = to_send * blocks.BLOCK
    seen = replace(view, remaining=float(remaining), predicted_outage=predicted,
                   elapsed=time.monotonic() - t_begin)
    size = int(pre.get("blocks") or 0) * blocks.BLOCK
    record = replace(last, n=n, how="precheck", started_at=WallTime(w_start),
                     seconds=round(took, 3), blocks=0, bytes=0, wire_bytes=0,
                     read_bytes=size, cpu_seconds=0.0,
                     digest_seconds=float(pre.get("seconds") or 0.0), remaining=remaining,
                     predicted_next_s=predicted, rpo_s=round(time.time() - holds_since, 3),
                     carried_blocks=0, todo_blocks=to_send, error=None)
    return seen, record


def _new_tracker_maybe(exc: LabError) -> bool:
    """Whether a failed attempt may have begun a new write tracker (which ends what a
    comparison before the freeze found): a full, map or rehash pass may; an era pass, or
    one that failed before it knew what it was (at its connection), did not; an attempt
    that said nothing (its session gone, a failed check) is not known, so it may."""
    progress = exc.evidence.get("progress")
    if not isinstance(progress, dict) or "how" not in progress:
        return True
    return progress["how"] not in (None, "era")


def _failed_pass(n: int, w_start: float, t_start: float, exc: LabError) -> PassRecord:
    got = exc.evidence.get("progress") or {}
    return PassRecord(n=n, how="failed", started_at=WallTime(w_start),
                      seconds=round(time.monotonic() - t_start, 3),
                      blocks=int(got.get("flushed_blocks", 0)),
                      bytes=int(got.get("flushed_bytes", 0)), wire_bytes=0, read_bytes=0,
                      cpu_seconds=0.0, digest_seconds=0.0, dirty_rate=0.0, link_rate=0.0,
                      remaining=0.0, predicted_next_s=0.0, decision="retry",
                      why="the pass failed", rpo_s=0.0, error=exc.message,
                      carried_blocks=int(got.get("carried_blocks", 0)),
                      todo_blocks=int(got.get("todo_blocks", 0)))


async def _reconnect(m: SshMachine) -> None:
    await m.close()
    with contextlib.suppress(SshError):
        await m.connect(timeout=60)


async def _revive(dm: SshMachine, target_args: list[str]) -> None:
    """The destination's agent running again if it died (its disk keeps what it flushed;
    the source's map says what that is); a failure here shows in the next pass."""
    try:
        await dm.run(["true"], timeout=30)
    except SshError:
        await _reconnect(dm)
    with contextlib.suppress(LabError):
        await _agent(dm, *target_args)


def _view(n: int, got: dict[str, Any], took: float, t_start: float, prev_start: float | None,
          t_begin: float, w_start: float, prev_link_rate: float = 0.0,
          tracking: str = "hash", call_s: float | None = None) -> tuple[PassView, PassRecord]:
    """The criterion's view of a pass, and its record (its decision still to be made);
    ``call_s``: the pass command's own time, as the controller waited for it."""
    sent = float(got["bytes"])
    send_s = max(float(got["send_seconds"]), 1e-3)
    # the rate this pass moved the disk's bytes at (compressed or not: the remaining delta
    # is counted in the disk's bytes too); a pass that moved nothing keeps the last one
    link_rate = sent / send_s if sent else prev_link_rate
    # the bytes found changed since the previous pass began (pass 1 found them all)
    dirty = sent / (t_start - prev_start) if prev_start is not None else 0.0
    remaining = dirty * took
    digest_s = float(got["digest_seconds"])
    # what the next pass costs before it sends: the same scan with hash tracking, the
    # tracker's answer with era tracking (after a full or rehash pass with a new tracker,
    # nothing measured yet: its query is a fraction of a second)
    scan_next = digest_s if tracking == "hash" or got["how"] == "era" else 0.0
    # what every pass pays whatever it moves: the command's time neither scanning nor
    # sending (about a second under TCG, half an era pass's time)
    fixed = max(0.0, call_s - digest_s - float(got["send_seconds"])) if call_s else 0.0
    predicted = scan_next + fixed + (0.0 if remaining == 0 else remaining / link_rate
                                     if link_rate > 0 else float("inf"))
    free = got.get("free_bytes")
    view = PassView(passes=n, remaining=remaining, dirty_rate=dirty, link_rate=link_rate,
                    predicted_outage=predicted, last_pass=took,
                    elapsed=time.monotonic() - t_begin,
                    free_bytes=float(free) if free is not None else float("inf"))
    record = PassRecord(
        n=n, how=str(got["how"]), started_at=WallTime(w_start), seconds=round(took, 3),
        blocks=int(got["blocks"]), bytes=int(sent), wire_bytes=int(got["wire_bytes"]),
        read_bytes=int(got["read_bytes"]), cpu_seconds=float(got["cpu_seconds"]),
        digest_seconds=digest_s, dirty_rate=round(dirty, 1), link_rate=round(link_rate, 1),
        remaining=round(remaining), predicted_next_s=round(predicted, 3) if predicted != float(
            "inf") else -1.0, decision="", why="", rpo_s=0.0,
        carried_blocks=int(got.get("carried_blocks", 0)), todo_blocks=int(got["blocks"]),
        free_bytes=int(free) if free is not None else None, fixed_seconds=round(fixed, 3))
    return view, record


async def _app(m: SshMachine, *args: str) -> dict[str, Any] | None:
    """The application's answer (None when the VM has no application installed)."""
    if not (await m.run(["test", "-f", APP], check=False)).ok:
        return None
    ran = await m.run(["python3", "-B", APP, *args, "--dir", APP_DIR], check=False,
                      timeout=60)
    out = _last_json(ran.stdout)
    if out is None:
        raise ReplicationError(f"{m.name}: app.py {args[0]}: "
                               f"{(ran.stderr.strip() or ran.stdout.strip())[-500:]}")
    return out


async def _acked(m: SshMachine) -> tuple[int, float] | None:
    """The source application's last acknowledged record and its time (None: it has
    acknowledged none, or cannot say: a pass goes on without it)."""
    try:
        ran = await m.run(["python3", "-B", APP, "status", "--dir", APP_DIR], check=False,
                          timeout=30)
    except SshError:
        return None
    got = _last_json(ran.stdout) if ran.ok else None
    try:
        if got and int(got.get("last_acked") or 0) > 0:
            return int(got["last_acked"]), float(got["acked_at"])
    except (TypeError, ValueError):
        pass
    return None


async def _precheck(whole: LabContext, sm: SshMachine, vm: str, tls: dict[str, Path],
                    to: str) -> dict[str, Any]:
    """Both disks compared whole while the source still runs: every block that differs
    must be one its tracker saw written. Raises :class:`ReplicationError` with the
    ``precheck`` evidence when one was not (nothing may be cut over then)."""
    if not await _installed(sm):  # the source rebooted since the pass: /run is empty
        await install_agents(sm, tls)
    whole.progress(f"{vm}: both disks compared whole before the freeze (a tracked "
                   "verification)")
    pre = await _agent(sm, "precheck", "--disk", SOURCE_DISK, "--to", to, "--tls",
                       f"{AGENT_DIR}/tls", "--state", f"{AGENT_DIR}/state")
    if pre.get("unexplained_count"):
        raise ReplicationError(
            f"the write tracker missed writes: {pre['unexplained_count']} blocks differ that "
            f"it did not see written (e.g. {pre['unexplained'][:5]}); nothing was cut over",
            precheck=pre)
    return pre


async def _cutover(whole: LabContext, ca: LabctlCloud, cb: LibvirtCloud, vm: str,
                   sm: SshMachine, dm: SshMachine, pass_args: list[str], rec: Replication,
                   n: int, stage: Stage, verify: str = "full",
                   pre: dict[str, Any] | None = None, pre_fresh: bool = False
                   ) -> tuple[Cutover, PassRecord]:
    """The source quiesced, the final pass, the replica checked (``pre``: what the
    comparison before the freeze found, for a tracked verification; ``pre_fresh``: no pass
    came after it), the source stopped and the destination booted from the replica, its
    application started."""
    steps: dict[str, float] = {}
    to, tls, state = pass_args[3], f"{AGENT_DIR}/tls", f"{AGENT_DIR}/state"
    t = t_quiesce = time.monotonic()
    last = rec.passes[-1]
    w_quiesce = time.time()
    stage.app_stopped = True
    stopped = await _app(sm, "stop")
    await sm.run(["sync"])
    await sm.run(["fsfreeze", "-f", "/"])
    steps["quiesce"] = round(time.monotonic() - t, 3)
    whole.progress(f"quiesced {vm} (application stopped at record "
                   f"{(stopped or {}).get('last_acked')}, filesystem frozen): the final pass")
    t = t_final = time.monotonic()
    w_final = time.time()
    try:
        got = await _agent(sm, "pass", *pass_args)
        final_s = time.monotonic() - t
        steps["final_pass"] = round(final_s, 3)
        t = time.monotonic()
        checked = await _verify(sm, to, tls, state, verify, pre, got)
    except (ReplicationError, SshError) as exc:
        # (a WAN cut, the target's agent gone): nothing is cut over yet, so the source
        # runs again rather than wait frozen, and the replication goes on with passes
        raise await _thaw(whole, sm, vm, stage, exc, n, w_final, t_final,
                          time.monotonic() - t_quiesce) from exc
    steps["verify"] = round(time.monotonic() - t, 3)
    if not checked.get("equal"):
        raise ReplicationError(f"after the final pass {checked.get('differ_count')} blocks "
                               "differ between source and destination", verify=checked)
    final = PassRecord(
        n=n, how="final", started_at=WallTime(w_final), seconds=round(final_s, 3),
        blocks=int(got["blocks"]), bytes=int(got["bytes"]), wire_bytes=int(got["wire_bytes"]),
        read_bytes=int(got["read_bytes"]), cpu_seconds=float(got["cpu_seconds"]),
        digest_seconds=float(got["digest_seconds"]), dirty_rate=0.0, link_rate=0.0,
        remaining=0.0, predicted_next_s=0.0, decision="final",
        why=f"predicted {last.predicted_next_s:.2f} s", rpo_s=0.0)
    # the source stops (its filesystem frozen and its disk equal to the replica: a stop of
    # its QEMU loses nothing); the helper system goes, its target disk becomes the VM's
    row = vms.row(ca.ctx, vm)
    stage.source_stopped = True

    async def switch() -> tuple[Cutover, PassRecord]:
        t = time.monotonic()
        await vms.stop(ca.ctx, vm)
        steps["source_stopped"] = round(time.monotonic() - t, 3)
        t = time.monotonic()
        await dm.close()
        helper = await cb.show(rec.dest)
        target = next(d for d in helper.disks if d.role == "data")
        # the target agent flushed every write it acknowledged (and the verify read them
        # back): the helper is terminated, not shut down (about 4 s of the outage under TCG),
        # its agent with it (nothing of it is on the disk kept: the helper's root, where the
        # agent was, is deleted with it; stopping it first cost about 1 s)
        await cb.stop(rec.dest, force=True)
        kept = cb.take_disk(rec.dest, Path(target.where))
        await cb.delete(rec.dest)
        steps["helper_removed"] = round(time.monotonic() - t, 3)
        t = time.monotonic()
        await cb.create(NewVm(vm, memory_mib=int(row["memory"]) >> 20, root=kept))
        await cb.start(vm)
        steps["destination_booted"] = round(time.monotonic() - t, 3)
        t = time.monotonic()
        predicted = _final_predicted(last, pre if pre_fresh else None)
        cut = Cutover(
            quiesced_at=WallTime(w_quiesce),
            source_last_acked=(stopped or {}).get("last_acked"),
            source_acked_at=WallTime((stopped or {})["acked_at"]) if stopped else None,
            final_predicted_s=predicted, final_s=round(final_s, 3),
            final_prediction_error=round(abs(final_s - predicted) / final_s, 3)
            if final_s > 0 and predicted >= 0 else -1.0,
            verify=checked, steps=steps,
            criterion_predicted_s=last.predicted_next_s if predicted != last.predicted_next_s
            else None)
        async with cb.ssh(vm) as nm:
            if stopped is not None:
                # the application checks its last acknowledged record and what follows it
                # before it starts (it refuses to start on missing data, and cuts a torn tail);
                # every record is checked once its first acknowledgement ends the outage
                started = await nm.run(["python3", "-B", APP, "resume", "--dir", APP_DIR,
                                        "--check", "tail"], check=False, timeout=120)
                check = _started_check(started)
                cut = replace(cut, dest_check=check)
                if not check.get("ok") or check.get("last_acked") != stopped.get("last_acked"):
                    if started.ok:  # it started on other data than the source's: stop it
                        await nm.run(["python3", "-B", APP, "stop", "--dir", APP_DIR], check=False)
                    raise ReplicationError("the application's records on the destination do not "
                                           "match the source's", check=check, source=stopped,
                                           stderr=started.stderr[-1000:])
                if not started.ok:  # every record there, and yet it did not start
                    said = (started.stderr.strip() or started.stdout.strip()).splitlines()
                    raise ReplicationError("the application did not start on the destination: "
                                           + (said[-1][-300:] if said else
                                              f"exit status {started.returncode}"),
                                           check=check, source=stopped)
                first = await _first_new_ack(nm, int(stopped["last_acked"]))
                steps["application_started"] = round(time.monotonic() - t, 3)
                if isinstance(first, str):
                    cut = replace(cut, steps=steps, outage_unmeasured=first)
                else:
                    cut = replace(cut, steps=steps, dest_first_acked=first[0],
                                  dest_first_acked_at=WallTime(first[1]),
                                  outage_s=round(first[1] - float(stopped["acked_at"]), 3))
                cut = replace(cut, dest_check=await _every_record(nm, stopped, check))
            left = await nm.run(["test", "-e", AGENT_DIR], check=False)
            if left.ok:
                raise ReplicationError(f"the agent is still in {vm} at {AGENT_DIR}")
        return cut, final

    return await _past_no_return(whole, vm, switch())


async def _past_no_return(whole: LabContext, vm: str,
                          work: Coroutine[Any, Any, tuple[Cutover, PassRecord]]
                          ) -> tuple[Cutover, PassRecord]:
    """The cutover's steps once the source is stopping: a Ctrl-C there would leave the VM
    stopped in both clouds, so the first one is said and the cutover finishes (the replica
    is verified equal); a second one abandons it (asyncio's own second-interrupt rule:
    the source is left stopped with its disk intact, the destination as it is)."""
    task = asyncio.ensure_future(work)
    me = asyncio.current_task()
    said = False
    while True:
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:  # (steps that ended meanwhile: the loop returns them)
            if said or me is None:
                task.cancel()
                raise
            said = True
            me.uncancel()
            whole.progress(f"{vm}: Ctrl-C with the source stopped and its replica verified: "
                           "the cutover finishes (Ctrl-C again abandons it, the VM then "
                           "stopped in both clouds)")


async def _thaw(whole: LabContext, sm: SshMachine, vm: str, stage: Stage, exc: LabError,
                n: int, w_final: float, t_final: float, frozen_s: float) -> CutoverUndone:
    """The source thawed and its application started again after its final pass failed
    (a failure here is the replication's: it is given back as any other). A session lost
    with the final pass (the source crashed and rebooted: its freeze, its agent and its
    write tracker gone with it) is opened again first, for the same steps."""
    lost = False
    try:
        await _stop_left(sm)
    except SshError:
        lost = True
        await _reconnect(sm)
        try:
            await _stop_left(sm)
        except SshError as again:
            raise ReplicationError(f"the final pass failed ({exc.message}), and {vm} did not "
                                   f"answer again: {again.message}", cause=exc.message
                                   ) from exc
    await sm.run(["fsfreeze", "-u", "/"], check=False)
    resumed = await sm.run(["python3", "-B", APP, "resume", "--dir", APP_DIR], check=False,
                           timeout=120)
    if not resumed.ok:
        raise ReplicationError(f"the final pass failed ({exc.message}), and {vm}'s application "
                               "did not start again: " + (resumed.stderr.strip()
                                                          or resumed.stdout.strip())[-300:],
                               cause=exc.message) from exc
    stage.app_stopped = False
    why = (f"the final pass failed with the source frozen for {frozen_s:.1f} s: thawed, its "
           "application started again, nothing cut over; passes again")
    if lost:
        why = ("the final pass failed and the session with the source went with it (it "
               f"rebooted, or its network went) after {frozen_s:.1f} s frozen: connected "
               "again, thawed, its application started again, nothing cut over; passes again")
    whole.progress(f"{vm}: {why}")
    failed = replace(_failed_pass(n, w_final, t_final, exc), why=why)
    return CutoverUndone(f"the final pass failed: {exc.message}", failed, exc)


def _final_predicted(last: PassRecord, pre: dict[str, Any] | None) -> float:
    """The final pass's time as predicted when the source freezes. The criterion's
    prediction is the last pass's; a comparison before the freeze (a tracked
    verification) came between, the application writing all along (70 s for 2 GiB under
    TCG), and counted what the tracker saw written by its end: those blocks at the last
    pass's rate, its fixed cost, and the tracker's answer at what it cost the last era pass
    a block (its listing grows with the blocks: 0.53 s for 114, 0.21 s for 39 at 256 MiB;
    after a pass that began a tracker nothing of it is measured yet). (The seconds from
    its end to the freeze are not counted: about one.)"""
    to_send = None if pre is None else pre.get("to_send")
    if to_send is None or last.link_rate <= 0:
        return last.predicted_next_s
    scan = (last.digest_seconds * int(to_send) / last.todo_blocks
            if last.how == "era" and last.todo_blocks else 0.0)
    return round(last.fixed_seconds + scan + int(to_send) * blocks.BLOCK / last.link_rate, 3)


async def _verify(sm: SshMachine, to: str, tls: str, state: str, mode: str,
                  pre: dict[str, Any] | None, final: dict[str, Any]) -> dict[str, Any]:
    """The cutover's check of the replica, the source frozen: every block (full), or the
    blocks written since the precheck's era began, with those a cut pass had left to send
    then and those the final pass sent (tracked: the precheck found the rest equal, and
    nothing wrote them since, whatever passes came between); ``both`` does tracked, then
    full as its check. A final pass that did not read the tracker the precheck's era is
    of (a reboot since) is checked whole."""
    base = ["verify", "--disk", SOURCE_DISK, "--to", to, "--tls", tls]
    if mode == "full" or pre is None:
        return await _agent(sm, *base)
    if final.get("how") != "era" or final.get("tracker") != pre.get("tracker"):
        got = await _agent(sm, *base)
        return {**got, "precheck": pre, "why_full": "the final pass did not read the "
                "tracker the precheck's era began (the source lost it): every block read"}
    tracked = await _agent(sm, *base, "--since-precheck", str(int(pre["since"])),
                           "--state", state, "--tracker", str(pre["tracker"]))
    out = {**tracked, "precheck": pre}
    if mode == "both":
        whole_disk = await _agent(sm, *base)
        out = {**out, "full": whole_disk,
               "equal": bool(tracked.get("equal")) and bool(whole_disk.get("equal")),
               "differ_count": max(int(tracked.get("differ_count") or 0),
                                   int(whole_disk.get("differ_count") or 0))}
    return out


async def _every_record(m: SshMachine, stopped: dict[str, Any], started_on: dict[str, Any]
                        ) -> dict[str, Any]:
    """Every record up to the source's last acknowledged one, checked on the destination
    while its application writes on (after the outage: it started on its tail's check,
    ``started_on``); one missing or damaged is data lost, and the application stops."""
    t = time.monotonic()
    last = int(stopped["last_acked"])
    ran = await m.run(["python3", "-B", APP, "verify", "--dir", APP_DIR, "--upto", str(last)],
                      check=False, timeout=1800)
    got = _last_json(ran.stdout) or {
        "ok": False, "error": (ran.stderr.strip() or ran.stdout.strip())[-500:]}
    got |= {"seconds": round(time.monotonic() - t, 3), "started_on": started_on}
    if not got.get("ok"):
        await m.run(["python3", "-B", APP, "stop", "--dir", APP_DIR], check=False)
        raise ReplicationError(f"the application's records on the destination are not all "
                               f"there: {got.get('first_bad') or got.get('error')} (the "
                               f"source's last acknowledged record is {last}); it is stopped",
                               check=got, source=stopped)
    return got


def _started_check(started: CommandResult) -> dict[str, Any]:
    """The record check the application made before it started (``resume`` prints it; a
    refusal says it on stderr as JSON after its reason)."""
    out = _last_json(started.stdout)
    if started.ok and out is not None:
        return dict(out.get("verified") or {})
    text = started.stderr.strip()
    brace = text.find("{")
    if brace >= 0:
        with contextlib.suppress(ValueError):
            refused: dict[str, Any] = json.loads(text[brace:])
            return {**refused, "ok": False}
    return {"ok": False, "error": (text or started.stdout.strip())[-500:]}


#: how long a destination's writer must say its disk is full, acknowledging nothing, before
#: the cutover ends without an outage to measure (a batch refused once can pass the next)
FULL_FOR_S = 5.0


async def _first_new_ack(m: SshMachine, after: int, timeout: float = 60.0,
                         full_for: float = FULL_FOR_S) -> tuple[int, float] | str:
    """The first record the application acknowledged on the destination (from its own
    log): its number and time; or why it acknowledges none: its disk is full (the source's
    was: a replica of a full disk is full). A writer that exited is an error as soon as
    the writer is asked (from 2 s on)."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    full_seen: float | None = None
    while time.monotonic() < deadline:
        ran = await m.run(["cat", f"{APP_DIR}/acks.log"], check=False)
        for line in ran.stdout.splitlines():
            seq, _, at = line.partition(" ")
            if seq.isdigit() and int(seq) > after:
                return int(seq), float(at)
        if time.monotonic() - t0 < 2.0:  # (its first batch is due within 0.1 s of its start:
            await asyncio.sleep(0.5)      # the writer is asked only when it is late)
            continue
        st = await _app(m, "status") or {}
        if st.get("writer") is None:
            log = await m.run(["tail", "-n", "3", f"{APP_DIR}/app.log"], check=False)
            raise ReplicationError(f"{m.name}: the application exited after it started: "
                                   + (log.stdout.strip().replace("\n", "; ")[-300:]
                                      or "it left nothing in its log"), status=st)
        if st.get("full_since") is None:
            full_seen = None
        elif full_seen is None:
            full_seen = time.monotonic()
        elif time.monotonic() - full_seen >= full_for:
            return (f"the application started on the destination with every record (up to "
                    f"{after}), but its disk is full: it has acknowledged none since (every "
                    f"batch refused for {time.time() - float(st['full_since']):.0f} s)")
        await asyncio.sleep(0.5)
    raise ReplicationError(f"{m.name}: the application acknowledged nothing within "
                           f"{timeout:g} s of its start")


@dataclass(frozen=True)
class ReplicationRow(Message):
    """One line of ``labctl replication list``."""

    id: int
    vm: str
    from_site: str
    to_site: str
    state: str
    started_at: WallTime
    passes: int
    outage_s: float | None
    error: str | None


def approve(whole: LabContext, rid: int, withdraw: bool = False) -> ReplicationRow:
    """Say the cutover of running replication ``rid`` may go: its criterion's ``approved``
    reads 1 from the next pass on (``withdraw``: 0 again; a cutover already under way
    goes on)."""
    row = next((r for r in list_all(whole) if r.id == rid), None)
    if row is None:
        show(whole, rid)  # the refusal naming the replications there are
        raise AssertionError("unreachable")
    if row.state != "running":
        raise ReplicationError(f"replication {rid} is {row.state}: there is no cutover left "
                               "to approve", id=rid, state=row.state)
    work = whole.dir.path / "replications" / str(rid)
    if withdraw:
        (work / APPROVED).unlink(missing_ok=True)
        return row
    work.mkdir(parents=True, exist_ok=True)
    (work / APPROVED).write_text(f"{time.time()}\n")
    return row


def list_all(whole: LabContext) -> list[ReplicationRow]:
    out = []
    for r in whole.inv.rows("replications"):
        rec = json.loads(r["result"] or "{}")
        cut_short = gone(str(r["state"]), rec.get("controller"))
        out.append(ReplicationRow(
            id=int(r["id"]), vm=str(r["vm"]), from_site=str(r["from_site"]),
            to_site=str(r["to_site"]), state="failed" if cut_short else str(r["state"]),
            started_at=WallTime(float(r["started_at"])),
            passes=len([p for p in rec.get("passes") or []
                        if p.get("how") not in ("failed", "precheck")]),
            outage_s=(rec.get("cutover") or {}).get("outage_s"),
            error=cut_short or rec.get("error")))
    return out


def show(whole: LabContext, rid: int) -> Replication:
    r = whole.inv.row("replications", id=rid)
    if r is None:
        known = ", ".join(str(x["id"]) for x in whole.inv.rows("replications")) or "none"
        raise LabStateError(f"no replication {rid} (recorded: {known})", id=rid)
    rec = Replication.from_wire(json.loads(r["result"]), f"replication {rid}")
    cut_short = gone(rec.state, rec.controller)
    return replace(rec, state="failed", error=cut_short) if cut_short else rec
