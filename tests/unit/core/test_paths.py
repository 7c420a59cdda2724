"""The labctl home: a directory there that cannot be made or read is one line naming
LABCTL_HOME and what is in the way."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from labctl.core import paths
from labctl.core.errors import LabStateError
from labctl.state.labdir import LabDir, existing_labs


def _refusal(call: object, *args: object) -> str:
    with pytest.raises(LabStateError) as info:
        call(*args)  # type: ignore[operator]
    return info.value.message


def test_a_file_in_the_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "home"
    file.write_text("")
    monkeypatch.setenv("LABCTL_HOME", str(file))
    expected = f"LABCTL_HOME={file} cannot be used: {file} is not a directory"
    assert _refusal(paths.make_dir, file / "labs" / "t1") == expected
    assert _refusal(paths.list_dir, file / "labs") == expected
    assert _refusal(existing_labs) == expected
    assert _refusal(paths.check_home) == expected
    assert _refusal(LabDir("t1").create) == expected


def test_a_directory_that_cannot_be_made(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABCTL_HOME", "/proc/labctl")
    assert _refusal(paths.make_dir, Path("/proc/labctl/labs")) == (
        "LABCTL_HOME=/proc/labctl cannot be used: cannot create /proc/labctl: /proc does not "
        "let directories be made in it (No such file or directory)")
    monkeypatch.setenv("LABCTL_HOME", "/sys/labctl")
    assert _refusal(paths.make_dir, Path("/sys/labctl/labs")) == (
        "LABCTL_HOME=/sys/labctl cannot be used: cannot create /sys/labctl: Operation not "
        "permitted")


def test_a_read_only_file_system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """check_home (validate's) tells a read-only file system without writing to it."""
    monkeypatch.setenv("LABCTL_HOME", str(tmp_path / "home"))
    real = os.statvfs(tmp_path)
    monkeypatch.setattr(os, "statvfs", lambda path: os.statvfs_result(
        (*real[:8], real.f_flag | os.ST_RDONLY, *real[9:])))
    assert _refusal(paths.check_home) == (f"LABCTL_HOME={tmp_path / 'home'} cannot be used: "
                                          f"{tmp_path} is on a read-only file system")
    assert not (tmp_path / "home").exists()


def test_the_default_home_is_named_when_labctl_home_is_unset(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LABCTL_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".local").write_text("")
    assert _refusal(paths.check_home) == (
        f"the labctl home {tmp_path}/.local/share/labctl (LABCTL_HOME is not set) cannot be "
        f"used: {tmp_path / '.local'} is not a directory")


def test_a_missing_home_has_no_labs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABCTL_HOME", str(tmp_path / "nothing"))
    assert existing_labs() == []
    paths.check_home()


def test_an_image_cache_that_is_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """up would have failed building its first image, the lab half made."""
    monkeypatch.setenv("LABCTL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LABCTL_CACHE", str(tmp_path / "cache" / "images"))
    (tmp_path / "cache").write_text("")
    assert _refusal(paths.check_home) == (f"LABCTL_CACHE={tmp_path / 'cache' / 'images'} cannot "
                                          f"be used: {tmp_path / 'cache'} is not a directory")
    assert _refusal(paths.make_dir, tmp_path / "cache" / "images" / "kernel").startswith(
        f"LABCTL_CACHE={tmp_path / 'cache' / 'images'} cannot be used: ")


def test_a_lab_of_another_user_names_the_owner_and_the_cure(tmp_path: Path) -> None:
    """A lab brought up with sudo is root's: a normal user is told whose it is and how to
    run labctl to reach it (the check itself is by ownership, so it runs as any user)."""
    mine = tmp_path / "mine"
    mine.mkdir()
    assert paths.someone_elses(mine) is None
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    if os.geteuid() != 0:
        pytest.skip("making a directory another user's needs root")
    os.chown(theirs, 65534, 65534)
    why = paths.someone_elses(theirs / "labs" / "x")  # the first part that exists is looked at
    assert why is not None and why.startswith(f"{theirs} belongs to ")
    assert "not to this user: run labctl as " in why and "sudo -u " in why, why
