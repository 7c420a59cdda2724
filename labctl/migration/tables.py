"""The migration records' tables in the lab inventory, declared apart from the code that
writes them so that opening an inventory imports no migration code."""

from __future__ import annotations

from labctl.state.inventory import Schema

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
