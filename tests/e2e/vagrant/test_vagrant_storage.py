"""A storage node that is a machine (slow): ``labctl vagrant up`` of a storage machine and a
host machine from labctl's box, then ``labctl up`` of the topology it wrote. The storage
agent runs on the machine with the controller's code handed over and drives the LIO of
the machine's own kernel; each datastore is a sparse file of the lab's on a loop device.

Checked from outside labctl: libiscsi's ``iscsi-inq`` on the host machine, with the host's
CHAP identity, reads the LUN's NAA designator, and it is the ID ``status --json`` reports;
the test VM heartbeats on the host machine from the LUN; a datastore made while the lab
runs is a new loop device there, a resize reaches the host by the storage event, a delete
removes its file. ``labctl down`` leaves the machine's LIO without the lab's target or
backstores, no loop device on the lab's files, no directory or process; ``vagrant down``
leaves nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import E2E, free_subnet, labctl, unique_lab, wait
from tests.e2e.vagrant.outside import destroyed, naa_read_by_host, on

pytestmark = [*E2E, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("vagrant") is None,
                                 reason="vagrant is not installed (scripts/setup.sh)")]


def _machine_state(m: dict[str, Any]) -> dict[str, str]:
    """What of any lab is on the storage machine: LIO targets and backstores, loop devices,
    labctl's state directories and agents."""
    # LIO's own entries (lio_version...) appear once its modules are loaded: the lab's
    # objects are its targets (iqn.) and the storage objects of its iblock HBAs
    iscsi = on(m, "ls", "/sys/kernel/config/target/iscsi").split()
    core = on(m, "find", "/sys/kernel/config/target/core", "-mindepth", "2",
              "-maxdepth", "2", "-type", "d", "-path", "*/iblock_*/*").split()
    return {
        "targets": " ".join(t for t in iscsi if t.startswith("iqn.")),
        "backstores": " ".join(sorted(core)),
        "loops": on(m, "losetup", "--list", "--noheadings").strip(),
        "dirs": on(m, "find", "/var/lib/labctl/labs", "-mindepth", "1").strip(),
        "agents": on(m, "pgrep", "-af", "labctl.agents").strip(),
    }


def _beat(name: str) -> int | None:
    vm = json.loads(labctl("--lab", name, "vm", "list", "--json").stdout)[0]
    return int(vm["heartbeat"]["counter"]) if vm.get("heartbeat") else None


def test_a_storage_machine_serves_luns_from_its_own_lio(lab_home: Path, tmp_path: Path) -> None:
    name = unique_lab("vs")
    topo = tmp_path / "machines.yaml"
    topo.write_text(
        f"name: {name}\nsites:\n  - name: s1\n    subnet: {free_subnet()}\n"
        "storage_nodes:\n  - name: stor1\n    memory: 512M\n    capacity: 2G\n"
        "hosts:\n  - name: host1\n    memory: 1G\n"
        "datastores:\n  - {name: ds1, size: 64M, hosts: [host1]}\n"
        "vms:\n  - {name: vm1, host: host1, datastore: ds1, memory: 128M, working_set: 16M,"
        " autostart: false}\n")
    try:
        up = json.loads(labctl("vagrant", "up", str(topo), "--no-provision", "--json",
                               timeout=2400).stdout)
        machines = {m["name"]: m for m in up["machines"]}
        stor = machines["stor1"]
        assert stor["group"] == "storage"
        before = _machine_state(stor)
        labctl("up", up["topology"], timeout=1200)
        try:
            lab = ("--lab", name)
            status = json.loads(labctl(*lab, "status", "--json").stdout)
            (node,) = status["storage_nodes"]
            assert node["agent"] == "up" and node["ssh"] == f"root@{stor['address']}:22"
            assert node["domain"] == "" and node["domain_state"] is None
            (ds,) = status["datastores"]
            assert ds["seen_by"]["host1"]["naa"] == ds["naa"]
            # an outside iSCSI client on the host machine (libiscsi, the host's CHAP identity)
            # reads the NAA designator of the LUN: the ID status reports
            read, reported = naa_read_by_host(name, "host1", stor, "ds1")
            assert read == reported
            shown = json.loads(labctl(*lab, "datastore", "show", "ds1", "--json").stdout)
            # the LUN is a loop device on the lab's file on the machine, LIO's iblock on it
            loops = on(stor, "losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE")
            assert f"/disks/{shown['backing']['disk_serial']}.img" in loops, loops
            # the VM boots from the LUN on the host machine and heartbeats
            labctl(*lab, "vm", "start", "vm1", timeout=900)
            first = wait(lambda: _beat(name), 300, "vm1's heartbeat")
            assert wait(lambda: (b := _beat(name)) and b > first and b, 60, "a later beat")
            # a datastore made while the lab runs, grown (the event reaches the host), deleted
            made = json.loads(labctl(*lab, "datastore", "create", "ds2", "--size", "32M",
                                     "--hosts", "host1", "--json", timeout=300).stdout)
            assert made["seen_by"]["host1"]["seen_naa"] == made["naa"], made
            grown = json.loads(labctl(*lab, "datastore", "resize", "ds2", "48M", "--json",
                                      timeout=300).stdout)
            assert grown["event"] is not None, grown
            seen = json.loads(labctl(*lab, "datastore", "show", "ds2", "--json").stdout)
            assert seen["seen_by"]["host1"]["size_bytes"] == 48 << 20, seen
            labctl(*lab, "datastore", "delete", "ds2", timeout=300)
            left = on(stor, "losetup", "--list", "--noheadings", "--output", "BACK-FILE")
            assert "lc-ds2" not in left and "lc-ds1" in left, left
            _a_second_lab_with_a_ds1_of_its_own(name, up["topology"], stor, tmp_path)
            _a_restart_of_the_storage_machine_s_node(name, stor, shown, first)
            # the storage agent killed: `up` again starts it, and it watches ds1 again (a
            # resize still reaches the host as a storage event); the VM never noticed
            state = str(Path(shown["backing"]["path"]).parent.parent)
            pid = on(stor, "cat", f"{state}/agent.pid").strip()
            on(stor, "kill", "-9", pid)
            again = labctl("up", up["topology"], timeout=600)
            assert "the storage agent of stor1 does not answer" in again.stderr + again.stdout
            status = json.loads(labctl(*lab, "status", "--json").stdout)
            assert status["storage_nodes"][0]["agent"] == "up"
            grown = json.loads(labctl(*lab, "datastore", "resize", "ds1", "80M", "--json",
                                      timeout=300).stdout)
            assert grown["event"] is not None, grown
            assert wait(lambda: (b := _beat(name)) and b > first and b, 60, "a beat after")
        finally:
            labctl("--lab", name, "down", "--purge", check=False, timeout=600)
        # the machine's LIO and loop driver as they were before the lab, nothing of it left
        assert _machine_state(stor) == before
    finally:
        down = labctl("vagrant", "down", str(topo), "--json", check=False, timeout=900)
    destroyed(name, down, ["stor1", "host1"])


def _a_restart_of_the_storage_machine_s_node(name: str, stor: dict[str, Any],
                                             shown: dict[str, Any], first: int) -> None:
    """``storage restart`` of a node that is a machine: its agent is stopped and what it
    made in the machine's LIO released (the LUN vanishes from the host), then a new agent
    exports the same disk file again. The LUN comes back with its NAA (read from outside
    too), the storage event stream says the agent was lost and came back, and the VM
    whose disk it is carries on."""
    lab = ("--lab", name)
    state = str(Path(shown["backing"]["path"]).parent.parent)
    pid = on(stor, "cat", f"{state}/agent.pid").strip()
    beat = wait(lambda: _beat(name), 60, "a beat before the restart")
    restarted = json.loads(labctl(*lab, "storage", "restart", "stor1", "--json",
                                  timeout=600).stdout)
    assert [(lun["name"], lun["naa"]) for lun in restarted["luns"]] == [
        ("ds1", shown["naa"])], restarted
    assert on(stor, "cat", f"{state}/agent.pid").strip() != pid  # a new agent
    read, reported = naa_read_by_host(name, "host1", stor, "ds1")
    assert read == reported == bytes.fromhex(shown["naa"].removeprefix("naa."))
    # the rescan service heard the node go and come back, and the LUN added again after
    kinds = [e["kind"] for e in map(json.loads, labctl(*lab, "events", "--json").stdout
                                    .splitlines()) if e["naa"] == shown["naa"]]
    lost = kinds.index("storage_agent_lost")
    back = kinds.index("storage_agent_back", lost)
    assert back < kinds.index("lun_added", back), kinds
    # the guest's disk is the LUN: it beats on past the restart (QEMU's libiscsi reconnected)
    assert wait(lambda: (b := _beat(name)) and b > max(beat, first) + 2 and b, 120,
                "beats after the restart")


def _a_second_lab_with_a_ds1_of_its_own(first: str, topology: str, stor: dict[str, Any],
                                         tmp_path: Path) -> None:
    """Another lab on the same two machines (its agents on ports of their own), with a
    datastore ds1 too: LIO's backstore names are machine-wide, and each lab's node names
    its own with the lab's prefix. Both ds1 are served side by side, each lab sees its own
    (its NAA, read by an outside iSCSI client too), and the second goes without touching
    the first's."""
    name = unique_lab("vs2")
    data = yaml.safe_load(Path(topology).read_text())
    data["name"] = name
    data["vms"] = []
    data["datastores"] = [{"name": "ds1", "size": "32M", "hosts": ["host1"]}]
    for item, port in ((data["hosts"][0], 7610), (data["storage_nodes"][0], 7611)):
        item["ssh"]["agent_port"] = port
    topo = tmp_path / "second.yaml"
    topo.write_text(yaml.safe_dump(data, sort_keys=False))
    mine = json.loads(labctl("--lab", first, "datastore", "show", "ds1", "--json").stdout)
    read_mine, _ = naa_read_by_host(first, "host1", stor, "ds1")
    try:
        labctl("up", str(topo), timeout=1200)
        theirs = json.loads(labctl("--lab", name, "datastore", "show", "ds1", "--json").stdout)
        assert theirs["naa"] != mine["naa"], (theirs, mine)
        assert theirs["seen_by"]["host1"]["naa"] == theirs["naa"], theirs
        read, reported = naa_read_by_host(name, "host1", stor, "ds1")
        assert read == reported != read_mine
        # both on the machine's one LIO, each under its lab's name for it
        core = on(stor, "find", "/sys/kernel/config/target/core", "-mindepth", "2",
                  "-maxdepth", "2", "-type", "d", "-path", "*/iblock_*/*").split()
        ds1 = sorted(Path(c).name.split(":")[0].split(".")[0] for c in core
                     if Path(c).name.endswith(":ds1"))
        assert ds1 == sorted([first, name]), core
        # each lab lists its own datastores only
        listed = json.loads(labctl("--lab", first, "datastore", "list", "--json").stdout)
        assert [d["name"] for d in listed] == ["ds1"] and listed[0]["naa"] == mine["naa"]
    finally:
        down = labctl("--lab", name, "down", "--purge", check=False, timeout=600)
    assert down.returncode == 0, down.stderr
    # the first lab's ds1 is served as before: its NAA read again from outside
    read, reported = naa_read_by_host(first, "host1", stor, "ds1")
    assert read == reported == read_mine
