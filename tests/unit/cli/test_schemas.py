"""The schema files of the --json records: written from the messages, read back the same."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from labctl.cli.schemas import write_schemas
from labctl.core.wire import json_schema
from labctl.datastores.protocol import HostCache
from labctl.lab.status import HostState, LabStatus, Step
from labctl.migration.result import MigrationResult


def test_write_and_read_back(tmp_path: Path) -> None:
    out = tmp_path / "share" / "schemas"
    records = {"status": LabStatus, "host-storage": HostCache, "migrations.show": MigrationResult}
    paths = write_schemas(out, records)
    assert paths == [out / "status.schema.json", out / "host-storage.schema.json",
                     out / "migrations.show.schema.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)  # no leftovers
    for path, cls in zip(paths, records.values(), strict=True):
        text = path.read_text(encoding="utf-8")
        schema = json.loads(text)
        assert schema == json_schema(cls)
        assert text == json.dumps(schema, indent=2, sort_keys=True) + "\n"
        jsonschema.Draft202012Validator.check_schema(schema)
    status = json.loads(paths[0].read_text(encoding="utf-8"))
    record = LabStatus("demo", "up", "tcg", None,
                       hosts=[HostState("host1", "a", "10.0.0.11", "iqn.2024-01.dev.x:h1",
                                        "lc-demo-host1", "up")], steps=[Step("hosts", 1.5)])
    jsonschema.validate(json.loads(json.dumps(record.to_wire())), status)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**record.to_wire(), "lab": None}, status)


def test_rewrite_gives_the_same_bytes(tmp_path: Path) -> None:
    (path,) = write_schemas(tmp_path, {"status": LabStatus})
    first = path.read_bytes()
    path.write_text("stale\n")
    assert write_schemas(tmp_path, {"status": LabStatus}) == [path]
    assert path.read_bytes() == first


@pytest.mark.parametrize("name", ["", "../status", "a/b", ".hidden", "-x"])
def test_bad_names_write_nothing(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="bad schema name"):
        write_schemas(tmp_path / "out", {"ok": LabStatus, name: LabStatus})
    assert not (tmp_path / "out").exists()
