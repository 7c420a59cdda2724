"""Datastores on the real lab: allocation with array-style IDs, ACLs to exactly the named
hosts, outside iSCSI clients agree with the inventory, resize refreshes exactly the sharing
hosts (inventory lookup and polling), delete rules, IDs never repeat."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    E2E,
    NO_ACL,
    NO_LUN,
    LabCli,
    chap_env,
    free_subnet,
    host_iqn,
    module_lab,
    naa_designator,
    outside_size,
    refused,
    unique_lab,
    wait,
)

pytestmark = E2E

NAME = unique_lab("dse")
TOPO = """
name: {name}
sites: [{{name: s1, subnet: {subnet}}}]
storage_nodes: [{{name: stor1, capacity: 512M}}]
hosts: [{{name: h1}}, {{name: h2}}, {{name: h3}}, {{name: h4}}]
datastores: [{{name: ds1, size: 64M, hosts: [h1, h2]}}]
vms: [{{name: vm1, host: h1, datastore: ds1, memory: 128M, working_set: 16M}}]
"""


lc = LabCli(NAME)
js = lc.json


@pytest.fixture(scope="module")
def lab(lab_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with module_lab(NAME, TOPO.format(name=NAME, subnet=free_subnet()), lab_home,
                    tmp_path_factory):
        yield {"dir": lab_home / "labs" / NAME, "home": lab_home,
               "status": json.loads(lc("status", "--json").stdout)}


def outside_naa(host: str, m: dict[str, Any]) -> subprocess.CompletedProcess[bytes]:
    """VPD 0x83 as iscsi-inq prints it, from the host's namespace (-c 131: atoi)."""
    url = f"iscsi://{m['portal'].split(':')[0]}/{m['target_iqn']}/{m['lun']}"
    return subprocess.run(["ip", "netns", "exec", f"labctl-{NAME}-{host}", "iscsi-inq", "-i",
                           host_iqn(NAME, host), "-e", "1", "-c", "131", url],
                          capture_output=True, timeout=60, check=False,
                          env={**os.environ, **chap_env(NAME, host, m["target_iqn"])})


def test_create_gives_lio_naa_id_seen_only_by_named_hosts(lab: dict[str, Any]) -> None:
    res = js("datastore", "create", "dsa", "--size", "32M", "--hosts", "h2,h3")
    assert re.fullmatch(r"naa\.6001405[0-9a-f]{25}", res["naa"]), res["naa"]
    assert res["node"] == "stor1" and res["size_bytes"] == 32 << 20
    assert sorted(res["seen_by"]) == ["h2", "h3"]
    assert all(s["seen_naa"] == res["naa"] and s["state"] == "ok" for s in res["seen_by"].values())
    shown = js("datastore", "show", "dsa")
    assert shown["naa"] == res["naa"] and shown["lun"] == res["lun"]
    assert Path(shown["backing"]["path"]).exists()
    raw = bytes.fromhex(res["naa"].removeprefix("naa.")).split(b"\0")[0]
    for host in ("h2", "h3"):
        inq = outside_naa(host, res)
        assert inq.returncode == 0, inq.stderr
        assert naa_designator(inq.stdout) == raw, inq.stdout
        assert outside_size(NAME, host, res) == 32 << 20
    # not named: h1 (named for ds1) logs in but has no such LUN, h4 (named for nothing) is refused
    for host, why in (("h1", NO_LUN), ("h4", NO_ACL)):
        assert refused(outside_naa(host, res), why), host
        units = js("host", "storage", host)["units"]
        assert res["naa"] not in [u["naa"] for u in units]
    assert res["naa"] in [u["naa"] for u in js("host", "storage", "h3")["units"]]


def test_allocation_refuses_when_no_node_has_room(lab: dict[str, Any]) -> None:
    res = lc("datastore", "create", "huge", "--size", "2G", "--hosts", "h1", check=False)
    assert res.returncode == 1
    assert "no storage node has room for 2G (stor1:" in res.stderr and "free of 512M" in res.stderr
    assert "huge" not in lc("datastore", "list").stdout


def test_ids_never_repeat_after_delete(lab: dict[str, Any]) -> None:
    first = js("datastore", "create", "dsb", "--size", "8M", "--hosts", "h4")
    lc("datastore", "delete", "dsb")
    again = js("datastore", "create", "dsb", "--size", "8M", "--hosts", "h4")
    assert again["naa"] != first["naa"]
    reg = sqlite3.connect(lab["home"] / "registry" / "datastore-ids.db")
    rows = reg.execute("SELECT naa, released FROM ids").fetchall()
    naas = [r[0] for r in rows]
    assert len(naas) == len(set(naas)) and first["naa"] in naas and again["naa"] in naas
    assert dict(rows)[first["naa"]] is not None  # released, kept forever
    lc("datastore", "delete", "dsb")


def test_delete_refused_while_a_vm_uses_it(lab: dict[str, Any]) -> None:
    res = lc("datastore", "delete", "ds1", check=False)
    assert res.returncode == 1
    assert "datastore ds1 is the disk of VM vm1: delete refused" in res.stderr


def _commands(host: str) -> int:
    return int(js("host", "storage", host)["scsi_commands"])


@pytest.mark.parametrize("lookup", ["inventory", "poll"])
def test_resize_refreshes_exactly_the_sharing_hosts(lab: dict[str, Any], lookup: str) -> None:
    lc("rescan", "lookup", lookup)
    m = js("datastore", "show", "ds1")
    size = m["size_bytes"] + (16 << 20)
    before = {h: _commands(h) for h in ("h1", "h2", "h3", "h4")}
    res = js("datastore", "resize", "ds1", f"{size >> 20}M")
    ev = res["event"]
    assert ev["kind"] == "lun_capacity_changed" and ev["state"] == "done", ev
    assert ev["lookup"] == lookup
    assert sorted(ev["hosts_refreshed"]) == ["h1", "h2"] and ev["hosts_stale"] == []
    assert ev["size_bytes"] == size
    assert set(ev["scsi_commands"]) == {"h1", "h2"}
    if lookup == "poll":
        assert sorted(ev["hosts_polled"]) == ["h1", "h2", "h3", "h4"]
    after = {h: _commands(h) for h in ("h1", "h2", "h3", "h4")}
    assert after["h3"] == before["h3"] and after["h4"] == before["h4"]  # not touched
    assert after["h1"] > before["h1"] and after["h2"] > before["h2"]
    for host in ("h1", "h2"):
        assert outside_size(NAME, host, m) == size
        unit = next(u for u in js("host", "storage", host)["units"] if u["naa"] == m["naa"])
        assert unit["size_bytes"] == size and unit["state"] == "ok"
    assert js("datastore", "show", "ds1")["size_bytes"] == size
    # the VM on the LUN was told (block_resize) and its guest sees the new size
    assert [v["vm"] for v in ev["vms_resized"]] == ["vm1"]
    wait(lambda: f"DISK size {size}" in lc("vm", "console", "vm1", "size", check=False).stdout,
         10, f"the guest to see DISK size {size}", interval=0.3)
    shown = lc("events").stdout
    assert "lun_capacity_changed" in shown and "refreshed h1,h2" in shown


def test_delete_drops_acls_and_cache(lab: dict[str, Any]) -> None:
    m = js("datastore", "show", "dsa")
    lc("datastore", "delete", "dsa")
    assert "dsa" not in lc("datastore", "list").stdout
    assert refused(outside_naa("h2", m), NO_LUN)
    assert m["naa"] not in [u["naa"] for u in js("host", "storage", "h2")["units"]]
    assert not Path(m["backing"]["path"]).exists()
