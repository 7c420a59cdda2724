"""Contracts between the controller side (rescan service, datastore service) and the storage
and host agents, against in-process fakes: no root, no VM, no namespace.

Each fake is an authenticated RpcServer on 127.0.0.1 serving the typed Methods of its
protocol; a method a test did not give it, or a method of no protocol at all, is recorded
and fails the test. The fake storage node and fake hosts share one ``Array`` (what the
LUNs really are), so a host's refresh reads what the storage reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from labctl.core.errors import LabError, ProtocolError
from labctl.core.ids import naa_from_unit_serial
from labctl.core.rpc import RpcClient, RpcServer
from labctl.core.secret import write_secret
from labctl.core.wire import Empty, Message, Method, methods
from labctl.datastores import protocol as dp
from labctl.datastores import rescan, service
from labctl.datastores.registry import IdRegistry
from labctl.datastores.tables import DATASTORES, host_units, sharing
from labctl.state.context import LabContext
from labctl.state.inventory import Inventory
from labctl.state.labdir import LabDir
from labctl.storage import node as storagenode
from labctl.storage import protocol as sp

TARGET = "iqn.2003-01.org.linux-iscsi.fake:stor1"
SERIAL = "0123456789abcdef0123456789abcdef"
UNIT = "naa." + naa_from_unit_serial(SERIAL)
MIB = 1 << 20


def iqn(host: str) -> str:
    return f"iqn.2024-01.org.labctl:{host}"


# --- fakes ----------------------------------------------------------------------------------

Impl = Callable[[Any], Awaitable[Message]]


class _Strict(dict[str, Any]):
    """A handler table that also answers methods it does not hold (recorded as unexpected)."""

    def __init__(self, table: dict[str, Any], unknown: Callable[[str], Any]) -> None:
        super().__init__(table)
        self.unknown = unknown

    def __contains__(self, name: object) -> bool:
        return True

    def __missing__(self, name: str) -> Any:
        return self.unknown(name)


class Fake:
    """An agent serving ``impl`` (method name -> async handler of the typed request) for the
    Methods of ``protocol``; every call is recorded, an unexpected one fails the test."""

    def __init__(self, name: str, secret: bytes, protocol: list[Method[Any, Any]],
                 impl: dict[str, Impl], raw: dict[str, Callable[..., Awaitable[Any]]] | None = None
                 ) -> None:
        self.name = name
        self.impl = impl
        self.calls: list[tuple[str, Message]] = []
        self.unexpected: list[str] = []
        entries = [m.serve(self._handler(m)) for m in protocol if m.name not in (raw or {})]
        table = {**dict(entries), **(raw or {})}
        self.server = RpcServer(secret, _Strict(table, self._unknown), name=f"fake {name}")
        self.port = 0

    def _handler(self, m: Method[Any, Any]) -> Impl:
        async def handle(req: Message) -> Message:
            self.calls.append((m.name, req))
            fn = self.impl.get(m.name)
            if fn is None:
                self.unexpected.append(f"{m.name} {req.to_wire()}")
                raise LabError(f"fake {self.name}: unexpected {m.name}")
            return await fn(req)
        return handle

    def _unknown(self, name: str) -> Callable[..., Awaitable[Any]]:
        async def handle(**params: Any) -> Any:
            self.unexpected.append(f"{name} {params} (no such method)")
            raise LabError(f"fake {self.name}: unexpected {name}")
        return handle

    def called(self, method: str, **match: Any) -> list[Message]:
        return [r for n, r in self.calls if n == method
                and all(getattr(r, k) == v for k, v in match.items())]

    def publish(self, event: str, msg: Message) -> None:
        self.server.publish(event, msg.to_wire())

    async def start(self) -> None:
        await self.server.start("127.0.0.1", 0)
        assert self.server._server is not None
        self.port = self.server._server.sockets[0].getsockname()[1]


@dataclass
class Array:
    """What the LUNs really are: their sizes; a host's scan and the storage both read it."""

    sizes: dict[str, int] = field(default_factory=dict)  # datastore name -> bytes
    units: dict[str, str] = field(default_factory=dict)  # datastore name -> ID
    disks: dict[str, int] = field(default_factory=dict)  # plugged virtio serial -> bytes


def fake_storage(secret: bytes, array: Array, **impl: Impl) -> Fake:
    async def ping(_: Empty) -> sp.NodePing:
        return sp.NodePing(node="stor1", uptime_s=100.0, portal_down=False)

    async def refresh_capacity(req: sp.LunName) -> sp.Capacity:
        return sp.Capacity(name=req.name, size_bytes=array.sizes[req.name], device="/dev/vdb",
                           naa=array.units[req.name], lun=0,
                           previous_size_bytes=array.sizes[req.name])

    return Fake("stor1", secret, methods(vars(sp).values()),
                {"ping": ping, "refresh_capacity": refresh_capacity, **impl})


def scan_of(array: Array, unit: str, datastore: str = "ds1") -> dp.Scan:
    """What a host reads of ``unit`` now (LIO's NAA ID, the array's size)."""
    return dp.Scan(naa=unit, datastore=datastore, portal="127.0.0.1:3260", target_iqn=TARGET,
                   lun=0, size_bytes=array.sizes[datastore], state="ok", seen_naa=unit,
                   scanned_at=time.time(), scans=1, scsi_commands=2, error=None,
                   commands_this_scan=2)


def fake_host(name: str, secret: bytes, array: Array, shares: set[str],
              answering: asyncio.Event | None = None, **impl: Impl) -> Fake:
    """A host whose cache holds the units in ``shares``; while ``answering`` is clear it
    does not answer storage_refresh."""

    async def lookup(req: dp.UnitId) -> dp.Lookup:
        has = req.naa in shares
        entry = None
        if has:  # a cache entry, not a scan (a Scan's extra field does not fit CacheEntry)
            scan = scan_of(array, req.naa).to_wire()
            del scan["commands_this_scan"]
            entry = dp.CacheEntry.from_wire(scan)
        return dp.Lookup(host=name, naa=req.naa, shares=has, entry=entry)

    async def refresh(req: dp.Refresh) -> dp.Scan:
        assert req.origin == "controller"
        if req.naa not in shares:
            raise LabError(f"host {name} has no datastore {req.naa} in its cache")
        if answering is not None:
            await answering.wait()
        return scan_of(array, req.naa)

    table: dict[str, Impl] = {"storage_lookup": lookup}
    if shares:
        table["storage_refresh"] = refresh
    return Fake(name, secret, methods(vars(dp).values()), {**table, **impl})


def liveness_only(fake: Fake) -> bool:
    """Only the rescan service's liveness lookups reached ``fake``."""
    return all(n == "storage_lookup" and getattr(r, "naa", None) == rescan._LIVENESS_UNIT
               for n, r in fake.calls)


# --- a lab directory pointing at the fakes ------------------------------------------------------

def make_lab(lab_dir: Path, storage: Fake, hosts: dict[str, Fake], datastores: dict[str, list[str]],
             array: Array) -> Inventory:
    """A lab directory whose site s1 (its secret, its inventory) has the fakes as agents."""
    site = lab_dir / "sites" / "s1"
    site.mkdir(parents=True, exist_ok=True)
    if not (site / "secret").exists():
        raise AssertionError("write the secret first")
    inv = Inventory.open(site / "inventory.db", [DATASTORES])
    inv.upsert("storage_nodes", name="stor1", site="s1", address="127.0.0.1", target_iqn=TARGET,
               domain="d", tap="t", agent_port=storage.port, capacity=1 << 30, state="up",
               memory=256 * MIB, domain_type="qemu")
    for h, f in hosts.items():
        inv.upsert("hosts", name=h, site="s1", address="127.0.0.1", initiator_iqn=iqn(h),
                   netns=f"ns-{h}", veth=f"v-{h}", agent_port=f.port, memory=1 << 30,
                   agent_pid=None, state="up")
    for name, shared_by in datastores.items():
        inv.upsert("datastores", name=name, node="stor1", size_bytes=array.sizes[name],
                   unit_serial=SERIAL, naa=array.units[name], lun=0, disk_serial=f"lc-{name}",
                   backing_path=str(lab_dir / f"{name}.img"), state="exported",
                   created=time.time())
        for h in shared_by:
            inv.upsert("datastore_hosts", datastore=name, host=h, seen_naa=None, seen_size=None,
                       scanned_at=None)
    return inv


@contextlib.asynccontextmanager
async def running(lab_dir: Path, fakes: list[Fake]) -> AsyncIterator[rescan.RescanService]:
    """The rescan service of site s1 of ``lab_dir``, subscribed to every fake; every fake
    honest."""
    svc = rescan.RescanService(lab_dir, "s1")
    stop = asyncio.Event()
    task = asyncio.ensure_future(svc.run(stop))
    try:
        await until(lambda: svc.inv.get_meta("rescan_ready") is not None, "the service to subscribe")
        yield svc
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        for f in fakes:
            await f.server.close()
    for f in fakes:
        assert f.unexpected == [], f"{f.name} got unexpected calls: {f.unexpected}"


async def until(cond: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def capacity_changed(array: Array, name: str, new_size: int) -> sp.LunCapacityChanged:
    """The array grows ``name``; the event its storage agent publishes for it."""
    before, array.sizes[name] = array.sizes[name], new_size
    return sp.LunCapacityChanged(node="stor1", portal="127.0.0.1:3260", target_iqn=TARGET,
                                 name=name, naa=array.units[name], lun=0,
                                 size_bytes=new_size, previous_size_bytes=before,
                                 device="/dev/vdb")


@pytest.fixture
def lab(tmp_path: Path) -> tuple[Path, bytes, Array]:
    lab_dir = tmp_path / "lab"
    (lab_dir / "sites" / "s1").mkdir(parents=True)
    secret = write_secret(lab_dir / "sites" / "s1" / "secret")
    return lab_dir, secret, Array(sizes={"ds1": 64 * MIB}, units={"ds1": UNIT})


# --- (a) the rescan service's rounds ------------------------------------------------------------

def test_capacity_change_refreshes_exactly_the_sharing_hosts(lab: tuple[Path, bytes, Array]
                                                              ) -> None:
    lab_dir, secret, array = lab

    async def go() -> None:
        resized: list[dp.VmSize] = []

        async def block_resize(req: dp.VmSize) -> dp.VmSize:
            resized.append(req)
            return req

        storage = fake_storage(secret, array)
        hosts = {"h1": fake_host("h1", secret, array, {UNIT}, vm_block_resize=block_resize),
                 "h2": fake_host("h2", secret, array, {UNIT}),
                 "h3": fake_host("h3", secret, array, set())}
        for f in (storage, *hosts.values()):
            await f.start()
        inv = make_lab(lab_dir, storage, hosts, {"ds1": ["h1", "h2"]}, array)
        inv.upsert("vms", name="vm1", host="h1", datastore="ds1", memory=128 * MIB, vcpus=1,
                   dirty_rate=0.0, working_set=16 * MIB, state="running", pid=1, started_at=0.0,
                   heartbeat_ms=100)
        async with running(lab_dir, [storage, *hosts.values()]):
            storage.publish(sp.EVENT_LUN_CAPACITY_CHANGED, capacity_changed(array, "ds1", 96 * MIB))
            ev = await rescan.wait_for_event(inv, UNIT, 0, size_bytes=96 * MIB, timeout=10)
        assert ev.state == "done" and ev.kind == "lun_capacity_changed"
        assert ev.source == "storage:stor1" and ev.datastore == "ds1" and ev.lookup == "inventory"
        assert ev.hosts_sharing == ev.hosts_refreshed == ["h1", "h2"]
        assert ev.hosts_stale == [] and ev.hosts_disagree == [] and ev.hosts_polled == []
        assert ev.expected == {"state": "ok", "size_bytes": 96 * MIB}
        assert ev.scsi_commands == {"h1": 2, "h2": 2}
        assert ev.vms_resized == [{"vm": "vm1", "host": "h1", "size_bytes": 96 * MIB, "ok": True}]
        assert ev.detail["size_bytes"] == 96 * MIB and ev.detail["previous_size_bytes"] == 64 * MIB
        assert ev.agreed_ms is not None and ev.agreed_ms >= 0
        assert resized == [dp.VmSize(name="vm1", size_bytes=96 * MIB)]
        for h in ("h1", "h2"):
            assert len(hosts[h].called("storage_refresh", naa=UNIT)) == 1
        assert liveness_only(hosts["h3"])
        assert storage.called("refresh_capacity", name="ds1")
        assert inv.row("datastores", name="ds1")["size_bytes"] == 96 * MIB
        assert {r.host: r.seen_size for r in sharing(inv, datastore="ds1")} == {
            "h1": 96 * MIB, "h2": 96 * MIB}
        assert {(u.host, u.state, u.size_bytes) for u in host_units(inv)} == {
            ("h1", "fresh", 96 * MIB), ("h2", "fresh", 96 * MIB)}
        inv.close()

    asyncio.run(go())


def test_host_that_does_not_answer_is_stale_then_healed(lab: tuple[Path, bytes, Array],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    lab_dir, secret, array = lab
    monkeypatch.setattr(rescan, "_REFRESH_TIMEOUT", 0.3)  # how long a refresh may take

    async def go() -> None:
        answering = asyncio.Event()  # h2 does not answer storage_refresh until it is set
        storage = fake_storage(secret, array)
        hosts = {"h1": fake_host("h1", secret, array, {UNIT}),
                 "h2": fake_host("h2", secret, array, {UNIT}, answering=answering)}
        for f in (storage, *hosts.values()):
            await f.start()
        inv = make_lab(lab_dir, storage, hosts, {"ds1": ["h1", "h2"]}, array)
        async with running(lab_dir, [storage, *hosts.values()]):
            storage.publish(sp.EVENT_LUN_CAPACITY_CHANGED, capacity_changed(array, "ds1", 80 * MIB))
            ev = await rescan.wait_for_event(inv, UNIT, 0, size_bytes=80 * MIB, timeout=10)
            assert ev.state == "partial"
            assert ev.hosts_refreshed == ["h1"] and ev.hosts_stale == ["h2"]
            assert ev.hosts_late == [] and ev.agreed_ms is None
            assert {(u.host, u.state) for u in host_units(inv)} == {("h1", "fresh"),
                                                                   ("h2", "stale")}
            answering.set()
            healed = await until(lambda: (e := rescan.event(inv, ev.id)) is not None
                                 and e.hosts_late == ["h2"] and e, "h2 to catch up")
        assert healed.state == "done" and healed.hosts_stale == ["h2"]
        assert {(u.host, u.state, u.size_bytes) for u in host_units(inv)} == {
            ("h1", "fresh", 80 * MIB), ("h2", "fresh", 80 * MIB)}
        assert {r.host: r.seen_size for r in sharing(inv, datastore="ds1")}["h2"] == 80 * MIB
        assert "late h2" in rescan.format_event(healed)
        inv.close()

    asyncio.run(go())


def test_events_about_one_unit_are_coalesced(lab: tuple[Path, bytes, Array]) -> None:
    lab_dir, secret, array = lab

    async def go() -> None:
        asked, release = asyncio.Event(), asyncio.Event()

        async def slow_capacity(req: sp.LunName) -> sp.Capacity:
            asked.set()
            await release.wait()  # the first round waits here while more events arrive
            return sp.Capacity(name=req.name, size_bytes=array.sizes[req.name], device="/dev/vdb")

        grown = capacity_changed(array, "ds1", 70 * MIB)

        storage = fake_storage(secret, array, refresh_capacity=slow_capacity)
        hosts = {"h1": fake_host("h1", secret, array, {UNIT}),
                 "h2": fake_host("h2", secret, array, {UNIT})}
        for f in (storage, *hosts.values()):
            await f.start()
        inv = make_lab(lab_dir, storage, hosts, {"ds1": ["h1", "h2"]}, array)
        async with running(lab_dir, [storage, *hosts.values()]):
            storage.publish(sp.EVENT_LUN_CAPACITY_CHANGED, grown)
            await until(asked.is_set, "the first round to ask the storage")
            for _ in range(2):  # the storage says it again (a resize in steps, say)
                storage.publish(sp.EVENT_LUN_CAPACITY_CHANGED, grown)
            for h in ("h1", "h2"):
                hosts[h].publish(dp.EVENT_UNIT_ATTENTION, dp.UnitAttention(
                    host=h, at=time.time(), naa=UNIT, sense_key=6, ascq=0x2a09))
            await until(lambda: len(rescan.events(inv)) == 5, "five events recorded")
            release.set()
            evs = await until(lambda: (e := rescan.events(inv)) and all(
                x.state in rescan.FINAL for x in e) and e, "every event to finish")
        rounds = [e for e in evs if e.state != "coalesced"]
        assert [e.id for e in rounds] == [evs[0].id, evs[-1].id]
        assert all(e.state == "done" for e in rounds)
        assert rounds[0].size_bytes == rounds[1].size_bytes == 70 * MIB
        assert rounds[0].message is None
        assert rounds[1].message == "4 events coalesced"
        assert [e.coalesced_into for e in evs[1:-1]] == [evs[-1].id] * 3
        assert sorted(e.kind for e in evs) == ["lun_capacity_changed"] * 3 + ["unit_attention"] * 2
        attention = next(e for e in evs if e.kind == "unit_attention")
        assert attention.source.startswith("host:") and attention.detail["ascq"] == 0x2a09
        assert len(storage.called("refresh_capacity")) == 2  # one query per round
        for h in ("h1", "h2"):
            assert len(hosts[h].called("storage_refresh")) == 2
        inv.close()

    asyncio.run(go())


def test_poll_lookup_asks_every_host(lab: tuple[Path, bytes, Array]) -> None:
    lab_dir, secret, array = lab

    async def go() -> None:
        storage = fake_storage(secret, array)
        # the inventory says h1 and h2; the hosts' own caches say h1 and h3: polling asks them
        hosts = {"h1": fake_host("h1", secret, array, {UNIT}),
                 "h2": fake_host("h2", secret, array, set()),
                 "h3": fake_host("h3", secret, array, {UNIT})}
        for f in (storage, *hosts.values()):
            await f.start()
        inv = make_lab(lab_dir, storage, hosts, {"ds1": ["h1", "h2"]}, array)
        rescan.set_lookup(inv, "poll")
        async with running(lab_dir, [storage, *hosts.values()]):
            storage.publish(sp.EVENT_LUN_CAPACITY_CHANGED, capacity_changed(array, "ds1", 65 * MIB))
            ev = await rescan.wait_for_event(inv, UNIT, 0, size_bytes=65 * MIB, timeout=10)
        assert ev.state == "done" and ev.lookup == "poll", ev
        assert ev.hosts_polled == ["h1", "h2", "h3"]
        assert ev.hosts_sharing == ev.hosts_refreshed == ["h1", "h3"]
        for h in hosts:
            assert hosts[h].called("storage_lookup", naa=UNIT), h
        assert not hosts["h2"].called("storage_refresh")
        inv.close()

    asyncio.run(go())


def test_malformed_event_is_recorded_and_ignored(lab: tuple[Path, bytes, Array]) -> None:
    lab_dir, secret, array = lab

    async def go() -> None:
        storage = fake_storage(secret, array)
        hosts = {"h1": fake_host("h1", secret, array, {UNIT})}
        for f in (storage, *hosts.values()):
            await f.start()
        inv = make_lab(lab_dir, storage, hosts, {"ds1": ["h1"]}, array)
        async with running(lab_dir, [storage, *hosts.values()]):
            storage.server.publish(sp.EVENT_LUN_CAPACITY_CHANGED, {"name": "ds1", "naa": UNIT})
            ev = await until(lambda: next((e for e in rescan.events(inv)
                                           if e.state == "ignored"), None), "the event")
        assert ev.kind == "lun_capacity_changed" and ev.naa is None
        assert ev.message is not None and ev.message.startswith("warning: malformed event:")
        assert "missing field 'node'" in ev.message
        assert not hosts["h1"].called("storage_refresh")
        inv.close()

    asyncio.run(go())


# --- (b) datastore create: the registry's ID exported and handed to the named hosts -------------

def test_create_exports_the_registry_id_and_hands_the_mapping(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABCTL_HOME", str(tmp_path / "home"))
    labdir = LabDir("t", root=tmp_path / "labs")
    labdir.create()
    labdir.create_site("s1")
    secret = labdir.site_secret("s1")  # the site's controller's, its agents'
    array = Array()

    async def attach_data_disk(lab: str, node: str, dd: storagenode.DataDisk) -> str:
        assert (lab, node) == ("t", "stor1")
        array.disks[dd.serial] = dd.size_bytes  # libvirt hot-plugged it into the node
        return "vdb"

    monkeypatch.setattr(storagenode, "attach_data_disk", attach_data_disk)

    async def ensure_lun(req: sp.EnsureLun) -> sp.LunEnsured:
        if req.disk_serial not in array.disks:
            raise LabError(f"no virtio disk with serial {req.disk_serial!r}")
        naa = naa_from_unit_serial(req.unit_serial)  # as LIO builds it
        array.sizes[req.name], array.units[req.name] = array.disks[req.disk_serial], "naa." + naa
        return sp.LunEnsured(name=req.name, lun=3, naa="naa." + naa, serial=req.unit_serial,
                             size_bytes=array.disks[req.disk_serial], device="/dev/vdb",
                             initiators=sorted(req.initiators), created=True)

    def attach_for(host: str) -> Impl:
        async def attach(req: dp.StorageAttach) -> dp.Attached:
            for u in req.units:
                assert u.initiator_iqn == iqn(host)
            return dp.Attached(units=[scan_of(array, u.naa, u.datastore or "?").replace(lun=u.lun)
                                      for u in req.units])
        return attach

    async def go() -> None:
        storage = Fake("stor1", secret, methods(vars(sp).values()), {"ensure_lun": ensure_lun})
        hosts = {h: Fake(h, secret, methods(vars(dp).values()),
                         {"storage_attach": attach_for(h)} if h != "h3" else {})
                 for h in ("h1", "h2", "h3")}
        for f in (storage, *hosts.values()):
            await f.start()
        inv = make_lab(labdir.path, storage, hosts, {}, array)
        ctx = LabContext("t", labdir, inv, site="s1")
        try:
            created = await service.create(ctx, "dsx", "32M", ["h1", "h2"])
        finally:
            for f in (storage, *hosts.values()):
                await f.server.close()
        for f in (storage, *hosts.values()):
            assert f.unexpected == [], f.unexpected

        issued = IdRegistry().get(created.naa or "")
        assert issued is not None and (issued.datastore, issued.lab, issued.node) == (
            "dsx", "t", "stor1")
        (asked,) = storage.called("ensure_lun")
        assert isinstance(asked, sp.EnsureLun)
        assert asked.unit_serial == issued.unit_serial and asked.disk_serial == "lc-dsx"
        assert asked.initiators == [iqn("h1"), iqn("h2")]
        assert created.naa == "naa." + naa_from_unit_serial(issued.unit_serial)
        want = dp.Unit(naa=created.naa, portal="127.0.0.1:3260", target_iqn=TARGET, lun=3,
                       initiator_iqn="", datastore="dsx")
        for h in ("h1", "h2"):
            (req,) = hosts[h].called("storage_attach")
            assert isinstance(req, dp.StorageAttach)
            assert req.units == [want.replace(initiator_iqn=iqn(h))]
        assert hosts["h3"].calls == []
        assert created.lun == 3 and created.size_bytes == 32 * MIB and created.state == "exported"
        assert created.hosts == ["h1", "h2"] and sorted(created.seen_by) == ["h1", "h2"]
        assert all(s.state == "ok" and s.seen_naa == created.naa for s in created.seen_by.values())
        out = created.to_wire()  # what `labctl datastore create --json` prints
        assert list(out) == ["name", "naa", "node", "portal", "target_iqn", "lun", "backing",
                             "unit_serial", "size_bytes", "state", "hosts", "kind", "seen_by",
                             "seconds"]
        assert out["kind"] == "block"
        assert {r.host: (r.seen_naa, r.seen_size) for r in sharing(inv, datastore="dsx")} == {
            h: (created.naa, 32 * MIB) for h in ("h1", "h2")}
        inv.close()

    asyncio.run(go())


# --- (c) a reply that does not fit its message -------------------------------------------------

def test_malformed_reply_is_a_clear_protocol_error(lab: tuple[Path, bytes, Array]) -> None:
    lab_dir, secret, array = lab

    async def no_size(**params: Any) -> Any:
        return {"name": params["name"], "device": "/dev/vdb"}  # size_bytes left out

    async def attach_without_state(**params: Any) -> Any:
        scan = scan_of(array, UNIT).to_wire()
        del scan["state"]
        return {"units": [scan]}

    async def go() -> None:
        storage = Fake("stor1", secret, methods(vars(sp).values()), {},
                       raw={"refresh_capacity": no_size})
        host = Fake("h1", secret, methods(vars(dp).values()), {},
                    raw={"storage_attach": attach_without_state})
        for f in (storage, host):
            await f.start()
        inv = make_lab(lab_dir, storage, {"h1": host}, {"ds1": ["h1"]}, array)
        try:
            async with await RpcClient.connect("127.0.0.1", storage.port, secret,
                                               peer="storage node stor1") as c:
                with pytest.raises(ProtocolError) as err:
                    await sp.REFRESH_CAPACITY.call(c, sp.LunName("ds1"))
            assert err.value.message == ("refresh_capacity reply from storage node stor1: "
                                         "missing field 'size_bytes'")
            assert err.value.evidence["field"] == "size_bytes"

            async with await RpcClient.connect("127.0.0.1", host.port, secret,
                                               peer="host h1") as c:
                with pytest.raises(ProtocolError) as err:
                    await service.attach_for_vm(c, inv, "ds1", "h1")
            assert err.value.message == ("storage_attach reply from host h1.units[0]: "
                                         "missing field 'state'")
        finally:
            for f in (storage, host):
                await f.server.close()
        assert storage.unexpected == [] and host.unexpected == []
        inv.close()

    asyncio.run(go())
