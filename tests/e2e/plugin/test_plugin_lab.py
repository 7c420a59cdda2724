"""The pytest plugin on the real thing: a session run with ``--lab labs/default.yaml`` brings
the lab up under a name and subnet of its own, hands its tests the lab, a host, the VM and
the datastore, and those tests check from outside (the guest's heartbeat goes on, its disk
counter reads back, an iSCSI client in the host reads the LUN); at the end nothing of the
lab is left. With ``--lab-keep`` the lab stays, and says how to reach it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from labctl.core.paths import repo_root
from tests.conftest import E2E, leftovers

pytestmark = E2E
pytest_plugins = ["pytester"]

INNER = '''
import time


def test_the_lab_is_real(lab, host, vm, datastore):
    before = vm.heartbeat()
    time.sleep(1.5)
    after = vm.heartbeat()
    assert before is not None and after is not None and after > before
    assert vm.console("read").startswith("DISK read ")
    shown = lab.json("datastore", "show", datastore.name)
    assert shown["naa"] == datastore.naa
    iqn = next(h["initiator_iqn"] for h in lab.status()["hosts"] if h["name"] == host.name)
    url = "iscsi://%s/%s/%d" % (shown["portal"].split(":")[0], shown["target_iqn"], shown["lun"])
    res = host.run("iscsi-readcapacity16", "-s", "-i", iqn, url)
    assert res.returncode == 0, res.stderr
    assert int(res.stdout.strip()) == shown["size_bytes"]


def test_the_same_lab_for_the_whole_session(lab):
    assert lab.status()["state"] == "up"
    with open("lab-under-test", "w") as f:  # for the outside check after the session
        f.write(f"{lab.name} {lab.home}")
'''


def _ini(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")


def test_a_session_against_a_lab_leaves_nothing(pytester: pytest.Pytester) -> None:
    _ini(pytester)
    pytester.makepyfile(test_inner=INNER)
    res = pytester.runpytest_subprocess("--lab", str(repo_root() / "labs/default.yaml"), "-v",
                                        timeout=1200)
    res.assert_outcomes(passed=2)
    name, home = (pytester.path / "lab-under-test").read_text().split()
    assert name.startswith("pt")
    assert leftovers(name, Path(home) / "labs" / name) == []


def test_keep_leaves_the_lab_up_and_says_how_to_reach_it(pytester: pytest.Pytester) -> None:
    _ini(pytester)
    pytester.makepyfile(test_inner=(
        "def test_up(lab):\n"
        "    with open('lab-under-test', 'w') as f:\n"
        "        f.write(f'{lab.name} {lab.home}')\n"))
    res = pytester.runpytest_subprocess("--lab", str(repo_root() / "labs/default.yaml"),
                                        "--lab-keep", timeout=1200)
    name, home = (pytester.path / "lab-under-test").read_text().split()
    try:
        res.assert_outcomes(passed=1)
        res.stdout.fnmatch_lines([f"labctl: lab {name} is kept up: LABCTL_HOME={home} "
                                  f"labctl --lab {name} status"])
        ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                            check=True).stdout
        assert f"labctl-{name}-host1" in ns
    finally:
        subprocess.run([sys.executable, "-m", "labctl.cli", "--lab", name, "down", "--purge"],
                       env={**os.environ, "LABCTL_HOME": home}, capture_output=True,
                       check=False, timeout=600)
    assert leftovers(name, Path(home) / "labs" / name) == []
