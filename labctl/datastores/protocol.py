"""The host's storage protocol: the controller and the rescan service ask a host agent
about the datastores it sees (its storage cache), and the host publishes storage events
it notices. Imports only ``labctl.core``.

Every method is answered by the host agent (its storage cache,
:mod:`labctl.datastores.hostcache`); the callers are the datastore service, the lab's
VM start, the CLI and the rescan service. Events are published by the host agent as
``Message.to_wire()`` and decoded with :func:`decode_event` by the rescan service.

A unit is a datastore by its ID: the LUN's NAA ID, ``naa.`` + 32 hex digits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from labctl.core.wire import Empty, Json, Message, Method, WallTime

#: what a host last found for a unit: ``new`` (never scanned), ``ok`` (the LUN reports
#: the unit's ID), ``mismatch`` (it reports another ID), ``unreachable`` (login failed),
#: ``error`` (any other failure)
UnitState = Literal["new", "ok", "unreachable", "mismatch", "error"]


# --- what the controller hands a host ----------------------------------------------------

@dataclass(frozen=True)
class Unit(Message):
    """A datastore's mapping as the controller hands it to one host: its ID and where the
    host reaches it (portal, target, LUN) as which initiator."""

    #: the datastore ID (``naa.…``)
    naa: str
    #: ``ip:port`` of the storage node's iSCSI portal
    portal: str
    target_iqn: str
    lun: int
    #: the host's own initiator name (the storage's ACL names it)
    initiator_iqn: str
    #: the datastore's name, for people reading the cache
    datastore: str | None = None


# --- the host's cache --------------------------------------------------------------------

@dataclass(frozen=True)
class CacheEntry(Message):
    """What a host knows of one unit: the mapping it was handed and what it last read."""

    #: the datastore ID (``naa.…``); ``seen_naa`` is what the LUN itself last reported
    naa: str
    datastore: str | None
    portal: str
    target_iqn: str
    lun: int
    #: capacity the LUN reported at the last successful scan
    size_bytes: int | None
    state: UnitState
    #: the NAA ID the LUN reported at the last successful scan
    seen_naa: str | None
    #: the last scan
    scanned_at: WallTime | None
    scans: int
    #: SCSI commands this host sent for this unit, in all
    scsi_commands: int
    #: why the last scan did not end ``ok``
    error: str | None


@dataclass(frozen=True)
class Scan(CacheEntry):
    """A cache entry right after a scan, with the SCSI commands that scan sent."""

    commands_this_scan: int


@dataclass(frozen=True)
class StorageAttach(Message):
    """Request of ``storage_attach``: take over these mappings and scan each unit."""

    units: list[Unit]


@dataclass(frozen=True)
class Attached(Message):
    """Reply of ``storage_attach``: each unit's scan, in the order asked."""

    units: list[Scan]


@dataclass(frozen=True)
class UnitIds(Message):
    """Request of ``storage_forget`` (the units to drop) and its reply (those dropped)."""

    units: list[str]


@dataclass(frozen=True)
class Refresh(Message):
    """Request of ``storage_refresh``: re-read one unit. A refresh the controller asked
    for (``origin="controller"``) raises no event, so a refresh cannot trigger itself."""

    naa: str
    origin: str = "controller"


@dataclass(frozen=True)
class Rescan(Message):
    """Request of ``storage_rescan``: one unit, or (None) every unit plus discovery."""

    naa: str | None = None


@dataclass(frozen=True)
class Discovered(Message):
    """A LUN a known target shows this host (REPORT LUNS), or why the target could not be
    asked (``error``; lun, size and mapped None)."""

    portal: str
    target_iqn: str | None = None
    lun: int | None = None
    size_bytes: int | None = None
    #: the host has a mapping for this target and LUN
    mapped: bool | None = None
    error: str | None = None


@dataclass(frozen=True)
class Rescanned(Message):
    """Reply of ``storage_rescan``."""

    units: list[Scan]
    discovered: list[Discovered]


@dataclass(frozen=True)
class UnitId(Message):
    """Request of ``storage_lookup``: one unit by its ID."""

    naa: str


@dataclass(frozen=True)
class Lookup(Message):
    """Reply of ``storage_lookup``: whether the host shares the unit, from its cache alone
    (no SCSI command; how the rescan service polls hosts)."""

    host: str
    naa: str
    shares: bool
    entry: CacheEntry | None


@dataclass(frozen=True)
class HostCache(Message):
    """Reply of ``storage_cache``: the host's whole cache."""

    host: str
    #: every SCSI command this host agent sent (scans, discovery, probes)
    scsi_commands: int
    units: list[CacheEntry]


@dataclass(frozen=True)
class Report(Message):
    """Request of ``storage_report``: something noticed about a unit outside the agent
    (``kind``: ``io_error``, ``unit_attention`` or ``host_capacity_changed``), published
    as that event."""

    kind: str
    naa: str
    detail: dict[str, Json] | None = None


@dataclass(frozen=True)
class Reported(Message):
    """Reply of ``storage_report``."""

    host: str
    naa: str
    kind: str


@dataclass(frozen=True)
class VmSize(Message):
    """Request and reply of ``vm_block_resize``: VM ``name``'s disk is ``size_bytes``."""

    name: str
    size_bytes: int


@dataclass(frozen=True)
class NfsCheck(Message):
    """Request of ``nfs_check``: can this host read file datastore ``export`` of ``server``
    with QEMU's own NFS client (the way its VMs open their disks)?"""

    server: str
    export: str


@dataclass(frozen=True)
class NfsChecked(Message):
    """Reply of ``nfs_check``: ``error`` says why not (None: it can)."""

    server: str
    export: str
    error: str | None
    seconds: float


STORAGE_ATTACH = Method("storage_attach", StorageAttach, Attached)
STORAGE_FORGET = Method("storage_forget", UnitIds, UnitIds)
STORAGE_REFRESH = Method("storage_refresh", Refresh, Scan)
STORAGE_RESCAN = Method("storage_rescan", Rescan, Rescanned)
STORAGE_LOOKUP = Method("storage_lookup", UnitId, Lookup)
STORAGE_CACHE = Method("storage_cache", Empty, HostCache)
STORAGE_REPORT = Method("storage_report", Report, Reported)
VM_BLOCK_RESIZE = Method("vm_block_resize", VmSize, VmSize)


# --- events ------------------------------------------------------------------------------
# Each names the host, when it noticed (time.time()) and the unit first.

EVENT_HOST_CAPACITY_CHANGED = "host_capacity_changed"
EVENT_UNIT_ATTENTION = "unit_attention"
EVENT_IO_ERROR = "io_error"
#: events a host publishes about a unit
HOST_EVENTS = (EVENT_HOST_CAPACITY_CHANGED, EVENT_UNIT_ATTENTION, EVENT_IO_ERROR)


@dataclass(frozen=True)
class HostCapacityChanged(Message):
    """Event ``host_capacity_changed``: a scan the host made by itself read a new size."""

    host: str
    at: float
    naa: str
    datastore: str | None
    previous_size_bytes: int
    size_bytes: int


@dataclass(frozen=True)
class UnitAttention(Message):
    """Event ``unit_attention``: a SCSI command got CHECK CONDITION / UNIT ATTENTION."""

    host: str
    at: float
    naa: str
    sense_key: int
    ascq: int


@dataclass(frozen=True)
class IoError(Message):
    """Event ``io_error``: QEMU's BLOCK_IO_ERROR on a VM's disk (``detail`` is QEMU's event
    data as it came); ``unit`` is None when the disk is on no unit the host knows."""

    host: str
    at: float
    naa: str | None
    vm: str
    detail: Json


@dataclass(frozen=True)
class StorageReported(Message):
    """Any host event raised through ``storage_report`` (the event's name is the report's
    kind): the reporter's ``detail`` as it came."""

    host: str
    at: float
    naa: str
    detail: dict[str, Json]
    reported: bool = True


HostEvent = HostCapacityChanged | UnitAttention | IoError | StorageReported

#: the type of each host event raised by the host itself (not through storage_report)
EVENTS: dict[str, type[HostCapacityChanged | UnitAttention | IoError]] = {
    EVENT_HOST_CAPACITY_CHANGED: HostCapacityChanged,
    EVENT_UNIT_ATTENTION: UnitAttention,
    EVENT_IO_ERROR: IoError,
}


def decode_event(kind: str, data: object) -> HostEvent | None:
    """The typed form of host storage event ``kind`` (ProtocolError if ``data`` does not
    fit it); None for an event that is not a storage event (e.g. ``vm_exited``)."""
    cls = EVENTS.get(kind)
    if cls is None:
        return None
    where = f"host event {kind}"
    if isinstance(data, dict) and data.get("reported") is True:
        return StorageReported.from_wire(data, where)
    return cls.from_wire(data, where)
NFS_CHECK = Method("nfs_check", NfsCheck, NfsChecked)
