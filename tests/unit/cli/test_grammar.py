"""The command line's grammar and promises, without a lab: global options anywhere, the lab
from LABCTL_LAB, verbs under nouns with the old spellings kept, one JSON document on stdout
even for a failure, a closed pipe ended quietly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from labctl import __version__
from labctl.cli.args import HANDLERS, parser


@pytest.mark.parametrize("argv", [
    ["--lab", "x", "--json", "status"],
    ["status", "--lab", "x", "--json"],
    ["-q", "status", "--json", "--lab", "x"],
])
def test_global_options_before_or_after_the_command(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    assert (args.cmd, args.lab, args.json) == ("status", "x", True)


def test_options_after_a_verb_and_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    args = parser().parse_args(["datastore", "show", "ds1", "--json", "--lab", "y"])
    assert (args.cmd, args.action, args.name, args.json, args.lab) == (
        "datastore", "show", "ds1", True, "y")
    monkeypatch.setenv("LABCTL_LAB", "fromenv")
    assert parser().parse_args(["status"]).lab == "fromenv"
    assert parser().parse_args(["status", "--lab", "given"]).lab == "given"


def test_nouns_verbs_and_aliases() -> None:
    p = parser()
    assert p.parse_args(["migrations"]).action == "list"  # the old spelling, the old default
    assert p.parse_args(["migration", "show", "3"]).id == 3
    assert p.parse_args(["migrations", "show", "3", "--plot", "x.png"]).plot == Path("x.png")
    assert p.parse_args(["vm", "list"]).action == "list"
    args = p.parse_args(["exec", "host1", "--", "ip", "-j", "addr"])
    assert args.host == "host1" and args.argv[-3:] == ["ip", "-j", "addr"]
    assert p.parse_args(["down", "--purge"]).purge
    commands = p._subparsers._group_actions  # type: ignore[union-attr]
    assert {a.dest for a in commands} == {"cmd"}
    assert set(commands[0].choices) == set(HANDLERS)  # every command has its handler module
    assert set(HANDLERS) >= {"up", "status", "ls", "down", "vm", "migrate", "migration",
                             "datastore", "events", "exec", "shell", "logs"}


def _cli(*argv: str, home: Path, **kw: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LABCTL_HOME": str(home)}
    env.pop("LABCTL_LAB", None)
    return subprocess.run([sys.executable, "-m", "labctl.cli", *argv], capture_output=True,
                          text=True, env=env, timeout=60, check=False, **kw)  # type: ignore[call-overload]


def test_version_and_help(tmp_path: Path) -> None:
    res = _cli("--version", home=tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == f"labctl {__version__}"
    res = _cli("--help", home=tmp_path)
    assert res.returncode == 0 and "migration" in res.stdout and "exec" in res.stdout


def test_a_failure_with_json_is_still_one_json_document(tmp_path: Path) -> None:
    res = _cli("status", "--json", home=tmp_path)
    assert res.returncode == 1
    doc = json.loads(res.stdout)  # stdout holds exactly one JSON document
    assert doc["error"]["type"] == "LabStateError"
    assert "no lab is up" in doc["error"]["message"]
    assert res.stderr.strip() == "labctl: error: no lab is up (start one with: labctl up)"
    assert "Traceback" not in res.stderr


def test_ls_on_an_empty_home(tmp_path: Path) -> None:
    res = _cli("ls", "--json", home=tmp_path)
    assert res.returncode == 0
    assert json.loads(res.stdout) == {"home": str(tmp_path), "labs": []}


def test_a_closed_pipe_is_no_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "LABCTL_HOME": str(tmp_path)}
    cli = subprocess.Popen([sys.executable, "-m", "labctl.cli", "migration", "policies"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert cli.stdout is not None and cli.stderr is not None
    cli.stdout.close()  # the reader is gone before labctl writes
    err = cli.stderr.read().decode()
    assert cli.wait(60) == 0 and "Traceback" not in err and "BrokenPipe" not in err


@pytest.mark.parametrize(("argv", "error"), [
    (["events", "--last", "-3"], "argument --last: '-3' is negative: give 0 or more"),
    (["logs", "rescan", "-n", "-5"], "argument --lines/-n: '-5' is negative: give 0 or more"),
    (["vm", "console", "vm1", "-n", "x"], "argument --lines/-n: 'x' is not a whole number"),
])
def test_a_count_is_a_whole_number_of_zero_or_more(
        argv: list[str], error: str, capsys: pytest.CaptureFixture[str]) -> None:
    """events --last -3 showed every event but the first three."""
    with pytest.raises(SystemExit) as exc:
        parser().parse_args(argv)
    assert exc.value.code == 2
    assert f"error: {error} (see 'labctl " in capsys.readouterr().err
    assert parser().parse_args([*argv[:-1], "7"]).__dict__.get(
        "last" if "--last" in argv else "lines") == 7


def test_an_oserror_no_command_worded_is_still_one_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The last guard of the one-line promise: the file and the system's reason, and with
    -v the traceback that shows which code should have said it in its own words."""
    from labctl.cli import labs
    from labctl.cli.main import main

    def unreadable(args: object) -> int:
        raise PermissionError(13, "Permission denied", "/srv/labs/t1/inventory.db")

    monkeypatch.setattr(labs, "_ls", unreadable)
    assert main(["ls"]) == 1
    err = capsys.readouterr().err
    assert err == ("labctl: error: /srv/labs/t1/inventory.db: Permission denied "
                   "(-v shows where)\n")
    assert main(["ls", "--json", "-v"]) == 1
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert doc["error"]["type"] == "PermissionError"
    assert doc["error"]["message"] == "/srv/labs/t1/inventory.db: Permission denied"
    assert "unreadable" in doc["error"]["evidence"]["traceback"]
    assert err.startswith("labctl: error: /srv/labs/t1/inventory.db: Permission denied\n"
                          "Traceback (most recent call last):\n")


def test_a_full_disk_under_the_inventory_is_one_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """SQLite's 'database or disk is full' was a traceback from migrate and datastore create;
    it is one line with the cure (SQLite rolled the write back: nothing is half-written)."""
    import sqlite3

    from labctl.cli import labs
    from labctl.cli.main import main

    def full(args: object) -> int:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(labs, "_ls", full)
    monkeypatch.setenv("LABCTL_HOME", "/srv/full")
    assert main(["ls"]) == 1
    err = capsys.readouterr().err
    assert err == ("labctl: error: the lab's inventory cannot be written: database or disk is "
                   "full (free space under LABCTL_HOME=/srv/full; the inventory is as it was "
                   "before this write)\n")
    assert main(["ls", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["error"]["type"] == "OperationalError"
