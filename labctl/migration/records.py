"""Migration records: each migration, its passes and decisions, written to the lab's
inventory as they happen (the ``migrations``, ``migration_passes`` and
``migration_decisions`` tables, declared in ``labctl.migration.tables``)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from labctl.core.errors import LabStateError
from labctl.core.wire import Json, Message, WallTime, iso_time
from labctl.migration.convergence import Decision
from labctl.migration.policy import Policy
from labctl.migration.protocol import PassRecord
from labctl.migration.result import MigrationResult, Record
from labctl.state.inventory import Inventory


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
            (vm, source, dest, json.dumps(policy.to_wire()), policy.storage, time.time()))
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


def amend_result(inv: Inventory, mid: int, **fields: Json) -> None:
    """Add ``fields`` to migration ``mid``'s stored record (what the driver could not know:
    the other half of a migration between sites)."""
    row = inv.conn.execute("SELECT result FROM migrations WHERE id=?", (mid,)).fetchone()
    if row is None:
        return
    try:
        stored = json.loads(row["result"] or "{}")
    except ValueError:
        stored = {}
    stored.update(fields)
    inv.conn.execute("UPDATE migrations SET result=? WHERE id=?",
                     (json.dumps(stored, default=str), mid))


@dataclass(frozen=True)
class MigrationRow(Message):
    """One line of ``labctl migration list``: the migration's figures without its passes,
    decisions and checks (``migration show ID`` has them all)."""

    id: int
    vm: str
    source: str
    dest: str
    policy: str | None
    storage: str
    #: running, completed, failed or cancelled
    state: str
    started_at: WallTime | None
    finished_at: WallTime | None
    total_ms: float | None
    downtime_ms: float | None
    stop_to_resume_ms: float | None
    blackout_ms: float | None
    passes: int | None
    bytes_sent: int | None
    error: str | None
    #: the site whose controller recorded it (in a lab of several sites)
    site: str | None = None


def has_migration(inv: Inventory, mid: int) -> bool:
    return -(1 << 63) <= mid < 1 << 63 and inv.conn.execute(
        "SELECT 1 FROM migrations WHERE id=?", (mid,)).fetchone() is not None


def list_migrations(inv: Inventory) -> list[MigrationRow]:
    rows = inv.conn.execute(
        "SELECT id, vm, source, dest, policy, storage, state, started, finished, total_ms, "
        "downtime_ms, stop_to_resume_ms, blackout_ms, passes, bytes, error FROM migrations "
        "ORDER BY id").fetchall()
    return [MigrationRow(
        id=r["id"], vm=r["vm"], source=r["source"], dest=r["dest"],
        policy=_policy(r["policy"]).get("name"), storage=r["storage"], state=r["state"],
        started_at=r["started"], finished_at=r["finished"],
        total_ms=r["total_ms"], downtime_ms=r["downtime_ms"],
        stop_to_resume_ms=r["stop_to_resume_ms"], blackout_ms=r["blackout_ms"],
        passes=r["passes"], bytes_sent=r["bytes"], error=r["error"]) for r in rows]


def _policy(text: str | None) -> dict[str, Json]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _iso(t: float | None) -> str | None:
    return None if t is None else iso_time(t)


def get_migration(inv: Inventory, mid: int) -> Record:
    """Migration ``mid`` as one record, the same as ``labctl migrate`` printed for it (a
    :class:`MigrationResult` as JSON): its stored result with its ``id``, ``state``,
    ``pass_records`` and ``decisions`` (kept in their own tables)."""
    # an id past SQLite's 64-bit integers is no id of a row (and would overflow the query)
    row = (inv.conn.execute("SELECT * FROM migrations WHERE id=?", (mid,)).fetchone()
           if -(1 << 63) <= mid < 1 << 63 else None)
    if row is None:
        raise LabStateError(f"no migration {mid} in this lab (see: labctl migrations)", id=mid)
    try:
        stored = json.loads(row["result"] or "{}")
    except ValueError:
        stored = {}
    out: Record = {
        # what the row knows, for a migration that is still running (its result is empty)
        "vm": row["vm"], "source": row["source"], "dest": row["dest"],
        "policy": _policy(row["policy"]).get("name"), "storage": row["storage"],
        "started_at": _iso(row["started"]), "finished_at": _iso(row["finished"]),
        **(stored if isinstance(stored, dict) else {}),
        "id": row["id"], "state": row["state"]}
    out["pass_records"] = [json.loads(p["data"]) for p in inv.conn.execute(
        "SELECT data FROM migration_passes WHERE migration=? ORDER BY pass", (mid,))]
    out["decisions"] = [{"action": x["action"], "reason": x["reason"], "at_pass": x["at_pass"],
                         "t_rel": x["t_rel"], "detail": json.loads(x["detail"] or "{}")}
                        for x in inv.conn.execute(
        "SELECT seq, at_pass, action, reason, t_rel, detail FROM migration_decisions "
        "WHERE migration=? ORDER BY seq", (mid,))]
    return out
