"""The datastores' tables in the lab inventory, their rows as types, and the one helper
that writes what a host last read of a datastore."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from labctl.core.wire import Json, Message, WallTime, iso_time
from labctl.state.inventory import Inventory, Schema

if TYPE_CHECKING:  # a type only: opening an inventory needs no protocol module
    from labctl.datastores.protocol import CacheEntry

R = TypeVar("R")

#: datastores (ID, node, LUN, backing disk), who shares each (and what each host last
#: read of it), the rescan service's event records and each host's view of each unit;
#: file datastores (ID, node, export, backing disk) and the hosts they are exported to
DATASTORES = Schema("datastores", """
CREATE TABLE IF NOT EXISTS datastores (
    name TEXT PRIMARY KEY, node TEXT NOT NULL, size_bytes INTEGER NOT NULL, unit_serial TEXT NOT NULL,
    naa TEXT, lun INTEGER, disk_serial TEXT NOT NULL, backing_path TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'defined', created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS datastore_hosts (
    datastore TEXT NOT NULL, host TEXT NOT NULL, seen_naa TEXT, seen_size INTEGER, scanned_at REAL,
    PRIMARY KEY (datastore, host));
CREATE TABLE IF NOT EXISTS rescan_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, source TEXT NOT NULL,
    kind TEXT NOT NULL, unit TEXT, datastore TEXT, detail TEXT NOT NULL DEFAULT '{}',
    state TEXT NOT NULL, coalesced_into INTEGER, lookup TEXT, size_bytes INTEGER,
    expected TEXT, hosts_sharing TEXT, hosts_polled TEXT, hosts_refreshed TEXT,
    hosts_stale TEXT, hosts_disagree TEXT, hosts_late TEXT NOT NULL DEFAULT '[]',
    scsi_commands TEXT, vms_resized TEXT, agreed_ms REAL, agreed_at REAL, finished REAL,
    message TEXT);
CREATE TABLE IF NOT EXISTS file_datastores (
    name TEXT PRIMARY KEY, node TEXT NOT NULL, size_bytes INTEGER NOT NULL, unit_serial TEXT NOT NULL,
    naa TEXT NOT NULL, disk_serial TEXT NOT NULL, backing_path TEXT NOT NULL, export TEXT,
    state TEXT NOT NULL DEFAULT 'defined', created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS file_datastore_hosts (
    datastore TEXT NOT NULL, host TEXT NOT NULL, checked_at REAL, check_error TEXT,
    PRIMARY KEY (datastore, host));
CREATE TABLE IF NOT EXISTS host_units (
    host TEXT NOT NULL, unit TEXT NOT NULL, datastore TEXT, state TEXT NOT NULL,
    size_bytes INTEGER, refreshed_at REAL, event INTEGER, PRIMARY KEY (host, unit));
""")




@dataclass(frozen=True)
class Datastore:
    """A row of ``datastores``: a datastore's ID (``naa``), where it lives and its state."""

    name: str
    node: str
    size_bytes: int
    unit_serial: str
    naa: str | None
    lun: int | None
    disk_serial: str
    backing_path: str
    state: str
    created: float


@dataclass(frozen=True)
class Sharing:
    """A row of ``datastore_hosts``: a host named for a datastore and what it last read."""

    datastore: str
    host: str
    seen_naa: str | None
    seen_size: int | None
    scanned_at: WallTime | None


@dataclass(frozen=True)
class HostUnit:
    """A row of ``host_units``: the rescan service's view of one host's copy of one unit
    (``fresh``, ``stale``, ``unknown`` or ``disagree``) and the event that last set it."""

    host: str
    unit: str
    datastore: str | None
    state: str
    size_bytes: int | None
    refreshed_at: float | None
    event: int | None


@dataclass(frozen=True)
class RescanEvent(Message):
    """A row of ``rescan_events`` with its JSON columns decoded: one event and the outcome
    of the round that handled it, as ``labctl events --json`` prints it. ``detail`` is the
    event's data as it came, ``expected`` the storage's state the round wanted,
    ``vms_resized`` one object per VM told the new size."""

    id: int
    at: WallTime
    source: str
    kind: str
    #: the datastore ID the event is about (``naa.…``), None for an event about no datastore
    naa: str | None
    datastore: str | None
    detail: Json
    state: str
    coalesced_into: int | None
    lookup: str | None
    size_bytes: int | None
    expected: Json
    hosts_sharing: list[str] | None
    hosts_polled: list[str] | None
    hosts_refreshed: list[str] | None
    hosts_stale: list[str] | None
    hosts_disagree: list[str] | None
    hosts_late: list[str]
    scsi_commands: dict[str, int] | None
    vms_resized: list[Json] | None
    agreed_ms: float | None
    agreed_at: WallTime | None
    finished_at: WallTime | None
    message: str | None
    #: the site whose rescan service recorded it (in a lab of several sites)
    site: str | None = None


#: the columns of rescan_events that hold JSON
_JSON_COLUMNS = ("detail", "hosts_sharing", "hosts_polled", "hosts_refreshed", "hosts_stale",
                 "hosts_disagree", "hosts_late", "scsi_commands", "vms_resized", "expected")


def typed_rows(inv: Inventory, cls: type[R], table: str, **where: Any) -> list[R]:
    """The rows of ``table`` matching ``where`` as ``cls`` (a dataclass naming the columns
    it wants)."""
    want = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return [cls(**{k: v for k, v in r.items() if k in want}) for r in inv.rows(table, **where)]


def datastore(inv: Inventory, **where: Any) -> Datastore | None:
    """The datastore matching ``where`` (``name=`` or ``naa=``), or None."""
    found = typed_rows(inv, Datastore, "datastores", **where)
    return found[0] if found else None


def datastores(inv: Inventory, **where: Any) -> list[Datastore]:
    return typed_rows(inv, Datastore, "datastores", **where)


def sharing(inv: Inventory, **where: Any) -> list[Sharing]:
    return typed_rows(inv, Sharing, "datastore_hosts", **where)


def host_units(inv: Inventory, **where: Any) -> list[HostUnit]:
    return typed_rows(inv, HostUnit, "host_units", **where)


def rescan_events(inv: Inventory, where: str = "", args: tuple[object, ...] = ()
                  ) -> list[RescanEvent]:
    """Rows of ``rescan_events`` (``where``: an SQL condition on ``args``), by id."""
    sql = "SELECT * FROM rescan_events" + (f" WHERE {where}" if where else "") + " ORDER BY id"
    out = []
    for r in inv.conn.execute(sql, args).fetchall():
        row = dict(r)
        row["naa"] = row.pop("unit")  # the column predates the one name for an ID
        row["finished_at"] = row.pop("finished")  # and the one name for a time
        for k in ("at", "agreed_at", "finished_at"):  # Unix time in the table
            if row[k] is not None:
                row[k] = iso_time(row[k])
        for k in _JSON_COLUMNS:
            if row.get(k) is not None:
                row[k] = json.loads(row[k])
        out.append(RescanEvent.from_wire(row, f"rescan event #{row.get('id')}"))
    return out


def record_seen(inv: Inventory, datastore: str, host: str, entry: CacheEntry) -> None:
    """What ``host`` last read of ``datastore``, from its storage cache ``entry``."""
    inv.update("datastore_hosts", {"datastore": datastore, "host": host},
               seen_naa=entry.seen_naa, seen_size=entry.size_bytes,
               scanned_at=entry.scanned_at)
