"""The Vagrant lab's pieces that need no VM: the box's recipe hash, the host key read from a
console log, the environment the Vagrantfile is run with."""

from __future__ import annotations

from pathlib import Path

import pytest

from labctl.core.errors import MissingDependency
from labctl.lab import topology, vagrant


def test_the_box_hash_follows_its_recipe(tmp_path: Path) -> None:
    recipe = tmp_path / "box"
    recipe.mkdir()
    (recipe / "packages").write_text("openssh-server\n")
    first = vagrant.box_hash(recipe)
    assert vagrant.box_hash(recipe) == first
    (recipe / "packages").write_text("openssh-server\nsudo\n")
    assert vagrant.box_hash(recipe) != first
    assert vagrant.box_hash() == vagrant.box_hash(vagrant.recipe_dir())


def test_the_host_key_is_the_last_one_the_console_printed(tmp_path: Path) -> None:
    log = tmp_path / "host1.console"
    assert vagrant._console_key(log) is None  # not written yet
    log.write_text("[    0.000000] Linux version ...\n\nLABCTL-HOSTKEY ssh-ed25519 AAAAold\n"
                   "Debian GNU/Linux 12 labctl-box ttyS0\n\r\nLABCTL-HOSTKEY ssh-ed25519 AAAAnew\r\n"
                   "login: ")
    assert vagrant._console_key(log) == "ssh-ed25519 AAAAnew"


def test_the_vagrantfile_is_told_where_everything_goes(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABCTL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("VAGRANT_HOME", raising=False)
    path = tmp_path / "lab.yaml"
    path.write_text("name: vg1\nsites: [{name: s1, subnet: 10.250.3.0/24}]\n"
                    "hosts: [{name: h1}]\nstorage_nodes: [{name: n1}]\n")
    topo = topology.load(path)
    env = vagrant.environment(topo, path, "labctl-bookworm-x", "tcg")
    assert env["VAGRANT_DOTFILE_PATH"] == str(tmp_path / "home" / "vagrant" / "vg1" / "dot")
    assert env["VAGRANT_HOME"] == str(vagrant.VAGRANT_HOME)
    assert env["LABCTL_TOPOLOGY"] == str(path) and env["LABCTL_VAGRANT_ACCEL"] == "tcg"
    assert env["LABCTL_VAGRANT_BOX"] == "labctl-bookworm-x"
    # the consoles outside root's home, one directory per lab directory
    assert env["LABCTL_VAGRANT_CONSOLE_DIR"].startswith("/var/lib/labctl/consoles/vg1-")
    assert vagrant.environment(topo, path)["LABCTL_VAGRANT_MGMT"] == env["LABCTL_VAGRANT_MGMT"]
    assert vagrant.machines_of(topo) == [("n1", "storage", "10.250.3.2"),
                                         ("h1", "hosts", "10.250.3.11")]


def test_without_vagrant_the_key_is_missing_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    monkeypatch.setattr(vagrant, "VAGRANT_KEYS", tmp_path)
    with pytest.raises(MissingDependency, match="Vagrant's insecure key is not installed"):
        vagrant.vagrant_insecure_key()
