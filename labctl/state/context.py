"""The context a feature is handed to work in one management domain of a lab: its name and
directory, its open inventory, the lab lock, authenticated clients for its agents, and a
progress sink.

A lab has two kinds of domain. Each **site** is one: its own inventory (hosts, storage
nodes, datastores, VMs and their records), its own secret (held by its agents and by no
other site's), its own rescan service. A site's context sees only that: asking it for
another site's host is "unknown host". The **lab's own** context (``site`` None) is the
operator's of the whole testbed: the sites' bridges, the WAN links between them, and each
site's context (:meth:`LabContext.in_site`) for what spans sites (routes across a WAN
link, a chain copied from one site's datastore to another's).

Features (datastores, migration, ...) take a :class:`LabContext` instead of calling back
into the :class:`~labctl.lab.face.Lab` face; the face (and the CLI, scenarios and tests)
make one with ``Lab.context()``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass, field

from labctl.core.errors import LabStateError
from labctl.core.rpc import RpcClient
from labctl.core.secret import derived
from labctl.state.inventory import Inventory, Schema
from labctl.state.labdir import LabDir

Progress = Callable[[str], None]


def quiet(_: str) -> None:
    """A progress sink that drops every line."""


@dataclass
class LabContext:
    """One domain of a lab, opened: see the module docstring. The inventory is the caller's
    to close (the lab context closes the site contexts it opened)."""

    name: str
    dir: LabDir
    #: this domain's inventory: a site's own, or the lab's
    inv: Inventory
    progress: Progress = quiet
    #: the site this context is the controller of; None for the lab's own context
    site: str | None = None
    #: a site's view of the lab: the lab's inventory (its sites, the WAN links between them);
    #: None for the lab's own context, whose ``inv`` it is
    lab_inv: Inventory | None = None
    #: the lab context's site contexts opened so far (by :meth:`in_site`)
    opened: dict[str, LabContext] = field(default_factory=dict)
    #: the schemas a site's inventory is opened with (the features')
    schemas: tuple[Schema, ...] = ()

    @property
    def shared(self) -> Inventory:
        """The inventory of what the sites share: the sites themselves and the WAN links."""
        return self.lab_inv if self.lab_inv is not None else self.inv

    def secret(self) -> bytes:
        """The secret of this domain's agents: the site's, or the lab's (the WAN routers')."""
        return self.dir.site_secret(self.site) if self.site else self.dir.secret()

    def storage_peer_key(self) -> bytes:
        """The key the storage nodes of every site share to read each other's files (a
        chain copy between sites), derived from the lab's secret; it opens ``file_send``
        and nothing else on a node."""
        return derived(self.dir.secret(), "storage-peer")

    def site_names(self) -> list[str]:
        """The lab's sites, in the topology's order."""
        return [str(r["name"]) for r in self.shared.rows("sites")]

    def in_site(self, site: str) -> LabContext:
        """Site ``site``'s context, opened once from the lab's own context (which closes it)."""
        if self.site is not None:
            if site == self.site:
                return self
            raise LabStateError(f"site {self.site}'s controller cannot work in site {site}",
                                site=site)
        if site not in self.opened:
            if site not in self.site_names():
                known = ", ".join(self.site_names()) or "none"
                raise LabStateError(f"lab {self.name} has no site {site!r} (sites: {known})",
                                    site=site)
            self.opened[site] = LabContext(self.name, self.dir,
                                           self.dir.site_inventory(site, self.schemas),
                                           self.progress, site=site, lab_inv=self.inv)
        return self.opened[site]

    def all_sites(self) -> list[LabContext]:
        """Every site's context (from the lab's own context)."""
        return [self.in_site(s) for s in self.site_names()]

    def close_sites(self) -> None:
        for ctx in self.opened.values():
            ctx.inv.close()
        self.opened.clear()

    @contextmanager
    def lock(self) -> Iterator[None]:
        """The lab lock: two labctl commands never change one lab at once."""
        with self.dir.lock():
            yield

    def host_client(self, host: str,
                    timeout: float = 5.0) -> AbstractAsyncContextManager[RpcClient]:
        """An authenticated connection to ``host``'s agent (closed on exit)."""
        return self._agent_client("hosts", "host", host, timeout)

    def storage_client(self, node: str,
                       timeout: float = 5.0) -> AbstractAsyncContextManager[RpcClient]:
        """An authenticated connection to storage node ``node``'s agent (closed on exit)."""
        return self._agent_client("storage_nodes", "storage node", node, timeout)

    @asynccontextmanager
    async def _agent_client(self, table: str, kind: str, name: str,
                            timeout: float) -> AsyncIterator[RpcClient]:
        row = self.inv.row(table, name=name)
        if row is None:
            known = ", ".join(r["name"] for r in self.inv.rows(table)) or "none"
            raise LabStateError(f"unknown {kind} {name!r} ({kind}s: {known})", name=name)
        client = await RpcClient.connect(str(row["address"]), int(row["agent_port"]),
                                         self.secret(), timeout=timeout,
                                         peer=f"{kind} {name}")
        try:
            yield client
        finally:
            await client.close()
