"""A lab VM's inventory row and what is read from it (its host, its disk as a host reaches
it), apart from the VM operations in :mod:`labctl.lab.vms`: a migration or a console
command reads these and needs none of the datastore service."""

from __future__ import annotations

from typing import Any

from labctl.core.errors import LabStateError
from labctl.datastores import mappings
from labctl.hosts import protocol as hp
from labctl.state.context import LabContext


def row(ctx: LabContext, name: str) -> dict[str, Any]:
    """The inventory row of VM ``name``; a clear error naming the VMs there are."""
    vm = ctx.inv.row("vms", name=name)
    if vm is None:
        known = ", ".join(r["name"] for r in ctx.inv.rows("vms")) or "none"
        raise LabStateError(f"unknown VM {name!r} (VMs: {known})", vm=name)
    return vm


def disk(ctx: LabContext, datastore: str | None, host: str) -> hp.IscsiDisk | None:
    """The VM disk on ``datastore`` as ``host`` reaches it (its own initiator name)."""
    if not datastore:
        return None
    u = mappings.unit(ctx.inv, datastore, host)
    return hp.IscsiDisk(portal=u.portal, target_iqn=u.target_iqn, lun=u.lun,
                        initiator_iqn=u.initiator_iqn, naa=u.naa)


def is_on_file(ctx: LabContext, vm: dict[str, Any]) -> bool:
    return bool(vm["datastore"]) and mappings.is_file_datastore(ctx.inv, vm["datastore"])


def running_host(ctx: LabContext, name: str) -> str:
    """The host VM ``name`` runs on; LabStateError if it does not run."""
    vm = row(ctx, name)
    if vm["state"] != "running":
        raise LabStateError(f"VM {name} is not running", vm=name)
    return str(vm["host"])
