"""A datastore as the inventory maps it and as a host is handed it (its ID, portal, target,
LUN, the initiator it logs in as), read from the inventory alone: a command that only
reads, like ``labctl migrate``, imports none of the datastore service."""

from __future__ import annotations

from dataclasses import dataclass, field

from labctl.core import names
from labctl.core.errors import LabStateError
from labctl.core.wire import Message
from labctl.datastores import protocol as dp
from labctl.datastores.tables import sharing
from labctl.state.inventory import Inventory


@dataclass(frozen=True)
class Backing(Message):
    """A datastore's backing volume: the sparse file on the controller and its virtio serial."""

    path: str
    disk_serial: str


@dataclass(frozen=True)
class Mapping(Message):
    """The inventory's mapping of a datastore: ID -> node, target, LUN, backing volume."""

    name: str
    #: the datastore ID (the LUN's NAA ID, ``naa.…``); None until it was exported
    naa: str | None
    node: str
    portal: str
    target_iqn: str
    #: None until the storage node exported it
    lun: int | None
    backing: Backing
    unit_serial: str
    size_bytes: int
    state: str
    #: the hosts named for it (they see the LUN)
    hosts: list[str]
    #: ``block``: a file datastore is printed as its own record (``kind: file``)
    kind: str = field(default="block", kw_only=True)


def mapping(inv: Inventory, name: str) -> Mapping:
    """The inventory's mapping of datastore ``name``: ID -> node, target, LUN, backing volume."""
    ds = inv.row("datastores", name=name)
    if ds is None:
        known = ", ".join(r["name"] for r in inv.rows("datastores")) or "none"
        raise LabStateError(f"unknown datastore {name!r} (datastores: {known})", datastore=name)
    node = inv.row("storage_nodes", name=ds["node"])
    assert node is not None
    return Mapping(
        naa=ds["naa"], name=name, node=ds["node"], portal=names.portal(node["address"]),
        target_iqn=node["target_iqn"], lun=ds["lun"],
        backing=Backing(path=ds["backing_path"], disk_serial=ds["disk_serial"]),
        unit_serial=ds["unit_serial"], size_bytes=ds["size_bytes"], state=ds["state"],
        hosts=[r.host for r in sharing(inv, datastore=name)])


def unit(inv: Inventory, name: str, host: str) -> dp.Unit:
    """Datastore ``name`` as ``host`` is handed it: its ID, where the host reaches it and as
    which initiator."""
    m = mapping(inv, name)
    h = inv.row("hosts", name=host)
    if h is None:
        raise LabStateError(f"unknown host {host!r}", host=host)
    if m.naa is None or m.lun is None:
        raise LabStateError(f"datastore {name} is not exported yet (state {m.state})",
                            datastore=name, host=host)
    return dp.Unit(naa=m.naa, portal=m.portal, target_iqn=m.target_iqn, lun=m.lun,
                   initiator_iqn=h["initiator_iqn"], datastore=name)


def is_file_datastore(inv: Inventory, name: str) -> bool:
    return inv.row("file_datastores", name=name) is not None
