"""Bad input on the command line (a file that is no topology or policy, a broken labctl
home, an absurd size) is one line on stderr and exit 1, never a traceback. Every command
here fails before it builds anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _cli(*argv: str, home: Path | str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LABCTL_HOME": str(home)}
    env.pop("LABCTL_LAB", None)
    return subprocess.run([sys.executable, "-m", "labctl.cli", *argv], capture_output=True,
                          text=True, env=env, timeout=120, check=False)


def _one_line(res: subprocess.CompletedProcess[str]) -> str:
    """The one error line of a failed command."""
    assert res.returncode == 1, res
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("labctl: error: ")
    return lines[0].removeprefix("labctl: error: ")


@pytest.mark.parametrize("cmd", ["validate", "up"])
@pytest.mark.parametrize(("content", "problem"), [
    (bytes(range(256)), "not text (byte 128 is not UTF-8): not a topology file (YAML text)"),
    (b"a: " + b"[" * 5000 + b"]" * 5000, "nested more than 32 levels deep"),
    (None, "is a directory, not a topology file (YAML text)"),
])
def test_a_topology_that_is_no_file_of_text(tmp_path: Path, cmd: str, content: bytes | None,
                                            problem: str) -> None:
    file = tmp_path / "lab.yaml"
    if content is None:
        file.mkdir()
    else:
        file.write_bytes(content)
    res = _cli(cmd, str(file), home=tmp_path / "home")
    assert _one_line(res) == f"{file}: {problem}"


@pytest.mark.parametrize(("content", "problem"), [
    (bytes(range(256)), "not text (byte 128 is not UTF-8): not a migration policy file (YAML text)"),
    (b"convergence: " + b"[" * 5000 + b"]" * 5000, "nested more than 32 levels deep"),
    (None, "is a directory, not a migration policy file (YAML text)"),
])
def test_a_policy_file_that_is_no_policy(tmp_path: Path, content: bytes | None,
                                         problem: str) -> None:
    """The policy file is read before the lab is looked for: its problem comes first."""
    file = tmp_path / "policy.yaml"
    if content is None:
        file.mkdir()
    else:
        file.write_bytes(content)
    res = _cli("migrate", "vm1", "--to", "h2", "--policy", str(file), home=tmp_path / "home")
    assert _one_line(res) == f"migration policy {file}: {problem}"


@pytest.mark.parametrize("argv", [["ls"], ["status"], ["datastore", "list"], ["validate", "LAB"],
                                  ["up", "LAB"]])
def test_a_labctl_home_that_is_a_file(tmp_path: Path, argv: list[str]) -> None:
    """ls said "no labs in <file>/labs", up raised NotADirectoryError."""
    home = tmp_path / "home"
    home.write_text("not a directory\n")
    lab = Path(__file__).resolve().parents[3] / "labs" / "default.yaml"
    res = _cli(*[str(lab) if a == "LAB" else a for a in argv], home=home / "sub")
    assert _one_line(res) == f"LABCTL_HOME={home / 'sub'} cannot be used: {home} is not a directory"


@pytest.mark.parametrize("cmd", ["validate", "up"])
def test_a_labctl_home_where_no_directory_can_be_made(tmp_path: Path, cmd: str) -> None:
    """/proc stands for a read-only file system (root may write anywhere else): up raised
    FileNotFoundError, validate blamed the topology for the space /proc lacks."""
    lab = Path(__file__).resolve().parents[3] / "labs" / "default.yaml"
    res = _cli(cmd, str(lab), home="/proc/labctl")
    assert _one_line(res) == ("LABCTL_HOME=/proc/labctl cannot be used: /proc is on a file "
                              "system of size 0 (like /proc): no lab can go there")


@pytest.mark.parametrize("lab", ["../victim", "..", "", "Lab1"])
def test_a_lab_name_that_is_a_path_is_refused(tmp_path: Path, lab: str) -> None:
    """'--lab ../victim down --purge' deleted the directory next to labs/, '--lab ..' the
    whole labctl home, '--lab ""' every lab."""
    home = tmp_path / "home"
    (home / "labs" / "t1").mkdir(parents=True)
    (home / "labs" / "t1" / "inventory.db").write_text("")
    (home / "victim").mkdir()
    (home / "victim" / "data").write_text("precious\n")
    res = _cli("--lab", lab, "down", "--purge", home=home)
    assert _one_line(res) == (f"bad lab name {lab!r}: lowercase letters, digits and '-', "
                              "starting with a letter, at most 16 characters")
    assert (home / "victim" / "data").read_text() == "precious\n"
    assert (home / "labs" / "t1" / "inventory.db").exists()


def test_the_lab_name_rule_is_the_topology_schema_s() -> None:
    from labctl.core import names
    from labctl.lab import topology

    rule = topology.schema()["$defs"]["name"]
    assert rule["pattern"] == f"^{names.LAB_NAME_RE.pattern}$"
    assert rule["description"] == names.LAB_NAME_RULE


@pytest.mark.parametrize("argv", [["status"], ["--lab", "t1", "migration", "list"],
                                  ["--lab", "t1", "down"]])
def test_a_damaged_inventory(tmp_path: Path, argv: list[str]) -> None:
    """An inventory that is no SQLite database raised sqlite3.DatabaseError."""
    db = tmp_path / "home" / "labs" / "t1" / "inventory.db"
    db.parent.mkdir(parents=True)
    db.write_bytes(bytes(range(256)) * 20)
    res = _cli(*argv, home=tmp_path / "home")
    assert _one_line(res) == (f"the inventory {db} is damaged (file is not a database): labctl "
                              "cannot tell what this lab created; move its directory aside to "
                              "start over")


def _lab_that_is_down(home: Path) -> None:
    """Lab t1 as 'labctl down' leaves it: its directory and inventory, nothing running."""
    from labctl.lab.face import SCHEMAS
    from labctl.state.labdir import LabDir

    lab = LabDir("t1", root=home / "labs")
    lab.create()
    inv = lab.inventory(SCHEMAS)
    inv.set_meta("state", "down")
    inv.close()


@pytest.mark.parametrize(("argv", "problem"), [
    (["export", "OUT"], "cannot export lab t1 to OUT: Is a directory"),
    (["export", "/proc/t1.tar.gz"], "cannot export lab t1 to /proc/t1.tar.gz: No such file or "
                                    "directory"),
    (["--lab", "t2", "export", "OUT/t2.tar.gz"], "no lab t2 in HOME/labs: nothing to export"),
])
def test_export_where_it_cannot_write(tmp_path: Path, argv: list[str], problem: str) -> None:
    """An archive that is a directory, a place /proc, a lab with no directory: tracebacks."""
    home = tmp_path / "home"
    _lab_that_is_down(home)
    out = tmp_path / "out"
    out.mkdir()
    res = _cli(*[a.replace("OUT", str(out)) for a in argv], home=home)
    assert _one_line(res) == problem.replace("OUT", str(out)).replace("HOME", str(home))


def test_a_migration_id_past_sqlite_s_integers(tmp_path: Path) -> None:
    """migration show 99999999999999999999999 overflowed SQLite's INTEGER."""
    home = tmp_path / "home"
    _lab_that_is_down(home)
    for mid in ("99999999999999999999999", "-99999999999999999999999"):
        res = _cli("migration", "show", mid, home=home)
        assert _one_line(res) == f"no migration {mid} in this lab (see: labctl migrations)"


def test_a_file_name_that_is_not_utf8_is_printed_as_its_bytes(tmp_path: Path) -> None:
    """In a UTF-8 locale stdout refused the name (UnicodeEncodeError) after the work."""
    home = os.fsdecode(bytes(tmp_path) + b"/h\xff")
    env = {**os.environ, "LABCTL_HOME": home, "PYTHONIOENCODING": "utf-8"}
    res = subprocess.run([sys.executable, "-m", "labctl.cli", "ls"], capture_output=True,
                         env=env, timeout=60, check=False)
    assert (res.returncode, res.stderr) == (0, b"")
    assert res.stdout == b"no labs in " + bytes(tmp_path) + b"/h\xff/labs\n"


@pytest.mark.parametrize("created", ["1e300", "yesterday", "nan"])
def test_ls_lists_a_lab_whose_creation_time_is_no_time(tmp_path: Path, created: str) -> None:
    """An inventory edited by hand: OverflowError or ValueError, and no lab listed."""
    from labctl.lab.face import SCHEMAS
    from labctl.state.labdir import LabDir

    home = tmp_path / "home"
    _lab_that_is_down(home)
    inv = LabDir("t1", root=home / "labs").inventory(SCHEMAS)
    inv.set_meta("created", created)
    inv.close()
    res = _cli("ls", "--json", home=home)
    assert (res.returncode, res.stderr) == (0, "")
    assert [(lab["name"], lab["created_at"]) for lab in json.loads(res.stdout)["labs"]] == [
        ("t1", None)]


def test_logs_reads_only_a_log_of_the_lab(tmp_path: Path) -> None:
    """'logs ../../t2/hosts/h9' printed the log of a host of another lab."""
    home = tmp_path / "home"
    _lab_that_is_down(home)
    (home / "labs" / "t1" / "hosts" / "h1").mkdir(parents=True)
    (home / "labs" / "t1" / "hosts" / "h1" / "agent.log").write_text("h1 says hello\n")
    (home / "labs" / "t2" / "hosts" / "h9").mkdir(parents=True)
    (home / "labs" / "t2" / "hosts" / "h9" / "agent.log").write_text("not for t1\n")
    res = _cli("--lab", "t1", "logs", "../../t2/hosts/h9", home=home)
    assert _one_line(res) == ("no logs for '../../t2/hosts/h9' in lab t1 (hosts: h1; storage "
                              "nodes: none; or rescan)")
    res = _cli("--lab", "t1", "logs", "h1", home=home)
    assert (res.returncode, res.stdout) == (0, "h1 says hello\n")


@pytest.mark.parametrize("argv", [["validate", "{f}"], ["up", "{f}"],
                                  ["migrate", "vm1", "--to", "h2", "--policy", "{f}"]])
def test_a_file_name_with_a_newline_keeps_its_error_on_one_line(tmp_path: Path,
                                                                argv: list[str]) -> None:
    file = tmp_path / "a\nb.yaml"
    file.write_text("just text\n")
    res = _cli(*[a.replace("{f}", str(file)) for a in argv], home=tmp_path / "home")
    assert f"{tmp_path}/a\\nb.yaml: " in _one_line(res)


@pytest.mark.parametrize(("argv", "problem"), [
    (["frob"], "argument COMMAND: invalid choice: 'frob'"),
    (["datastore", "create"], "the following arguments are required: name, --size, --hosts"),
    (["status", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_a_usage_error_is_one_line_and_exit_2(tmp_path: Path, argv: list[str],
                                              problem: str) -> None:
    res = _cli(*argv, home=tmp_path / "home")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res
    assert len(res.stderr.splitlines()) == 1, res.stderr
    assert problem in res.stderr and "--help" in res.stderr, res.stderr


def test_a_lab_home_with_uri_characters_still_lists_its_labs(tmp_path: Path) -> None:
    """The inventory is opened read-only through an SQLite URI: '?' or '#' in the path must
    not cut it short (every lab would read as not up)."""
    from labctl.state.inventory import Inventory
    from labctl.state.labdir import lab_meta

    lab = tmp_path / "odd?home#1" / "labs" / "t1"
    lab.mkdir(parents=True)
    inv = Inventory.open(lab / "inventory.db")
    inv.set_meta("state", "up")
    inv.close()
    assert lab_meta(lab)["state"] == "up"
