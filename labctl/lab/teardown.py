"""Teardown by ownership: remove exactly what the lab's journal says it created, each only
if it still proves to be the lab's (a link's alias, a namespace's mark, a domain's metadata,
a process's command line naming the lab directory). Never by a name pattern; works after a
SIGKILL mid-``up``."""

from __future__ import annotations

import asyncio

from labctl.core.errors import LabError
from labctl.drivers import netlink
from labctl.hosts.provider import NamespaceHosts, stop_owned_process
from labctl.hosts.sshhosts import SshHosts
from labctl.state.context import LabContext, Progress
from labctl.storage import node as storagenode
from labctl.storage.domains import LIBVIRT_QEMU_LOGS


async def teardown(ctx: LabContext) -> list[str]:
    """Remove the lab's objects (``ctx``: the lab's own context): each site's, as its own
    journal lists them, then the lab's; returns what was removed (one line each)."""
    removed: list[str] = _Said(ctx.progress)
    sites = ctx.all_sites()
    # the hosts first (their agents stop their VMs softly), through their provider
    for site in sites:
        await NamespaceHosts(ctx.name, ctx.dir.path, site.inv).teardown(site.inv, removed)
    unreachable: list[LabError] = []
    for site in sites:
        try:
            await SshHosts(ctx.name, ctx.dir.path, site.inv).teardown(site.inv, removed)
        except LabError as exc:  # the rest is torn down all the same; said at the end
            unreachable.append(exc)
    journals = [(site.inv, site.inv.owned()) for site in sites] + [(ctx.inv, ctx.inv.owned())]
    await asyncio.gather(*(stop_owned_process(name, int(d["pid"]), ctx.dir.path, removed)
                           for _, owned in journals for kind, name, d in owned
                           if kind == "process" and "pid" in d))
    try:
        for dom in await storagenode.destroy_owned(ctx.name, ctx.dir.path):
            removed.append(f"domain {dom}")
            # libvirt keeps the domain's QEMU log after undefine; it is this lab's file
            log = LIBVIRT_QEMU_LOGS / f"{dom}.log"
            if log.exists():
                log.unlink()
                removed.append(f"file {log}")
    except LabError as exc:
        ctx.progress(f"warning: {exc.message}")
    for inv, owned in journals:  # the sites' links (veths) before the lab's (bridges)
        for kind, name, detail in owned:
            if kind in ("ssh-host", "ssh-storage"):  # disowned by their provider, once
                continue                               # the machine is clean
            if kind == "link" and netlink.delete_link(name, detail["alias"]):
                removed.append(f"link {name}")
            inv.disown(kind, name)
    if unreachable:
        # the journal keeps those machines' entries: a later ``down`` tries them again
        raise unreachable[0]
    return list(removed)


class _Said(list[str]):
    """A list of removed objects that reports each one as it is removed (so the progress
    lines carry the time each removal happened, not the end of the teardown)."""

    def __init__(self, progress: Progress) -> None:
        super().__init__()
        self.progress = progress

    def append(self, item: str) -> None:
        super().append(item)
        self.progress(f"removed {item}")
