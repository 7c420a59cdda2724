"""The JSON Schemas shipped in labctl/schemas/ are those of the records the commands print:
regenerating them from the typed messages changes nothing."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from labctl.cli.args import parser
from labctl.cli.records import COMMANDS, RECORDS, SCHEMA_DIR, check_output, write_all


def test_shipped_schemas_are_up_to_date(tmp_path: Path) -> None:
    fresh = write_all(tmp_path)
    shipped = sorted(p.name for p in SCHEMA_DIR.glob("*.schema.json"))
    assert shipped == sorted(p.name for p in fresh), "run: python -m labctl.cli.records"
    for path in fresh:
        assert (SCHEMA_DIR / path.name).read_text() == path.read_text(), (
            f"{path.name} is stale: run python -m labctl.cli.records")
    assert len(RECORDS) == len(fresh)


def test_every_command_declares_what_its_json_prints() -> None:
    """Each command that takes --json names its records (so check_output, and the e2e tests
    through it, check every --json output), and every shipped record is printed by some
    command."""
    subs = _subcommands(parser())
    silent = {("demo", None), ("exec", None), ("shell", None)}  # a terminal's, not JSON
    missing = [c for c in subs if c not in COMMANDS and c not in silent]
    assert missing == []
    assert set(COMMANDS) <= set(subs)
    used = {name for names, _ in COMMANDS.values() for name in names} | {"error"}
    assert used == set(RECORDS)


def _subcommands(p: argparse.ArgumentParser) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if name in ("migrations", "replications"):  # another spelling
                    continue
                inner = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
                if inner:
                    out += [(name, action_name) for action_name in inner[0].choices]
                else:
                    out.append((name, None))
    return out


def test_check_output_names_what_does_not_fit() -> None:
    ok = json.dumps({"link": "wan1", "rtt_ms": [40.1, 40.3]})
    assert check_output(["wan", "ping", "wan1", "--json"], 0, ok) == "wan-ping"
    with pytest.raises(ValueError, match=r"fits none of wan-ping: wan-ping: rtt_ms/0: .x. is not of type"):
        check_output(["wan", "ping", "wan1", "--json"], 0, '{"link": "w", "rtt_ms": ["x"]}')
    err = json.dumps({"error": {"type": "LabStateError", "message": "no lab is up",
                                "evidence": None}})
    assert check_output(["status", "--json"], 1, err) == "error"
    line = json.dumps({"at": "2026-12-01T19:24:39.123+00:00", "line": "HB 17"})
    assert check_output(["logs", "h1", "--json"], 0, line + "\n" + line + "\n") == "log-line"
    with pytest.raises(ValueError, match="log-line: at: "):
        check_output(["logs", "h1", "--json"], 0, json.dumps({"at": 1733.5, "line": "x"}))


def test_check_output_names_the_record_that_fits_and_reads_a_follow_as_lines() -> None:
    tail = json.dumps({"name": "vm1", "lines": ["HB 1"]})
    assert check_output(["vm", "console", "vm1", "--json"], 0, tail) == "vm-console-tail"
    line = json.dumps({"at": "2026-12-01T19:24:39.123+00:00", "line": "HB 17"})
    follow = ["vm", "console", "vm1", "--follow", "--json"]
    assert check_output(follow, 0, line + "\n" + line + "\n") == "log-line"
