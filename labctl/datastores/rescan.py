"""The rescan service: storage events -> the hosts sharing the unit -> refresh -> verified.

One process per lab, started by ``labctl up`` inside the lab's ownership::

    python -m labctl.agents.rescan --lab-dir DIR --lab NAME

It subscribes to every storage agent and every host agent (reconnecting when one
goes away) and receives their events:

* storage side: ``lun_capacity_changed`` (the agent noticed its backing disk grow,
  e.g. after ``labctl datastore resize``), ``lun_added``, ``lun_removed``,
  ``portal_down``/``portal_up``; the service adds ``storage_agent_lost`` /
  ``storage_agent_back`` when it loses or regains a storage agent;
* host side: ``host_capacity_changed``, ``unit_attention``, ``io_error``.

For each event about a unit (a datastore ID, ``naa.…``) it

1. looks the unit up in the inventory (unknown: a warning is recorded, nothing else);
2. asks the storage agent for the unit's current capacity (the state every host must end
   with);
3. finds the hosts sharing the unit, **from the inventory** (``datastore_hosts``) or **by
   polling the hosts** (``storage_lookup``: each answers from its own cache, no SCSI
   command), per lab (inventory meta ``rescan_lookup``: ``inventory`` or ``poll``);
4. sends ``storage_refresh(unit)`` to exactly those hosts, each re-reading that one unit,
   and waits until each reports the storage's state (retrying a few times);
5. tells every VM running on the unit its new size (QEMU ``block_resize``);
6. records the event, the hosts refreshed, stale or disagreeing, SCSI commands per host
   and the time until all agreed (table ``rescan_events`` of the inventory).

Events about one unit are **coalesced**: while a round for the unit runs, new events
queue; the next round covers all of them at once (they are recorded with
``coalesced_into``) and uses the storage's state at that time. A sharing host that
does not answer is marked **stale** (table ``host_units``) and refreshed as soon as it
answers again; the event record then lists it under ``hosts_late``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from labctl.core.errors import AgentError, LabError, LabStateError, ProtocolError
from labctl.core.ids import normal_naa
from labctl.core.rpc import Cursor, RpcClient
from labctl.core.secret import read_secret
from labctl.core.wire import Json, Message, Method
from labctl.datastores import protocol as dp
from labctl.datastores.tables import (
    DATASTORES,
    Datastore,
    RescanEvent,
    datastore,
    datastores,
    host_units,
    record_seen,
    rescan_events,
    sharing,
    typed_rows,
)
from labctl.state.inventory import Inventory
from labctl.storage import protocol as sp
from labctl.storage.node import DomainWatch

log = logging.getLogger("labctl.datastores.rescan")

LOOKUPS = ("inventory", "poll")
#: a storage node's domain, as libvirt reports it (events from source "libvirt")
EVENT_NODE_PAUSED = "storage_node_paused"
EVENT_WAN_DOWN = "wan_down"
EVENT_WAN_UP = "wan_up"
EVENT_NODE_STOPPED = "storage_node_stopped"
EVENT_NODE_RESUMED = "storage_node_resumed"
#: recorded as they are: the refresh that follows a node's return is storage_agent_back's
NODE_DOWN_EVENTS = (EVENT_NODE_PAUSED, EVENT_NODE_STOPPED, EVENT_NODE_RESUMED)
FINAL = ("done", "partial", "ignored", "coalesced", "failed")
_REFRESH_TIMEOUT = 3.0
_AGREE_TRIES = 10
_HEAL_BACKOFF_MAX_S = 30.0  # a host that keeps disagreeing is asked again at most this rarely
_LIVENESS_UNIT = "naa." + "0" * 32  # no host has it: a lookup of it is a cheap liveness call

Q = TypeVar("Q", bound=Message)
R = TypeVar("R", bound=Message)


def last_event_id(inv: Inventory) -> int:
    row = inv.conn.execute("SELECT MAX(id) FROM rescan_events").fetchone()
    return int(row[0] or 0)


def events(inv: Inventory, after: int = 0) -> list[RescanEvent]:
    return rescan_events(inv, "id > ?", (after,))


def event(inv: Inventory, eid: int) -> RescanEvent | None:
    found = rescan_events(inv, "id=?", (eid,))
    return found[0] if found else None


async def wait_for_event(inv: Inventory, unit: str, after: int, size_bytes: int | None = None,
                         timeout: float = 30.0) -> RescanEvent:
    """The first finished event about ``unit`` newer than ``after`` (for a resize: the round
    that ended with ``size_bytes``); follows coalescing to the round that carried it."""
    deadline = time.monotonic() + timeout
    while True:
        for ev in events(inv, after):
            if ev.naa != unit or ev.state not in FINAL:
                continue
            if ev.state == "coalesced" and ev.coalesced_into:
                primary = event(inv, ev.coalesced_into)
                if primary is None or primary.state not in FINAL:
                    continue
                ev = primary
            if size_bytes is None or ev.size_bytes == size_bytes:
                return ev
        if time.monotonic() > deadline:
            running = inv.get_meta("rescan_ready")
            raise LabStateError(
                f"no rescan outcome for {unit} within {timeout:g} s"
                + ("" if running else " (the lab's rescan service is not running)"),
                unit=unit, after=after)
        await asyncio.sleep(0.05)


def format_event(ev: RescanEvent) -> str:
    t = time.strftime("%H:%M:%S", time.localtime(ev.at)) + f".{int(ev.at * 1000) % 1000:03d}"
    head = f"#{ev.id:<4} {t} " + (f"{ev.site} " if ev.site else "") + \
        f"{ev.source:<14} {ev.kind:<22} "
    what = f"{ev.datastore or '?'} {ev.naa or ''}".strip()
    if ev.state == "coalesced":
        return head + f"{what}: coalesced into #{ev.coalesced_into}"
    if ev.state == "ignored":
        return head + f"{what}: {ev.message or 'ignored'}"
    if ev.state not in FINAL:
        return head + f"{what}: {ev.state}"
    if ev.naa is None and ev.message:  # about no datastore (a WAN router's state)
        return head + f"{ev.message} [{ev.state}]"
    size = ev.size_bytes
    parts = [what, f"size {size >> 20} MiB" if size else "",
             f"lookup {ev.lookup}", f"refreshed {','.join(ev.hosts_refreshed or []) or '-'}"]
    if ev.hosts_stale:
        parts.append(f"stale {','.join(ev.hosts_stale)}")
    if ev.hosts_late:
        parts.append(f"late {','.join(ev.hosts_late)}")
    if ev.hosts_disagree:
        parts.append(f"disagree {','.join(ev.hosts_disagree)}")
    if ev.agreed_ms is not None:
        parts.append(f"all agreed in {ev.agreed_ms:.0f} ms")
    if ev.vms_resized:
        parts.append("VM " + ",".join(str(v.get("vm")) for v in ev.vms_resized) + " resized")
    if ev.message:
        parts.append(str(ev.message))
    return head + "; ".join(p for p in parts if p) + f" [{ev.state}]"


def set_lookup(inv: Inventory, mode: str) -> None:
    if mode not in LOOKUPS:
        raise LabStateError(f"unknown lookup {mode!r} (one of {', '.join(LOOKUPS)})", mode=mode)
    inv.set_meta("rescan_lookup", mode)


# ------------------------------------------------------------------------------ the service

@dataclass(frozen=True)
class Expected:
    """A unit's state as the storage reports it now: what every sharing host must end with."""

    state: Literal["ok", "unreachable"]
    size_bytes: int | None = None  # with state ok

    def record(self) -> dict[str, object]:
        """The form kept in ``rescan_events.expected``."""
        if self.state == "unreachable":
            return {"state": "unreachable"}
        return {"state": "ok", "size_bytes": self.size_bytes}


@dataclass(frozen=True)
class VmResize:
    """A running VM on the unit, told the new size (``ok``) or not (``error``)."""

    vm: str
    host: str
    ok: bool
    size_bytes: int | None = None
    error: str | None = None

    def record(self) -> dict[str, object]:
        """The form kept in ``rescan_events.vms_resized``."""
        if self.ok:
            return {"vm": self.vm, "host": self.host, "size_bytes": self.size_bytes, "ok": True}
        return {"vm": self.vm, "host": self.host, "ok": False, "error": self.error}


@dataclass(frozen=True)
class _Agent:
    """A row of ``hosts`` or ``storage_nodes``: where its agent listens."""

    name: str
    address: str
    agent_port: int


@dataclass(frozen=True)
class _Vm:
    """A row of ``vms``: what the service needs to tell a VM its disk's new size."""

    name: str
    host: str
    state: str


class _Gate:
    """An event sink that holds events until ``open()``, then passes them on in order."""

    def __init__(self, sink: Callable[[str, Json], None]) -> None:
        self.sink = sink
        self.held: list[tuple[str, Json]] | None = []

    def __call__(self, event: str, data: Json) -> None:
        if self.held is None:
            self.sink(event, data)
        else:
            self.held.append((event, data))

    def open(self) -> None:
        held, self.held = self.held or [], None
        for event, data in held:
            self.sink(event, data)


def _links_of(lab_dir: Path, site: str) -> set[str]:
    """The WAN links of the lab at ``lab_dir`` that reach ``site`` (read once: links are
    made with the lab)."""
    inv = Inventory.open(lab_dir / "inventory.db")
    try:
        return {str(r["name"]) for r in inv.rows("wan_links") if site in (r["site_a"], r["site_b"])}
    except sqlite3.OperationalError:  # a lab without the WAN links' table has no links
        return set()
    finally:
        inv.close()


class RescanService:
    """Follows every agent of one site of a lab (its own inventory and secret: it sees no
    other site's) and runs the event -> refresh rounds."""

    def __init__(self, lab_dir: Path, site: str) -> None:
        self.lab_dir = lab_dir
        self.site = site
        self.inv = Inventory.open(lab_dir / "sites" / site / "inventory.db", [DATASTORES])
        self.secret = read_secret(lab_dir / "sites" / site / "secret")
        #: the WAN links that reach this site (their routers' events are this site's too)
        self.links = _links_of(lab_dir, site)
        self.hosts: dict[str, RpcClient] = {}
        self.nodes: dict[str, RpcClient] = {}
        self.node_lost: dict[str, bool] = {}
        self.portal_down: dict[str, bool] = {}
        self.node_paused: dict[str, bool] = {}
        self.router_paused: set[str] = set()
        self._pending: dict[str, list[int]] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._connected: set[str] = set()
        self._asking: dict[str, asyncio.Task[Expected]] = {}  # storage queries in flight
        self._heal_backoff: dict[tuple[str, str], tuple[float, float]] = {}  # (next try, delay)

    # -- recording
    def _record(self, source: str, kind: str, unit: str | None, datastore: str | None,
                detail: dict[str, Json], state: str = "queued") -> int:
        cur = self.inv.conn.execute(
            "INSERT INTO rescan_events(at, source, kind, unit, datastore, detail, state) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (time.time(), source, kind, unit, datastore, json.dumps(detail, default=str), state))
        return int(cur.lastrowid or 0)

    def _update(self, eid: int, **values: Any) -> None:
        enc = {k: (json.dumps(v) if isinstance(v, list | dict) else v) for k, v in values.items()}
        self.inv.update("rescan_events", {"id": eid}, **enc)

    # -- event intake
    def _on_storage_event(self, node: str, kind: str, data: Json) -> None:
        source = f"storage:{node}"
        try:
            ev = sp.decode_event(kind, data)
        except ProtocolError as exc:
            self._malformed(source, kind, data, exc)
            return
        if ev is None:  # not an event of the storage protocol: recorded, nothing else
            self.submit(source, kind, None, data if isinstance(data, dict) else {"data": data})
            return
        detail = ev.to_wire()
        if isinstance(ev, sp.PortalChanged):
            self.portal_down[node] = kind == sp.EVENT_PORTAL_DOWN
            for ds in datastores(self.inv, node=node):
                self.submit(source, kind, ds.naa, detail)
            return
        unit = normal_naa(ev.naa) if ev.naa else None
        if isinstance(ev, sp.LunAdded):
            self.portal_down[node] = False
        self.submit(source, kind, unit, detail)

    def _on_host_event(self, host: str, kind: str, data: Json) -> None:
        source = f"host:{host}"
        try:
            ev = dp.decode_event(kind, data)
        except ProtocolError as exc:
            self._malformed(source, kind, data, exc)
            return
        if ev is None:  # not a storage event (e.g. vm_exited)
            return
        self.submit(source, kind, ev.naa or None, ev.to_wire())

    def _malformed(self, source: str, kind: str, data: Json, exc: ProtocolError) -> None:
        """Record an event whose data does not fit its type; nothing else is done."""
        eid = self._record(source, kind, None, None,
                           data if isinstance(data, dict) else {"data": data})
        log.warning("event #%d from %s: %s", eid, source, exc.message)
        self._update(eid, state="ignored", message=f"warning: malformed event: {exc.message}",
                     finished=time.time())

    def submit(self, source: str, kind: str, unit: str | None, detail: dict[str, Json]) -> int:
        """Record an event and schedule the round for its unit (coalescing with a running one)."""
        ds = self._datastore(unit) if unit else None
        eid = self._record(source, kind, unit, ds.name if ds else None, detail)
        log.info("event #%d %s %s %s", eid, source, kind, unit)
        if unit is None or ds is None:
            known_deleted = kind == sp.EVENT_LUN_REMOVED
            msg = ("LUN removed (its datastore was deleted)" if known_deleted
                   else f"warning: event about an unknown LUN {unit or '(none)'}: nothing changed")
            if not known_deleted:
                log.warning("event #%d: %s", eid, msg)
            self._update(eid, state="done" if known_deleted else "ignored", message=msg,
                         finished=time.time())
            return eid
        self._pending.setdefault(unit, []).append(eid)
        if unit not in self._workers or self._workers[unit].done():
            self._workers[unit] = asyncio.ensure_future(self._work(unit))
        return eid

    def _datastore(self, unit: str) -> Datastore | None:
        return datastore(self.inv, naa=normal_naa(unit))

    # -- rounds
    async def _work(self, unit: str) -> None:
        while self._pending.get(unit):
            batch = self._pending.pop(unit)
            primary = batch[-1]
            for eid in batch[:-1]:
                self._update(eid, state="coalesced", coalesced_into=primary, finished=time.time())
            try:
                await self._round(unit, primary, len(batch))
            except Exception as exc:  # one bad round must not stop the service
                log.exception("round for %s failed", unit)
                self._update(primary, state="failed", message=f"{type(exc).__name__}: {exc}",
                             finished=time.time())

    def _lookup_mode(self) -> str:
        mode = self.inv.get_meta("rescan_lookup", "inventory") or "inventory"
        return mode if mode in LOOKUPS else "inventory"

    async def _host_call(self, host: str, method: Method[Q, R], req: Q, timeout: float) -> R:
        client = self.hosts.get(host)
        if client is None:
            raise AgentError(f"host {host} is not connected", host=host)
        return await method.call(client, req, timeout=timeout)

    async def _expected(self, ds: Datastore) -> Expected:
        """The unit's state as the storage reports it now. Concurrent callers (each sharing
        host's retries in a round) share one query to the storage agent."""
        task = self._asking.get(ds.name)
        if task is None or task.done():
            task = asyncio.ensure_future(self._ask_storage(ds))
            self._asking[ds.name] = task
        return await asyncio.shield(task)

    async def _ask_storage(self, ds: Datastore) -> Expected:
        node = ds.node
        if self.node_lost.get(node) or self.portal_down.get(node) or self.node_paused.get(node):
            return Expected("unreachable")
        client = self.nodes.get(node)
        if client is None:
            return Expected("unreachable")
        try:
            cap = await sp.REFRESH_CAPACITY.call(client, sp.LunName(ds.name), timeout=10)
        except AgentError as exc:
            if "no LUN" in exc.message:
                return Expected("unreachable")
            raise
        return Expected("ok", cap.size_bytes)

    async def _sharing(self, unit: str, ds: Datastore, mode: str
                       ) -> tuple[list[str], list[str], list[str]]:
        """(sharing hosts, hosts polled, hosts whose answer is unknown)."""
        if mode == "inventory":
            return [r.host for r in sharing(self.inv, datastore=ds.name)], [], []
        hosts = [h.name for h in typed_rows(self.inv, _Agent, "hosts", kind="host")]

        async def ask(h: str) -> bool | None:
            try:
                res = await self._host_call(h, dp.STORAGE_LOOKUP, dp.UnitId(unit),
                                            _REFRESH_TIMEOUT)
                return res.shares
            except AgentError:
                return None

        answers = await asyncio.gather(*(ask(h) for h in hosts))
        return ([h for h, a in zip(hosts, answers, strict=True) if a],
                hosts, [h for h, a in zip(hosts, answers, strict=True) if a is None])

    @staticmethod
    def _agrees(entry: dp.CacheEntry, want: Expected, unit: str) -> bool:
        if want.state == "unreachable":
            return entry.state in ("unreachable", "error")
        return (entry.state == "ok" and entry.seen_naa == unit
                and entry.size_bytes == want.size_bytes)

    async def _refresh_host(self, host: str, unit: str, want: Expected
                            ) -> tuple[str, dp.Scan | None, int, float | None]:
        """(outcome ok|stale|disagree, last entry, SCSI commands, time it agreed)."""
        cmds = 0
        entry: dp.Scan | None = None
        for _ in range(_AGREE_TRIES):
            try:
                entry = await self._host_call(host, dp.STORAGE_REFRESH,
                                              dp.Refresh(unit, origin="controller"),
                                              _REFRESH_TIMEOUT)
            except AgentError as exc:
                if "no datastore" in exc.message:  # the host does not know the unit
                    return "disagree", None, cmds, None
                return "stale", None, cmds, None
            cmds += entry.commands_this_scan
            if self._agrees(entry, want, unit):
                return "ok", entry, cmds, time.time()
            await asyncio.sleep(0.1)
            want = await self._expected_again(unit, want)
        return "disagree", entry, cmds, None

    async def _expected_again(self, unit: str, want: Expected) -> Expected:
        ds = self._datastore(unit)
        return await self._expected(ds) if ds is not None else want

    async def _round(self, unit: str, eid: int, coalesced: int) -> None:
        ev = event(self.inv, eid)
        assert ev is not None
        ds = self._datastore(unit)
        if ds is None:
            self._update(eid, state="ignored", finished=time.time(),
                         message=f"warning: {unit} is no longer a datastore of this lab")
            return
        mode = self._lookup_mode()
        if ev.kind == sp.EVENT_LUN_REMOVED:  # datastore delete: the sharing hosts dropped it
            self._update(eid, state="done", lookup=mode, hosts_refreshed=[], finished=time.time(),
                         message="LUN removed; the hosts named for it were told to drop it")
            return
        if ev.kind in NODE_DOWN_EVENTS:  # nothing to refresh until the node is back
            self._update(eid, state="done", lookup=mode, hosts_refreshed=[], finished=time.time(),
                         message=str(ev.detail.get("message") or ev.kind))
            return
        self._update(eid, state="processing")
        want = await self._expected(ds)
        shared, polled, unknown = await self._sharing(unit, ds, mode)
        results = await asyncio.gather(*(self._refresh_host(h, unit, want) for h in shared))
        refreshed, stale, disagree = [], [], []
        scsi: dict[str, int] = {}
        agreed_at = None
        for h, (outcome, entry, cmds, at) in zip(shared, results, strict=True):
            scsi[h] = cmds
            if outcome == "ok":
                refreshed.append(h)
                agreed_at = max(agreed_at or 0.0, at or 0.0)
                self._host_unit(h, unit, ds.name, "fresh", entry, eid)
                if entry is not None and want.state == "ok":
                    record_seen(self.inv, ds.name, h, entry)
            elif outcome == "stale":
                stale.append(h)
                self._host_unit(h, unit, ds.name, "stale", None, eid)
            else:
                disagree.append(h)
                self._host_unit(h, unit, ds.name, "disagree", entry, eid)
        for h in unknown:  # poll mode: a host that did not answer may share the unit
            self._host_unit(h, unit, ds.name, "unknown", None, eid)
        stale += [h for h in unknown if h not in stale]
        vms: list[VmResize] = []
        if want.state == "ok" and want.size_bytes is not None:
            if want.size_bytes != ds.size_bytes:
                self.inv.update("datastores", {"name": ds.name}, size_bytes=want.size_bytes)
                vms = await self._resize_vms(ds.name, want.size_bytes)
        ok = not stale and not disagree
        self._update(
            eid, state="done" if ok else "partial", lookup=mode, expected=want.record(),
            size_bytes=want.size_bytes, hosts_sharing=shared, hosts_polled=polled,
            hosts_refreshed=refreshed, hosts_stale=stale, hosts_disagree=disagree,
            scsi_commands=scsi, vms_resized=[v.record() for v in vms],
            agreed_at=agreed_at if ok else None,
            agreed_ms=round((agreed_at - ev.at) * 1000, 1) if ok and agreed_at else
            (0.0 if ok else None),
            finished=time.time(),
            message=(f"{coalesced} events coalesced" if coalesced > 1 else None))
        log.info("event #%d %s: refreshed %s stale %s disagree %s", eid, unit, refreshed, stale,
                 disagree)

    def _host_unit(self, host: str, unit: str, datastore: str, state: str,
                   entry: dp.CacheEntry | None, eid: int | None) -> None:
        self.inv.upsert("host_units", host=host, unit=unit, datastore=datastore, state=state,
                        size_bytes=None if entry is None else entry.size_bytes,
                        refreshed_at=time.time() if state == "fresh" else None, event=eid)

    async def _resize_vms(self, datastore: str, size: int) -> list[VmResize]:
        out = []
        for vm in typed_rows(self.inv, _Vm, "vms", datastore=datastore):
            if vm.state != "running":
                continue
            try:
                await self._host_call(vm.host, dp.VM_BLOCK_RESIZE,
                                      dp.VmSize(name=vm.name, size_bytes=size), 30.0)
                out.append(VmResize(vm=vm.name, host=vm.host, ok=True, size_bytes=size))
            except AgentError as exc:
                out.append(VmResize(vm=vm.name, host=vm.host, ok=False, error=exc.message))
        return out

    # -- stale hosts
    async def _heal(self, host: str) -> None:
        """Refresh every unit this host missed while it did not answer."""
        for row in host_units(self.inv, host=host):
            if row.state not in ("stale", "unknown", "disagree"):
                continue
            unit = row.unit
            ds = self._datastore(unit)
            if ds is None:
                self.inv.conn.execute("DELETE FROM host_units WHERE host=? AND unit=?", (host, unit))
                continue
            if row.state == "unknown":
                try:
                    res = await self._host_call(host, dp.STORAGE_LOOKUP, dp.UnitId(unit),
                                                _REFRESH_TIMEOUT)
                except AgentError:
                    return
                if not res.shares:
                    self.inv.conn.execute("DELETE FROM host_units WHERE host=? AND unit=?",
                                          (host, unit))
                    continue
            key = (host, unit)
            if row.state == "disagree" and time.monotonic() < self._heal_backoff.get(
                    key, (0.0, 0.0))[0]:
                continue
            want = await self._expected(ds)
            outcome, entry, _, _ = await self._refresh_host(host, unit, want)
            if outcome == "stale":
                return
            if outcome == "disagree":  # it keeps disagreeing: ask again later, less often
                delay = min(_HEAL_BACKOFF_MAX_S, 2 * self._heal_backoff.get(key, (0.0, 0.5))[1])
                self._heal_backoff[key] = (time.monotonic() + delay, delay)
            if outcome == "ok":
                self._heal_backoff.pop(key, None)
                self._host_unit(host, unit, ds.name, "fresh", entry, row.event)
                if entry is not None and want.state == "ok":
                    record_seen(self.inv, ds.name, host, entry)
                ev = event(self.inv, row.event) if row.event is not None else None
                if ev is not None:
                    late = list(ev.hosts_late or [])
                    if host not in late:
                        late.append(host)
                    still = [h for h in (ev.hosts_stale or []) if h not in late]
                    self._update(ev.id, hosts_late=late,
                                 state="done" if not still and not ev.hosts_disagree
                                 else ev.state)
                log.info("host %s caught up on %s", host, unit)

    async def _heal_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            hosts = {r.host for r in host_units(self.inv)
                     if r.state in ("stale", "unknown", "disagree")}
            busy = {u for u, t in self._workers.items() if not t.done()}
            for h in sorted(hosts):
                if h in self.hosts and not busy:
                    with contextlib.suppress(AgentError):
                        await self._heal(h)

    # -- following agents
    async def _follow(self, kind: str, name: str, address: str, port: int) -> None:
        key = f"{kind}:{name}"
        was_lost = False
        last_uptime: float | None = None
        cursor: Cursor | None = None
        while True:
            try:
                client = await RpcClient.connect(address, port, self.secret, timeout=2.0,
                                                 peer=f"{kind} {name}")
            except AgentError:
                if kind == "storage" and key in self._connected and not was_lost:
                    was_lost = True
                    self._storage_lost(name)
                await asyncio.sleep(0.5)
                continue
            try:
                if kind == "storage":
                    # events replayed on (re)subscribing come after our own "back"
                    gate = _Gate(lambda ev, data: self._on_storage_event(name, ev, data))
                    await client.subscribe(gate, cursor)
                    self.nodes[name] = client
                    ping = await sp.PING.call(client, timeout=5)
                    if was_lost or (last_uptime is not None and ping.uptime_s < last_uptime):
                        was_lost = False
                        self._storage_back(name)
                    last_uptime = ping.uptime_s
                    gate.open()
                else:
                    await client.subscribe(
                        lambda ev, data: self._on_host_event(name, ev, data), cursor)
                    self.hosts[name] = client
                self._connected.add(key)
                self._write_ready()
                # liveness: a cheap call every second; a node VM that vanished sends no RST
                while True:
                    await asyncio.sleep(1.0)
                    if kind == "storage":
                        ping = await sp.PING.call(client, timeout=3)
                        if ping.uptime_s < (last_uptime or 0):
                            self._storage_lost(name)
                            self._storage_back(name)
                        last_uptime = ping.uptime_s
                    else:
                        await dp.STORAGE_LOOKUP.call(client, dp.UnitId(_LIVENESS_UNIT), timeout=5)
            except (AgentError, LabError, KeyError, TypeError):
                pass
            finally:
                if kind == "storage":
                    self.nodes.pop(name, None)
                else:
                    self.hosts.pop(name, None)
                cursor = client.cursor  # the next connection asks for what came after it
                await client.close()
            if kind == "storage" and not was_lost:
                was_lost = True
                self._storage_lost(name)
            await asyncio.sleep(0.2)

    def _storage_lost(self, node: str) -> None:
        self.node_lost[node] = True
        for ds in datastores(self.inv, node=node):
            self.submit("service", "storage_agent_lost", ds.naa, {"node": node})

    def _storage_back(self, node: str) -> None:
        self.node_lost[node] = False
        self.portal_down[node] = False
        for ds in datastores(self.inv, node=node):
            self.submit("service", "storage_agent_back", ds.naa, {"node": node})

    def _write_ready(self) -> None:
        want = {f"storage:{n.name}" for n in typed_rows(self.inv, _Agent, "storage_nodes")} | {
            f"host:{h.name}" for h in typed_rows(self.inv, _Agent, "hosts", kind="host")}
        if want <= self._connected and self.inv.get_meta("rescan_ready") is None:
            self.inv.set_meta("rescan_ready", str(time.time()))
            log.info("subscribed to every agent")

    def _on_node_event(self, node: str, kind: str, why: str | None, role: str) -> None:
        """A node's domain changed state (libvirt's lifecycle event). A storage node's
        pause, crash or stop is recorded for each datastore on it, with its reason and the
        cure; its resumption refreshes the sharing hosts. A WAN router's stop or crash is
        ``wan_down``, its start or resumption ``wan_up``."""
        if role == "wan-router":
            self._on_router_event(node, kind, why)
            return
        words = {"suspended": EVENT_NODE_PAUSED, "stopped": EVENT_NODE_STOPPED,
                 "crashed": EVENT_NODE_STOPPED, "resumed": EVENT_NODE_RESUMED}
        event = words.get(kind)
        if event is None:
            return
        if event == EVENT_NODE_PAUSED:
            message = (f"storage node {node} paused ({why or 'no reason given'}): its LUNs do "
                       f"not answer; labctl storage resume {node}"
                       + (" once the cause (e.g. a full disk) is gone" if why == "I/O error"
                          else ""))
        elif event == EVENT_NODE_STOPPED:
            message = f"storage node {node} {kind} ({why or 'no reason given'})"
        else:
            message = (f"storage node {node} resumed; its hosts are refreshed once its agent "
                       "answers again")
        self.node_paused[node] = event == EVENT_NODE_PAUSED
        for ds in datastores(self.inv, node=node):
            self.submit("libvirt", event, ds.naa, {"node": node, "state": kind, "reason": why,
                                                   "message": message})

    def _on_router_event(self, node: str, kind: str, why: str | None) -> None:
        if node not in self.links:
            return
        if kind in ("stopped", "crashed", "suspended"):
            event, message = EVENT_WAN_DOWN, (
                f"WAN router {node} {kind} ({why or 'no reason given'}): the sites are cut off "
                f"from each other; 'labctl up' brings it back with its settings")
        elif kind == "started" or (kind == "resumed" and node in self.router_paused):
            event, message = EVENT_WAN_UP, f"WAN router {node} {kind}"
        else:
            return  # libvirt reports a start as started, then resumed: one event is enough
        if kind == "suspended":
            self.router_paused.add(node)
        else:
            self.router_paused.discard(node)
        eid = self._record("libvirt", event, None, None,
                           {"node": node, "state": kind, "reason": why, "message": message},
                           state="done")
        self._update(eid, message=message, finished=time.time())
        log.info("event #%d %s", eid, message)

    def _watch_nodes(self) -> DomainWatch | None:
        """libvirt's lifecycle events of this lab's storage nodes (None if libvirt cannot be
        reached: the agents' liveness checks still notice a node that is gone)."""
        lab = self.lab_dir.name  # a lab's directory is named after it
        try:
            watch = DomainWatch(lab, self.lab_dir, self._on_node_event)
            watch.start()
        except LabError as exc:
            log.warning("not watching the storage nodes' domains: %s", exc)
            return None
        return watch

    async def run(self, stop: asyncio.Event) -> None:
        watch = self._watch_nodes()
        for n in typed_rows(self.inv, _Agent, "storage_nodes"):
            self._tasks.append(asyncio.ensure_future(
                self._follow("storage", n.name, n.address, n.agent_port)))
        for h in typed_rows(self.inv, _Agent, "hosts", kind="host"):
            self._tasks.append(asyncio.ensure_future(
                self._follow("host", h.name, h.address, h.agent_port)))
        self._tasks.append(asyncio.ensure_future(self._heal_loop()))
        try:
            await stop.wait()
        finally:
            for t in [*self._tasks, *self._workers.values()]:
                t.cancel()
            await asyncio.gather(*self._tasks, *self._workers.values(), return_exceptions=True)
            self.inv.conn.execute("DELETE FROM meta WHERE key='rescan_ready'")
            self.inv.close()
            if watch is not None:
                watch.close()
