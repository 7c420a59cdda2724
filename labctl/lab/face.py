"""The ``Lab`` face: one lab, found by name, and everything a user can ask of it. Used by
the CLI, the scenarios and the tests; features are handed a
:class:`~labctl.state.context.LabContext` instead of this object.

All methods are coroutines (but ``find``/``context``); the CLI runs each command in one
event loop.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labctl.core.errors import LabError, LabStateError, TopologyError
from labctl.core.paths import check_home, labs_dir
from labctl.core.wire import Message
from labctl.datastores.tables import DATASTORES
from labctl.migration.tables import MIGRATIONS
from labctl.replication.tables import CLOUDS
from labctl.state.context import LabContext, Progress, quiet
from labctl.state.inventory import Inventory
from labctl.state.labdir import LabDir, archive, existing_labs, lab_state
from labctl.wan.tables import WAN

if TYPE_CHECKING:
    from labctl.hosts import protocol as hp
    from labctl.lab.crosssite import CrossSite
    from labctl.lab.status import LabStatus
    from labctl.lab.topology import Topology
    from labctl.lab.vms import Snapshotted
    from labctl.migration.policy import Policy

# Each method imports the feature code it uses when it is called: a command pays only for
# what it runs (``labctl status`` needs neither the topology checks nor the migration driver;
# measured by bench/cli-start).

#: every feature's inventory tables, each declared next to its feature
SCHEMAS = (DATASTORES, MIGRATIONS, WAN, CLOUDS)


class Lab:
    """One lab, found by name. Cheap to construct: nothing happens until a method is called."""

    def __init__(self, name: str, root: Path | None = None, progress: Progress = quiet,
                 site: str | None = None) -> None:
        self.dir = LabDir(name, root)
        self.name = name
        self.progress = progress
        #: the site every command works in (``--site``); None: the site of what it names
        self.site = site

    @classmethod
    def find(cls, name: str | None, root: Path | None = None, progress: Progress = quiet,
             site: str | None = None) -> Lab:
        """The lab called ``name``; without a name, the only lab that is up (or, when none
        is, the only lab there is). ``site`` scopes every command to that site."""
        if name is not None:
            lab = cls(name, root, progress, site)
            lab.dir.refuse_if_not_ours()
            return lab
        labs = existing_labs(root)
        base = root or labs_dir()
        states = {lab: lab_state(base / lab) or "unknown" for lab in labs}
        live = [lab for lab, s in states.items() if s != "down"]
        if len(live) == 1 or (not live and len(labs) == 1):
            lab = cls((live or labs)[0], root, progress, site)
            lab.dir.refuse_if_not_ours()
            return lab
        if not labs:
            hint = "" if os.geteuid() == 0 else (
                f"; this user's labs are in {base}, a lab brought up with sudo (as "
                "scripts/demo.sh does) is root's: run labctl with sudo to see it")
            raise LabStateError(f"no lab is up (start one with: labctl up){hint}")
        listed = ", ".join(f"{lab} ({s})" for lab, s in states.items())
        raise LabStateError(f"several labs exist ({listed}): say which with --lab NAME or "
                            "LABCTL_LAB=NAME")

    def state(self) -> str | None:
        """What the lab's inventory says it is (``up``, ``creating``, ``down``), None if
        there is no such lab."""
        return lab_state(self.dir.path)

    def require_up(self) -> None:
        """A clear refusal unless the lab is up."""
        state = self.state()
        if state is None:
            raise LabStateError(f"lab {self.name} is not up (start it with: labctl up)",
                                lab=self.name)
        if state != "up":
            raise LabStateError(f"lab {self.name} is {state}"
                                + (" (its records are kept: labctl up brings it back)"
                                   if state == "down" else ""), lab=self.name, state=state)

    def open_inventory(self) -> Inventory:
        """The lab's own inventory (its meta, sites and WAN links; the caller closes it); a
        clear error when the lab is not up."""
        if not self.dir.exists():
            raise LabStateError(f"lab {self.name} is not up (start it with: labctl up)", lab=self.name)
        return self.dir.inventory(SCHEMAS)

    @contextmanager
    def lab_context(self) -> Iterator[LabContext]:
        """The lab's own context (its sites' bridges, the WAN links, each site's context);
        a clear error when the lab is not up."""
        if not self.dir.exists():
            raise LabStateError(f"lab {self.name} is not up (start it with: labctl up)", lab=self.name)
        with self._opened() as ctx:
            yield ctx

    @contextmanager
    def context(self, site: str | None = None,
                of: tuple[str, str] | None = None) -> Iterator[LabContext]:
        """One site's context for a feature to work in (closed afterwards): ``site``, else
        the lab's ``--site``, else the site of ``of`` (``("vm", "vm1")``: kinds ``host``,
        ``vm``, ``node``, ``datastore``), else the lab's only site. A clear error when the lab
        is not up, or when it has several sites and none of these says which."""
        with self.lab_context() as lab:
            yield lab.in_site(self.pick_site(lab, site, of))

    def pick_site(self, lab: LabContext, site: str | None = None,
                  of: tuple[str, str] | None = None) -> str:
        """The site :meth:`context` works in (see there)."""
        if site or self.site:
            return str(site or self.site)
        sites = lab.site_names()
        if of is not None:
            found = [s for s in sites if has(lab.in_site(s).inv, *of)]
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise LabStateError(f"{of[0]} {of[1]} is in sites {', '.join(found)}: say which "
                                    "with --site", lab=self.name, sites=found)
        if len(sites) == 1:
            return sites[0]
        if not sites:
            raise LabStateError(f"lab {self.name} has no site yet (is it up?)", lab=self.name)
        if of is not None:
            known = [f"{n} ({s})" for s in sites for n in names_of(lab.in_site(s).inv, of[0])]
            raise LabStateError(f"lab {self.name} has no {of[0]} {of[1]!r} in any site "
                                f"({of[0]}s: {', '.join(known) or 'none'})", lab=self.name)
        raise LabStateError(f"lab {self.name} has sites {', '.join(sites)}: say which with "
                            "--site", lab=self.name, sites=sites)

    def scoped_sites(self, lab: LabContext) -> list[LabContext]:
        """The sites a listing covers: the ``--site`` one, else all of them."""
        return [lab.in_site(self.site)] if self.site else lab.all_sites()

    @contextmanager
    def _opened(self) -> Iterator[LabContext]:
        """The lab's own inventory (created if new) as a context; it and the site
        inventories opened through it are closed afterwards."""
        inv = self.dir.inventory(SCHEMAS)
        ctx = LabContext(self.name, self.dir, inv, self.progress, schemas=SCHEMAS)
        try:
            yield ctx
        finally:
            ctx.close_sites()
            inv.close()

    # ------------------------------------------------------------------ up
    def check(self, topo: Topology) -> None:
        """Check ``topo`` against this machine without building anything (its networks, the
        free disk space, the labctl home it goes in): what ``up`` checks before it builds,
        and ``labctl validate`` too."""
        from labctl.lab import bringup

        check_home()
        bringup.check_machine(topo, self.dir.path.parent)

    async def up(self, topo: Topology) -> LabStatus:
        """Bring the lab up. Idempotent for the same topology; refuses a different one."""
        if topo.name != self.name:
            raise TopologyError(topo.source, "name", f"names lab {topo.name}, not {self.name}")
        from labctl.lab import bringup

        check_home()
        bringup.preflight()
        with self.dir.lock():
            if self.state() == "down":  # a lab that was taken down: keep its results aside
                kept = archive(self.dir.path)
                self.progress(f"the records of the earlier lab {self.name} are kept in {kept}")
            if self.dir.exists():
                inv = self.dir.inventory(SCHEMAS)
                try:
                    state = inv.get_meta("state")
                    digest = inv.get_meta("topology_digest")
                finally:
                    inv.close()
                if state == "up" and digest == topo.digest:
                    self.progress(f"lab {self.name} is already up with this topology")
                    with self._opened() as ctx:
                        await bringup.recover(ctx, topo)
                    return await self.status()
                if state == "up":
                    raise LabStateError(
                        f"lab {self.name} is already up with a different topology; "
                        f"run 'labctl down --lab {self.name}' first", lab=self.name)
                raise LabStateError(
                    f"lab {self.name} did not come up completely last time (state {state}); "
                    f"run 'labctl down --lab {self.name}' to clean it up, then up again",
                    lab=self.name, state=state)
            self.check(topo)
            self.dir.create()
            with self._opened() as ctx:
                await bringup.build(ctx, topo)
        return await self.status()

    # ------------------------------------------------------------------ VMs
    async def vm_start(self, name: str) -> hp.VmStarted:
        from labctl.lab import vms

        with self.context(of=("vm", name)) as ctx, ctx.lock():
            return await vms.start(ctx, name)

    async def vm_stop(self, name: str) -> None:
        from labctl.lab import vms

        with self.context(of=("vm", name)) as ctx, ctx.lock():
            await vms.stop(ctx, name)

    async def vm_ssh(self, name: str, argv: list[str], timeout: float = 120.0,
                     sink: Callable[[int, bytes], object] | None = None) -> Any:
        """Run ``argv`` in server VM ``name`` (of any cloud of the lab) over its management
        channel, as its cloud's operator: the lab's key, the host key pinned; its session
        is closed after ``timeout`` seconds. ``sink``: its output goes there as it comes
        (1: standard output, 2: standard error), not into the result."""
        from labctl.lab import clouds

        with self.lab_context() as whole:
            sites = [whole.in_site(self.site)] if self.site else whole.all_sites()
            for site in sites:  # the cloud where it runs (a replicated VM's source stopped)
                cloud = clouds.cloud_of(site)
                try:
                    if (await cloud.show(name)).state != "running":
                        continue
                    machine = cloud.ssh(name)
                except LabStateError:
                    continue
                async with machine as m:
                    if sink is not None:
                        code, out, err = await m.stream(argv, sink, timeout=timeout), "", ""
                    else:
                        ran = await m.run(argv, check=False, timeout=timeout)
                        code, out, err = ran.returncode, ran.stdout, ran.stderr
                return clouds.Ran(vm=name, cloud=str(site.site), argv=argv, returncode=code,
                                  stdout=out, stderr=err)
            raise LabStateError(f"no running server VM {name!r} in lab {self.name} (server "
                                "VMs are guest: server in a labctl cloud, or a libvirt "
                                "cloud's VMs)", vm=name)

    async def vm_snapshot(self, name: str, layer: str | None = None) -> Snapshotted:
        from labctl.lab import vms

        with self.context(of=("vm", name)) as ctx, ctx.lock():
            return await vms.snapshot(ctx, name, layer)

    async def vm_source(self, name: str, snapshot: bool) -> tuple[str, str]:
        """(datastore, file) a chain copy of VM ``name`` starts from: its top layer, or with
        ``snapshot`` the layer below a new top (once nothing writes it any more)."""
        from labctl.datastores import filestores
        from labctl.lab import vms

        with self.lab_context() as whole, whole.lock():
            sites = self.scoped_sites(whole)
            if not any(has(s.inv, "vm", name) for s in sites):
                known = ", ".join(r["name"] for s in sites for r in s.inv.rows("vms")) or "none"
                raise LabStateError(f"{name!r}: name a file as DATASTORE:FILE (e.g. "
                                    f"fs1:base.qcow2), or a VM (VMs: {known})", ref=name)
            ctx = whole.in_site(self.pick_site(whole, of=("vm", name)))
            vm = vms.row(ctx, name)
            if not vms.is_on_file(ctx, vm):
                raise LabStateError(f"VM {name} is not on a file datastore: its disk is a LUN, "
                                    "not a chain of files", vm=name)
            if not snapshot:
                if not vm["disk_file"]:
                    raise LabStateError(f"VM {name} has no disk yet (it is made when the VM "
                                        "first starts)", vm=name)
                return str(vm["datastore"]), str(vm["disk_file"])
            if vm["state"] != "running":
                raise LabStateError(f"VM {name} is not running: copy it without --snapshot",
                                    vm=name)
            snapped = await vms.snapshot(ctx, name)
            await filestores.wait_quiet(ctx, snapped.datastore, snapped.previous)
            return snapped.datastore, snapped.previous

    def vm_set_heartbeat(self, name: str, period_ms: int) -> None:
        """Set a stopped VM's heartbeat period (``labctl.hb_ms`` on its next start); the
        migration code reads the period from the inventory."""
        from labctl.guest.protocol import HEARTBEAT_MS_MAX, HEARTBEAT_MS_MIN, valid_heartbeat_ms
        from labctl.lab import vms

        if not valid_heartbeat_ms(period_ms):
            raise LabError(f"heartbeat period {period_ms!r}: an integer from {HEARTBEAT_MS_MIN} "
                           f"to {HEARTBEAT_MS_MAX} ms", vm=name)
        with self.context(of=("vm", name)) as ctx, ctx.lock():
            if vms.row(ctx, name)["state"] == "running":
                raise LabStateError(f"VM {name} is running: stop it before changing its "
                                    f"heartbeat period", vm=name)
            ctx.inv.update("vms", {"name": name}, heartbeat_ms=period_ms)

    async def vm_console(self, name: str, command: str) -> str:
        """Send a console command to the test guest (``rate N``, ``wss N``, ``read``, ``sync``,
        ``size``); a command it does not know is refused in the guest's words."""
        from labctl.guest.protocol import check_command
        from labctl.hosts import protocol as hp
        from labctl.lab import vmrows

        try:
            check_command(command)  # the guest's own refusal, before any host is asked
        except ValueError as exc:
            raise LabError(f"VM {name}: {exc}", vm=name) from None
        with self.context(of=("vm", name)) as ctx:
            async with ctx.host_client(vmrows.running_host(ctx, name)) as c:
                return (await hp.VM_CONSOLE.call(c, hp.ConsoleCommand(name, command),
                                                 timeout=30)).answer

    async def vm_console_tail(self, name: str, lines: int = 20) -> list[str]:
        """The last console lines of a running VM, as its host agent read them."""
        from labctl.hosts import protocol as hp
        from labctl.lab import vmrows

        with self.context(of=("vm", name)) as ctx:
            async with ctx.host_client(vmrows.running_host(ctx, name)) as c:
                return (await hp.VM_CONSOLE_TAIL.call(c, hp.ConsoleTailRequest(name, lines),
                                                      timeout=30)).lines

    # ------------------------------------------------------------------ migration
    async def migrate(self, vm: str, to: str, policy: str | Policy | None = None,
                      late_storage: bool | None = None,
                      measure_dirty_rate: bool = False) -> dict[str, Any]:
        """Live-migrate ``vm`` to host ``to`` (see labctl/migration/)."""
        from labctl.datastores import mappings
        from labctl.lab import vmrows
        from labctl.migration import inlab

        with self.lab_context() as whole, whole.lock():
            ctx = whole.in_site(self.pick_site(whole, of=("vm", vm)))
            elsewhere = [s for s in whole.site_names() if s != ctx.site
                         and has(whole.in_site(s).inv, "host", to)]
            if elsewhere and not has(ctx.inv, "host", to):
                raise LabStateError(
                    f"host {to} is in site {elsewhere[0]} and VM {vm} in site {ctx.site}: sites "
                    "share no storage and no management; migrate it to a host of its own site",
                    vm=vm, host=to, site=ctx.site)
            row = vmrows.row(ctx, vm)
            store = row["datastore"]
            if vmrows.is_on_file(ctx, row):
                from labctl.datastores import filestores

                # both hosts open the same files over NFS: the source's chain as it is now
                if late_storage:
                    raise LabStateError(f"VM {vm} is on file datastore {store}: late storage "
                                        "preparation is for a LUN (the chain is opened "
                                        "early)", vm=vm)
                return await inlab.migrate(ctx, vm, to,
                                           sharing=filestores.shown(ctx.inv, store).hosts,
                                           dest_disk=None,
                                           policy=policy, late_storage=False,
                                           measure_dirty_rate=measure_dirty_rate)
            sharing = mappings.mapping(ctx.inv, store).hosts if store else None
            dest_disk = (vmrows.disk(ctx, store, to)  # inlab refuses a host it cannot reach
                         if store and ctx.inv.row("hosts", name=to, kind="host") is not None
                         and to in (sharing or []) else None)
            return await inlab.migrate(ctx, vm, to, sharing=sharing, dest_disk=dest_disk,
                                       policy=policy, late_storage=late_storage,
                                       measure_dirty_rate=measure_dirty_rate)

    async def migrate_to_site(self, vm: str, site: str, host: str | None = None,
                              policy: str | Policy | None = None,
                              compress: bool = False, keep_source: bool = False) -> CrossSite:
        """Live-migrate ``vm`` to site ``site`` through the sites' mobility agents (see
        labctl/lab/crosssite.py); the old datastore is deleted unless ``keep_source``."""
        from labctl.lab import crosssite

        with self.lab_context() as whole:
            src = self.pick_site(whole, of=("vm", vm))
            whole.in_site(site)  # a site the lab has, or a refusal listing them
            return await crosssite.migrate(whole, vm, src, site, host=host, policy=policy,
                                           compress=compress, keep_source=keep_source)

    async def replicate(self, vm: str, cloud: str, switchover: str | dict[str, Any] | None,
                        tracking: str = "era", compress: bool = False,
                        limit_bytes_s: float | None = None, stall_s: float = 30.0,
                        verify: str = "full") -> Any:
        """Replicate server VM ``vm`` to cloud ``cloud`` by agents in its guests and cut
        over (see labctl/lab/replicate.py)."""
        from labctl.lab import replicate

        with self.lab_context() as whole:
            src = self.pick_site(whole, of=("vm", vm))
            whole.in_site(cloud)  # a site the lab has, or a refusal listing them
            return await replicate.replicate(whole, vm, src, cloud, switchover, tracking,
                                             compress, limit_bytes_s, stall_s, verify)

    def replications(self, rid: int | None = None) -> Any:
        """Recorded replications (a list), or replication ``rid``."""
        from labctl.lab import replicate

        with self.lab_context() as whole:
            return replicate.list_all(whole) if rid is None else replicate.show(whole, rid)

    def approve_replication(self, rid: int, withdraw: bool = False) -> Any:
        """Let replication ``rid``'s cutover go (its criterion's ``approved`` is 1), or
        withdraw that (0 again)."""
        from labctl.lab import replicate

        with self.lab_context() as whole:
            return replicate.approve(whole, rid, withdraw)

    def migrations(self, mid: int | None = None) -> Any:
        """Recorded migrations of every site (of the ``--site`` one), a list; or migration
        ``mid`` with its passes and decisions (IDs are per site: an ID two sites have needs
        ``--site``)."""
        from labctl.migration.records import get_migration, has_migration, list_migrations

        with self.lab_context() as lab:
            sites = self.scoped_sites(lab)
            if mid is None:
                many = len(lab.site_names()) > 1
                return [r.replace(site=s.site) if many else r
                        for s in sites for r in list_migrations(s.inv)]
            found = [s for s in sites if has_migration(s.inv, mid)]
            if len(found) > 1:
                raise LabStateError(f"sites {', '.join(str(s.site) for s in found)} each have a "
                                    f"migration {mid}: say which with --site", id=mid)
            if not found:
                raise LabStateError(f"no migration {mid} in this lab (see: labctl migrations)",
                                    id=mid)
            return get_migration(found[0].inv, mid)

    # ------------------------------------------------------------------ status
    async def status(self) -> LabStatus:
        """The lab as its inventories record it and its agents report it now: every site
        (or the ``--site`` one)."""
        from labctl.lab.status import status as lab_status

        with self.lab_context() as lab:
            status = await lab_status(lab)
        return status.only_site(self.site) if self.site else status

    # ------------------------------------------------------------------ down
    async def down(self, purge: bool = False) -> Down:
        """Remove exactly what this lab owns (also after a crash mid-up). Its inventory,
        migration records, events and logs stay in the lab directory (``labctl migration
        show`` still works) unless ``purge``; the next ``up`` of the same name moves them to
        ``<labs>/<lab>.archive/``."""
        from labctl.lab import teardown

        if not self.dir.path.exists():
            raise LabStateError(f"lab {self.name} is not up: nothing to tear down", lab=self.name)
        removed: list[str] = []
        already = self.state() == "down"
        with self.dir.lock():
            if self.dir.exists() and not already:
                with self._opened() as ctx:
                    removed = await teardown.teardown(ctx)
                    _mark_down(ctx)
        if purge:
            shutil.rmtree(self.dir.path, ignore_errors=True)
            self.progress(f"lab {self.name} is down; its directory is deleted")
        elif already:
            self.progress(f"lab {self.name} was already down; its records are in {self.dir.path}")
        else:
            self.progress(f"lab {self.name} is down; its records are kept in {self.dir.path} "
                          "(labctl down --purge deletes them)")
        return Down(lab=self.name, removed=removed, already_down=already,
                    kept=None if purge else str(self.dir.path))


@dataclass(frozen=True)
class Down(Message):
    """What ``labctl down`` did."""

    lab: str
    #: the objects removed, one line each (``process host-agent:h1 (pid 123)``)
    removed: list[str]
    already_down: bool
    #: where the lab's records are kept (None: purged)
    kept: str | None


def _mark_down(lab: LabContext) -> None:
    """The inventories of a lab that is down: nothing runs any more."""
    lab.inv.set_meta("state", "down")
    lab.inv.set_meta("down_at", datetime.now(UTC).isoformat(timespec="seconds"))
    for site in lab.all_sites():
        inv = site.inv
        inv.conn.execute("DELETE FROM meta WHERE key='rescan_ready'")
        inv.conn.execute("UPDATE hosts SET state='down', agent_pid=NULL")
        inv.conn.execute("UPDATE storage_nodes SET state='down'")
        inv.conn.execute("UPDATE vms SET state='stopped', pid=NULL")


#: where each kind of thing a command names is kept in a site's inventory
_KIND_TABLES = {"host": ("hosts",), "vm": ("vms",), "node": ("storage_nodes",),
                "datastore": ("datastores", "file_datastores")}


def names_of(inv: Inventory, kind: str) -> list[str]:
    """The names of every ``kind`` (host, vm, node, datastore) a site's inventory has."""
    return [str(r["name"]) for t in _KIND_TABLES[kind] for r in inv.rows(t)]


def has(inv: Inventory, kind: str, name: str) -> bool:
    """Whether a site's inventory ``inv`` has a ``kind`` (host, vm, node, datastore) called
    ``name``."""
    return any(inv.row(t, name=name) is not None for t in _KIND_TABLES[kind])
