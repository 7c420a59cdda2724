"""The demo on Vagrant machines (slow): ``labctl vagrant up`` of labs/vagrant.yaml (as a lab
of this test's: its own name and subnet), provisioned by playbooks/ with nothing fetched
(the networks have no route out: every package is in the box, qemu.qmp handed over), the
agents' units installed and left stopped; then ``labctl demo`` of the same file drives
them over SSH: LIO on the storage machine, the test VM in a host machine, live-migrated to
the other and back (each verified by the driver: heartbeat continuous, disk counter read
back; stamps of two machines' clocks), its datastore grown and the new size seen by the
guest; ``demo: OK``, then ``vagrant down`` leaves nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from labctl.core.paths import repo_root
from tests.conftest import E2E, free_subnet, labctl, unique_lab
from tests.e2e.vagrant.outside import destroyed

pytestmark = [*E2E, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("vagrant") is None,
                                 reason="vagrant is not installed (scripts/setup.sh)")]


def test_the_demo_runs_on_three_vagrant_machines(lab_home: Path, tmp_path: Path) -> None:
    data = yaml.safe_load((repo_root() / "labs" / "vagrant.yaml").read_text())
    data["name"] = unique_lab("vd")
    data["sites"][0]["subnet"] = str(free_subnet())
    topo = tmp_path / "vagrant.yaml"
    topo.write_text(yaml.safe_dump(data, sort_keys=False))
    try:
        up = json.loads(labctl("vagrant", "up", str(topo), "--json", timeout=2400).stdout)
        assert sorted(m["name"] for m in up["machines"]) == ["host1", "host2", "stor1"]
        assert up["provisioned"]
        demo = labctl("demo", str(topo), timeout=2400, check=False)
        assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-2000:]
        out = demo.stdout
        assert "demo: OK" in out
        assert out.count("guest verified:") == 2 and "(continues)" in out
        assert "the new size" in out and "NOT the new size" not in out
    finally:
        down = labctl("vagrant", "down", str(topo), "--json", check=False, timeout=900)
    destroyed(data["name"], down, ["stor1", "host1", "host2"])
