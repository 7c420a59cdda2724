"""``labctl vagrant up|down`` on the real thing (slow): labctl's box built from Debian's
packages, a host machine booted from it by vagrant-libvirt under this machine's
accelerator, its SSH host key read from its serial console and pinned (a session pinned
to any other key is refused), root reached with the lab's own key; then ``labctl up`` of
the topology ``vagrant up`` wrote (the host as that machine, over SSH): the agent runs
the controller's code handed over, the test VM heartbeats on the machine (QEMU inside
it); ``labctl down`` leaves the machine clean, and after ``vagrant down`` nothing of it is
left: no domain, no network, no directory."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import asyncssh
import pytest

from labctl.drivers.ssh import SshError, SshMachine
from labctl.lab import vagrant
from tests.conftest import E2E, free_subnet, labctl, unique_lab, wait
from tests.e2e.vagrant.outside import destroyed

pytestmark = [*E2E, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("vagrant") is None,
                                 reason="vagrant is not installed (scripts/setup.sh)")]


def _virsh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True,
                          text=True, check=False, timeout=60)


async def _session(address: str, key: str, host_key: str) -> tuple[str, str]:
    async with SshMachine("host1", address, Path(key), host_key, user="root",
                          pinned_by="its console printed") as m:
        root = await m.run(["id", "-u"])
        addrs = await m.run(["ip", "-4", "-br", "addr", "show", "dev", "eth1"])
    return root.stdout.strip(), addrs.stdout


async def _leftover_dirs(address: str, key: str, host_key: str) -> str:
    """The lab's state directories still on the machine, and its processes."""
    async with SshMachine("host1", address, Path(key), host_key, user="root",
                          pinned_by="its console printed") as m:
        dirs = await m.run(["find", "/var/lib/labctl/labs", "-mindepth", "1"], check=False)
        procs = await m.run(["pgrep", "-af", "labctl.agents"], check=False)
    return (dirs.stdout + procs.stdout).strip()


def _beat(name: str) -> int | None:
    vm = json.loads(labctl("--lab", name, "vm", "list", "--json").stdout)[0]
    return int(vm["heartbeat"]["counter"]) if vm.get("heartbeat") else None


def test_a_machine_from_the_local_box_pinned_by_its_console(lab_home: Path,
                                                            tmp_path: Path) -> None:
    name = unique_lab("vg")
    topo = tmp_path / "machines.yaml"
    topo.write_text(f"name: {name}\nsites:\n  - name: s1\n    subnet: {free_subnet()}\n"
                    "hosts:\n  - name: host1\n    memory: 1G\n"
                    "vms:\n  - {name: vm1, host: host1, memory: 128M, working_set: 16M, autostart: false}\n")
    uuid = ""
    try:
        up = json.loads(labctl("vagrant", "up", str(topo), "--no-provision", "--json",
                               timeout=1800).stdout)
        (m,) = up["machines"]
        assert m["name"] == "host1" and m["group"] == "hosts" and not up["provisioned"]
        assert Path(m["host_key_file"]).read_text().strip() == m["host_key"]
        assert m["host_key"].startswith("ssh-ed25519 ")
        uuid = (Path(up["dotfile"]) / "machines/host1/libvirt/id").read_text().strip()
        assert _virsh("domstate", uuid).stdout.strip() == "running"
        # the key its console printed is the key it presents; root through sudo; the
        # topology's address on its private network
        uid, addrs = asyncio.run(_session(m["address"], m["key"], m["host_key"]))
        assert uid == "0" and m["address"] in addrs
        other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
        with pytest.raises(SshError, match="presented another host key"):
            asyncio.run(_session(m["address"], m["key"], other))
        # the lab on it: the host agent started over SSH with the controller's own code
        labctl("up", up["topology"], timeout=1200)
        try:
            status = json.loads(labctl("--lab", name, "status", "--json").stdout)
            assert status["hosts"][0]["agent"] == "up"
            assert status["hosts"][0]["ssh"] == f"root@{m['address']}:22"
            labctl("--lab", name, "vm", "start", "vm1", timeout=900)
            first = wait(lambda: _beat(name), 300, "vm1's heartbeat on the machine")
            assert wait(lambda: (b := _beat(name)) and b > first and b, 60, "a later beat")
            uname = labctl("--lab", name, "exec", "host1", "--", "uname", "-n")
            assert uname.stdout.strip() == "host1"
        finally:
            labctl("--lab", name, "down", "--purge", check=False, timeout=600)
        left = asyncio.run(_leftover_dirs(m["address"], m["key"], m["host_key"]))
        assert left == "", left
    finally:
        down = labctl("vagrant", "down", str(topo), "--json", check=False, timeout=900)
    destroyed(name, down, ["host1"])
    assert json.loads(down.stdout)["removed"][0] == f"machine host1 (domain {uuid})"
    assert _virsh("dominfo", uuid).returncode != 0
    for net in (f"labctl-{name}-mgmt", f"labctl-{name}-s1"):
        assert _virsh("net-info", net).returncode != 0, net
    assert not vagrant.workdir(name).exists() and not vagrant.console_dir(name).exists()
