"""Rescan service faults on the real lab: a sharing host down during a refresh, a burst of
events on one LUN, an event about an unknown LUN, the storage node restarted."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from labctl.core.rpc import RpcClient
from labctl.storage import node as storagenode
from tests.conftest import (
    E2E,
    LabCli,
    free_subnet,
    module_lab,
    outside_size,
    site_secret,
    unique_lab,
    wait,
)

pytestmark = E2E

NAME = unique_lab("rse")
TOPO = """
name: {name}
sites: [{{name: s1, subnet: {subnet}}}]
storage_nodes: [{{name: stor1, capacity: 1G}}]
hosts: [{{name: h1}}, {{name: h2}}, {{name: h3}}]
datastores:
  - {{name: ds1, size: 64M, hosts: [h1, h2]}}
  - {{name: ds2, size: 32M, hosts: [h2, h3]}}
vms: [{{name: vm1, host: h1, datastore: ds1, memory: 128M, working_set: 16M}}]
"""


lc = LabCli(NAME)
js = lc.json


def events() -> list[dict[str, Any]]:
    return [json.loads(line) for line in lc("events", "--json").stdout.splitlines()]


def host_call(lab: dict[str, Any], host: str, method: str, **params: Any) -> Any:
    h = next(x for x in lab["status"]["hosts"] if x["name"] == host)
    secret = site_secret(lab["dir"].name, host)

    async def go() -> Any:
        c = await RpcClient.connect(h["address"], 7600, secret, timeout=5)
        try:
            return await c.call(method, **params)
        finally:
            await c.close()

    return asyncio.run(go())


@pytest.fixture(scope="module")
def lab(lab_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with module_lab(NAME, TOPO.format(name=NAME, subnet=free_subnet()), lab_home,
                    tmp_path_factory):
        yield {"dir": lab_home / "labs" / NAME, "status": json.loads(lc("status", "--json").stdout)}


def _unit(host: str, unit: str) -> dict[str, Any]:
    return dict(next(u for u in js("host", "storage", host)["units"] if u["naa"] == unit))


def test_sharing_host_down_is_marked_stale_and_caught_up(lab: dict[str, Any]) -> None:
    pid = next(h for h in json.loads(lc("status", "--json").stdout)["hosts"] if h["name"] == "h2")
    db = sqlite3.connect(lab["dir"] / "sites" / "s1" / "inventory.db")
    inv_pid = int(db.execute("SELECT agent_pid FROM hosts WHERE name='h2'").fetchone()[0])
    db.close()
    assert pid["agent"] == "up"
    m = js("datastore", "show", "ds1")
    size = m["size_bytes"] + (8 << 20)
    os.kill(inv_pid, signal.SIGSTOP)  # the lab's own host agent: h2 stops answering
    try:
        res = js("datastore", "resize", "ds1", f"{size >> 20}M")
        ev = res["event"]
        assert ev["state"] == "partial", ev
        assert ev["hosts_refreshed"] == ["h1"] and ev["hosts_stale"] == ["h2"]
        assert _unit("h1", m["naa"])["size_bytes"] == size
    finally:
        os.kill(inv_pid, signal.SIGCONT)
    caught = wait(lambda: next((e for e in events() if e["id"] == ev["id"]
                                and "h2" in e["hosts_late"]), None), 30, "h2 to catch up")
    assert caught["state"] == "done"
    assert _unit("h2", m["naa"])["size_bytes"] == size
    assert "late h2" in lc("events").stdout


def test_burst_on_one_lun_is_coalesced(lab: dict[str, Any]) -> None:
    m = js("datastore", "show", "ds2")
    last = max((e["id"] for e in events()), default=0)
    # a burst of host reports about one unit: the first starts a round, the rest coalesce
    reports = 6
    for _ in range(reports):
        host_call(lab, "h3", "storage_report", kind="unit_attention", naa=m["naa"])
    # and a burst of real capacity changes on the storage node
    sizes = [m["size_bytes"] + (i << 20) for i in range(1, 6)]

    async def grow() -> None:
        for s in sizes:
            await storagenode.resize_data_disk(NAME, "stor1", m["backing"]["disk_serial"], s)

    asyncio.run(grow())
    final = sizes[-1]

    def settled() -> list[dict[str, Any]] | None:
        evs = [e for e in events() if e["id"] > last and e["naa"] == m["naa"]]
        done = [e for e in evs if e["state"] in ("done", "partial", "coalesced")]
        ok = (len(done) == len(evs) and any(e.get("size_bytes") == final for e in evs)
              and any(e["kind"] == "lun_capacity_changed" for e in evs))
        return evs if ok else None

    evs = wait(settled, 30, "the burst to settle")
    assert any(e["state"] == "coalesced" for e in evs), evs
    rounds = [e for e in evs if e["state"] != "coalesced"]
    assert len(rounds) < reports + len(sizes), rounds  # fewer rounds than things triggered
    for e in evs:
        if e["state"] == "coalesced":
            assert e["coalesced_into"] in [r["id"] for r in rounds]
    for host in ("h2", "h3"):
        assert _unit(host, m["naa"])["size_bytes"] == final
        assert outside_size(NAME, host, m) == final
    assert m["naa"] not in [u["naa"] for u in js("host", "storage", "h1")["units"]]


def test_event_about_unknown_lun_is_a_warning(lab: dict[str, Any]) -> None:
    before = {h: js("host", "storage", h) for h in ("h1", "h2", "h3")}
    stores = lc("datastore", "list").stdout
    bogus = "naa.6001405" + "f" * 25
    host_call(lab, "h1", "storage_report", kind="io_error", naa=bogus)
    ev = wait(lambda: next((e for e in events() if e["naa"] == bogus
                            and e["state"] == "ignored"), None), 10, "the unknown-LUN event")
    assert ev["message"].startswith("warning: event about an unknown LUN")
    assert ev["hosts_refreshed"] is None
    assert lc("datastore", "list").stdout == stores
    for h, view in before.items():
        assert js("host", "storage", h)["scsi_commands"] == view["scsi_commands"]
    assert "unknown LUN" in (lab["dir"] / "sites" / "s1" / "rescan.log").read_text()


def test_storage_node_restart_hosts_and_vm_reconnect(lab: dict[str, Any]) -> None:
    def vm() -> dict[str, Any]:
        return dict(json.loads(lc("status", "--json").stdout)["vms"][0])

    ids = {d["name"]: d["naa"] for d in js("datastore", "list")}
    before = vm()["disk_counter"]
    out = lc("storage", "restart", "stor1").stdout
    assert "re-exported" in out
    assert {d["name"]: d["naa"] for d in js("datastore", "list")} == ids
    # the guest's disk counter continues past where it was (QEMU's libiscsi reconnected)
    wait(lambda: (vm().get("disk_counter") or 0) > before + 2, 60, "the disk counter to advance")
    read = lc("vm", "console", "vm1", "read").stdout
    assert int(read.split()[-1]) > before
    for host, ds in (("h1", "ds1"), ("h2", "ds1"), ("h2", "ds2"), ("h3", "ds2")):
        wait(lambda h=host, d=ds: _unit(h, ids[d])["state"] == "ok", 30, f"{host} sees {ds}")
    # every LUN the restarted agent re-exported reaches the stream, after the node is back
    # (the service replays what the new agent published before it re-subscribed)
    evs = events()
    for naa in ids.values():
        mine = [e["kind"] for e in evs if e["naa"] == naa]
        assert "storage_agent_lost" in mine and "lun_added" in mine, mine
        lost = mine.index("storage_agent_lost")
        back = mine.index("storage_agent_back", lost)
        assert back < mine.index("lun_added", back), mine


def test_a_paused_storage_node_shows_and_recovers(lab: dict[str, Any]) -> None:
    """A storage node paused behind labctl's back (virsh suspend, as libvirt does on an I/O
    error): libvirt's event is recorded with its reason and the cure, status shows the
    domain paused and the VM stalled, `labctl storage resume` brings both back."""
    cli = LabCli(NAME)
    domain = f"labctl-{NAME}-stor1"
    before = len(events())
    subprocess.run(["virsh", "-c", "qemu:///system", "suspend", domain], check=True,
                   capture_output=True)
    try:
        paused = wait(lambda: [e for e in events()[before:]
                               if e["kind"] == "storage_node_paused"], 10,
                      "the pause to be recorded")
        assert paused[0]["source"] == "libvirt" and paused[0]["detail"]["reason"] == "user"
        assert "labctl storage resume stor1" in paused[0]["message"], paused[0]
        node = cli.json("status")["storage_nodes"][0]
        assert (node["domain_state"], node["domain_reason"]) == ("paused", "user"), node
        vm = wait(lambda: (v := cli.json("status")["vms"][0])["state"] == "stalled" and v, 20,
                  "the VM to show as stalled")  # its guest waits on the LUN's I/O
        assert vm["reason"].startswith("no heartbeat for"), vm
    finally:
        res = cli("storage", "resume", "stor1")
    assert "running" in res.stdout
    wait(lambda: [e for e in events()[before:] if e["kind"] == "storage_node_resumed"], 10,
         lambda: f"the resumption to be recorded: {events()[before:]}")
    wait(lambda: cli.json("status")["vms"][0]["state"] == "running", 20,
         "the VM to beat again")
    assert cli.json("status")["storage_nodes"][0]["domain_state"] == "running"
    # every sharing host's view of ds1 is usable again (refreshed once the agent answered)
    wait(lambda: all(u["state"] == "ok" for h in ("h1", "h2")
                     for u in cli.json("host", "storage", h)["units"] if u["datastore"] == "ds1"),
         30, lambda: f"the hosts to see ds1 again: {events()[before:]}")
