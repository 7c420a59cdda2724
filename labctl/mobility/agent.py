"""A mobility agent: a site's stand-in for a host of another site (agent side).

Registered in its site's inventory as a host of kind ``mobility``, it answers the host
agent's migration protocol, so each site's controller runs its ordinary migration driver:

* **outgoing** (site A, the VM's site): it poses as the *destination*. ``mig_prepare``
  opens one mutual-TLS relay connection to the peer agent, sends the VM's spec on the
  relay's ``control`` stream and answers only once site B's destination listens; the URI
  and NBD export it answers are its own local ends of the relay's ``memory`` and ``disk``
  streams. ``mig_dest_finish`` tells site B that the source completed (its last
  heartbeat) and answers what site B's destination verified.
* **incoming** (site B): it poses as the *source*. ``mig_source_info`` answers the spec
  site A sent; ``mig_start`` points the relay's streams at site B's destination (its
  migration URI, its disk's NBD export) and tells site A it is ready; ``mig_status``
  reports the relay's bytes, and ``completed`` once site A's source said so;
  ``mig_source_finish`` passes what site B's destination verified back to site A.

Either side giving up tells the other (``abort`` / ``failed``); site B also gives up on a
site A that has said nothing for ``PEER_SILENCE_S`` (a cut WAN), and site A on a
controller whose lease lapsed. Nothing here touches a VM: the QEMUs are the hosts'.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labctl.core.errors import LabError, LabStateError, MigrationError, ProtocolError
from labctl.core.rpc import Handler, RpcServer
from labctl.core.tlsctx import client_context, server_context
from labctl.core.wire import Empty, handlers
from labctl.hosts import protocol as hp
from labctl.migration import protocol as mp
from labctl.mobility import protocol as p
from labctl.mobility.relay import Counters, EndA, RelayError, serve_b

log = logging.getLogger("labctl.mobility")

#: site B gives up on site A after this long without a word (the WAN is cut, A is gone)
PEER_SILENCE_S = 10.0
#: how long site A waits for site B's destination to listen
PEER_PREPARE_S = 80.0


def _now() -> float:
    return time.monotonic()


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    ca: Path


@dataclass
class _Migration:
    """One migration through this agent, either role."""

    vm: str
    migration: str
    role: str  # outgoing | incoming
    peer: str
    counters: Counters = field(default_factory=Counters)
    state: str = "announced"
    error: str | None = None
    t_start: float | None = None
    t_end: float | None = None
    # outgoing
    peer_address: str = ""
    peer_port: int = 0
    compress: bool = False
    window: int | None = None
    end: EndA | None = None
    ctl_writer: asyncio.StreamWriter | None = None
    lease_until: float = 0.0
    # incoming
    prepare: p.Control | None = None
    prepared: asyncio.Event = field(default_factory=asyncio.Event)
    targets: dict[str, tuple[str, int]] = field(default_factory=dict)
    t0: float = 0.0
    statuses: list[mp.StatusChange] = field(default_factory=list)
    final: Any = None
    heartbeat: mp.HeartbeatStamp | None = None
    last_word: float = 0.0
    # both: the peer's next answer (A: ready/finished/failed; B: completed/abort)
    replies: asyncio.Queue[p.Control] = field(default_factory=asyncio.Queue)

    def stats(self) -> p.RelayStats:
        end = self.t_end if self.t_end is not None else _now()
        return p.RelayStats(
            vm=self.vm, migration=self.migration,
            role="outgoing" if self.role == "outgoing" else "incoming", state=self.state,
            out=dict(self.counters.out), back=dict(self.counters.back),
            wire=dict(self.counters.wire),
            seconds=round(end - self.t_start, 3) if self.t_start is not None else 0.0,
            error=self.error)


async def _send(writer: asyncio.StreamWriter, msg: p.Control) -> None:
    writer.write(json.dumps(msg.to_wire(), separators=(",", ":")).encode() + b"\n")
    await writer.drain()


async def _lines(reader: asyncio.StreamReader, what: str) -> AsyncIterator[p.Control]:
    """Control messages from ``reader`` as they come (an async generator)."""
    while True:
        line = await reader.readline()
        if not line:
            return
        try:
            yield p.Control.from_wire(json.loads(line), what)
        except (ProtocolError, ValueError) as exc:
            log.warning("%s: a control line that is no message (%s)", what, exc)


class MobilityAgent:
    """One site's mobility agent (see the module docstring)."""

    def __init__(self, name: str, address: str, relay_port: int, tls: TlsFiles) -> None:
        self.name = name
        self.address = address
        self.relay_port = relay_port
        self.tls = tls
        self.migrations: dict[str, _Migration] = {}
        self.server: RpcServer | None = None
        self._relay: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ the RPC face
    def handlers(self) -> dict[str, Handler]:
        return handlers(
            hp.PING.serve(self.ping), hp.VM_LIST.serve(self.vm_list),
            hp.VM_STATUS.serve(self.vm_status),
            p.MOB_OUTGOING.serve(self.outgoing), p.MOB_INCOMING.serve(self.incoming),
            p.MOB_STATS.serve(self.stats), p.MOB_PING.serve(self.mob_ping),
            *mp.served_by(self))  # it answers the whole migration protocol

    async def ping(self, _: Empty) -> hp.HostPing:
        return hp.HostPing(host=self.name, pid=os.getpid(), qemu_version=None, accel="none",
                           mem_available=None)

    async def mob_ping(self, _: Empty) -> p.MobilityPing:
        return p.MobilityPing(name=self.name, relay_port=self.relay_port)

    async def vm_list(self, _: Empty) -> hp.VmList:
        return hp.VmList(vms=[])  # it runs no VM: the QEMUs are the hosts'

    async def vm_status(self, req: hp.VmName) -> hp.VmStatus:
        """A VM is never *running* here: a driver's recovery checks the real source."""
        m = self.migrations.get(req.name)
        return hp.VmStatus(name=req.name, state="elsewhere" if m else "unknown",
                           process="none", pid=None, returncode=None, heartbeat=None,
                           disk_counter=None, first_heartbeat_s=None, qmp_check_socket="",
                           console_log="")

    async def stats(self, req: hp.VmName) -> p.RelayStats:
        return self._get(req.name).stats()

    def _get(self, vm: str, role: str | None = None) -> _Migration:
        m = self.migrations.get(vm)
        if m is None or (role is not None and m.role != role):
            what = {"outgoing": "to another site", "incoming": "from another site"}.get(
                role or "", "")
            raise LabStateError(f"mobility agent {self.name} has no migration of {vm!r} "
                                f"{what + ' ' if what else ''}announced (labctl migrate VM "
                                "--to-site SITE)", vm=vm)
        return m

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ announcements
    async def outgoing(self, req: p.Outgoing) -> p.RelayStats:
        old = self.migrations.get(req.vm)
        if old is not None and old.state in ("prepared", "running"):
            raise LabStateError(f"VM {req.vm} is already migrating through {self.name}",
                                vm=req.vm)
        m = _Migration(vm=req.vm, migration=req.migration, role="outgoing", peer=req.peer,
                       peer_address=req.peer_address, peer_port=req.peer_port,
                       compress=req.compress, window=req.window)
        self.migrations[req.vm] = m
        return m.stats()

    async def incoming(self, req: p.Incoming) -> p.RelayStats:
        old = self.migrations.get(req.vm)
        if old is not None and old.state in ("prepared", "running"):
            raise LabStateError(f"VM {req.vm} is already migrating through {self.name}",
                                vm=req.vm)
        m = _Migration(vm=req.vm, migration=req.migration, role="incoming", peer=req.peer)
        self.migrations[req.vm] = m
        return m.stats()

    # ------------------------------------------------------------------ site A: destination
    async def mig_prepare(self, req: mp.Prepare) -> mp.Prepared:
        t = _now()
        m = self._get(req.spec.name, "outgoing")
        if req.storage != "early":
            raise MigrationError("a migration to another site prepares its storage early "
                                 "(the disk is mirrored)", vm=m.vm)
        m.t_start = t
        end = EndA(m.counters, compress=m.compress, **({"window": m.window} if m.window
                                                        else {}))
        ctx = client_context(self.tls.cert, self.tls.key, self.tls.ca)
        try:
            await asyncio.wait_for(end.connect(m.peer_address, m.peer_port, ctx,
                                               server_hostname=m.peer), 15)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            self._fail(m, f"cannot reach the mobility agent {m.peer} at "
                          f"{m.peer_address}:{m.peer_port}: {exc!r}")
            raise MigrationError(str(m.error), vm=m.vm, peer=m.peer) from None
        m.end = end
        port = await end.listen("control")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        m.ctl_writer = writer
        self._spawn(self._read_replies(m, reader))
        await _send(writer, p.Control(op="prepare", vm=m.vm, migration=m.migration,
                                      spec=req.spec, disk_size=req.disk_size,
                                      mirror=req.export_disk))
        m.lease_until = _now() + req.lease_s
        self._spawn(self._keep_talking(m))
        reply = await self._reply(m, PEER_PREPARE_S, "to prepare its destination")
        if reply.op != "ready":
            self._fail(m, f"site B did not prepare: {reply.error or reply.op}")
            await self._close(m)
            raise MigrationError(str(m.error), vm=m.vm, peer=m.peer)
        mem = await end.listen("memory", host=self.address)
        nbd = None
        if req.export_disk:
            nbd = f"nbd:{self.address}:{await end.listen('disk', host=self.address)}" \
                  ":exportname=disk0"
        m.state = "prepared"
        took = _now() - t
        log.info("outgoing %s: site B ready through %s after %.3f s", m.vm, m.peer, took)
        return mp.Prepared(uri=f"tcp:{self.address}:{mem}", pid=None, storage="early",
                           timings={"prepare_s": round(took, 4)},
                           checks=mp.StorageChecks(), run_dir="", nbd=nbd)

    async def _read_replies(self, m: _Migration, reader: asyncio.StreamReader) -> None:
        async for msg in _lines(reader, f"control of {m.vm} from {m.peer}"):
            m.last_word = _now()
            if msg.op == "alive":
                continue
            if msg.op == "failed":
                self._fail(m, f"site B gave up: {msg.error or 'no reason given'}")
            await m.replies.put(msg)
        if m.state not in ("completed", "failed"):
            await m.replies.put(p.Control(op="failed", vm=m.vm,
                                          error=f"lost the relay to {m.peer}"))

    async def _reply(self, m: _Migration, timeout: float, what: str) -> p.Control:
        try:
            return await asyncio.wait_for(m.replies.get(), timeout)
        except TimeoutError:
            return p.Control(op="failed", vm=m.vm,
                             error=f"{m.peer} did not answer within {timeout:g} s {what}")

    async def _keep_talking(self, m: _Migration) -> None:
        """Site A: ``alive`` every second while the migration runs; an ``abort`` once the
        controller's lease lapses (it is gone or cut off); the migration fails once site
        B has said nothing for ``PEER_SILENCE_S`` (the next lease renewal says so)."""
        m.last_word = _now()
        while m.state in ("announced", "prepared", "running"):
            await asyncio.sleep(1.0)
            if m.ctl_writer is None:
                return
            if _now() - m.last_word > PEER_SILENCE_S:
                self._fail(m, f"no word from {m.peer} for {PEER_SILENCE_S:g} s (the WAN is "
                              "cut, or site B's agent is gone)")
                await m.replies.put(p.Control(op="failed", vm=m.vm, error=m.error))
                await self._close(m)
                return
            if _now() > m.lease_until and m.state != "completed":
                self._fail(m, "the controller's lease lapsed")
                with contextlib.suppress(OSError, RuntimeError):
                    await _send(m.ctl_writer, p.Control(op="abort", vm=m.vm, error=m.error))
                await self._close(m)
                return
            with contextlib.suppress(OSError, RuntimeError):
                await _send(m.ctl_writer, p.Control(op="alive", vm=m.vm))

    async def mig_renew(self, req: mp.Renew) -> mp.Renewed:
        m = self._get(req.name, "outgoing")
        if m.state == "failed":
            raise MigrationError(f"the migration of {m.vm} through {self.name} failed: "
                                 f"{m.error}", vm=m.vm)
        m.lease_until = _now() + req.lease_s
        if m.state == "prepared":
            m.state = "running"
        return mp.Renewed(lease_until=m.lease_until)

    async def mig_late_storage(self, req: hp.VmName) -> mp.DestStorage:
        raise MigrationError("a migration to another site has no late storage window (its "
                             "disk is mirrored)", vm=req.name)

    async def mig_dest_finish(self, req: mp.DestFinish) -> mp.DestFinished:
        m = self._get(req.name, "outgoing")
        if m.ctl_writer is None or m.state == "failed":
            raise MigrationError(f"the migration of {m.vm} through {self.name} failed: "
                                 f"{m.error or 'not prepared'}", vm=m.vm)
        m.lease_until = float("inf")
        await _send(m.ctl_writer, p.Control(op="completed", vm=m.vm,
                                            heartbeat=req.source_heartbeat))
        reply = await self._reply(m, max(req.timeout, 10.0) + 30.0,
                                  "to verify the guest at its destination")
        if reply.op != "finished" or reply.dest is None:
            self._fail(m, f"site B did not verify the guest: {reply.error or reply.op}")
            await self._close(m)
            raise MigrationError(str(m.error), vm=m.vm, peer=m.peer)
        m.state = "completed"
        m.t_end = _now()
        await self._close(m)
        return reply.dest

    async def mig_dest_abort(self, req: hp.VmName) -> mp.DestAborted:
        m = self.migrations.get(req.name)
        if m is None or m.role != "outgoing":
            return mp.DestAborted(name=req.name, removed=False)
        if m.state != "completed":
            self._fail(m, m.error or "site A's controller gave up")
            if m.ctl_writer is not None:
                with contextlib.suppress(OSError, RuntimeError):
                    await _send(m.ctl_writer, p.Control(op="abort", vm=m.vm, error=m.error))
        await self._close(m)
        return mp.DestAborted(name=req.name, removed=True)

    def _fail(self, m: _Migration, why: str) -> None:
        if m.state not in ("completed", "failed"):
            m.state, m.error, m.t_end = "failed", why, _now()
            log.warning("%s %s: %s", m.role, m.vm, why)

    async def _close(self, m: _Migration) -> None:
        if m.ctl_writer is not None:
            m.ctl_writer.close()
            m.ctl_writer = None
        if m.end is not None:
            end, m.end = m.end, None
            await asyncio.sleep(0.2)  # let the last frames go out
            await end.close()

    # ------------------------------------------------------------------ site B: relay end
    async def start_relay(self) -> None:
        ctx = server_context(self.tls.cert, self.tls.key, self.tls.ca)
        self._relay = await asyncio.start_server(self._relay_connection, self.address,
                                                 self.relay_port, ssl=ctx)

    async def _relay_connection(self, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        """One relay connection from a peer (mutual TLS already checked both certificates):
        its control stream reaches a listener of its own, which learns which migration the
        connection carries; memory and disk reach site B's destination once it listens."""
        conn: dict[str, Any] = {"m": None}
        targets: dict[str, tuple[str, int]] = {}
        counters = Counters()

        async def control(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await self._control_b(conn, targets, counters, r, w)

        local = await asyncio.start_server(control, "127.0.0.1", 0)
        targets["control"] = ("127.0.0.1", int(local.sockets[0].getsockname()[1]))
        try:
            await serve_b(reader, writer, targets, counters)
        except RelayError as exc:
            m = conn["m"]
            if m is not None:
                self._fail_b(m, f"the relay from {m.peer} broke: {exc}")
        finally:
            local.close()
            m = conn["m"]
            if m is not None and m.state not in ("completed", "failed"):
                self._fail_b(m, f"the relay from {m.peer} closed")

    async def _control_b(self, conn: dict[str, Any], targets: dict[str, tuple[str, int]],
                         counters: Counters, r: asyncio.StreamReader,
                         w: asyncio.StreamWriter) -> None:
        watch: asyncio.Task[None] | None = None
        try:
            async for msg in _lines(r, "control from site A"):
                m: _Migration | None = conn["m"]
                if msg.op == "prepare":
                    m = self.migrations.get(msg.vm)
                    if m is None or m.role != "incoming" or m.state != "announced":
                        await _send(w, p.Control(op="failed", vm=msg.vm, error=(
                            f"mobility agent {self.name} expects no migration of {msg.vm}")))
                        return
                    conn["m"] = m
                    m.counters, m.targets, m.prepare = counters, targets, msg
                    m.t_start, m.last_word = _now(), _now()
                    m.ctl_writer = w
                    m.state = "prepared"
                    m.prepared.set()
                    watch = asyncio.ensure_future(self._watch_peer(m))
                elif m is None:
                    return
                elif msg.op == "alive":
                    m.last_word = _now()
                elif msg.op == "completed":
                    m.last_word = _now()
                    m.heartbeat = msg.heartbeat
                    m.final = {"status": "completed"}
                    self._status(m, "completed")
                elif msg.op == "abort":
                    self._fail_b(m, f"site A gave up: {msg.error or 'no reason given'}")
        finally:
            if watch is not None:
                watch.cancel()

    async def _watch_peer(self, m: _Migration) -> None:
        """Site B: ``alive`` to site A every second; the migration fails once site A has
        said nothing for ``PEER_SILENCE_S``."""
        while m.state in ("prepared", "running"):
            await asyncio.sleep(1.0)
            if m.ctl_writer is not None:
                with contextlib.suppress(OSError, RuntimeError):
                    await _send(m.ctl_writer, p.Control(op="alive", vm=m.vm))
            if _now() - m.last_word > PEER_SILENCE_S:
                self._fail_b(m, f"no word from {m.peer} for {PEER_SILENCE_S:g} s (the WAN "
                                "is cut, or site A's agent is gone)")

    def _status(self, m: _Migration, status: str) -> None:
        m.statuses.append(mp.StatusChange(t_rel=round(_now() - (m.t0 or _now()), 4),
                                          status=status))
        if status == "completed":
            m.state = "completed"
        if self.server is not None:
            self.server.publish(mp.EVENT_PROGRESS, mp.MigrationProgress(
                vm=m.vm, t=_now(), status=status).to_wire())

    def _fail_b(self, m: _Migration, why: str) -> None:
        if m.state in ("completed", "failed"):
            return
        self._fail(m, why)
        m.final = {"status": "failed", "error-desc": why}
        self._status(m, "failed")
        m.prepared.set()  # a driver waiting for site A's spec learns it now

    async def mig_source_info(self, req: hp.VmName) -> mp.SourceInfo:
        m = self._get(req.name, "incoming")
        try:
            await asyncio.wait_for(m.prepared.wait(), PEER_PREPARE_S)
        except TimeoutError:
            raise MigrationError(f"site A's mobility agent {m.peer} sent nothing about "
                                 f"{m.vm} within {PEER_PREPARE_S:g} s", vm=m.vm) from None
        if m.state == "failed" or m.prepare is None or m.prepare.spec is None:
            raise MigrationError(f"the migration of {m.vm} from {m.peer} failed: {m.error}",
                                 vm=m.vm)
        return mp.SourceInfo(spec=m.prepare.spec, status="running",
                             disk_size=m.prepare.disk_size, heartbeat=None, pid=None,
                             process="running", migrating=False)

    async def mig_dirty_rate(self, req: mp.DirtyRateRequest) -> mp.DirtyRate:
        raise MigrationError("the dirty rate is measured on site A's source host", vm=req.name)

    async def mig_start(self, req: mp.Start) -> mp.Started:
        m = self._get(req.name, "incoming")
        if m.state != "prepared" or m.ctl_writer is None:
            raise MigrationError(f"the migration of {m.vm} from {m.peer} is {m.state}"
                                 + (f": {m.error}" if m.error else ""), vm=m.vm)
        host, _, port = req.uri.removeprefix("tcp:").rpartition(":")
        if not req.uri.startswith("tcp:") or not port.isdigit():
            raise LabError(f"mig_start: bad URI {req.uri!r}")
        m.targets["memory"] = (host, int(port))
        assert m.prepare is not None
        if m.prepare.mirror:
            if req.mirror_to is None:
                raise MigrationError(f"site A mirrors the disk of {m.vm}: site B's "
                                     "destination must export it", vm=m.vm)
            parts = req.mirror_to.split(":")
            if len(parts) < 3 or parts[0] != "nbd" or not parts[2].isdigit():
                raise LabError(f"mig_start: bad NBD URI {req.mirror_to!r}")
            m.targets["disk"] = (parts[1], int(parts[2]))
        m.t0 = _now()
        m.state = "running"
        self._status(m, "active")
        await _send(m.ctl_writer, p.Control(op="ready", vm=m.vm))
        return mp.Started(t0=m.t0)

    async def mig_status(self, req: mp.StatusRequest) -> mp.SourceStatus:
        m = self._get(req.name, "incoming")
        status = ("completed" if m.state == "completed" else "failed" if m.state == "failed"
                  else "active")
        now = {"status": status,
               "ram": {"transferred": m.counters.out.get("memory", 0)},
               "disk": {"transferred": m.counters.out.get("disk", 0)}}
        return mp.SourceStatus(
            status=status, t0=m.t0, passes=[], statuses=list(m.statuses), now=now,
            final=m.final if status in mp.FINAL_STATUSES else None, stop_t=None,
            stop_qemu_t=None, checkpoints={}, heartbeat=m.heartbeat,
            process="running", returncode=None, t=_now())

    async def mig_set(self, req: mp.SetParameters) -> mp.Stamp:
        return mp.Stamp(t=_now())  # the source's parameters are site A's controller's

    async def mig_continue(self, req: hp.VmName) -> mp.Stamp:
        return mp.Stamp(t=_now())

    async def mig_postcopy(self, req: hp.VmName) -> mp.Stamp:
        raise MigrationError("post-copy is not carried between sites", vm=req.name)

    async def mig_mirror_complete(self, req: hp.VmName) -> mp.MirrorCompleted:
        raise MigrationError("site A's source completes the mirror", vm=req.name)

    async def mig_cancel(self, req: mp.Cancel) -> mp.Cancelled:
        m = self.migrations.get(req.name)
        if m is not None and m.role == "incoming" and m.state == "announced":
            self._fail_b(m, req.reason or "site A's half failed before it reached this agent")
        elif m is not None and m.role == "incoming":
            if m.state == "completed":  # the source finished; the destination did not verify
                m.state, m.error = "failed", "site B's destination did not verify the guest"
            self._fail_b(m, m.error or req.reason or "site B's controller gave up")
            if m.ctl_writer is not None:
                with contextlib.suppress(OSError, RuntimeError):
                    await _send(m.ctl_writer, p.Control(op="failed", vm=m.vm, error=m.error))
        return mp.Cancelled(status="cancelled", vm_status="elsewhere", resumed_by_us=False,
                            took_s=0.0)

    async def mig_source_finish(self, req: mp.SourceFinish) -> hp.VmStopped:
        m = self._get(req.name, "incoming")
        if m.ctl_writer is None:
            raise MigrationError(f"the relay from {m.peer} is gone", vm=m.vm)
        await _send(m.ctl_writer, p.Control(op="finished", vm=m.vm, dest=req.dest))
        m.t_end = _now()
        return hp.VmStopped(name=m.vm, pid=None, returncode=None)

    # ------------------------------------------------------------------ lifecycle
    async def close(self) -> None:
        if self._relay is not None:
            self._relay.close()
        for m in self.migrations.values():
            await self._close(m)
        for t in list(self._tasks):
            t.cancel()
