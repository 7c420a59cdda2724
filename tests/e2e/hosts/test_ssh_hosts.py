"""Hosts that are machines reached over SSH, end to end: two "machines" that exist before
the lab and outlive it (network namespaces on a bridge this test makes, each running
OpenSSH's own sshd with its own host key), a topology that names them by address, client
key and pinned host key, and a storage node VM on the same bridge. labctl delivers the
lab's secret over SFTP, starts the host agents over SSH and then does everything through
them as on namespace hosts: the VM heartbeats, live-migrates from one machine to the
other, a command runs on a machine with the host's iSCSI identity, and ``down`` leaves the
machines running with nothing of the lab on them."""

from __future__ import annotations

import ipaddress
import json
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest

from labctl.core.proc import cmdlines
from labctl.drivers import netlink
from labctl.hosts.sshhosts import STATE_ROOT
from tests.conftest import E2E, LabCli, free_subnet, labctl, leftovers, unique_lab, wait

SSHD = Path("/usr/sbin/sshd")
SFTP = Path("/usr/lib/openssh/sftp-server")

pytest_plugins = ["pytester"]

pytestmark = [*E2E, pytest.mark.skipif(not SSHD.exists() or not SFTP.exists(),
                                       reason="OpenSSH's server is not installed "
                                              "(scripts/test.sh installs it)")]


@dataclass(frozen=True)
class Machines:
    """The two machines: their addresses, the bridge they share, the keys."""

    subnet: ipaddress.IPv4Network
    bridge: str
    addresses: dict[str, str]
    client_key: Path
    host_keys: dict[str, Path]  # public key files
    sshd: dict[str, subprocess.Popen[bytes]]
    #: how each machine's sshd is started (to start it again after a test stopped it)
    sshd_argv: dict[str, list[str]]
    logs: Path

    def start_sshd(self, m: str) -> None:
        with open(self.logs / f"sshd_{m}.log", "ab") as log:
            self.sshd[m] = subprocess.Popen(self.sshd_argv[m], stdout=log, stderr=log,
                                            start_new_session=True)


def _key(path: Path) -> Path:
    key = asyncssh.generate_private_key("ssh-ed25519")
    key.write_private_key(str(path))
    path.chmod(0o600)
    key.write_public_key(str(path) + ".pub")
    return Path(str(path) + ".pub")


@pytest.fixture(scope="module")
def machines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machines]:
    tag = secrets.token_hex(3)
    d = tmp_path_factory.mktemp("machines")
    subnet = free_subnet()
    net = subnet.network_address
    bridge, alias = f"lsb{tag}", f"test:ssh-machines:{tag}"
    made: list[tuple[str, str, str]] = []
    procs: dict[str, subprocess.Popen[bytes]] = {}  # filled by start_sshd
    privsep = Path("/run/sshd")  # OpenSSH's privilege separation directory
    made_privsep = not privsep.exists()
    try:
        privsep.mkdir(mode=0o755, exist_ok=True)
        netlink.ensure_bridge(bridge, alias, ipaddress.IPv4Interface(f"{net + 1}/24"))
        made.append(("link", bridge, alias))
        client = d / "client"
        (d / "authorized_keys").write_text(_key(client).read_text())
        addresses, host_keys, argv = {}, {}, {}
        for i, m in enumerate(("m1", "m2")):
            ns, veth, addr = f"lsm{tag}{m}", f"lsv{tag}{i}", f"{net + 11 + i}"
            made.append(("netns", ns, f"{alias}:{m}"))
            netlink.ensure_netns(ns, f"{alias}:{m}")
            made.append(("link", veth, f"{alias}:{m}"))
            netlink.ensure_veth(netlink.VethSpec(
                outer=veth, netns=ns, bridge=bridge, alias=f"{alias}:{m}",
                address=ipaddress.IPv4Interface(f"{addr}/24")))
            host_keys[m] = _key(d / f"host_{m}")
            cfg = d / f"sshd_{m}.conf"
            cfg.write_text("\n".join([
                f"ListenAddress {addr}", f"HostKey {d / f'host_{m}'}",
                f"PidFile {d / f'sshd_{m}.pid'}", f"AuthorizedKeysFile {d / 'authorized_keys'}",
                "PermitRootLogin prohibit-password", "PasswordAuthentication no",
                "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no",
                f"Subsystem sftp {SFTP}", "LogLevel VERBOSE", ""]))
            argv[m] = ["ip", "netns", "exec", ns, str(SSHD), "-D", "-e", "-f", str(cfg)]
            addresses[m] = addr
        machines = Machines(subnet, bridge, addresses, client, host_keys, procs, argv, d)
        for m in argv:
            machines.start_sshd(m)
        yield machines
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
            p.wait(10)
        for kind, name, mark in reversed(made):
            if kind == "link":
                netlink.delete_link(name, mark)
            else:
                netlink.delete_netns(name, mark)
        if made_privsep:
            privsep.rmdir()


def _topology(lab: str, m: Machines, host1_key: Path) -> str:
    def host(name: str, machine: str, key: Path) -> str:
        return (f"  - name: {name}\n    address: {m.addresses[machine]}\n"
                f"    ssh: {{key: {m.client_key}, host_key: {key}, python: {sys.executable}}}\n")
    return (f"name: {lab}\nsites:\n  - name: s1\n    subnet: {m.subnet}\n"
            f"    bridge: {m.bridge}\nstorage_nodes:\n  - name: stor1\n    capacity: 1G\n"
            f"hosts:\n{host('host1', 'm1', host1_key)}{host('host2', 'm2', m.host_keys['m2'])}"
            "datastores:\n  - name: ds1\n    size: 256M\n    hosts: [host1, host2]\n"
            "vms:\n  - name: vm1\n    host: host1\n    datastore: ds1\n    memory: 128M\n"
            "    dirty_rate: 5\n    working_set: 16M\n")


def _beat(lab: LabCli) -> tuple[str, int] | None:
    vm = next(v for v in lab.json("vm", "list") if v["name"] == "vm1")
    return (vm["host"], int(vm["heartbeat"]["counter"])) if vm.get("heartbeat") else None


class _Follow:
    """``labctl logs HOST --follow`` running, its lines gathered as they come."""

    def __init__(self, lab: str, host: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "labctl.cli", "--lab", lab, "logs",
                                      host, "--follow", "-n", "1"], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(30)
        self._reader.join(10)
        return code


def _of_lab(state_root: Path) -> list[int]:
    """Processes whose command line names a directory below ``state_root``."""
    own = str(state_root).encode()
    return [pid for pid, cmd in cmdlines() if any(a.startswith(own + b"/")
                                                  for a in cmd.split(b"\0"))]


def test_an_impostor_machine_is_refused(machines: Machines, lab_home: Path,
                                        tmp_path: Path) -> None:
    """host1 pinned to m2's host key: m1 presents its own, and the lab does not come up."""
    name = unique_lab("sshk")
    topo = tmp_path / "lab.yaml"
    topo.write_text(_topology(name, machines, machines.host_keys["m2"]))
    res = labctl("up", str(topo), check=False, timeout=600)
    try:
        assert res.returncode != 0
        last = res.stderr.strip().splitlines()[-1]
        assert "presented another host key than the one the topology pins" in last \
            and "Traceback" not in res.stderr, \
            res.stderr[-1500:]
    finally:
        labctl("--lab", name, "down", "--purge", check=False)
    assert leftovers(name, lab_home / "labs" / name) == []


def test_a_lab_on_machines_reached_over_ssh(machines: Machines, lab_home: Path,
                                            tmp_path: Path) -> None:
    name = unique_lab("ssh")
    topo = tmp_path / "lab.yaml"
    topo.write_text(_topology(name, machines, machines.host_keys["m1"]))
    lab = LabCli(name)
    labctl("up", str(topo), timeout=900)
    follow: _Follow | None = None
    try:
        status = lab.json("status")
        hosts = {h["name"]: h for h in status["hosts"]}
        assert hosts["host1"]["ssh"] == f"root@{machines.addresses['m1']}:22"
        assert hosts["host1"]["agent"] == "up" and hosts["host2"]["agent"] == "up"
        assert hosts["host1"]["netns"] == ""
        # a command runs on the machine (its address is the machine's), and with the host's
        # iSCSI identity, handed over the session's input, it reads the LUN's size
        res = lab("exec", "host1", "--", "ip", "-4", "-br", "addr", "show", "dev", "eth0")
        assert machines.addresses["m1"] in res.stdout
        shown = lab.json("datastore", "show", "ds1")
        url = (f"iscsi://{shown['portal'].split(':')[0]}/{shown['target_iqn']}/"
               f"{shown['lun']}")
        res = lab("exec", "host1", "--", "iscsi-readcapacity16", "-s", "-i",
                  hosts["host1"]["initiator_iqn"], url)
        assert int(res.stdout.strip()) == shown["size_bytes"]
        # the agents run in the machines' own directories, with the secret 0600
        tag_dirs = [p for p in Path(STATE_ROOT).iterdir() if (p / "host1").is_dir()
                    and _of_lab(p / "host1")]
        assert len(tag_dirs) == 1
        state_root = tag_dirs[0]
        assert (state_root / "host1" / "secret").stat().st_mode & 0o777 == 0o600
        # the VM heartbeats on host1, live-migrates to host2 and beats on there
        first = wait(lambda: _beat(lab), 120, "vm1's first heartbeat")
        assert first[0] == "host1"
        # host2's agent log followed over SSH while the VM comes in
        follow = _Follow(name, "host2")
        wait(lambda: follow.lines, 30, "the last line of host2's log")
        done = lab.json("migrate", "vm1", "--to", "host2")
        assert done["state"] == "completed" and done["dest"] == "host2", done
        # the driver's own checks: no beat lost or repeated, the disk counter read back
        assert done["heartbeat"]["continues"] and done["disk"]["ok"], done
        after = wait(lambda: (b := _beat(lab)) and b[0] == "host2" and b[1] > first[1] and b,
                     60, "vm1's heartbeat on host2")
        time.sleep(1.5)
        later = _beat(lab)
        assert later is not None and later[1] > after[1]
        logs = lab("logs", "host2")
        assert logs.stdout.strip()
        wait(lambda: any("incoming vm1 ready" in ln for ln in follow.lines), 30,
             "the incoming VM's line in the followed log")
        assert follow.stop() == 130, follow.proc.stderr
        # Ctrl-C ended the session, and the tail on the machine with it
        log_path = str(state_root / "host2" / "agent.log").encode()
        wait(lambda: not [pid for pid, cmd in cmdlines() if log_path in cmd.split(b"\0")],
             10, "the machine's tail of the log to end")
        _a_second_lab_on_m2(machines, lab, tmp_path)
    finally:
        if follow is not None and follow.proc.poll() is None:
            follow.stop()
        down = labctl("--lab", name, "down", "--json", check=False, timeout=600)
    assert down.returncode == 0, down.stderr
    removed = json.loads(down.stdout)["removed"]
    assert any(r.startswith(f"directory {state_root}/host1 on host1") for r in removed), removed
    # nothing of the lab on the machines: no directory, no process; the machines go on
    assert not state_root.exists()
    assert _of_lab(state_root) == []
    assert all(p.poll() is None for p in machines.sshd.values())
    assert Path("/sys/class/net", machines.bridge).exists()
    assert leftovers(name, lab_home / "labs" / name, records_kept=True) == []
    labctl("--lab", name, "down", "--purge")
    assert leftovers(name, lab_home / "labs" / name) == []


def _a_second_lab_on_m2(m: Machines, first: LabCli, tmp_path: Path) -> None:
    """Another lab on m2, where the first lab's vm1 runs: on the port the first lab's agent
    has it is refused before anything is made there; on a port of its own it comes up
    beside it, and goes without touching the first lab's agent or VM."""
    name = unique_lab("ssh2")
    topo = tmp_path / "second.yaml"
    dirs = set(Path(STATE_ROOT).iterdir())

    def write(port: str) -> None:
        topo.write_text(f"name: {name}\nsites:\n  - name: s1\n    subnet: {m.subnet}\n"
                        f"hosts:\n  - name: h1\n    address: {m.addresses['m2']}\n"
                        f"    ssh: {{key: {m.client_key}, host_key: {m.host_keys['m2']}, "
                        f"python: {sys.executable}{port}}}\n")

    write("")
    res = labctl("up", str(topo), check=False, timeout=600)
    try:
        assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr[-1500:]
        assert res.stderr.strip().splitlines()[-1].endswith(
            f"host h1 (root@{m.addresses['m2']}:22): port 7600 of {m.addresses['m2']} is taken "
            "by something that is not this lab's agent (another lab's on the same machine?): "
            "give this lab's host another agent_port in its ssh settings"), res.stderr[-1500:]
        assert set(Path(STATE_ROOT).iterdir()) == dirs  # nothing of it made there
        labctl("--lab", name, "down", "--purge")
        write(", agent_port: 7610")
        labctl("up", str(topo), timeout=600)
        second = LabCli(name)
        [h1] = second.json("status")["hosts"]
        assert (h1["agent"], h1["address"]) == ("up", m.addresses["m2"]), h1
        assert second("exec", "h1", "--", "true").returncode == 0
        assert len(set(Path(STATE_ROOT).iterdir()) - dirs) == 1  # a directory of its own
    finally:
        down = labctl("--lab", name, "down", "--purge", check=False, timeout=600)
    assert down.returncode == 0, down.stderr
    assert set(Path(STATE_ROOT).iterdir()) == dirs
    # the first lab's agent on m2 and its VM there go on
    assert {h["name"]: h["agent"] for h in first.json("status")["hosts"]}["host2"] == "up"
    beat = _beat(first)
    wait(lambda: (b := _beat(first)) and beat and b[1] > beat[1], 30, "vm1's next heartbeat")


def test_a_machine_gone_at_down_is_said_and_tried_again(machines: Machines, lab_home: Path,
                                                        tmp_path: Path) -> None:
    """m1's SSH server stops while the lab is up: down removes the rest, says which machine
    it could not reach in one line and keeps its entry; once m1 answers again, down ends
    its agent and removes its directory."""
    name = unique_lab("sshd")
    topo = tmp_path / "lab.yaml"
    m = machines
    topo.write_text(f"name: {name}\nsites:\n  - name: s1\n    subnet: {m.subnet}\n"
                    f"hosts:\n  - name: host1\n    address: {m.addresses['m1']}\n"
                    f"    ssh: {{key: {m.client_key}, host_key: {m.host_keys['m1']}, "
                    f"python: {sys.executable}}}\n")
    labctl("up", str(topo), timeout=600)
    lab = LabCli(name)
    state = next(p for p in Path(STATE_ROOT).glob("*/host1") if _of_lab(p))
    m.sshd["m1"].send_signal(signal.SIGTERM)
    m.sshd["m1"].wait(10)
    try:
        res = lab("down", check=False, timeout=300)
        assert res.returncode != 0
        said = res.stderr.strip().splitlines()[-1]
        assert said.startswith("labctl: error: could not tear down every SSH host: host1: no "
                               "SSH session") and "Traceback" not in res.stderr, res.stderr
        # its agent still runs there (nothing was done to it) and still answers
        assert lab.json("status")["hosts"][0]["agent"] == "up"
    finally:
        m.start_sshd("m1")
    wait(lambda: lab("down", check=False, timeout=300).returncode == 0, 30,
         "down once m1's SSH server is back")
    assert not state.exists() and _of_lab(state) == []
    labctl("--lab", name, "down", "--purge")
    assert leftovers(name, lab_home / "labs" / name) == []


INNER = '''
import time

import pytest


@pytest.mark.hardware
def test_the_same_checks_on_machines(lab, host, vm, datastore):
    before = vm.heartbeat()
    time.sleep(1.5)
    assert before is not None and vm.heartbeat() > before
    shown = lab.json("datastore", "show", datastore.name)
    iqn = next(h["initiator_iqn"] for h in lab.status()["hosts"] if h["name"] == host.name)
    url = "iscsi://%s/%s/%d" % (shown["portal"].split(":")[0], shown["target_iqn"], shown["lun"])
    res = host.run("iscsi-readcapacity16", "-s", "-i", iqn, url)
    assert res.returncode == 0, res.stderr
    assert int(res.stdout.strip()) == shown["size_bytes"]
    with open("lab-under-test", "w") as f:
        f.write(f"{lab.name} {lab.home}")
'''


def test_the_pytest_plugin_runs_against_the_machines(machines: Machines,
                                                      pytester: pytest.Pytester) -> None:
    """``pytest --lab FILE`` with a topology of machines: the plugin keeps their addresses,
    runs the hardware-marked test (an iSCSI client on a machine, over SSH) and leaves
    nothing of its lab."""
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_inner=INNER)
    topo = pytester.path / "machines.yaml"
    topo.write_text(_topology("ignored", machines, machines.host_keys["m1"]))
    res = pytester.runpytest_subprocess("--lab", str(topo), "-v", timeout=1200)
    res.assert_outcomes(passed=1)
    name, home = (pytester.path / "lab-under-test").read_text().split()
    assert leftovers(name, Path(home) / "labs" / name) == []
    assert not [p for p in Path(STATE_ROOT).glob("*/host1") if _of_lab(p)]
