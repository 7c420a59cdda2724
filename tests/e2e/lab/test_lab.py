"""The local lab, end to end, on the real thing: LIO in the storage VM, iSCSI on the wire,
QEMU guests in namespace hosts. Checked from outside labctl wherever possible."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from labctl.cli.records import SCHEMA_DIR
from tests.conftest import (
    E2E,
    NO_ACL,
    LabCli,
    chap_env,
    free_subnet,
    in_ns,
    labctl,
    leftovers,
    module_lab,
    naa_designator,
    outside_qmp,
    refused,
    unique_lab,
    wait,
)

pytestmark = E2E

TOPO = """
name: {name}
sites: [{{name: s1, subnet: {subnet}}}]
storage_nodes: [{{name: stor1, capacity: 1G}}]
hosts: [{{name: h1}}, {{name: h2}}, {{name: h3}}]
datastores: [{{name: ds1, size: 64M, hosts: [h1, h2]}}]
vms: [{{name: vm1, host: h1, datastore: ds1, memory: 128M, working_set: 32M, dirty_rate: 5}}]
"""


@pytest.fixture(scope="module")
def lab(lab_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    name, subnet = unique_lab("e2e"), free_subnet()
    with module_lab(name, TOPO.format(name=name, subnet=subnet), lab_home,
                    tmp_path_factory) as topo:
        status = json.loads(labctl("--lab", name, "status", "--json").stdout)
        yield {"name": name, "dir": lab_home / "labs" / name, "status": status, "topo": topo,
               "subnet": subnet}


def test_status_lists_everything(lab: dict[str, Any]) -> None:
    s = lab["status"]
    assert s["state"] == "up"
    assert [h["name"] for h in s["hosts"]] == ["h1", "h2", "h3"]
    assert all(h["initiator_iqn"].startswith("iqn.") and h["agent"] == "up" for h in s["hosts"])
    assert s["storage_nodes"][0]["target_iqn"].startswith("iqn.")
    assert s["storage_nodes"][0]["agent"] == "up" and s["storage_nodes"][0]["agent_uptime_s"] > 0
    ds = s["datastores"][0]
    assert ds["size_bytes"] == 64 << 20 and ds["hosts"] == ["h1", "h2"]
    assert re.fullmatch(r"naa\.6001405[0-9a-f]{25}", ds["naa"]), ds["naa"]
    assert s["vms"][0]["state"] == "running" and s["vms"][0]["host"] == "h1"


def test_outside_iscsi_client_sees_same_naa(lab: dict[str, Any]) -> None:
    s = lab["status"]
    node = s["storage_nodes"][0]
    ds = s["datastores"][0]
    for host in s["hosts"][:2]:
        url = f"iscsi://{node['address']}/{node['target_iqn']}/{ds['lun']}"
        # iscsi-inq parses -c with atoi (so 0x83 must be 131) and prints binary designators
        # with %s: the NAA bytes appear raw, up to the first zero byte
        env = chap_env(lab["name"], host["name"], node["target_iqn"])
        inq = subprocess.run(["ip", "netns", "exec", f"labctl-{lab['name']}-{host['name']}",
                              "iscsi-inq", "-i", host["initiator_iqn"], "-e", "1", "-c", "131", url],
                             capture_output=True, timeout=60, check=False,
                             env={**os.environ, **env})
        assert inq.returncode == 0, inq.stderr
        raw = bytes.fromhex(ds["naa"].removeprefix("naa."))
        shown = raw.split(b"\0")[0]
        assert naa_designator(inq.stdout) == shown, inq.stdout
        # `labctl exec` runs as the host: its IQN and CHAP secret are in the environment
        ls = labctl("--lab", lab["name"], "exec", host["name"], "--", "iscsi-ls", "-s", "-i",
                    host["initiator_iqn"], f"iscsi://{node['address']}", check=False)
        assert ls.returncode == 0 and f"Lun:{ds['lun']}" in ls.stdout, ls.stdout + ls.stderr


def test_host_not_named_cannot_log_in(lab: dict[str, Any]) -> None:
    s = lab["status"]
    node = s["storage_nodes"][0]
    h3 = s["hosts"][2]
    url = f"iscsi://{node['address']}/{node['target_iqn']}/0"
    inq = in_ns(lab["name"], "h3", "iscsi-inq", "-i", h3["initiator_iqn"], url,
                env=chap_env(lab["name"], "h3", node["target_iqn"]))
    assert refused(inq, NO_ACL), inq.stdout + inq.stderr


def test_host_claiming_another_hosts_iqn_gets_nothing(lab: dict[str, Any]) -> None:
    """From h3's namespace, claim h1's IQN: without h1's CHAP secret (none, or h3's own) no
    login; with it, the LUN reads (so the refusal is the secret's doing, not the network)."""
    s = lab["status"]
    node = s["storage_nodes"][0]
    ds = s["datastores"][0]
    h1 = s["hosts"][0]
    url = f"iscsi://{node['address']}/{node['target_iqn']}/{ds['lun']}"
    own = chap_env(lab["name"], "h3", node["target_iqn"])
    for env in ({}, {**own, "LIBISCSI_CHAP_USERNAME": h1["initiator_iqn"]}):
        cap = in_ns(lab["name"], "h3", "iscsi-readcapacity16", "-s", "-i", h1["initiator_iqn"],
                    url, env=env)
        assert cap.returncode != 0 and "Authentication failure" in cap.stdout + cap.stderr, cap
        ls = in_ns(lab["name"], "h3", "iscsi-ls", "-s", "-i", h1["initiator_iqn"],
                   f"iscsi://{node['address']}",
                   env={k: v for k, v in env.items() if "_TARGET_" not in k})
        assert "Lun:" not in ls.stdout, ls
    cap = in_ns(lab["name"], "h3", "iscsi-readcapacity16", "-s", "-i", h1["initiator_iqn"], url,
                env=chap_env(lab["name"], "h1", node["target_iqn"]))
    assert cap.returncode == 0 and int(cap.stdout) > 0, cap


def test_heartbeat_is_live_and_disk_counter_advances(lab: dict[str, Any]) -> None:
    def vm() -> dict[str, Any]:
        st = json.loads(labctl("--lab", lab["name"], "status", "--json").stdout)
        return dict(st["vms"][0])

    a = vm()
    time.sleep(2.5)
    b = vm()
    assert b["heartbeat"]["counter"] >= a["heartbeat"]["counter"] + 10
    assert b["heartbeat"]["age_s"] < 1.0
    assert b["disk_counter"] > a["disk_counter"]


def test_outside_qmp_and_console_log(lab: dict[str, Any]) -> None:
    """The VM's own QEMU answers on its spare QMP socket; its console log holds heartbeats."""
    vm = json.loads(labctl("--lab", lab["name"], "status", "--json").stdout)["vms"][0]
    assert outside_qmp(vm["qmp_check_socket"], "query-status", timeout=10)["status"] == "running"
    log = Path(vm["console_log"]).read_text(errors="replace")
    assert sum(1 for line in log.splitlines() if line.startswith("HB ")) >= 10


def test_vm_disk_logs_in_with_a_secret_object_off_the_command_line(lab: dict[str, Any]) -> None:
    """QEMU opens the LUN as its host with CHAP; the secret is in neither its command line nor
    a file once QEMU runs (the object read it from a 0600 file that is gone), and the block
    node QEMU reports names the user and the secret object only."""
    vm = json.loads(labctl("--lab", lab["name"], "status", "--json").stdout)["vms"][0]
    h1 = lab["status"]["hosts"][0]
    cred = chap_env(lab["name"], h1["name"], lab["status"]["storage_nodes"][0]["target_iqn"])
    password = cred["LIBISCSI_CHAP_PASSWORD"]
    cmdline = Path(f"/proc/{vm['pid']}/cmdline").read_bytes().decode().split("\0")
    assert "secret,id=disk0-chap,format=raw,file=" in " ".join(cmdline)
    assert any(f"user={h1['initiator_iqn']},password-secret=disk0-chap" in a for a in cmdline)
    run_dir = Path(vm["qmp_check_socket"]).parent
    assert not (run_dir / "chap.secret").exists()
    leaked = [f.name for f in run_dir.iterdir() if f.is_file() and password.encode() in f.read_bytes()]
    assert password not in " ".join(cmdline) and leaked == []
    environ = Path(f"/proc/{vm['pid']}/environ").read_bytes()
    assert password.encode() not in environ
    nodes = outside_qmp(vm["qmp_check_socket"], "query-named-block-nodes", timeout=10)
    disk = [n for n in nodes if n["node-name"] == "disk0"]
    assert disk and password not in json.dumps(nodes), nodes


def test_console_tail_shows_heartbeats(lab: dict[str, Any]) -> None:
    res = labctl("--lab", lab["name"], "vm", "console", "vm1")
    beats = [line for line in res.stdout.splitlines() if line.startswith("HB ")]
    assert len(beats) >= 5, res.stdout
    answer = labctl("--lab", lab["name"], "vm", "console", "vm1", "read").stdout.strip()
    assert re.fullmatch(r"DISK read [0-9]+", answer), answer


def test_console_attach_sends_typed_lines_and_follows(lab: dict[str, Any]) -> None:
    """vm console --attach: each line typed is a console command whose answer comes back;
    one the guest does not know is refused without ending the session; new console lines
    arrive stamped with their time; the end of input detaches and the guest runs on."""
    proc = subprocess.Popen([sys.executable, "-m", "labctl.cli", "--lab", lab["name"], "vm",
                             "console", "vm1", "--attach", "--lines", "0"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None
    proc.stdin.write("size\nbogus\nread\n")
    proc.stdin.flush()
    time.sleep(2.5)  # a few heartbeats (100 ms apart) come through the follow meanwhile
    out, err = proc.communicate(timeout=60)  # closes stdin: the end of input detaches
    assert proc.returncode == 0, err
    assert re.search(r"^> DISK size [0-9]+$", out, re.M) and re.search(r"^> DISK read [0-9]+$", out,
                                                                  re.M), out
    assert "bogus" in err and "detached from vm1's console" in err, err
    stamped = [line for line in out.splitlines() if re.match(r"^\d{4}-\d\d-\d\dT\S+  HB ", line)]
    assert len(stamped) >= 5, out
    after = LabCli(lab["name"]).json("vm", "list")[0]
    assert after["state"] == "running", after


def test_verbose_points_at_the_logs(lab: dict[str, Any]) -> None:
    res = labctl("--lab", lab["name"], "status", "-v")
    lines = [line.split() for line in res.stderr.splitlines() if line.startswith("  ")]
    logs = {(w[0], Path(w[-1])) for w in lines}
    assert ("h1", lab["dir"] / "hosts" / "h1" / "agent.log") in logs, res.stderr
    assert ("stor1", lab["dir"] / "storage" / "stor1" / "console.log") in logs, res.stderr
    assert all(path.is_file() for _, path in logs), logs
    assert any(name.startswith("vm1@") for name, _ in logs), res.stderr


def test_a_long_step_on_a_terminal_keeps_results_on_their_own_lines(lab: dict[str, Any]) -> None:
    """On a terminal, progress lines get a running clock; whatever comes after (a result on
    stdout, the next step) starts on a line of its own, and no escape is left behind."""
    main, sub = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "labctl.cli", "--lab", lab["name"], "vm",
                                 "stop", "vm1"], stdin=sub, stdout=sub, stderr=sub)
        text = _read_pty(main, proc)
        proc = subprocess.Popen([sys.executable, "-m", "labctl.cli", "--lab", lab["name"], "vm",
                                 "start", "vm1"], stdin=sub, stdout=sub, stderr=sub)
        text += _read_pty(main, proc)
    finally:
        os.close(sub)
        os.close(main)
    lines = [line.rsplit("\r", 1)[-1] for line in text.replace("\r\n", "\n").split("\n")]
    assert "VM vm1 stopped" in lines and any(
        line.startswith("VM vm1 running (pid ") for line in lines), text
    for line in lines:  # a progress line is only ever progress: no result glued onto it
        assert not line.startswith("[") or not re.search(r"VM vm1 (stopped|running)", line), text


def _read_pty(fd: int, proc: subprocess.Popen[bytes]) -> str:
    out = b""
    while True:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                out += os.read(fd, 4096)
            except OSError:
                break
        elif proc.poll() is not None:
            break
    assert proc.wait(timeout=60) == 0, out
    return out.decode(errors="replace")


def test_datastores_larger_than_the_disk_are_refused(lab_home: Path, tmp_path: Path) -> None:
    name = unique_lab("e2ebig")
    topo = tmp_path / "big.yaml"
    topo.write_text(TOPO.format(name=name, subnet=free_subnet())
                    .replace("capacity: 1G", "capacity: 900T").replace("size: 64M", "size: 800T"))
    res = labctl("up", str(topo), check=False)
    assert res.returncode == 1
    assert "lab.yaml" not in res.stderr and "big.yaml: datastores: the datastores need" in res.stderr
    assert not (lab_home / "labs" / name).exists()


def test_up_twice_is_idempotent(lab: dict[str, Any]) -> None:
    res = labctl("up", str(lab["topo"]))
    assert "already up" in res.stderr


def test_vm_stop_and_start_keeps_disk_counter(lab: dict[str, Any]) -> None:
    before = json.loads(labctl("--lab", lab["name"], "status", "--json").stdout)["vms"][0]
    labctl("--lab", lab["name"], "vm", "stop", "vm1")
    res = labctl("--lab", lab["name"], "vm", "stop", "vm1", check=False)
    assert res.returncode == 1 and "not running" in res.stderr
    labctl("--lab", lab["name"], "vm", "start", "vm1")
    after = json.loads(labctl("--lab", lab["name"], "status", "--json").stdout)["vms"][0]
    assert after["state"] == "running"
    assert after["disk_counter"] >= before["disk_counter"]


def test_unknown_vm(lab: dict[str, Any]) -> None:
    res = labctl("--lab", lab["name"], "vm", "start", "nope", check=False)
    assert res.returncode == 1
    assert res.stderr.strip() == "labctl: error: unknown VM 'nope' (VMs: vm1)"


def test_down_after_sigkill_mid_up(lab_home: Path, tmp_path: Path) -> None:
    name = unique_lab("e2ekill")
    topo = tmp_path / "kill.yaml"
    topo.write_text(TOPO.format(name=name, subnet=free_subnet()))
    lab_dir = lab_home / "labs" / name

    def node_defined() -> bool:
        doms = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--name"],
                              capture_output=True, text=True, check=False).stdout
        return f"labctl-{name}-stor1" in doms

    proc = subprocess.Popen([sys.executable, "-m", "labctl.cli", "up", str(topo)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # kill it once the storage VM exists, while it is still booting
        wait(node_defined, 120, "the storage node to appear", interval=0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert leftovers(name, lab_dir) != []
    res = labctl("--lab", name, "up", str(topo), check=False)
    assert res.returncode == 1 and "did not come up completely" in res.stderr
    labctl("--lab", name, "down")
    assert leftovers(name, lab_dir, records_kept=True) == []
    assert (lab_dir / "inventory.db").exists()  # the records outlive the lab
    res = labctl("--lab", name, "down")  # a second down says so and succeeds
    assert "was already down" in res.stdout
    labctl("--lab", name, "down", "--purge")
    assert leftovers(name, lab_dir) == []
    res = labctl("--lab", name, "down", check=False)
    assert res.returncode == 1
    assert res.stderr.strip() == f"labctl: error: lab {name} is not up: nothing to tear down"


def test_missing_qemu_is_a_clear_error(lab_home: Path, tmp_path: Path) -> None:
    name = unique_lab("e2eq")
    topo = tmp_path / "q.yaml"
    topo.write_text(TOPO.format(name=name, subnet=free_subnet()))
    env = {**os.environ, "LABCTL_QEMU": "qemu-system-nonexistent"}
    res = subprocess.run([sys.executable, "-m", "labctl.cli", "up", str(topo)], capture_output=True,
                         text=True, env=env, check=False)
    assert res.returncode == 1
    assert "QEMU (qemu-system-nonexistent) is not installed" in res.stderr
    assert not (lab_home / "labs" / name).exists()


def test_subnet_clash_with_machine_is_refused(lab: dict[str, Any], tmp_path: Path) -> None:
    topo = tmp_path / "clash.yaml"
    # half of the module lab's own subnet: a clash with a network of this machine on purpose
    half = next(lab["subnet"].subnets(new_prefix=25))
    topo.write_text(TOPO.format(name=unique_lab("e2eclash"), subnet=half))
    res = labctl("up", str(topo), check=False)
    assert res.returncode == 1
    assert "sites[0].subnet" in res.stderr and "overlaps a network this machine already uses" in res.stderr


def test_demo_runs_the_flagship_scenario_and_leaves_nothing(lab_home: Path, tmp_path: Path) -> None:
    """What the README's first command runs (`labctl demo`), on the default lab's topology
    (moved to a subnet of its own): alive, migrated there and back with the guest verified,
    the datastore grown and seen by both hosts and the guest, then torn down."""
    default = (Path(__file__).resolve().parents[3] / "labs" / "default.yaml").read_text()
    assert "10.231.0.0/24" in default and "name: default" in default
    name = unique_lab("e2edemo")
    topo = tmp_path / "demo.yaml"
    topo.write_text(default.replace("10.231.0.0/24", str(free_subnet()))
                    .replace("name: default", f"name: {name}"))
    left: list[str] = []
    try:
        r = labctl("demo", str(topo), check=False, timeout=600)
        # what the demo's own teardown left, looked up before anything else removes it
        left = leftovers(name, lab_home / "labs" / name, records_kept=True)
    finally:
        if (lab_home / "labs" / name).exists():  # the records the demo kept
            labctl("--lab", name, "down", "--purge", check=False)
    assert left == [], left
    assert r.returncode == 0 and r.stdout.rstrip().endswith("demo: OK"), r.stdout + r.stderr
    out = r.stdout
    assert re.search(r"guest verified:\s+on host2: ", out) and re.search(
        r"guest verified:\s+on host1: ", out), out
    assert out.count("(continues)") == 2 and out.count("read back") >= 2
    assert re.search(r"refreshed host1,host2; all agreed in \d+ ms; VM vm1 resized", out), out
    assert f"disk as {320 << 20} bytes (the new size)" in out
    assert leftovers(name, lab_home / "labs" / name) == []  # after --purge


def _schema(name: str) -> dict[str, Any]:
    return dict(json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text()))


def test_json_outputs_match_their_shipped_schemas(lab: dict[str, Any]) -> None:
    """Each command's --json output, as a user's script reads it, validates against the
    schema labctl ships for that record."""
    cli = LabCli(lab["name"])
    jsonschema.validate(cli.json("status"), _schema("status"))
    jsonschema.validate(json.loads(labctl("ls", "--json").stdout), _schema("ls"))
    for vm in cli.json("vm", "list"):
        jsonschema.validate(vm, _schema("vm"))
    for ds in cli.json("datastore", "list"):
        jsonschema.validate(ds, _schema("datastore"))
    jsonschema.validate(cli.json("datastore", "show", "ds1"), _schema("datastore-show"))
    jsonschema.validate(cli.json("host", "storage", "h1"), _schema("host-storage"))
    bad = cli("vm", "start", "nope", "--json", check=False)
    assert bad.returncode == 1
    jsonschema.validate(json.loads(bad.stdout), _schema("error"))
    # the rest through labctl(), which checks every --json output against its schema
    assert labctl("validate", str(lab["topo"]), "--json").returncode == 0
    assert cli.json("vm", "console", "vm1", "read")["answer"].startswith("DISK read ")
    assert cli.json("vm", "console", "vm1", "--lines", "3")["lines"]
    logs = cli("logs", "h1", "--lines", "3", "--json").stdout.splitlines()
    assert len(logs) == 3 and all(json.loads(line)["at"] is None for line in logs)
    # a lab just up may have no storage event yet (the rescan and WAN tests make them)
    events = [json.loads(line) for line in cli("events", "--json").stdout.splitlines()]
    assert all(e["at"].endswith("+00:00") for e in events), events
    assert cli.json("rescan", "lookup")["lookup"] in ("inventory", "poll")
    assert cli.json("storage", "portal", "stor1", "up")
    assert cli.json("migration", "policies")[0]["name"] == "default"
    assert isinstance(cli.json("migration", "list"), list)
    shown = cli.json("host", "storage", "h1")
    assert all(u["scanned_at"] is None or u["scanned_at"].endswith("+00:00")
               for u in shown["units"]), shown


def test_export_packs_the_records_without_secrets(lab: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "repro.tar.gz"
    res = LabCli(lab["name"]).json("export", str(out))
    assert res["file"] == str(out) and res["files"] > 5
    with tarfile.open(out) as tar:
        names = tar.getnames()
    assert f"{lab['name']}/inventory.db" in names and f"{lab['name']}/topology.json" in names
    assert any(n.endswith("/agent.log") for n in names)
    assert not any(Path(n).name in ("secret", ".lock") for n in names), names


def test_a_killed_agent_comes_back_with_its_vm_tracked(lab: dict[str, Any]) -> None:
    """SIGKILL of h1's agent leaves its VM's QEMU running; status names the dead agent and
    the cure; `up` (idempotent) starts the agent again, which takes over the running QEMU:
    same PID, heartbeat advancing, console answering, no restart of the guest."""
    cli = LabCli(lab["name"])
    vm = cli.json("status")["vms"][0]
    qemu_pid, beat = vm["pid"], vm["heartbeat"]["counter"]
    agent_pid = int((lab["dir"] / "hosts" / "h1" / "agent.pid").read_text())
    os.kill(agent_pid, signal.SIGKILL)
    wait(lambda: not Path(f"/proc/{agent_pid}").exists(), 10, "the agent to die")
    assert Path(f"/proc/{qemu_pid}").exists()  # the guest does not go with its agent
    h1 = next(h for h in cli.json("status")["hosts"] if h["name"] == "h1")
    assert h1["agent"] == "unreachable" and "labctl up" in h1["agent_reason"], h1
    res = cli("up", str(lab["topo"]))
    assert "does not answer" in res.stderr and "starting it again" in res.stderr, res.stderr
    after = cli.json("status")["vms"][0]
    assert after["pid"] == qemu_pid and after["state"] == "running", after
    again = wait(lambda: (v := cli.json("status")["vms"][0])["heartbeat"] and
                 v["heartbeat"]["counter"] > beat and v, 10, "the heartbeat to be tracked")
    assert again["heartbeat"]["age_s"] < 2
    assert re.fullmatch(r"DISK read [0-9]+", cli("vm", "console", "vm1", "read").stdout.strip())
    assert "adopted VM vm1" in (lab["dir"] / "hosts" / "h1" / "agent.log").read_text()
