"""The context a feature is handed to work on one lab: its name and directory, its open
inventory, the lab lock, authenticated clients for its agents, and a progress sink.

Features (datastores, migration, ...) take a :class:`LabContext` instead of calling back
into the :class:`~labctl.lab.face.Lab` face; the face (and the CLI, scenarios and tests)
make one with ``Lab.context()``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass

from labctl.core.errors import LabStateError
from labctl.core.rpc import RpcClient
from labctl.state.inventory import Inventory
from labctl.state.labdir import LabDir

Progress = Callable[[str], None]


def quiet(_: str) -> None:
    """A progress sink that drops every line."""


@dataclass
class LabContext:
    """One lab, opened: see the module docstring. The inventory is the caller's to close."""

    name: str
    dir: LabDir
    inv: Inventory
    progress: Progress = quiet

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
                                         self.dir.secret(), timeout=timeout,
                                         peer=f"{kind} {name}")
        try:
            yield client
        finally:
            await client.close()
