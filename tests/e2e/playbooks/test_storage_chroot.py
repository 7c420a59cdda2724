"""The storage role builds an image root: run through the chroot connection
(``community.general.chroot``) against a throwaway minimal Debian root made with
mmdebstrap (the suite and mirror of the storage node image), it installs LIO's and NFS's
packages, the storage agent's unit and labctl on the agent's path; it starts nothing, loads
no module, leaves no secret in the image, and a second run changes nothing.
About 1.5 minutes (mmdebstrap ~20 s, the first run ~60 s, the second ~10 s)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from labctl.storage.image import debian_suite
from tests.conftest import E2E

REPO = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent
ANSIBLE_PLAYBOOK = BIN / "ansible-playbook"

pytestmark = [*E2E, pytest.mark.skipif(not ANSIBLE_PLAYBOOK.exists(),
                                       reason="ansible is not installed (pip install ansible)")]

SUITE = debian_suite()
MIRROR = f"deb http://deb.debian.org/debian {SUITE} main"
UNIT = "etc/systemd/system/labctl-storage-agent.service"
PACKAGES = ("python3-rtslib-fb", "targetcli-fb", "nfs-kernel-server", "rpcbind", "systemd",
            "python3-venv", "kmod", "e2fsprogs", "qemu-utils")


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A minimal Debian root (minbase: apt, and python3 for Ansible's modules)."""
    root = tmp_path_factory.mktemp("storage-image") / "root"
    argv = ["mmdebstrap", "--mode=root", "--variant=minbase", "--quiet", "--include=python3"]
    argv += [f"--dpkgopt=path-exclude={p}"
             for p in ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*")]
    argv += [SUITE, str(root), MIRROR]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
        assert res.returncode == 0, f"mmdebstrap failed:\n{res.stderr}"
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _play(root: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    inventory = tmp / "inventory.yml"
    inventory.write_text(
        "storage:\n"
        "  hosts:\n"
        f"    {root}:\n"
        "      ansible_connection: community.general.chroot\n"
        "      ansible_python_interpreter: /usr/bin/python3\n")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "ANSIBLE_NOCOLOR": "1", "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible-tmp")}
    env.pop("LABCTL_SECRET_FILE", None)
    return subprocess.run([str(ANSIBLE_PLAYBOOK), "-i", str(inventory),
                           str(REPO / "playbooks" / "site.yml")],
                          capture_output=True, text=True, timeout=600, env=env, check=False)


def _in_root(root: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["chroot", str(root), *argv], capture_output=True, text=True,
                          timeout=60, check=False)


def test_storage_role_builds_an_image_root(image_root: Path, tmp_path: Path) -> None:
    first = _play(image_root, tmp_path)
    assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-2000:]

    # the packages
    res = _in_root(image_root, "dpkg-query", "-W", "-f=${Package} ${db:Status-Status}\n",
                   *PACKAGES)
    assert res.returncode == 0, res.stderr
    assert sorted(res.stdout.split("\n")[:-1]) == sorted(f"{p} installed" for p in PACKAGES)

    # the unit, enabled (it starts when a machine boots the image); Debian's NFS services
    # masked
    unit = (image_root / UNIT).read_text()
    assert "ExecStart=/opt/labctl/venv/bin/python -m labctl.agents.storage " in unit
    assert "--secret-file /etc/labctl/secret" in unit
    assert (image_root / "etc/systemd/system/multi-user.target.wants"
            / "labctl-storage-agent.service").is_symlink()
    for masked in ("nfs-server.service", "rpcbind.service", "rpcbind.socket"):
        assert os.readlink(image_root / "etc/systemd/system" / masked) == "/dev/null"

    # LIO's modules at boot; rtslib-fb's directories
    modules = (image_root / "etc/modules-load.d/labctl-storage.conf").read_text().split()
    for mod in ("configfs", "target_core_mod", "target_core_iblock", "iscsi_target_mod"):
        assert mod in modules
    assert (image_root / "etc/rtslib-fb-target").is_dir()
    assert (image_root / "etc/target").is_dir()

    # labctl on the agent's path, with Debian's rtslib-fb beside it
    res = _in_root(image_root, "/opt/labctl/venv/bin/python", "-c",
                   "import labctl.agents.storage, labctl.storage.agent, rtslib_fb; "
                   "print(labctl.agents.storage.__file__)")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "/opt/labctl/src/labctl/agents/storage.py"

    # nothing of a running machine: no secret, no agent configuration, no policy-rc.d left
    assert not (image_root / "etc/labctl/secret").exists()
    assert not (image_root / "etc/labctl/storage.json").exists()
    assert not (image_root / "usr/sbin/policy-rc.d").exists()

    # the same role again changes nothing
    second = _play(image_root, tmp_path)
    assert second.returncode == 0, second.stdout[-6000:] + second.stderr[-2000:]
    recap = [line for line in second.stdout.splitlines() if "changed=" in line]
    assert recap and all(" changed=0 " in line for line in recap), second.stdout[-6000:]
