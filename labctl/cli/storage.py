"""CLI for datastores, host storage caches, storage nodes and the event stream.

    labctl datastore create NAME --size SIZE --hosts H1,H2 [--node NODE]
    labctl datastore create NAME --kind file --size SIZE --hosts H1,H2 [--node NODE]
    labctl datastore list|show NAME|files NAME|delete NAME|resize NAME SIZE
    labctl host storage HOST [--json] [--rescan [--unit ID]]
    labctl events [--follow] [--json] [--last N]
    labctl rescan lookup [inventory|poll]
    labctl storage restart NODE | storage portal NODE up|down
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass

from labctl.cli.files import print_files
from labctl.cli.labs import emit
from labctl.cli.progress import Progress
from labctl.core.errors import LabStateError
from labctl.core.sizes import format_size, human_size
from labctl.core.wire import Message
from labctl.datastores import filestores, rescan
from labctl.datastores import service as datastores
from labctl.datastores.protocol import HostCache
from labctl.datastores.tables import RescanEvent
from labctl.lab.face import Lab
from labctl.storage import domains
from labctl.wan import service as wan


@dataclass(frozen=True)
class RescanLookup(Message):
    """``labctl rescan lookup``: how the rescan service finds the hosts sharing a datastore
    (``inventory``: from the lab's records; ``poll``: by asking every host)."""

    lab: str
    lookup: str


@dataclass(frozen=True)
class NodeDomain(Message):
    """``labctl storage resume NODE``: the node's domain as libvirt has it now."""

    node: str
    domain_state: str
    domain_reason: str | None


def _unit(lab: Lab, text: str | None, host: str) -> str | None:
    if text is None or text.lower().startswith("naa."):
        return text
    with lab.context(of=("host", host)) as ctx:
        return str(datastores.show(ctx, text).naa)


#: what works on a lab that is down (its inventory is kept)
_READ = {("datastore", "list"), ("datastore", "show"), ("events", None)}


async def run(args: argparse.Namespace, progress: Progress) -> int:
    lab = Lab.find(args.lab, progress=progress, site=args.site)
    if (args.cmd, getattr(args, "action", None)) not in _READ:
        lab.require_up()
    return await dispatch(lab, args)


async def dispatch(lab: Lab, args: argparse.Namespace) -> int:
    if args.cmd == "datastore":
        return await _datastore(lab, args)
    if args.cmd == "host":
        unit = _unit(lab, args.unit, args.host)
        with lab.context(of=("host", args.host)) as ctx:
            res = await datastores.host_storage(ctx, args.host, rescan_unit=unit,
                                            rescan_all=(args.action == "rescan" or args.rescan)
                                            and unit is None)
        if args.json:
            print(json.dumps(res.to_wire(), indent=2))
        else:
            _print_host(res)
        return 0
    if args.cmd == "events":
        return await _events(lab, args)
    if args.cmd == "rescan":  # each site's rescan service (the --site one's)
        with lab.lab_context() as whole:
            modes = []
            for site in lab.scoped_sites(whole):
                if args.mode:
                    rescan.set_lookup(site.inv, args.mode)
                modes.append(site.inv.get_meta("rescan_lookup", "inventory") or "inventory")
        mode = modes[0] if len(set(modes)) == 1 else ",".join(modes)
        if args.json:
            emit(RescanLookup(lab=lab.name, lookup=mode).to_wire())
        else:
            print(f"lab {lab.name}: sharing hosts found by {mode}")
        return 0
    if args.cmd == "storage":
        if args.action == "resume":
            state = await domains.resume(lab.name, args.node)
            if args.json:
                emit(NodeDomain(node=args.node, domain_state=state.state,
                                domain_reason=state.reason).to_wire())
            else:
                print(f"storage node {args.node}: {state}")
            return 0
        if args.action == "restart":
            with lab.lab_context() as whole:
                ctx = whole.in_site(lab.pick_site(whole, of=("node", args.node)))
                restarted = await datastores.restart_node(ctx, args.node)
                await wan.route_nodes(whole, args.node)  # its routes to other sites
            if args.json:
                print(json.dumps(restarted.to_wire(), indent=2))
                return 0
            again = [lun.name + " " + lun.naa for lun in restarted.luns]
            again += [f"{f} (file)" for f in restarted.file_datastores]
            print(f"storage node {restarted.node} restarted (agent after {restarted.boot_s} s); "
                  f"re-exported {', '.join(again) or 'nothing'}")
        else:
            with lab.context(of=("node", args.node)) as ctx:
                portal = await datastores.portal_set(ctx, args.node, args.state == "up")
            if args.json:
                print(json.dumps(portal.to_wire(), indent=2))
                return 0
            print(f"storage node {args.node}: portal {args.state} "
                  f"({', '.join(portal.portals) or 'none'})")
        return 0
    raise AssertionError(args.cmd)


async def _datastore(lab: Lab, args: argparse.Namespace) -> int:
    name = getattr(args, "name", None)
    if (args.action == "create" and args.kind == "file") or (args.action in (
            "show", "delete", "resize", "files") and _is_file(lab, name)):
        return await _file_datastore(lab, args)
    if args.action == "files":  # not a file datastore: the same refusal as any other
        with lab.context(of=("datastore", str(name))) as ctx:
            filestores.row(ctx.inv, str(name))
    if args.action == "create":
        hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]  # "h1, h2" too
        with lab.context(of=_creator(args.node, hosts)) as ctx:
            created = await datastores.create(ctx, args.name, args.size, hosts, node=args.node)
        if args.json:
            print(json.dumps(created.to_wire(), indent=2))
            return 0
        print(f"datastore {created.name}: {created.naa}  {format_size(created.size_bytes)} on "
              f"{created.node} ({created.target_iqn} LUN {created.lun}, {created.backing.path})")
        for h, seen in created.seen_by.items():
            print(f"  {h}: sees {seen.seen_naa} {format_size(seen.size_bytes or 0)} "
                  f"[{seen.state}]")
        return 0
    if args.action == "list":  # every site's (the --site one's)
        with lab.lab_context() as whole:
            sites = lab.scoped_sites(whole)
            rows = [m for ctx in sites for m in datastores.list_all(ctx)]
            files = [f for ctx in sites for f in filestores.list_all(ctx.inv)]
        if args.json:
            emit([m.to_wire() for m in rows] + [f.to_wire() for f in files])
            return 0
        print(f"{'NAME':<10} {'KIND':<5} {'ID':<38} {'NODE':<8} {'LUN':>3} {'SIZE':>6}  HOSTS")
        for m in rows:
            print(f"{m.name:<10} {'block':<5} {m.naa or '-':<38} {m.node:<8} "
                  f"{m.lun if m.lun is not None else '-':>3} "
                  f"{format_size(m.size_bytes):>6}  {','.join(m.hosts)}")
        for f in files:
            print(f"{f.name:<10} {'file':<5} {f.naa:<38} {f.node:<8} {'-':>3} "
                  f"{format_size(f.size_bytes):>6}  {','.join(f.hosts)}")
        return 0
    if args.action == "show":
        with lab.context(of=("datastore", args.name)) as ctx:
            m = datastores.show(ctx, args.name)
        if args.json:
            print(json.dumps(m.to_wire(), indent=2))
            return 0
        print(f"datastore {m.name}\n  naa      {m.naa}\n  node     {m.node}\n"
              f"  target   {m.target_iqn} at {m.portal}, LUN {m.lun}\n"
              f"  backing  {m.backing.path} (virtio serial {m.backing.disk_serial})\n"
              f"  size     {format_size(m.size_bytes)}\n  vms      {', '.join(m.vms) or '-'}")
        for h, s in m.seen_by.items():
            print(f"  host {h}: {s.naa or '-'} {format_size(s.size_bytes or 0)}")
        return 0
    if args.action == "delete":
        with lab.context(of=("datastore", args.name)) as ctx:
            deleted = await datastores.delete(ctx, args.name)
        if args.json:
            print(json.dumps(deleted.to_wire(), indent=2))
            return 0
        print(f"datastore {deleted.name} ({deleted.naa}) deleted; its ID is never reused")
        return 0
    if args.action == "resize":
        with lab.context(of=("datastore", args.name)) as ctx:
            resized = await datastores.resize(ctx, args.name, args.size,
                                              wait=0 if args.no_wait else 30)
        if args.json:
            print(json.dumps(resized.to_wire(), indent=2))
            return 0
        if not resized.changed:
            print(f"datastore {resized.name} ({resized.naa}) is already "
                  f"{format_size(resized.size_bytes)}: nothing to do")
            return 0
        print(f"datastore {resized.name} ({resized.naa}) grown to "
              f"{format_size(resized.size_bytes)}")
        if resized.event is not None:
            print(rescan.format_event(resized.event))
        return 0
    raise AssertionError(args.action)


def _creator(node: str | None, hosts: list[str]) -> tuple[str, str] | None:
    """What places a new datastore in a site: its node, else its first host."""
    return ("node", node) if node else ("host", hosts[0]) if hosts else None


def _is_file(lab: Lab, name: str | None) -> bool:
    if name is None:
        return False
    with lab.context(of=("datastore", name)) as ctx:
        return filestores.is_file_datastore(ctx.inv, name)


async def _file_datastore(lab: Lab, args: argparse.Namespace) -> int:
    """``datastore create --kind file``, and show/files/delete/resize of a file datastore."""
    if args.action == "create":
        hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
        with lab.context(of=_creator(args.node, hosts)) as ctx, ctx.lock():
            made = await datastores.create_file(ctx, args.name, args.size, hosts, args.node)
        if args.json:
            emit(made.to_wire())
            return 0
        print(f"datastore {made.name}: {made.naa}  file, {human_size(made.size_bytes)} on "
              f"{made.node}, exported at {made.url} to {', '.join(made.hosts)}")
        return 0
    if args.action == "show":
        with lab.context(of=("datastore", args.name)) as ctx:
            shown = filestores.shown(ctx.inv, args.name)
        if args.json:
            emit(shown.to_wire())
            return 0
        print(f"datastore {shown.name}\n  naa      {shown.naa}\n  kind     file\n"
              f"  node     {shown.node}\n  export   {shown.url or '-'}\n"
              f"  size     {human_size(shown.size_bytes)}\n  hosts    {', '.join(shown.hosts)}")
        for h, chk in shown.checked_by.items():
            print(f"  host {h}: {chk.state}" + (f" ({chk.error})" if chk.error else ""))
        return 0
    if args.action == "files":
        with lab.context(of=("datastore", args.name)) as ctx:
            listed = await filestores.files(ctx, args.name)
        if args.json:
            emit(listed.to_wire())
            return 0
        print_files(listed)
        return 0
    if args.action == "delete":
        with lab.context(of=("datastore", args.name)) as ctx, ctx.lock():
            gone = await filestores.delete(ctx, args.name)
        if args.json:
            emit(gone.to_wire())
            return 0
        print(f"datastore {gone.name} ({gone.naa}) deleted; its ID is never reused")
        return 0
    raise LabStateError(f"datastore {args.name} is a file datastore: {args.action} works on "
                        "block datastores only in this version", datastore=args.name)


def _print_host(res: HostCache) -> None:
    n = len(res.units)
    print(f"host {res.host}: {n} datastore{'' if n == 1 else 's'}, "
          f"{res.scsi_commands} SCSI commands sent")
    for u in res.units:
        when = time.strftime("%H:%M:%S", time.localtime(u.scanned_at)) if u.scanned_at else "-"
        size = format_size(u.size_bytes) if u.size_bytes else "-"
        print(f"  {u.datastore or '?':<10} {u.naa}  {size:>6}  {u.target_iqn} LUN "
              f"{u.lun}  {u.state}  scanned {when}" + (f"  ({u.error})" if u.error else ""))


async def _events(lab: Lab, args: argparse.Namespace) -> int:
    """Every event with its outcome, of every site (each site's rescan service keeps its
    own; of the --site one alone with --site), in the order they happened. With --follow,
    an event is printed once it is finished, and again if its outcome changes later (a stale
    host caught up)."""
    with lab.lab_context() as whole:
        sites = lab.scoped_sites(whole)
        many = len(whole.site_names()) > 1
        shown: dict[tuple[str | None, int], tuple[str, str]] = {}

        def read() -> list[RescanEvent]:
            evs = [ev.replace(site=s.site) if many else ev
                   for s in sites for ev in rescan.events(s.inv)]
            return sorted(evs, key=lambda e: (e.at, e.site or "", e.id))

        evs = read()
        if args.last:
            for ev in evs[:-args.last]:
                shown[ev.site, ev.id] = (ev.state, json.dumps(ev.hosts_late))
            evs = evs[-args.last:]
        while True:
            for ev in evs:
                key = (ev.state, json.dumps(ev.hosts_late))
                if shown.get((ev.site, ev.id)) == key or (
                        args.follow and ev.state not in rescan.FINAL):
                    continue
                shown[ev.site, ev.id] = key
                print(json.dumps(ev.to_wire()) if args.json else rescan.format_event(ev),
                      flush=True)
            if not args.follow:
                return 0
            await asyncio.sleep(0.2)
            evs = read()
