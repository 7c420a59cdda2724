"""CLI for datastores, host storage caches, storage nodes and the event stream.

    labctl datastore create NAME --size SIZE --hosts H1,H2 [--node NODE]
    labctl datastore list|show NAME|delete NAME|resize NAME SIZE
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
from typing import Any

from labctl.core.sizes import format_size
from labctl.datastores import rescan
from labctl.datastores import service as datastores
from labctl.datastores.protocol import HostCache
from labctl.lab.face import Lab

COMMANDS = ("datastore", "host", "events", "rescan", "storage")


def add_parsers(sub: Any) -> None:
    ds = sub.add_parser("datastore", help="create, list, show, resize, delete datastores")
    dsub = ds.add_subparsers(dest="action", required=True)
    c = dsub.add_parser("create", help="allocate a LUN with an array-style NAA ID for some hosts")
    c.add_argument("name")
    c.add_argument("--size", required=True, help="e.g. 128M, 1G")
    c.add_argument("--hosts", required=True, help="comma-separated hosts allowed to see it")
    c.add_argument("--node", help="storage node (default: the one with most free space)")
    c.add_argument("--json", action="store_true")
    ls = dsub.add_parser("list", help="every datastore: ID, node, LUN, size, hosts")
    ls.add_argument("--json", action="store_true")
    sh = dsub.add_parser("show", help="one datastore's mapping and what each host saw")
    sh.add_argument("name")
    sh.add_argument("--json", action="store_true")
    de = dsub.add_parser("delete", help="remove a datastore no VM uses")
    de.add_argument("name")
    rs = dsub.add_parser("resize", help="grow the LUN on the storage node (libvirt block resize); "
                         "sharing hosts are refreshed by the rescan service")
    rs.add_argument("name")
    rs.add_argument("size")
    rs.add_argument("--no-wait", action="store_true", help="do not wait for the rescan outcome")
    rs.add_argument("--json", action="store_true")

    host = sub.add_parser("host", help="a host's own view of storage")
    hsub = host.add_subparsers(dest="action", required=True)
    hs = hsub.add_parser("storage", help="the host's cached view of the datastores it sees")
    hs.add_argument("host")
    hs.add_argument("--json", action="store_true")
    hs.add_argument("--rescan", action="store_true", help="rescan first (everything, or --unit)")
    hs.add_argument("--unit", help="with --rescan: only this datastore ID (or datastore name)")
    hr = hsub.add_parser("rescan", help="make a host rescan (everything, or one unit)")
    hr.add_argument("host")
    hr.add_argument("--unit", help="only this datastore ID (or datastore name)")
    hr.add_argument("--json", action="store_true")

    ev = sub.add_parser("events", help="storage events and their rescan outcomes")
    ev.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    ev.add_argument("--json", action="store_true", help="one JSON object per line")
    ev.add_argument("--last", type=int, default=0, help="only the last N events")

    rc = sub.add_parser("rescan", help="rescan service settings")
    rsub = rc.add_subparsers(dest="action", required=True)
    lk = rsub.add_parser("lookup", help="show or set how sharing hosts are found")
    lk.add_argument("mode", nargs="?", choices=rescan.LOOKUPS)

    st = sub.add_parser("storage", help="storage node operations")
    ssub = st.add_subparsers(dest="action", required=True)
    rr = ssub.add_parser("restart", help="restart a storage node; datastores keep their IDs")
    rr.add_argument("node")
    po = ssub.add_parser("portal", help="take a storage node's iSCSI portal down or up")
    po.add_argument("node")
    po.add_argument("state", choices=["up", "down"])


def _unit(lab: Lab, text: str | None) -> str | None:
    if text is None or text.lower().startswith("naa."):
        return text
    with lab.context() as ctx:
        return str(datastores.show(ctx, text).id)


async def dispatch(lab: Lab, args: argparse.Namespace) -> int:
    if args.cmd == "datastore":
        return await _datastore(lab, args)
    if args.cmd == "host":
        unit = _unit(lab, args.unit)
        with lab.context() as ctx:
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
    if args.cmd == "rescan":
        inv = lab.open_inventory()
        try:
            if args.mode:
                rescan.set_lookup(inv, args.mode)
            print(f"lab {lab.name}: sharing hosts found by "
                  f"{inv.get_meta('rescan_lookup', 'inventory')}")
        finally:
            inv.close()
        return 0
    if args.cmd == "storage":
        if args.action == "restart":
            with lab.context() as ctx:
                restarted = await datastores.restart_node(ctx, args.node)
            print(f"storage node {restarted.node} restarted (agent after {restarted.boot_s} s); "
                  f"re-exported {', '.join(lun.datastore + ' ' + lun.id for lun in restarted.luns)}")
        else:
            with lab.context() as ctx:
                portal = await datastores.portal_set(ctx, args.node, args.state == "up")
            print(f"storage node {args.node}: portal {args.state} "
                  f"({', '.join(portal.portals) or 'none'})")
        return 0
    raise AssertionError(args.cmd)


async def _datastore(lab: Lab, args: argparse.Namespace) -> int:
    if args.action == "create":
        hosts = [h for h in args.hosts.split(",") if h]
        with lab.context() as ctx:
            created = await datastores.create(ctx, args.name, args.size, hosts, node=args.node)
        if args.json:
            print(json.dumps(created.to_wire(), indent=2))
            return 0
        print(f"datastore {created.datastore}: {created.id}  {format_size(created.size_bytes)} on "
              f"{created.node} ({created.target_iqn} LUN {created.lun}, {created.backing.path})")
        for h, seen in created.seen_by.items():
            print(f"  {h}: sees {seen.seen_naa} {format_size(seen.size_bytes or 0)} "
                  f"[{seen.state}]")
        return 0
    if args.action == "list":
        with lab.context() as ctx:
            rows = datastores.list_all(ctx)
        if args.json:
            print(json.dumps([m.to_wire() for m in rows], indent=2))
            return 0
        print(f"{'NAME':<10} {'ID':<38} {'NODE':<8} {'LUN':>3} {'SIZE':>6}  HOSTS")
        for m in rows:
            print(f"{m.datastore:<10} {m.id or '-':<38} {m.node:<8} "
                  f"{m.lun if m.lun is not None else '-':>3} "
                  f"{format_size(m.size_bytes):>6}  {','.join(m.hosts)}")
        return 0
    if args.action == "show":
        with lab.context() as ctx:
            m = datastores.show(ctx, args.name)
        if args.json:
            print(json.dumps(m.to_wire(), indent=2))
            return 0
        print(f"datastore {m.datastore}\n  id       {m.id}\n  node     {m.node}\n"
              f"  target   {m.target_iqn} at {m.portal}, LUN {m.lun}\n"
              f"  backing  {m.backing.path} (virtio serial {m.backing.disk_serial})\n"
              f"  size     {format_size(m.size_bytes)}\n  vms      {', '.join(m.vms) or '-'}")
        for h, s in m.seen_by.items():
            print(f"  host {h}: {s.naa or '-'} {format_size(s.size_bytes or 0)}")
        return 0
    if args.action == "delete":
        with lab.context() as ctx:
            deleted = await datastores.delete(ctx, args.name)
        print(f"datastore {deleted.datastore} ({deleted.id}) deleted; its ID is never reused")
        return 0
    if args.action == "resize":
        with lab.context() as ctx:
            resized = await datastores.resize(ctx, args.name, args.size,
                                              wait=0 if args.no_wait else 30)
        if args.json:
            print(json.dumps(resized.to_wire(), indent=2))
            return 0
        print(f"datastore {resized.datastore} ({resized.id}) grown to "
              f"{format_size(resized.size_bytes)}")
        if resized.event is not None:
            print(rescan.format_event(resized.event))
        return 0
    raise AssertionError(args.action)


def _print_host(res: HostCache) -> None:
    n = len(res.units)
    print(f"host {res.host}: {n} datastore{'' if n == 1 else 's'}, "
          f"{res.scsi_commands} SCSI commands sent")
    for u in res.units:
        when = time.strftime("%H:%M:%S", time.localtime(u.scanned_at)) if u.scanned_at else "-"
        size = format_size(u.size_bytes) if u.size_bytes else "-"
        print(f"  {u.datastore or '?':<10} {u.id}  {size:>6}  {u.target_iqn} LUN "
              f"{u.lun}  {u.state}  scanned {when}" + (f"  ({u.error})" if u.error else ""))


async def _events(lab: Lab, args: argparse.Namespace) -> int:
    """Every event with its outcome. With --follow, an event is printed once it is finished,
    and again if its outcome changes later (a stale host caught up)."""
    inv = lab.open_inventory()
    try:
        shown: dict[int, tuple[str, str]] = {}
        evs = rescan.events(inv)
        if args.last:
            for ev in evs[:-args.last]:
                shown[ev.id] = (ev.state, json.dumps(ev.hosts_late))
            evs = evs[-args.last:]
        while True:
            for ev in evs:
                key = (ev.state, json.dumps(ev.hosts_late))
                if shown.get(ev.id) == key or (args.follow and ev.state not in rescan.FINAL):
                    continue
                shown[ev.id] = key
                print(json.dumps(ev.to_wire()) if args.json else rescan.format_event(ev),
                      flush=True)
            if not args.follow:
                return 0
            await asyncio.sleep(0.2)
            evs = rescan.events(inv)
    finally:
        inv.close()
