"""The lab's inventory: one SQLite file in the lab directory.

It holds what the lab is (hosts, storage nodes, datastores with their LUN
identity, VMs, who sees which datastore) and the ownership journal: every
object the lab creates outside its directory is written to ``resources``
*before* it is created and removed from it only after it is gone, so teardown
finds everything even after the controller was killed mid-``up``.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labctl.core.errors import LabStateError


@dataclass(frozen=True)
class Schema:
    """Tables one part of labctl owns in the inventory, declared next to that part:
    ``CREATE TABLE IF NOT EXISTS`` statements and columns added after a table first
    shipped (``(table, column, declaration)``, added to older inventories on open)."""

    name: str
    sql: str
    added_columns: tuple[tuple[str, str, str], ...] = ()


#: the lab's own tables: what the lab is (sites, hosts, storage nodes, VMs), its bring-up
#: steps and the ownership journal (``resources``)
LAB = Schema("lab", """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS resources (
    id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, name TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL, UNIQUE (kind, name));
CREATE TABLE IF NOT EXISTS sites (name TEXT PRIMARY KEY, subnet TEXT NOT NULL, bridge TEXT NOT NULL,
    provider TEXT NOT NULL DEFAULT 'labctl');
CREATE TABLE IF NOT EXISTS hosts (
    name TEXT PRIMARY KEY, site TEXT NOT NULL, address TEXT NOT NULL, initiator_iqn TEXT NOT NULL,
    netns TEXT NOT NULL, veth TEXT NOT NULL, agent_port INTEGER NOT NULL, memory INTEGER NOT NULL,
    agent_pid INTEGER, state TEXT NOT NULL DEFAULT 'defined', kind TEXT NOT NULL DEFAULT 'host',
    ssh TEXT);
CREATE TABLE IF NOT EXISTS storage_nodes (
    name TEXT PRIMARY KEY, site TEXT NOT NULL, address TEXT NOT NULL, target_iqn TEXT NOT NULL,
    domain TEXT NOT NULL, tap TEXT NOT NULL, agent_port INTEGER NOT NULL, capacity INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'defined', memory INTEGER NOT NULL DEFAULT 268435456,
    domain_type TEXT NOT NULL DEFAULT 'qemu', mac TEXT, ssh TEXT);
CREATE TABLE IF NOT EXISTS vms (
    name TEXT PRIMARY KEY, host TEXT NOT NULL, datastore TEXT, memory INTEGER NOT NULL,
    vcpus INTEGER NOT NULL, dirty_rate REAL NOT NULL, working_set INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'stopped', pid INTEGER, started_at REAL,
    heartbeat_ms INTEGER NOT NULL DEFAULT 100, base TEXT, disk_file TEXT,
    guest TEXT NOT NULL DEFAULT 'test', address TEXT, mac TEXT, app_rate REAL, disk_size INTEGER);
CREATE TABLE IF NOT EXISTS steps (name TEXT NOT NULL, seconds REAL NOT NULL, at REAL NOT NULL);
""", added_columns=(("vms", "heartbeat_ms", "INTEGER NOT NULL DEFAULT 100"),
                      ("vms", "base", "TEXT"), ("vms", "disk_file", "TEXT"),
                      ("storage_nodes", "memory", "INTEGER NOT NULL DEFAULT 268435456"),
                      ("storage_nodes", "domain_type", "TEXT NOT NULL DEFAULT 'qemu'"),
                      ("storage_nodes", "mac", "TEXT"),
                      ("hosts", "kind", "TEXT NOT NULL DEFAULT 'host'"),
                      ("vms", "guest", "TEXT NOT NULL DEFAULT 'test'"), ("vms", "address", "TEXT"),
                      ("vms", "mac", "TEXT"), ("vms", "app_rate", "REAL"),
                      ("vms", "disk_size", "INTEGER"),
                      ("sites", "provider", "TEXT NOT NULL DEFAULT 'labctl'"),
                      ("hosts", "ssh", "TEXT"), ("storage_nodes", "ssh", "TEXT")))


class Inventory:
    """A thin typed face over the lab's SQLite file. Open with ``Inventory.open(path)``."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    @classmethod
    def open(cls, path: Path, schemas: Iterable[Schema] = ()) -> Inventory:
        """Open (or create) the inventory at ``path`` with the lab's tables and those of
        ``schemas`` (each feature's own, created once here, not on every read). A file that
        cannot be opened or is no SQLite database is a LabStateError naming it."""
        try:
            conn = sqlite3.connect(path, isolation_level=None, timeout=30)
        except sqlite3.Error as exc:
            raise LabStateError(f"cannot open the inventory {path}: {exc}", path=str(path)) from None
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            for schema in (LAB, *schemas):
                conn.executescript(schema.sql)
                for table, column, decl in schema.added_columns:  # made before it existed
                    have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
                    if column not in have:
                        conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
        except sqlite3.OperationalError as exc:  # locked, read-only, unreadable
            conn.close()
            raise LabStateError(f"cannot open the inventory {path}: {exc}", path=str(path)) from None
        except sqlite3.DatabaseError as exc:  # the file is damaged, or no database at all
            conn.close()
            raise LabStateError(f"the inventory {path} is damaged ({exc}): labctl cannot tell "
                                "what this lab created; move its directory aside to start over",
                                path=str(path)) from None
        return cls(conn)

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # -- meta -------------------------------------------------------------
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return str(row[0]) if row else default

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    # -- ownership journal -----------------------------------------------
    def own(self, kind: str, name: str, **detail: Any) -> None:
        """Record that the lab is about to create ``kind``/``name``. Call *before* creating it."""
        self.conn.execute(
            "INSERT INTO resources(kind, name, detail, created) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(kind, name) DO UPDATE SET detail=excluded.detail",
            (kind, name, json.dumps(detail), time.time()),
        )

    def disown(self, kind: str, name: str) -> None:
        self.conn.execute("DELETE FROM resources WHERE kind=? AND name=?", (kind, name))

    def owned(self, kind: str | None = None) -> list[tuple[str, str, dict[str, Any]]]:
        """Owned objects, newest first (the order to remove them in)."""
        sql = "SELECT kind, name, detail FROM resources"
        args: tuple[str, ...] = ()
        if kind is not None:
            sql += " WHERE kind=?"
            args = (kind,)
        rows = self.conn.execute(sql + " ORDER BY id DESC", args).fetchall()
        return [(r["kind"], r["name"], json.loads(r["detail"])) for r in rows]

    # -- rows -------------------------------------------------------------
    def upsert(self, table: str, **row: Any) -> None:
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        self.conn.execute(f"INSERT OR REPLACE INTO {table}({cols}) VALUES ({marks})",
                          tuple(row.values()))

    def update(self, table: str, key: dict[str, Any], **values: Any) -> None:
        sets = ", ".join(f"{k}=?" for k in values)
        where = " AND ".join(f"{k}=?" for k in key)
        self.conn.execute(f"UPDATE {table} SET {sets} WHERE {where}",
                          (*values.values(), *key.values()))

    def rows(self, table: str, **where: Any) -> list[dict[str, Any]]:
        sql = f"SELECT * FROM {table}"
        if where:
            sql += " WHERE " + " AND ".join(f"{k}=?" for k in where)
        return [dict(r) for r in self.conn.execute(sql + " ORDER BY rowid", tuple(where.values()))]

    def row(self, table: str, **where: Any) -> dict[str, Any] | None:
        found = self.rows(table, **where)
        return found[0] if found else None

    def record_step(self, name: str, seconds: float) -> None:
        self.conn.execute("INSERT INTO steps(name, seconds, at) VALUES (?, ?, ?)",
                          (name, seconds, time.time()))
