"""A live migration to another site, through the two sites' mobility agents.

The lab's operator holds both sites' controllers (as an HCX manager is paired with two
vCenters). Each site runs its *ordinary* migration driver on its own half, with its own
records: site A migrates the VM from its host to its mobility agent (posing as a
destination), site B from its mobility agent (posing as a source) to its host. The agents
carry the VM's configuration, the memory stream and the disk's block mirror between them
over one mutual-TLS relay. Site B's disk is a new datastore (a new LUN with its own ID,
the size of the VM's), which the mirror fills before and during the memory copy.

Everything that can be refused is refused before anything moves: the VM's own site, no
mobility agent, no host with the memory, no room for the disk.

Once the VM runs in site B, site A deletes the datastore that held its disk (a vMotion
leaves nothing of the VM behind); ``keep_source`` keeps it as a cold copy instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from dataclasses import dataclass, replace
from typing import Any

from labctl.core.errors import LabError, MigrationError
from labctl.core.names import MOBILITY_RELAY_PORT
from labctl.core.wire import Json, Message, WallTime
from labctl.datastores import filestores
from labctl.datastores import service as datastores
from labctl.hosts import protocol as hp
from labctl.lab import vmrows
from labctl.migration import protocol as mp
from labctl.migration.driver import Endpoint, Migration
from labctl.migration.inlab import MEM_RESERVE
from labctl.migration.policy import Policy, load_policy
from labctl.migration.records import Recorder, amend_result
from labctl.migration.result import CrossSiteLink
from labctl.mobility import protocol as mob
from labctl.state.context import LabContext
from labctl.wan import service as wan
from labctl.wan.protocol import WanShown

#: site B's half only follows the relay: site A's driver judges progress and convergence
FOLLOWER_STALL_S = 120.0


@dataclass(frozen=True)
class Half(Message):
    """One site's half of a migration between sites, as that site recorded it."""

    site: str
    #: the half's own ID in its site's records (``labctl --site SITE migration show ID``)
    id: int | None
    source: str
    dest: str
    state: str | None
    error: str | None = None


@dataclass(frozen=True)
class CrossSite(Message):
    """``labctl migrate VM --to-site SITE``: both halves, the relay, the WAN in force."""

    #: the ID both halves' records carry
    id: str
    vm: str
    from_site: str
    to_site: str
    source: str
    dest: str
    #: the new datastore that holds the VM's disk in the destination site
    datastore: str
    #: the datastore that held it in the source site, and what became of it: ``deleted``
    #: after a completed move (on a file datastore: ``deleted FILE``, the VM's top layer),
    #: ``kept`` (asked to, or the move failed), or why it could not be deleted
    source_datastore: str
    source_datastore_state: str
    state: str
    started_at: WallTime
    seconds: float
    halves: list[Half]
    #: bytes the relay carried per stream (memory, disk, control), from site A to B
    relay_bytes: dict[str, int]
    #: what crossed the WAN for them (after compression)
    relay_wire_bytes: dict[str, int]
    relay_mbit_s: float | None
    wan: list[WanShown]
    #: site A's record (the real source: passes, downtime, blackout, verification)
    record: Json = None
    error: str | None = None


#: the round trip the relay adds to the link's own: two Python copies, TLS, the router
#: (measured: a window of 2 MiB carried ~600 Mbit/s at 0 ms of netem, 512 KiB ~380)
RELAY_BASE_RTT_S = 0.010
#: the smallest window: a frame in flight and one being read
MIN_WINDOW = 256 << 10


def window(link: WanShown) -> int:
    """The relay's window for ``link``: twice the bytes its configured rate carries in its
    round trip plus :data:`RELAY_BASE_RTT_S` (what one TCP flow across it keeps in
    flight, and the relay's own delay), at least :data:`MIN_WINDOW`; an uncapped link
    counts as 2 Gbit/s (what the router forwards here). Measured against the earlier
    windows (twice the link's product alone, at least 2 MiB; or sized from the rate the
    relay measured): docs/bench/mobility.md."""
    p = link.params
    rtt_s = (2 * p.delay_ms + 2 * p.jitter_ms) / 1000 + RELAY_BASE_RTT_S
    rate = (p.rate_mbit if p.rate_mbit is not None else 2000.0) * 1e6 / 8
    return max(MIN_WINDOW, int(2 * rate * rtt_s))


def _mobility(site: LabContext) -> dict[str, Any]:
    rows = site.inv.rows("hosts", kind="mobility")
    if not rows:
        raise MigrationError(f"site {site.site} has no mobility agent (give the site "
                             "'mobility: NAME' in the topology)", site=site.site)
    return rows[0]


def _pick_host(b: LabContext, vm: dict[str, Any], host: str | None) -> dict[str, Any]:
    """Site B's destination host: ``host``, or the first with the VM's memory free."""
    hosts = b.inv.rows("hosts", kind="host")
    if host is not None:
        hosts = [h for h in hosts if h["name"] == host]
        if not hosts:
            known = ", ".join(h["name"] for h in b.inv.rows("hosts", kind="host")) or "none"
            raise MigrationError(f"site {b.site} has no host {host!r} (hosts: {known})",
                                 host=host)
    offers = []
    for h in hosts:
        used = sum(v["memory"] for v in b.inv.rows("vms", host=h["name"], state="running"))
        if used + vm["memory"] <= h["memory"]:
            return h
        offers.append(f"{h['name']} {(h['memory'] - used) >> 20} MiB free")
    raise MigrationError(f"no host of site {b.site} has memory for VM {vm['name']}: it needs "
                         f"{vm['memory'] >> 20} MiB ({'; '.join(offers) or 'no hosts'})",
                         vm=vm["name"], site=b.site)


async def migrate(whole: LabContext, vm: str, src_site: str, to_site: str,
                  host: str | None = None, policy: str | Policy | None = None,
                  compress: bool = False, keep_source: bool = False) -> CrossSite:
    """Move running VM ``vm`` of site ``src_site`` to site ``to_site`` (its host ``host``,
    else one with room); site A then deletes the VM's old datastore unless
    ``keep_source``."""
    if to_site == src_site:
        raise MigrationError(f"VM {vm} is already in site {to_site}: migrate it to one of "
                             f"the site's hosts with --to HOST", vm=vm, site=to_site)
    pol = load_policy(policy)
    if pol.storage == "late" or pol.postcopy:
        raise MigrationError("a migration to another site mirrors the disk and prepares it "
                             "early, without post-copy: pick another policy", policy=pol.name)
    a, b = whole.in_site(src_site), whole.in_site(to_site)
    row = vmrows.row(a, vm)
    if row["state"] != "running":
        raise MigrationError(f"VM {vm} is not running (state {row['state']})", vm=vm)
    if row["guest"] == "server":
        raise MigrationError(f"VM {vm} is a server guest whose address its host routes: a "
                             "migration between sites does not carry it (labctl replicate "
                             "moves it to another cloud)", vm=vm)
    store = row["datastore"]
    if not store:
        raise MigrationError(f"VM {vm} has no disk on a datastore: nothing to carry to "
                             f"{to_site}", vm=vm)
    mob_a, mob_b = _mobility(a), _mobility(b)
    dest = _pick_host(b, row, host)
    top = str(row["disk_file"]) if vmrows.is_on_file(a, row) and row["disk_file"] else None
    if top is not None:  # a qcow2 chain: the mirror flattens it onto a LUN of its size
        size = int((await filestores.chain(a, store, top)).layers[0].virtual_size)
    else:
        size = int(datastores.show(a, store).size_bytes)
    links = [w for w in await wan.show(whole) if {src_site, to_site} == set(w.sites)]
    if not links:
        raise MigrationError(f"no WAN link joins {src_site} and {to_site}", vm=vm)
    if links[0].state != "up":
        raise MigrationError(f"the WAN link {links[0].name} between {src_site} and {to_site} "
                             f"is {links[0].state}", vm=vm, link=links[0].name)
    xid = secrets.token_hex(6)
    new_store = f"{vm}-{xid[:4]}"[:16]
    whole.progress(f"{to_site}: a new datastore {new_store} ({size >> 20} MiB) for the disk "
                   f"of {vm}, shared by {dest['name']}")
    created = await datastores.create(b, new_store, size, [str(dest["name"])])
    t0, t_wall = time.monotonic(), time.time()
    result: CrossSite | None = None
    try:
        result = await _run(whole, a, b, row, mob_a, mob_b, dest, new_store, xid, pol,
                            compress, links[0])
        left = "kept"
        if result.state == "completed" and not keep_source:
            left = await _release(a, store, vm, top)
        return replace(result, seconds=round(time.monotonic() - t0, 3),
                       started_at=WallTime(t_wall), source_datastore_state=left)
    finally:
        if result is None or result.state != "completed":
            with contextlib.suppress(LabError):  # site B frees what it made for the VM
                await datastores.delete(b, created.name)


async def _release(a: LabContext, store: str, vm: str, top: str | None) -> str:
    """Site A deletes what held the VM's disk: the datastore (its hosts forget the LUN, the
    node drops it), or on a file datastore the VM's own top layer (the layers below it may
    be other VMs' bases: they stay). A failure is reported, not raised: the VM already runs
    in site B."""
    try:
        if top is None:
            a.progress(f"{a.site}: deleting datastore {store}, the disk {vm} left behind")
            await datastores.delete(a, store)
            return "deleted"
        a.progress(f"{a.site}: deleting {store}:{top}, the disk {vm} left behind")
        await filestores.lease(a, store, top, vm, release=True)
        await filestores.delete_file(a, store, top)
        return f"deleted {top}"
    except LabError as exc:
        a.progress(f"warning: {a.site} kept datastore {store}: {exc.message}")
        return f"kept: {exc.message}"
    return "deleted"


async def _run(whole: LabContext, a: LabContext, b: LabContext, row: dict[str, Any],
               mob_a: dict[str, Any], mob_b: dict[str, Any], dest: dict[str, Any],
               new_store: str, xid: str, pol: Policy, compress: bool,
               link: WanShown) -> CrossSite:
    vm = str(row["name"])
    src = str(row["host"])
    t_wall = time.time()
    async with a.host_client(src) as sc, a.host_client(str(mob_a["name"])) as ac, \
            b.host_client(str(mob_b["name"])) as bc, b.host_client(str(dest["name"])) as dc:
        avail = (await hp.PING.call(dc, timeout=10)).mem_available
        if avail is not None and row["memory"] + MEM_RESERVE > avail:
            raise MigrationError(f"host {dest['name']} lacks memory for VM {vm}: the machine "
                                 f"has {avail >> 20} MiB available", vm=vm)
        await mob.MOB_INCOMING.call(bc, mob.Incoming(vm=vm, migration=xid,
                                                     peer=str(mob_a["name"])))
        await mob.MOB_OUTGOING.call(ac, mob.Outgoing(
            vm=vm, migration=xid, peer=str(mob_b["name"]), peer_address=str(mob_b["address"]),
            peer_port=MOBILITY_RELAY_PORT, compress=compress, window=window(link)))
        rec_a, rec_b = Recorder(a.inv), Recorder(b.inv)
        src_row = a.inv.row("hosts", name=src)
        assert src_row is not None
        half_a = Migration(vm, Endpoint(src, sc, str(src_row["address"])),
                           Endpoint(str(mob_a["name"]), ac, str(mob_a["address"])), pol,
                           recorder=rec_a, progress=lambda m: whole.progress(f"[{a.site}] {m}"),
                           heartbeat_ms=int(row["heartbeat_ms"]), mirror=True)
        half_b = Migration(vm, Endpoint(str(mob_b["name"]), bc, str(mob_b["address"])),
                           Endpoint(str(dest["name"]), dc, str(dest["address"])),
                           replace(pol, stall_timeout_s=FOLLOWER_STALL_S,
                                   timeout_s=max(pol.timeout_s, FOLLOWER_STALL_S)),
                           dest_disk=vmrows.disk(b, new_store, str(dest["name"])),
                           recorder=rec_b, progress=lambda m: whole.progress(f"[{b.site}] {m}"),
                           heartbeat_ms=int(row["heartbeat_ms"]), mirror=True)
        task_b = asyncio.ensure_future(half_b.run())
        got_a: Json = None
        error: str | None = None
        try:
            got_a = await half_a.run()
        except LabError as exc:
            error = exc.message
            with contextlib.suppress(LabError):  # site B's half stops waiting for A
                await mp.MIG_CANCEL.call(bc, mp.Cancel(
                    vm, reason=f"site {a.site}'s half failed: {error}"), timeout=10)
        try:
            got_b = await asyncio.wait_for(task_b, 60 if error is None else 40)
        except (LabError, TimeoutError) as exc:
            got_b = None
            error = error or getattr(exc, "message", None) or f"site {b.site}'s half: {exc!r}"
            task_b.cancel()
            with contextlib.suppress(BaseException):
                await task_b
        stats = await mob.MOB_STATS.call(ac, hp.VmName(vm))
    state = "completed" if error is None else "failed"
    halves = [Half(site=str(a.site), id=rec_a.id, source=src, dest=str(mob_a["name"]),
                   state=half_a.result.state, error=half_a.result.error),
              Half(site=str(b.site), id=rec_b.id, source=str(mob_b["name"]),
                   dest=str(dest["name"]), state=half_b.result.state,
                   error=half_b.result.error)]
    links: dict[str, Json] = {}
    for inv, rec, peer, half in ((a.inv, rec_a, rec_b, "outgoing"),
                                 (b.inv, rec_b, rec_a, "incoming")):
        links[half] = CrossSiteLink(
            id=xid, from_site=str(a.site), to_site=str(b.site), peer_id=peer.id,
            relay_bytes=stats.out, relay_wire_bytes=stats.wire, half=half).to_wire()
        if rec.id is not None:
            amend_result(inv, rec.id, cross_site=links[half])
    if state == "completed":
        # the VM now belongs to site B: its row moves from A's inventory to B's
        b.inv.upsert("vms", **{**{k: row[k] for k in row if k != "pid"},
                               "host": dest["name"], "datastore": new_store, "state": "running",
                               "pid": got_b.get("dest_pid") if isinstance(got_b, dict) else None,
                               "started_at": time.time(), "disk_file": None})
        a.inv.conn.execute("DELETE FROM vms WHERE name=?", (vm,))
    moved = stats.out.get("memory", 0) + stats.out.get("disk", 0)
    return CrossSite(
        id=xid, vm=vm, from_site=str(a.site), to_site=str(b.site), source=src,
        dest=str(dest["name"]), datastore=new_store, source_datastore=str(row["datastore"]),
        source_datastore_state="kept", state=state, started_at=WallTime(t_wall),
        seconds=0.0, halves=halves, relay_bytes=stats.out, relay_wire_bytes=stats.wire,
        relay_mbit_s=round(moved * 8 / stats.seconds / 1e6, 1) if stats.seconds else None,
        wan=[link], record={**(got_a if isinstance(got_a, dict) else half_a.result.to_wire()),
                            "cross_site": links["outgoing"]},
        error=error)
