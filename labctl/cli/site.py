"""``--site NAME``: scope a command to one site of the lab. ``status`` shows that site alone
(its hosts, storage nodes, datastores, VMs and WAN links); a command that names a host, VM,
datastore, storage node or WAN link outside it is refused in one line before it runs."""

from __future__ import annotations

import argparse

from labctl.core.errors import LabStateError
from labctl.lab.face import Lab, has


def _named(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(kind, name) of everything the command names."""
    cmd, action = args.cmd, getattr(args, "action", None)
    out: list[tuple[str, str]] = []
    if getattr(args, "host", None):
        out.append(("host", args.host))
    if cmd == "migrate":
        out += [("vm", args.vm)] + ([("host", args.to)] if args.to else [])
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
    """Refuse a site the lab does not have, and anything named outside the site (the lab's
    own context looks in every site's inventory to say where it is)."""
    lab = Lab.find(args.lab)
    with lab.lab_context() as whole:
        sites = whole.site_names()
        if args.site not in sites:
            raise LabStateError(f"--site: lab {lab.name} has no site {args.site!r} "
                                f"(sites: {', '.join(sites) or 'none'})", site=args.site)
        for kind, name in _named(args):
            where = [s for s in sites if has(whole.in_site(s).inv, kind, name)]
            if where and args.site not in where:
                raise LabStateError(f"{kind} {name} is in site {where[0]}, not {args.site} "
                                    f"(--site {args.site})", site=args.site)
        if args.cmd == "wan" and getattr(args, "link", None):
            row = whole.inv.row("wan_links", name=args.link)
            if row is not None and args.site not in (row["site_a"], row["site_b"]):
                raise LabStateError(f"WAN link {args.link} does not reach site {args.site} "
                                    f"(it joins {row['site_a']} and {row['site_b']})")
