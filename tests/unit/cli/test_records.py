"""The JSON Schemas shipped in labctl/schemas/ are those of the records the commands print:
regenerating them from the typed messages changes nothing."""

from __future__ import annotations

from pathlib import Path

from labctl.cli.records import RECORDS, SCHEMA_DIR, write_all


def test_shipped_schemas_are_up_to_date(tmp_path: Path) -> None:
    fresh = write_all(tmp_path)
    shipped = sorted(p.name for p in SCHEMA_DIR.glob("*.schema.json"))
    assert shipped == sorted(p.name for p in fresh), "run: python -m labctl.cli.records"
    for path in fresh:
        assert (SCHEMA_DIR / path.name).read_text() == path.read_text(), (
            f"{path.name} is stale: run python -m labctl.cli.records")
    assert len(RECORDS) == len(fresh)
