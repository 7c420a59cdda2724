"""The datastores' tables in the lab inventory, and the one helper that writes what a host
last read of a datastore."""

from __future__ import annotations

from typing import Any

from labctl.state.inventory import Inventory, Schema

#: datastores (ID, node, LUN, backing disk), who shares each (and what each host last
#: read of it), the rescan service's event records and each host's view of each unit
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
CREATE TABLE IF NOT EXISTS host_units (
    host TEXT NOT NULL, unit TEXT NOT NULL, datastore TEXT, state TEXT NOT NULL,
    size_bytes INTEGER, refreshed_at REAL, event INTEGER, PRIMARY KEY (host, unit));
""")


def record_seen(inv: Inventory, datastore: str, host: str, entry: dict[str, Any]) -> None:
    """What ``host`` last read of ``datastore``, from its storage cache ``entry``."""
    inv.update("datastore_hosts", {"datastore": datastore, "host": host},
               seen_naa=entry.get("seen_naa"), seen_size=entry.get("size_bytes"),
               scanned_at=entry.get("scanned_at"))
