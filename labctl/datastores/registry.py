"""The datastore ID registry: every NAA ID ever issued on this machine, across labs and
storage nodes, so an ID is never handed out twice (also after a delete). SQLite under
``labctl.core.paths.home()``, outside every lab."""

from __future__ import annotations

import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from labctl.core import paths
from labctl.core.errors import LabStateError, StorageNodeError
from labctl.core.ids import naa_from_unit_serial


@dataclass(frozen=True)
class IssuedId:
    """One ID the registry issued: to which lab, node and datastore, and when."""

    naa: str
    unit_serial: str
    lab: str
    lab_dir: str
    node: str
    datastore: str
    issued: float
    released: float | None  # when its datastore was deleted (the ID stays taken)


class IdRegistry:
    """Every datastore ID ever issued on this machine (all labs, all storage nodes)."""

    _SCHEMA = """
    CREATE TABLE IF NOT EXISTS ids (
        naa TEXT PRIMARY KEY, unit_serial TEXT NOT NULL UNIQUE, lab TEXT NOT NULL,
        lab_dir TEXT NOT NULL, node TEXT NOT NULL, datastore TEXT NOT NULL,
        issued REAL NOT NULL, released REAL);
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or paths.home() / "registry" / "datastore-ids.db"

    def _conn(self) -> sqlite3.Connection:
        paths.make_dir(self.path.parent)
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        except sqlite3.Error as exc:
            raise LabStateError(f"cannot open the datastore ID registry {self.path}: {exc}",
                                registry=str(self.path)) from None
        try:
            conn.row_factory = sqlite3.Row
            conn.executescript(self._SCHEMA)
        except sqlite3.DatabaseError as exc:  # locked, unreadable, or no database at all
            conn.close()
            raise LabStateError(f"cannot read the datastore ID registry {self.path} ({exc})",
                                registry=str(self.path)) from None
        return conn

    def issue(self, lab: str, lab_dir: Path, node: str, datastore: str) -> tuple[str, str]:
        """A fresh (unit serial, NAA ID) pair, recorded before it is returned."""
        conn = self._conn()
        try:
            for _ in range(64):
                serial = uuid.uuid4().hex  # 32 hex digits; LIO's NAA keeps the first 25
                naa = "naa." + naa_from_unit_serial(serial)
                try:
                    conn.execute("INSERT INTO ids(naa, unit_serial, lab, lab_dir, node, datastore, "
                                 "issued) VALUES (?, ?, ?, ?, ?, ?, ?)",
                                 (naa, serial, lab, str(lab_dir), node, datastore, time.time()))
                except sqlite3.IntegrityError:
                    continue  # this ID was issued before: never again
                return serial, naa
        finally:
            conn.close()
        raise StorageNodeError("could not draw an unused datastore ID in 64 tries",
                               registry=str(self.path))

    def release(self, naa: str) -> None:
        """Mark an ID's datastore deleted. The ID stays recorded and is never issued again."""
        conn = self._conn()
        try:
            conn.execute("UPDATE ids SET released=? WHERE naa=? AND released IS NULL",
                         (time.time(), naa))
        finally:
            conn.close()

    def get(self, naa: str) -> IssuedId | None:
        conn = self._conn()
        try:
            row = conn.execute("SELECT * FROM ids WHERE naa=?", (naa,)).fetchone()
            return IssuedId(**dict(row)) if row else None
        finally:
            conn.close()

    def all(self) -> list[IssuedId]:
        conn = self._conn()
        try:
            return [IssuedId(**dict(r)) for r in conn.execute("SELECT * FROM ids ORDER BY issued")]
        finally:
            conn.close()


