"""Live migration on the real lab with a 20 ms heartbeat (``vms[].heartbeat_ms: 20``): the
period reaches the guest's kernel command line on both hosts, the migration measures with it,
and the guest survives (counter continues, disk counter read back on the destination)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import E2E, free_subnet, labctl, module_lab, unique_lab, wait

pytestmark = E2E

NAME = unique_lab("hbmig")
TOPO = """
name: {name}
sites: [{{name: s1, subnet: {subnet}}}]
storage_nodes: [{{name: stor1, capacity: 1G}}]
hosts: [{{name: h1}}, {{name: h2}}]
datastores: [{{name: ds1, size: 64M, hosts: [h1, h2]}}]
vms: [{{name: vm1, host: h1, datastore: ds1, memory: 192M, working_set: 48M, dirty_rate: 10,
       heartbeat_ms: 20}}]
"""


@pytest.fixture(scope="module")
def lab(lab_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with module_lab(NAME, TOPO.format(name=NAME, subnet=free_subnet()), lab_home,
                    tmp_path_factory, filename="hbmig.yaml"):
        yield lab_home / "labs" / NAME


def vm1() -> dict[str, Any]:
    st = json.loads(labctl("--lab", NAME, "status", "--json").stdout)
    return dict(next(v for v in st["vms"] if v["name"] == "vm1"))


def test_migration_with_a_20_ms_heartbeat(lab: Path) -> None:
    # the guest writes its disk counter once a second: a migration that starts before its
    # first write has nothing to read back (seen once: source 0, destination 0)
    before = wait(lambda: (v := vm1())["disk_counter"] and v["disk_counter"] >= 1 and v,
                  timeout=15, what="the guest's first disk counter write")
    assert before["heartbeat_ms"] == 20 and before["host"] == "h1", before
    argv = json.loads((lab / "hosts" / "h1" / "vms" / "vm1" / "argv.json").read_text())
    assert "labctl.hb_ms=20" in argv[argv.index("-append") + 1].split()
    for src, dst in (("h1", "h2"), ("h2", "h1")):
        res = json.loads(labctl("--lab", NAME, "migrate", "vm1", "--to", dst, "--json").stdout)
        assert res["state"] == "completed" and res["source"] == src and res["dest"] == dst, res
        assert res["heartbeat_period_ms"] == 20 and res["switchover"]["period_ms"] == 20, res
        hb = res["heartbeat"]
        assert hb["continues"], hb  # no reset, and no more beats than the blackout allows
        assert hb["dest_first"]["counter"] > hb["source_last"]["counter"], hb
        assert res["disk"]["ok"] and res["disk"]["dest_read"] >= 1, res["disk"]
        argv = json.loads((lab / "hosts" / dst / "vms" / "vm1" / "argv.json").read_text())
        assert "labctl.hb_ms=20" in argv[argv.index("-append") + 1].split()
        # still beating on the destination, and the disk counter reads back from the LUN
        first = vm1()
        time.sleep(0.5)
        again = vm1()
        assert again["host"] == dst and again["state"] == "running", again
        assert again["heartbeat"]["counter"] > first["heartbeat"]["counter"], (first, again)
        read = labctl("--lab", NAME, "vm", "console", "vm1", "read").stdout
        assert "DISK read" in read, read
        assert int(read.split()[-1]) >= res["disk"]["dest_read"], (read, res["disk"])
    shown = labctl("--lab", NAME, "migrations", "show", str(res["id"])).stdout
    assert "heartbeat every 20 ms" in shown, shown
