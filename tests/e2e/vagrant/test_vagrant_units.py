"""The playbooks' units as the agents, and file datastores on a storage machine (slow):
``labctl vagrant up`` with ``LABCTL_VAGRANT_AGENTS=systemd`` (the storage and host units
enabled and started by provisioning, with the Vagrantfile's secret), then ``labctl up`` of
a topology whose machines say ``ssh: {vagrant: true, agent: systemd}``. labctl runs each
unit on the lab's own files through a drop-in: the unit's main process is the agent on
the lab's state directory, it answers the lab's secret, the LUN's NAA ID is the one an
outside iSCSI client reads, and a test VM heartbeats from it. A file datastore on the
storage machine (a filesystem on a loop device of the lab's, exported by the machine's
kernel NFS server) holds a second test VM's disk chain; it heartbeats from there, and a
file datastore made and deleted while the lab runs comes and goes. ``labctl down`` stops
the units, removes the drop-ins, unexports and unmounts the file datastores, stops the NFS
daemons the lab started and removes the lab's directories; ``vagrant down`` leaves
nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import E2E, free_subnet, labctl, unique_lab, wait
from tests.e2e.vagrant.outside import destroyed, naa_read_by_host, on

pytestmark = [*E2E, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("vagrant") is None,
                                 reason="vagrant is not installed (scripts/setup.sh)")]

UNITS = {"stor1": "labctl-storage-agent.service", "host1": "labctl-host-agent.service"}


def _unit(m: dict[str, Any]) -> dict[str, str]:
    """The unit's state, its main process's command line and its drop-ins."""
    unit = UNITS[m["name"]]
    shown = on(m, "systemctl", "show", unit, "--property", "ActiveState,MainPID,DropInPaths")
    props = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)
    pid = props.get("MainPID", "0")
    argv = on(m, "cat", f"/proc/{pid}/cmdline") if pid != "0" else ""
    return {"state": props.get("ActiveState", ""), "argv": argv.replace("\0", " ").strip(),
            "dropins": props.get("DropInPaths", "")}


def _beat(name: str, vm_name: str) -> int | None:
    vm = next(v for v in json.loads(labctl("--lab", name, "vm", "list", "--json").stdout)
              if v["name"] == vm_name)
    return int(vm["heartbeat"]["counter"]) if vm.get("heartbeat") else None


def _nfs(stor: dict[str, Any], lab: str) -> dict[str, str]:
    """What of NFS the storage machine has: the lab's exports file, file systems mounted
    under the labs' directory, the portmapper's services, nfsd's threads."""
    return {
        "exports": on(stor, "cat", f"/etc/exports.d/labctl-{lab}-stor1.exports"),
        "mounts": on(stor, "findmnt", "-rn", "-o", "TARGET"),
        "rpc": on(stor, "rpcinfo", "-p", "127.0.0.1"),
        "threads": on(stor, "cat", "/proc/fs/nfsd/threads").strip(),
    }


def test_the_playbooks_units_run_the_lab_s_agents(lab_home: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    name = unique_lab("vu")
    topo = tmp_path / "units.yaml"
    topo.write_text(
        f"name: {name}\nsites:\n  - name: s1\n    subnet: {free_subnet()}\n"
        "storage_nodes:\n  - name: stor1\n    memory: 512M\n    capacity: 2G\n"
        "    ssh: {vagrant: true, agent: systemd}\n"
        "hosts:\n  - name: host1\n    memory: 1G\n    ssh: {vagrant: true, agent: systemd}\n"
        "datastores:\n  - {name: ds1, size: 64M, hosts: [host1]}\n"
        "  - {name: fs1, kind: file, size: 256M, hosts: [host1]}\n"
        "vms:\n  - {name: vm1, host: host1, datastore: ds1, memory: 128M, working_set: 16M,"
        " autostart: false}\n"
        "  - {name: vm2, host: host1, disk: {datastore: fs1, base: labctl-guest.qcow2},"
        " memory: 128M, working_set: 16M, autostart: false}\n")
    monkeypatch.setenv("LABCTL_VAGRANT_AGENTS", "systemd")
    try:
        up = json.loads(labctl("vagrant", "up", str(topo), "--json", timeout=2400).stdout)
        assert up["provisioned"]
        machines = {m["name"]: m for m in up["machines"]}
        for m in machines.values():  # provisioning started the units, on its own files
            unit = _unit(m)
            assert unit["state"] == "active" and "/var/lib/labctl/labs/" not in unit["argv"]
        labctl("up", str(topo), timeout=1200)
        try:
            lab = ("--lab", name)
            status = json.loads(labctl(*lab, "status", "--json").stdout)
            assert status["storage_nodes"][0]["agent"] == "up"
            for m in machines.values():  # the unit now runs the lab's agent on its files
                unit = _unit(m)
                assert unit["state"] == "active", unit
                assert "--secret-file /var/lib/labctl/labs/" in unit["argv"], unit
                assert "50-labctl-lab.conf" in unit["dropins"], unit
            stor = machines["stor1"]
            read, reported = naa_read_by_host(name, "host1", stor, "ds1")
            assert read == reported
            # the file datastore: the lab's filesystem mounted in its directory, exported
            # to host1 alone, read by host1 over NFS at bring-up
            fs1 = json.loads(labctl(*lab, "datastore", "show", "fs1", "--json").stdout)
            assert fs1["url"].startswith(f"nfs://{stor['address']}/var/lib/labctl/labs/"), fs1
            nfs = _nfs(stor, name)
            host1 = status["hosts"][0]["address"]
            assert f" {host1}(rw," in nfs["exports"] and nfs["exports"].count("(rw,") == 1, nfs
            assert any(m.startswith("/var/lib/labctl/labs/") and m.endswith("/fs/fs1")
                       for m in nfs["mounts"].split()), nfs
            assert " mountd" in nfs["rpc"] and int(nfs["threads"]) > 0, nfs
            for vm in ("vm1", "vm2"):  # one from the LUN, one from the file datastore
                labctl(*lab, "vm", "start", vm, timeout=900)
                first = wait(lambda vm=vm: _beat(name, vm), 300, f"{vm}'s heartbeat")
                assert wait(lambda vm=vm, first=first: (b := _beat(name, vm)) and b > first
                            and b, 60, f"a later beat of {vm}")
            files = json.loads(labctl(*lab, "datastore", "files", "fs1", "--json").stdout)
            assert {"labctl-guest.qcow2", "vm2.qcow2"} <= {f["name"] for f in files["files"]}
            made = json.loads(labctl(*lab, "datastore", "create", "fs2", "--kind", "file",
                                     "--size", "128M", "--hosts", "host1", "--json",
                                     timeout=300).stdout)
            assert made["url"], made
            labctl(*lab, "datastore", "delete", "fs2", timeout=300)
            assert "/fs/fs2" not in _nfs(stor, name)["mounts"]
            logs = labctl(*lab, "logs", "stor1", "--lines", "50")
            assert logs.stdout.strip(), logs  # the unit's journal, through labctl
        finally:
            down = labctl("--lab", name, "down", "--purge", check=False, timeout=600)
        assert down.returncode == 0, down.stderr
        for m in machines.values():  # the units stopped, the drop-ins and the lab's files gone
            unit = _unit(m)
            assert unit["state"] == "inactive" and unit["dropins"] == "", unit
            left = on(m, "find", "/var/lib/labctl/labs", "-mindepth", "1")
            assert left.strip() == "", left
        # no export, mount or NFS daemon of the lab's is left on the storage machine
        nfs = _nfs(machines["stor1"], name)
        assert nfs["exports"] == "" and "/var/lib/labctl/labs" not in nfs["mounts"], nfs
        assert nfs["rpc"] == "" and nfs["threads"] in ("", "0"), nfs
    finally:
        down = labctl("vagrant", "down", str(topo), "--json", check=False, timeout=900)
    destroyed(name, down, ["stor1", "host1"])
