"""The tables of the replication idea, declared apart from its code so that opening an
inventory imports none of it: a libvirt cloud's VMs (in its site's inventory), and the
replications with their passes (in the lab's own: the operator who holds both clouds'
credentials runs them)."""

from __future__ import annotations

from labctl.state.inventory import Schema

CLOUDS = Schema("clouds", """
CREATE TABLE IF NOT EXISTS cloud_vms (
    name TEXT PRIMARY KEY, domain TEXT NOT NULL, address TEXT NOT NULL, mac TEXT NOT NULL,
    memory INTEGER NOT NULL, vcpus INTEGER NOT NULL, root TEXT NOT NULL,
    root_format TEXT NOT NULL, disks TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS replications (
    id INTEGER PRIMARY KEY AUTOINCREMENT, vm TEXT NOT NULL, from_site TEXT NOT NULL,
    to_site TEXT NOT NULL, started_at REAL NOT NULL, state TEXT NOT NULL,
    result TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS replication_passes (
    replication INTEGER NOT NULL, n INTEGER NOT NULL, record TEXT NOT NULL,
    PRIMARY KEY (replication, n));
""")
