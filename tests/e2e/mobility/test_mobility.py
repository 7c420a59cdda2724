"""A live migration between two sites through their mobility agents, end to end: real
QEMU, the disk mirrored into a new LUN of the other site's storage node over NBD, memory
and disk relayed by the agents over mutual TLS across the WAN router's netem. Checked from
outside labctl: the guest's heartbeat and disk counter on its new host, the LUN's ID, the
sites' own records."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from labctl.cli.records import check_output
from labctl.testing.checks import outside_qmp
from tests.conftest import (
    E2E,
    LabCli,
    chap_env,
    free_subnet,
    host_iqn,
    in_ns,
    module_lab,
    outside_disk_counter,
    unique_lab,
    wait,
)

pytestmark = E2E

TOPO = """
name: {name}
sites:
  - {{name: site-a, subnet: {a}, mobility: mobility-a}}
  - {{name: site-b, subnet: {b}, mobility: mobility-b}}
storage_nodes:
  - {{name: stor-a, site: site-a, capacity: 512M}}
  - {{name: stor-b, site: site-b, capacity: 512M}}
hosts:
  - {{name: a1, site: site-a}}
  - {{name: b1, site: site-b}}
  - {{name: b2, site: site-b, memory: 64M}}
datastores:
  - {{name: ds-a, node: stor-a, size: 48M, hosts: [a1]}}
  - {{name: fs-a, kind: file, node: stor-a, size: 96M, hosts: [a1]}}
vms:
  - {{name: vm1, host: a1, datastore: ds-a, memory: 128M, dirty_rate: 2, working_set: 16M}}
  - {{name: vm2, host: a1, disk: {{datastore: fs-a, base: labctl-guest.qcow2}}, memory: 96M,
      dirty_rate: 1, working_set: 8M}}
wan: [{{name: wan1, sites: [site-a, site-b], delay: 5ms}}]
"""


@pytest.fixture(scope="module")
def lab(lab_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    name = unique_lab("mob")
    a, b = free_subnet(), free_subnet()
    with module_lab(name, TOPO.format(name=name, a=a, b=b), lab_home, tmp_path_factory):
        yield {"name": name, "cli": LabCli(name), "dir": lab_home / "labs" / name,
               "mobility-b": str(b[253])}


def _vm(cli: LabCli, name: str = "vm1") -> dict[str, Any]:
    return next(v for v in cli.json("vm", "list") if v["name"] == name)


def _beats_on(cli: LabCli, host: str, vm: str = "vm1") -> dict[str, Any]:
    """The VM's status once it beats on ``host`` (its heartbeat counter moves between
    looks)."""
    first = wait(lambda: (v := _vm(cli, vm))["host"] == host and v["heartbeat"] and v, 30,
                 f"{vm} beating on {host}")
    return dict(wait(lambda: (v := _vm(cli, vm))["heartbeat"]["counter"]
                     > first["heartbeat"]["counter"] and v, 30, f"{vm}'s heartbeat on {host}"))


def test_refusals_before_anything_moves(lab: dict[str, Any]) -> None:
    cli = lab["cli"]
    for args, why in (
            (("--to-site", "site-a"), "VM vm1 is already in site site-a"),
            (("--to-site", "site-c"), "lab {name} has no site 'site-c' (sites: site-a, site-b)"),
            (("--to-site", "site-b", "--host", "b2"),
             "no host of site site-b has memory for VM vm1: it needs 128 MiB (b2 64 MiB free)"),
            (("--to-site", "site-b", "--host", "a1"), "site site-b has no host 'a1'")):
        res = cli("migrate", "vm1", *args, check=False)
        assert res.returncode == 1, res
        assert why.format(name=lab["name"]) in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    res = cli("migrate", "vm1", "--to", "mobility-a", check=False)
    assert res.returncode == 1 and "--to-site SITE" in res.stderr, res.stderr
    assert cli.json("--site", "site-b", "datastore", "list") == []  # nothing was made
    # no room on site B's node for the disk: refused with the node's free space
    cli("datastore", "create", "filler", "--size", "480M", "--hosts", "b1")
    try:
        res = cli("migrate", "vm1", "--to-site", "site-b", check=False)
        assert res.returncode == 1 and "no storage node has room for 48M" in res.stderr, \
            res.stderr
    finally:
        cli("datastore", "delete", "filler")
    assert cli.json("--site", "site-b", "datastore", "list") == []
    assert _vm(cli)["host"] == "a1"


#: a TLS client of site B's relay that opens the control stream and says what became of its
#: connection: "open" (the agent kept it: a relay), else how it ended
_PROBE = """
import socket, ssl, sys
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
if len(sys.argv) > 2:
    ctx.load_cert_chain(sys.argv[2], sys.argv[3])
try:
    s = ctx.wrap_socket(socket.create_connection((sys.argv[1], 7800), 5))
    s.sendall(bytes([0, 1, 1, 0, 0, 0, 7]) + b"control")
    s.settimeout(3)
    print("closed" if s.recv(100) == b"" else "answered")
except TimeoutError:
    print("open")
except (ssl.SSLError, OSError) as exc:
    print("refused", exc)
"""


def test_a_third_party_without_the_lab_s_certificate_is_refused(lab: dict[str, Any]) -> None:
    """A TLS client with no certificate gets no relay from site B's agent (its connection is
    dropped at once); with site A's agent's certificate the same client keeps one."""
    res = in_ns(lab["name"], "a1", sys.executable, "-c", _PROBE, lab["mobility-b"])
    assert res.stdout.split()[:1] in (["closed"], ["refused"]), res.stdout + res.stderr
    tls = lab["dir"] / "hosts" / "mobility-a" / "tls"
    res = in_ns(lab["name"], "a1", sys.executable, "-c", _PROBE, lab["mobility-b"],
                str(tls / "mobility-a.pem"), str(tls / "mobility-a.key"))
    assert res.stdout.split() == ["open"], res.stdout + res.stderr


def test_the_vm_moves_to_the_other_site_with_its_disk(lab: dict[str, Any]) -> None:
    cli = lab["cli"]
    before = _beats_on(cli, "a1")
    src_store = next(d for d in cli.json("datastore", "list") if d["name"] == "ds-a")
    moved = cli.json("migrate", "vm1", "--to-site", "site-b")
    assert moved["state"] == "completed", moved.get("error")
    assert (moved["from_site"], moved["to_site"], moved["dest"]) == ("site-a", "site-b", "b1")
    assert [(h["site"], h["source"], h["dest"], h["state"]) for h in moved["halves"]] == [
        ("site-a", "a1", "mobility-a", "completed"), ("site-b", "mobility-b", "b1", "completed")]
    # the disk crossed whole (the mirror copies the 48 MiB LUN), the memory too
    assert moved["relay_bytes"]["disk"] >= 48 << 20
    assert moved["relay_bytes"]["memory"] > 16 << 20
    rec = moved["record"]
    assert rec["heartbeat"]["continues"] and rec["disk"]["ok"], rec
    assert rec["mirror"]["bytes"] >= 48 << 20
    # from outside: the guest beats on b1, in site B, past the source's last beat
    after = _beats_on(cli, "b1")
    assert after["heartbeat"]["counter"] > before["heartbeat"]["counter"]
    assert after["disk_counter"] >= before["disk_counter"]
    assert [v["name"] for v in cli.json("--site", "site-a", "vm", "list")] == ["vm2"]
    # its disk is a new LUN of site B's node: another datastore ID than the source's
    stores = cli.json("--site", "site-b", "datastore", "list")
    assert [d["name"] for d in stores] == [moved["datastore"]]
    assert stores[0]["node"] == "stor-b" and stores[0]["naa"] != src_store["naa"]
    # the guest reads its disk there: the counter it wrote before the move is on it
    answer = cli.json("vm", "console", "vm1", "read")["answer"]
    assert int(answer.split()[-1]) >= before["disk_counter"], answer
    # and a client of our own in b1's namespace reads the same LUN: the guest keeps writing it
    shown = cli.json("--site", "site-b", "datastore", "show", moved["datastore"])
    first = outside_disk_counter(lab["name"], "b1", shown)
    assert first is not None and first >= before["disk_counter"], first
    wait(lambda: (outside_disk_counter(lab["name"], "b1", shown) or 0) > first, 30,
         "the guest's next disk write on site B's LUN, read from outside")
    # nothing of vm1 is left in site A: no VM, its old datastore deleted (no LUN on stor-a)
    assert moved["source_datastore"] == "ds-a" and moved["source_datastore_state"] == "deleted"
    assert [d["name"] for d in cli.json("--site", "site-a", "datastore", "list")] == ["fs-a"]
    luns = in_ns(lab["name"], "a1", "iscsi-ls", "-s", "-i", host_iqn(lab["name"], "a1"),
                 f"iscsi://{src_store['portal'].split(':')[0]}",
                 env=chap_env(lab["name"], "a1", src_store["target_iqn"], mutual=False))
    assert "Lun:" not in luns.stdout, luns.stdout + luns.stderr
    # each site recorded its own half, both carry the shared ID
    half_a = cli.json("--site", "site-a", "migration", "list")[-1]
    half_b = cli.json("--site", "site-b", "migration", "list")[-1]
    assert (half_a["dest"], half_b["source"]) == ("mobility-a", "mobility-b")
    for site, half in (("site-a", half_a), ("site-b", half_b)):
        shown = cli.json("--site", site, "migration", "show", str(half["id"]))
        assert shown["cross_site"]["id"] == moved["id"], shown.get("cross_site")


def _migrate_in_background(lab: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "labctl.cli", "--lab", lab["name"], "-v",
                             "migrate", "vm1", "--to-site", "site-b", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _failed(out: str) -> dict[str, Any]:
    """The cross-site record of a failed ``migrate --to-site --json`` (an error record)."""
    assert check_output(["-v", "migrate", "vm1", "--to-site", "site-b", "--json"], 1,
                        out) == "error"
    error = json.loads(out)["error"]
    assert error["message"].startswith("migration of vm1 to site site-b failed: "), error
    moved: dict[str, Any] = error["evidence"]["cross_site"]  # both halves, as on success
    assert moved["state"] == "failed" and moved["error"], moved
    assert {h["state"] for h in moved["halves"]} <= {"failed", "cancelled"}, moved["halves"]
    return moved


def test_site_b_s_agent_killed_mid_copy(lab: dict[str, Any]) -> None:
    """Site B's mobility agent dies while the disk is copied: both halves fail, the guest
    runs on at the source, site B frees its datastore; ``labctl up`` starts the agent again."""
    cli = lab["cli"]
    if _vm(cli)["host"] != "a1":  # home, keeping site B's copy this time (then deleted)
        back = cli.json("migrate", "vm1", "--to-site", "site-a", "--keep-source")
        assert back["state"] == "completed", back.get("error")
        assert back["source_datastore_state"] == "kept"
        kept = cli.json("--site", "site-b", "datastore", "show", back["source_datastore"])
        assert kept["vms"] == [] and kept["node"] == "stor-b", kept
        cli("--site", "site-b", "datastore", "delete", back["source_datastore"])
    before = _beats_on(cli, "a1")
    stores_b = cli.json("--site", "site-b", "datastore", "list")
    cli("wan", "set", "wan1", "--rate", "16mbit")
    try:
        proc = _migrate_in_background(lab)
        time.sleep(6)
        pid = int((lab["dir"] / "hosts" / "mobility-b" / "agent.pid").read_text())
        os.kill(pid, signal.SIGKILL)  # the lab's own agent, started by this test's lab
        out, err = proc.communicate(timeout=240)
    finally:
        cli("wan", "set", "wan1", "--rate", "1gbit")
    assert proc.returncode == 1, err
    _failed(out)
    after = _beats_on(cli, "a1")
    assert after["heartbeat"]["counter"] > before["heartbeat"]["counter"]
    assert after["disk_counter"] >= before["disk_counter"]
    assert cli.json("--site", "site-b", "datastore", "list") == stores_b
    agents = {h["name"]: h["agent"] for h in cli.json("status")["hosts"]}
    assert agents["mobility-b"] == "unreachable", agents
    cli("up")  # the lab is up: its agents that do not answer are started again
    agents = {h["name"]: h["agent"] for h in cli.json("status")["hosts"]}
    assert agents["mobility-b"] == "up", agents


def test_a_wan_cut_mid_copy_leaves_the_vm_at_home(lab: dict[str, Any]) -> None:
    """The link is cut while the disk is copied: site B gives up on the silent site A and
    frees its datastore; the guest runs on at the source with its disk."""
    cli = lab["cli"]
    if _vm(cli)["host"] != "a1":  # bring it home first (the previous test moved it)
        assert cli.json("migrate", "vm1", "--to-site", "site-a")["state"] == "completed"
    before = _beats_on(cli, "a1")
    stores_b = cli.json("--site", "site-b", "datastore", "list")
    cli("wan", "set", "wan1", "--rate", "16mbit")  # the 48 MiB copy takes ~25 s
    try:
        proc = _migrate_in_background(lab)
        time.sleep(8)  # well into the disk copy
        cli("wan", "set", "wan1", "--down")
        out, err = proc.communicate(timeout=240)
    finally:
        cli("wan", "set", "wan1", "--up", "--rate", "1gbit")
    assert proc.returncode == 1, err
    moved = _failed(out)
    assert "no word from" in str(moved["halves"]), moved["halves"]  # B noticed the silence
    after = _beats_on(cli, "a1")
    assert after["heartbeat"]["counter"] > before["heartbeat"]["counter"]
    assert after["disk_counter"] >= before["disk_counter"]
    assert cli.json("--site", "site-b", "datastore", "list") == stores_b  # B freed its new one
    assert cli.json("--site", "site-b", "vm", "list") == []


def test_a_wan_cut_mid_memory_copy_leaves_the_vm_at_home(lab: dict[str, Any]) -> None:
    """The link is cut once the disk is in sync and the memory is on its way (seen from
    outside: the source QEMU's own QMP says the migration is active and has sent RAM): both
    agents give up on each other, the source QEMU cancels and the guest runs on."""
    cli = lab["cli"]
    if _vm(cli)["host"] != "a1":
        assert cli.json("migrate", "vm1", "--to-site", "site-a")["state"] == "completed"
    before = _beats_on(cli, "a1")
    sock = _vm(cli)["qmp_check_socket"]
    stores_b = cli.json("--site", "site-b", "datastore", "list")
    cli("wan", "set", "wan1", "--rate", "16mbit")
    try:
        proc = _migrate_in_background(lab)
        wait(lambda: (q := outside_qmp(sock, "query-migrate")).get("status") == "active"
             and q["ram"]["transferred"] > 4 << 20, 120, "the memory copy under way")
        cli("wan", "set", "wan1", "--down")
        out, err = proc.communicate(timeout=240)
    finally:
        cli("wan", "set", "wan1", "--up", "--rate", "1gbit")
    assert proc.returncode == 1, err
    moved = _failed(out)  # site A's driver saw no progress, or an agent heard nothing
    assert moved["relay_bytes"]["disk"] >= 48 << 20  # the disk had crossed: it was the memory
    after = _beats_on(cli, "a1")
    assert after["heartbeat"]["counter"] > before["heartbeat"]["counter"]
    assert after["disk_counter"] >= before["disk_counter"]
    assert outside_qmp(sock, "query-status")["status"] == "running"
    assert cli.json("--site", "site-b", "datastore", "list") == stores_b


def test_a_vm_on_a_file_datastore_moves_onto_a_lun(lab: dict[str, Any]) -> None:
    """A VM whose disk is a qcow2 chain on NFS moves too: the mirror flattens the chain
    onto a new LUN of site B the chain's virtual size; site A deletes the VM's own top
    layer and keeps the base (another VM's could be on it)."""
    cli = lab["cli"]
    before = _beats_on(cli, "a1", "vm2")
    moved = cli.json("migrate", "vm2", "--to-site", "site-b")
    assert moved["state"] == "completed", moved.get("error")
    assert moved["record"]["heartbeat"]["continues"] and moved["record"]["disk"]["ok"]
    assert moved["source_datastore"] == "fs-a"
    assert moved["source_datastore_state"] == "deleted vm2.qcow2", moved
    after = _beats_on(cli, moved["dest"], "vm2")
    assert after["disk_counter"] >= before["disk_counter"]
    shown = cli.json("--site", "site-b", "datastore", "show", moved["datastore"])
    assert shown["size_bytes"] == 64 << 20 and shown["vms"] == ["vm2"], shown
    got = outside_disk_counter(lab["name"], moved["dest"], shown)
    assert got is not None and got >= before["disk_counter"], got
    files = {f["name"] for f in cli.json("datastore", "files", "fs-a")["files"]}
    assert "vm2.qcow2" not in files and "labctl-guest.qcow2" in files, files
    assert "vm2" in [v["name"] for v in cli.json("--site", "site-b", "vm", "list")]
    assert "vm2" not in [v["name"] for v in cli.json("--site", "site-a", "vm", "list")]
