"""``--site NAME``: scope a command to one site of the lab. ``status`` shows that site alone
(its hosts, storage nodes, datastores, VMs and WAN links); a command that names a host, VM,
datastore, storage node or WAN link outside it is refused in one line before it runs."""

from __future__ import annotations

import argparse

from labctl.core.errors import LabStateError
from labctl.lab.face import Lab
from labctl.state.inventory import Inventory


def _site_of(inv: Inventory, kind: str, name: str) -> str | None:
    """The site of host/vm/datastore/node ``name`` (None when the lab has no such thing:
    the command itself says so)."""
    if kind == "host":
        row = inv.row("hosts", name=name)
        return None if row is None else str(row["site"])
    if kind == "vm":
        row = inv.row("vms", name=name)
        return None if row is None else _site_of(inv, "host", str(row["host"]))
    if kind == "node":
        row = inv.row("storage_nodes", name=name)
        return None if row is None else str(row["site"])
    row = inv.row("datastores", name=name) or inv.row("file_datastores", name=name)
    return None if row is None else _site_of(inv, "node", str(row["node"]))


def _named(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(kind, name) of everything the command names."""
    cmd, action = args.cmd, getattr(args, "action", None)
    out: list[tuple[str, str]] = []
    if getattr(args, "host", None):
        out.append(("host", args.host))
    if cmd == "migrate":
        out += [("vm", args.vm), ("host", args.to)]
    elif cmd == "vm" and getattr(args, "name", None):
        out.append(("vm", args.name))
    elif cmd == "datastore" and getattr(args, "name", None) and action != "create":
        out.append(("datastore", args.name))
    if cmd == "datastore" and action == "create":
        out += [("host", h) for h in str(args.hosts or "").split(",") if h]
        if args.node:
            out.append(("node", args.node))
    if cmd == "storage" and getattr(args, "node", None):
        out.append(("node", args.node))
    if cmd == "image" and getattr(args, "to", None):
        out.append(("datastore", args.to))
    if cmd == "chain":
        out.append(("datastore", args.to))
        source = str(getattr(args, "source", ""))
        if ":" in source:
            out.append(("datastore", source.split(":", 1)[0]))
        elif source:
            out.append(("vm", source))
    return out


def check(args: argparse.Namespace) -> None:
    """Refuse a site the lab does not have, and anything named outside the site."""
    lab = Lab.find(args.lab)
    inv = lab.open_inventory()
    try:
        sites = [str(r["name"]) for r in inv.rows("sites")]
        if args.site not in sites:
            raise LabStateError(f"--site: lab {lab.name} has no site {args.site!r} "
                                f"(sites: {', '.join(sites) or 'none'})", site=args.site)
        for kind, name in _named(args):
            where = _site_of(inv, kind, name)
            if where is not None and where != args.site:
                raise LabStateError(f"{kind} {name} is in site {where}, not {args.site} "
                                    f"(--site {args.site})", site=args.site)
        if args.cmd == "wan" and getattr(args, "link", None):
            row = inv.row("wan_links", name=args.link)
            if row is not None and args.site not in (row["site_a"], row["site_b"]):
                raise LabStateError(f"WAN link {args.link} does not reach site {args.site} "
                                    f"(it joins {row['site_a']} and {row['site_b']})")
    finally:
        inv.close()
