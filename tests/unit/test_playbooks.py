"""playbooks/ and the Vagrantfile pass their tools: ``ansible-playbook --syntax-check``,
``ansible-lint`` (production profile, from playbooks/.ansible-lint), ``yamllint`` (strict,
playbooks/.yamllint) and ``vagrant validate`` on the shipped topologies. Each test fails
with the tool's own output, and is skipped only when the tool is not installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PLAYBOOKS = REPO / "playbooks"
BIN = Path(sys.executable).parent


def _tool(name: str) -> Path | None:
    """``name`` from this Python's environment (the project venv), else from PATH."""
    local = BIN / name
    if local.exists():
        return local
    found = shutil.which(name)
    return Path(found) if found else None


def _env(**extra: str) -> dict[str, str]:
    # ansible-lint runs ansible-playbook and ansible-galaxy itself: the venv's, first
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "NO_COLOR": "1", "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0", **extra}


def _run(argv: list[str], cwd: Path, timeout: float = 120,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env or _env(), check=False)


def _check(res: subprocess.CompletedProcess[str], what: str) -> None:
    if res.returncode != 0:
        pytest.fail(f"{what} failed (exit {res.returncode}):\n{res.stdout}\n{res.stderr}",
                    pytrace=False)


def _need(name: str, package: str) -> Path:
    tool = _tool(name)
    if tool is None:
        pytest.skip(f"{name} is not installed (pip install {package})")
    return tool


def test_site_syntax() -> None:
    ansible_playbook = _need("ansible-playbook", "ansible")
    res = _run([str(ansible_playbook), "--syntax-check", "-i", "inventory/example.yml",
                "site.yml"], PLAYBOOKS)
    _check(res, "ansible-playbook --syntax-check site.yml")


def test_ansible_lint_production() -> None:
    ansible_lint = _need("ansible-lint", "ansible-lint")
    config = PLAYBOOKS / ".ansible-lint"
    assert "profile: production" in config.read_text(), "the lint profile is production"
    res = _run([str(ansible_lint), "--offline", "-c", str(config)], PLAYBOOKS)
    _check(res, "ansible-lint (production profile)")


def test_yamllint() -> None:
    yamllint = _need("yamllint", "yamllint")
    res = _run([str(yamllint), "--strict", "-c", ".yamllint", "."], PLAYBOOKS)
    _check(res, "yamllint --strict")


@pytest.mark.parametrize("topology", ["labs/default.yaml", "labs/two-sites.yaml"])
def test_vagrantfile_validates(topology: str, tmp_path: Path) -> None:
    vagrant = _tool("vagrant")
    if vagrant is None:
        pytest.skip("vagrant is not installed (Debian: apt-get install vagrant vagrant-libvirt)")
    # vagrant's own state in the test's directory: nothing is left in the tree or home
    env = _env(LABCTL_TOPOLOGY=str(REPO / topology), VAGRANT_HOME=str(tmp_path / "home"),
               VAGRANT_DOTFILE_PATH=str(tmp_path / "dot"), VAGRANT_CHECKPOINT_DISABLE="1",
               VAGRANT_DEFAULT_PROVIDER="libvirt")
    res = _run([str(vagrant), "validate"], REPO, env=env)
    _check(res, f"vagrant validate ({topology})")


def test_vagrantfile_refuses_a_missing_topology(tmp_path: Path) -> None:
    vagrant = _tool("vagrant")
    if vagrant is None:
        pytest.skip("vagrant is not installed (Debian: apt-get install vagrant vagrant-libvirt)")
    env = _env(LABCTL_TOPOLOGY=str(tmp_path / "missing.yaml"), VAGRANT_HOME=str(tmp_path / "home"),
               VAGRANT_DOTFILE_PATH=str(tmp_path / "dot"), VAGRANT_CHECKPOINT_DISABLE="1")
    res = _run([str(vagrant), "validate"], REPO, env=env)
    assert res.returncode != 0
    assert "no topology file" in res.stderr, res.stderr


def _listed(path: Path) -> set[str]:
    return {ln.split("#")[0].strip() for ln in path.read_text().splitlines()} - {""}


def test_the_local_box_carries_every_package_the_roles_install() -> None:
    """Provisioning a Vagrant lab fetches nothing (its networks have no route out): every
    package the host and storage roles install must already be in labctl's box."""
    import yaml

    host = yaml.safe_load((PLAYBOOKS / "roles/host/defaults/main.yml").read_text())
    storage = yaml.safe_load((PLAYBOOKS / "roles/storage/defaults/main.yml").read_text())
    venv = yaml.safe_load((PLAYBOOKS / "roles/labctl/tasks/venv.yml").read_text())
    venv_packages = next(t["vars"]["labctl_packages"] for t in venv
                         if t.get("name") == "Install Python's venv")
    wanted = {*host["host_qemu_packages"], *host["host_packages"],
              *storage["storage_extra_packages"], *_listed(REPO / "images/storage/packages"),
              *venv_packages}
    box = _listed(REPO / "images/box/packages") | _listed(REPO / "images/box/backports")
    assert wanted - box - {"systemd"} == set()  # systemd-sysv brings systemd
    # and the host's one PyPI package is handed over when offline
    assert host["host_venv_handover"] == ["qemu"]
