"""Migration records: each migration, its passes and decisions, written to the lab's
inventory as they happen (the ``migrations``, ``migration_passes`` and
``migration_decisions`` tables, declared here with the feature that owns them)."""

from __future__ import annotations

import json
import time

from labctl.core.errors import LabStateError
from labctl.migration.convergence import Decision
from labctl.migration.policy import Policy
from labctl.migration.protocol import PassRecord
from labctl.migration.result import MigrationResult, Record
from labctl.state.inventory import Inventory, Schema

#: each migration (its result JSON without passes and decisions), its passes and decisions
MIGRATIONS = Schema("migrations", """
CREATE TABLE IF NOT EXISTS migrations (
    id INTEGER PRIMARY KEY AUTOINCREMENT, vm TEXT NOT NULL, source TEXT NOT NULL, dest TEXT NOT NULL,
    policy TEXT NOT NULL, storage TEXT NOT NULL, state TEXT NOT NULL, started REAL NOT NULL,
    finished REAL, total_ms REAL, downtime_ms REAL, blackout_ms REAL, passes INTEGER, bytes INTEGER,
    error TEXT, result TEXT NOT NULL DEFAULT '{}', stop_to_resume_ms REAL);
CREATE TABLE IF NOT EXISTS migration_passes (
    migration INTEGER NOT NULL, pass INTEGER NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (migration, pass));
CREATE TABLE IF NOT EXISTS migration_decisions (
    migration INTEGER NOT NULL, seq INTEGER NOT NULL, at_pass INTEGER, action TEXT NOT NULL,
    reason TEXT NOT NULL, t_rel REAL NOT NULL, detail TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (migration, seq));
""", added_columns=(("migrations", "stop_to_resume_ms", "REAL"),))


class Recorder:
    """Writes a migration, its passes and decisions to the inventory as they happen."""

    def __init__(self, inv: Inventory | None) -> None:
        self.inv = inv
        self.id: int | None = None

    def start(self, vm: str, source: str, dest: str, policy: Policy) -> int | None:
        if self.inv is None:
            return None
        cur = self.inv.conn.execute(
            "INSERT INTO migrations(vm, source, dest, policy, storage, state, started, result) "
            "VALUES (?, ?, ?, ?, ?, 'running', ?, '{}')",
            (vm, source, dest, json.dumps(policy.to_dict()), policy.storage, time.time()))
        self.id = int(cur.lastrowid or 0)
        return self.id

    def add_pass(self, rec: PassRecord) -> None:
        if self.inv is not None and self.id is not None:
            self.inv.conn.execute(
                "INSERT OR REPLACE INTO migration_passes(migration, pass, data) VALUES (?, ?, ?)",
                (self.id, rec.pass_, json.dumps(rec.to_wire())))

    def add_decision(self, seq: int, d: Decision) -> None:
        if self.inv is not None and self.id is not None:
            self.inv.conn.execute(
                "INSERT OR REPLACE INTO migration_decisions(migration, seq, at_pass, action, reason, "
                "t_rel, detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (self.id, seq, d.at_pass, d.action, d.reason, d.t_rel, json.dumps(d.detail)))

    def finish(self, state: str, result: MigrationResult) -> None:
        if self.inv is not None and self.id is not None:
            # passes and decisions have their own tables (get_migration reads them there)
            stored = {k: v for k, v in result.to_wire().items()
                      if k not in ("pass_records", "decisions")}
            self.inv.conn.execute(
                "UPDATE migrations SET state=?, finished=?, total_ms=?, downtime_ms=?, "
                "blackout_ms=?, passes=?, bytes=?, error=?, result=?, stop_to_resume_ms=? "
                "WHERE id=?",
                (state, time.time(), result.total_ms, result.downtime_ms, result.blackout_ms,
                 result.passes, result.bytes_sent, result.error,
                 json.dumps(stored, default=str), result.stop_to_resume_ms, self.id))


def list_migrations(inv: Inventory) -> list[Record]:
    rows = inv.conn.execute(
        "SELECT id, vm, source, dest, policy, storage, state, started, finished, total_ms, "
        "downtime_ms, stop_to_resume_ms, blackout_ms, passes, bytes, error FROM migrations "
        "ORDER BY id").fetchall()
    out = []
    for r in rows:
        d = dict(r)
        d["policy"] = json.loads(d["policy"]).get("name")
        out.append(d)
    return out


def get_migration(inv: Inventory, mid: int) -> Record:
    """Migration ``mid`` as stored: its row, ``policy`` and ``result`` decoded, with its
    ``pass_records`` and ``decisions``."""
    # an id past SQLite's 64-bit integers is no id of a row (and would overflow the query)
    row = (inv.conn.execute("SELECT * FROM migrations WHERE id=?", (mid,)).fetchone()
           if -(1 << 63) <= mid < 1 << 63 else None)
    if row is None:
        raise LabStateError(f"no migration {mid} in this lab (see: labctl migrations)", id=mid)
    d = dict(row)
    d["policy"] = json.loads(d["policy"])
    d["result"] = json.loads(d["result"] or "{}")
    d["pass_records"] = [json.loads(p["data"]) for p in inv.conn.execute(
        "SELECT data FROM migration_passes WHERE migration=? ORDER BY pass", (mid,))]
    d["decisions"] = [dict(x) | {"detail": json.loads(x["detail"] or "{}")} for x in inv.conn.execute(
        "SELECT seq, at_pass, action, reason, t_rel, detail FROM migration_decisions "
        "WHERE migration=? ORDER BY seq", (mid,))]
    return d


