"""Live migration on the real lab: LUN over iSCSI from the storage VM, two namespace hosts,
driven through the labctl CLI as a user would. Checks from outside labctl: the destination's
QEMU over its second QMP monitor (qmp-check.sock), QEMU processes by their pidfiles.

Fault cases: destination QEMU killed, destination link cut, Ctrl-C on the CLI, migration to
the VM's own host, a VM that is not running, a host outside the datastore's ACL."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    E2E,
    free_subnet,
    host_iqn,
    in_ns,
    labctl,
    module_lab,
    outside_qmp,
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
vms: [{{name: vm1, host: h1, datastore: ds1, memory: 192M, working_set: 48M, dirty_rate: 10}}]
"""
SLOW_POLICY = "base: capped\nmax_bandwidth_mib_s: 16\nstall_timeout_s: 4\nlease_s: 6\n"
#: capped, and cancel as soon as non-convergence is detected
NO_CONVERGE_POLICY = "base: capped\nmax_bandwidth_mib_s: 20\nconvergence: {actions: [cancel]}\n"
#: every action short of post-copy, in order; a fast throttle ramp (50%, then 99%)
ESCALATE_POLICY = ("base: capped\nmax_bandwidth_mib_s: 20\nconvergence: {actions: [raise_downtime, "
                   "auto_converge, cancel], downtime_steps_ms: [600], throttle_initial: 50, "
                   "throttle_increment: 49}\n")
POSTCOPY_POLICY = ("base: capped\nmax_bandwidth_mib_s: 20\npostcopy: true\n"
                   "convergence: {actions: [postcopy]}\n")


@pytest.fixture(scope="module")
def lab(lab_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    name = unique_lab("mig")
    with module_lab(name, TOPO.format(name=name, subnet=free_subnet()), lab_home,
                    tmp_path_factory, filename="mig.yaml") as topo:
        policy = topo.parent / "slow.yaml"
        policy.write_text(SLOW_POLICY)
        nc = topo.parent / "noconv.yaml"
        nc.write_text(NO_CONVERGE_POLICY)
        (topo.parent / "escalate.yaml").write_text(ESCALATE_POLICY)
        (topo.parent / "postcopy.yaml").write_text(POSTCOPY_POLICY)
        yield {"name": name, "dir": lab_home / "labs" / name, "slow": str(policy),
               "noconv": str(nc), "escalate": str(topo.parent / "escalate.yaml"),
               "postcopy": str(topo.parent / "postcopy.yaml")}


def vm_host(lab: dict[str, Any]) -> str:
    st = json.loads(labctl("--lab", lab["name"], "status", "--json").stdout)
    return str(next(v for v in st["vms"] if v["name"] == "vm1")["host"])


def alive(lab: dict[str, Any], host: str) -> dict[str, Any]:
    st1 = json.loads(labctl("--lab", lab["name"], "status", "--json").stdout)
    time.sleep(0.8)
    st2 = json.loads(labctl("--lab", lab["name"], "status", "--json").stdout)
    v1 = next(v for v in st1["vms"] if v["name"] == "vm1")
    v2 = next(v for v in st2["vms"] if v["name"] == "vm1")
    assert v2["host"] == host and v2["state"] == "running", v2
    assert v2["heartbeat"]["counter"] > v1["heartbeat"]["counter"], (v1, v2)
    return dict(v2)


def dest_clean(lab: dict[str, Any], host: str, within: float = 3.0) -> None:
    run_dir = lab["dir"] / "hosts" / host / "vms" / "vm1"
    wait(lambda: not run_dir.exists(), within,
         lambda: f"{run_dir} to go; it holds {os.listdir(run_dir)}")


def other(host: str) -> str:
    return "h2" if host == "h1" else "h1"


def set_rate(lab: dict[str, Any], mb_s: int) -> None:
    """The guest dirties memory at ``mb_s`` MB/s (it takes MiB/s), set on its console."""
    out = labctl("--lab", lab["name"], "vm", "console", "vm1", f"rate {round(mb_s / 1.048576)}")
    assert "OK rate" in out.stdout, out.stdout


def test_back_and_forth_at_several_rates(lab: dict[str, Any]) -> None:
    for rate in (0, 10, 40, 100):
        src = vm_host(lab)
        dst = other(src)
        set_rate(lab, rate)
        res = json.loads(labctl("--lab", lab["name"], "migrate", "vm1", "--to", dst, "--json",
                                "--measure-dirty-rate").stdout)
        assert res["state"] == "completed" and res["dest"] == dst, res
        assert res["heartbeat"]["continues"] and res["disk"]["ok"], res
        assert res["dirty_rate_measured"]["dirty_rate_mib_s"] is not None
        # the host-observed switchover: source STOP before destination RESUME; the blackout
        # is exactly last beat -> STOP -> RESUME -> first beat
        sw = res["switchover"]
        assert res["stop_to_resume_ms"] > 0 and res["stop_t_rel"] < res["resume_t_rel"], sw
        assert abs(sw["hb_before_stop_ms"] + sw["stop_to_resume_ms"] + sw["after_resume_ms"]
                   - res["blackout_ms"]) < 0.5, sw
        assert res["prepare"]["checks"]["datastore"]["kind"] == "iscsi"
        assert res["prepare"]["checks"]["datastore"]["naa"]
        assert qmp_check(lab, dst, "query-status")["status"] == "running"
        alive(lab, dst)
    set_rate(lab, 10)
    listing = json.loads(labctl("--lab", lab["name"], "migrations", "--json").stdout)
    assert len(listing) >= 4 and all(m["state"] == "completed" for m in listing[-4:])
    assert all(m["stop_to_resume_ms"] > 0 for m in listing[-4:])
    png = lab["dir"] / "t.png"
    labctl("--lab", lab["name"], "migrations", "show", str(listing[-1]["id"]), "--plot", str(png))
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_non_convergence_detected_by_pass_5(lab: dict[str, Any]) -> None:
    """A capped link (20 MiB/s) and a guest dirtying ~100 MB/s: the detector fires by pass 5,
    the policy cancels, the VM keeps running on the source."""
    src = vm_host(lab)
    set_rate(lab, 100)
    try:
        r = labctl("--lab", lab["name"], "migrate", "vm1", "--to", other(src), "--policy",
                   lab["noconv"], check=False)
        assert r.returncode == 1 and "did not converge" in r.stderr, r.stderr
        alive(lab, src)
        dest_clean(lab, other(src))
        last = json.loads(labctl("--lab", lab["name"], "migrations", "--json").stdout)[-1]
        m = json.loads(labctl("--lab", lab["name"], "migrations", "show", str(last["id"]),
                              "--json").stdout)
        assert m["decisions"] and m["decisions"][0]["action"] == "cancel"
        assert m["decisions"][0]["at_pass"] <= 5, m["decisions"]
    finally:
        set_rate(lab, 10)


def qmp_check(lab: dict[str, Any], host: str, command: str) -> Any:
    """``command``'s answer from the VM's QEMU on ``host``, over its own spare QMP socket."""
    return outside_qmp(lab["dir"] / "hosts" / host / "vms" / "vm1" / "qmp-check.sock", command)


def show(lab: dict[str, Any], mid: int) -> dict[str, Any]:
    return dict(json.loads(labctl("--lab", lab["name"], "migrations", "show", str(mid),
                                  "--json").stdout))


def migrate_at(lab: dict[str, Any], dst: str, mb_s: int, policy: str) -> dict[str, Any]:
    """Migrate vm1 to ``dst`` while it dirties ``mb_s`` MB/s; the rate is put back to 10."""
    set_rate(lab, mb_s)
    try:
        return dict(json.loads(labctl("--lab", lab["name"], "migrate", "vm1", "--to", dst,
                                      "--policy", policy, "--json", timeout=180).stdout))
    finally:
        set_rate(lab, 10)


def test_multifd_policy(lab: dict[str, Any]) -> None:
    dst = other(vm_host(lab))
    res = migrate_at(lab, dst, 40, "multifd")
    assert res["state"] == "completed" and res["heartbeat"]["continues"] and res["disk"]["ok"]
    # the destination QEMU really received over multifd channels
    caps = {c["capability"]: c["state"]
            for c in qmp_check(lab, dst, "query-migrate-capabilities")}
    assert caps["multifd"] is True
    assert qmp_check(lab, dst, "query-migrate-parameters")["multifd-channels"] == 2
    alive(lab, dst)


def test_policy_escalates_downtime_then_throttle_then_cancels(lab: dict[str, Any]) -> None:
    """A guest dirtying ~100 MB/s over a 20 MiB/s link: the policy raises the downtime limit,
    then turns on auto-converge and waits for QEMU's throttle to ramp up before it judges
    again; whatever the outcome, the guest is alive and verified."""
    src = vm_host(lab)
    set_rate(lab, 100)
    try:
        r = labctl("--lab", lab["name"], "migrate", "vm1", "--to", other(src), "--policy",
                   lab["escalate"], "--json", check=False, timeout=180)
    finally:
        set_rate(lab, 10)
    last = json.loads(labctl("--lab", lab["name"], "migrations", "--json").stdout)[-1]
    m = show(lab, last["id"])
    actions = [d["action"] for d in m["decisions"]]
    assert actions[:2] == ["raise_downtime", "auto_converge"], m["decisions"]
    ac = m["decisions"][1]["at_pass"]
    throttles = [p["throttle_pct"] for p in m["pass_records"] if p["pass"] > ac]
    assert max(throttles) >= 50, throttles  # QEMU really throttled the vCPU
    if r.returncode == 0:  # the throttle was enough
        res = json.loads(r.stdout)
        assert res["heartbeat"]["continues"] and res["disk"]["ok"], res
        alive(lab, other(src))
    else:
        assert actions[-1] == "cancel" and "did not converge" in r.stderr, r.stderr
        cancel = m["decisions"][-1]["at_pass"]
        # judged again only with the throttle at QEMU's maximum
        assert [p["throttle_pct"] for p in m["pass_records"] if p["pass"] == cancel] == [99]
        alive(lab, src)
        dest_clean(lab, other(src))


def test_postcopy_when_not_converging(lab: dict[str, Any]) -> None:
    dst = other(vm_host(lab))
    res = migrate_at(lab, dst, 100, lab["postcopy"])
    assert res["state"] == "completed" and res["postcopy"], res
    assert res["decisions"][0]["action"] == "postcopy" and res["decisions"][0]["at_pass"] <= 5
    # QEMU itself went through post-copy
    assert "postcopy-active" in [s["status"] for s in res["statuses"]], res["statuses"]
    assert res["heartbeat"]["continues"] and res["disk"]["ok"], res
    assert qmp_check(lab, dst, "query-status")["status"] == "running"
    alive(lab, dst)


def test_refusals(lab: dict[str, Any]) -> None:
    src = vm_host(lab)
    r = labctl("--lab", lab["name"], "migrate", "vm1", "--to", src, check=False)
    assert r.returncode == 1 and "already runs on" in r.stderr
    r = labctl("--lab", lab["name"], "migrate", "vm1", "--to", "h3", check=False)
    assert r.returncode == 1 and "cannot reach datastore ds1" in r.stderr
    assert not (lab["dir"] / "hosts" / "h3" / "vms" / "vm1").exists()
    # a destination whose memory offer is too small for the VM
    run = lab["dir"] / "hosts" / other(src) / "vms" / "vm1"  # an old source's logs may be there
    listing = sorted(os.listdir(run)) if run.exists() else None
    db = sqlite3.connect(lab["dir"] / "sites" / "s1" / "inventory.db")
    offer = db.execute("SELECT memory FROM hosts WHERE name=?", (other(src),)).fetchone()[0]
    with db:
        db.execute("UPDATE hosts SET memory=? WHERE name=?", (128 << 20, other(src)))
    try:
        r = labctl("--lab", lab["name"], "migrate", "vm1", "--to", other(src), check=False)
        assert r.returncode == 1 and f"host {other(src)} lacks memory for VM vm1" in r.stderr
        assert (sorted(os.listdir(run)) if run.exists() else None) == listing  # nothing started
    finally:
        with db:
            db.execute("UPDATE hosts SET memory=? WHERE name=?", (offer, other(src)))
        db.close()
    labctl("--lab", lab["name"], "vm", "stop", "vm1")
    try:
        r = labctl("--lab", lab["name"], "migrate", "vm1", "--to", other(src), check=False)
        assert r.returncode == 1 and "not running" in r.stderr
    finally:
        labctl("--lab", lab["name"], "vm", "start", "vm1")
    alive(lab, src)


def start_migrate(lab: dict[str, Any], dst: str) -> subprocess.Popen[str]:
    """``labctl migrate vm1 --to dst`` with the slow policy, started in the background."""
    return subprocess.Popen([sys.executable, "-m", "labctl.cli", "--lab", lab["name"], "migrate",
                             "vm1", "--to", dst, "--policy", lab["slow"]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_destination_qemu_killed(lab: dict[str, Any]) -> None:
    src = vm_host(lab)
    dst = other(src)
    proc = start_migrate(lab, dst)
    pidfile = lab["dir"] / "hosts" / dst / "vms" / "vm1" / "qemu.pid"

    def dest_started() -> bool:
        if pidfile.exists():
            return True
        assert proc.poll() is None, proc.communicate()[1]  # the migration ended first
        return False

    wait(dest_started, 60, "the destination QEMU's pidfile", interval=0.1)
    time.sleep(2.0)
    os.kill(int(pidfile.read_text().split()[0]), signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    # whichever side tells first: the source's QEMU (the stream broke) or the destination,
    # which dropped the incoming VM when its QEMU died and says so to the next renewal
    assert proc.returncode == 1 and "failed" in err, err
    assert f"failed on {src}" in err or "its QEMU exited" in err, err
    alive(lab, src)
    dest_clean(lab, dst)


def _veth(lab: dict[str, Any], host: str) -> tuple[str, str]:
    """The host side of ``host``'s link to its site bridge, and the alias that proves it."""
    from labctl.core.names import alias as alias_for
    from labctl.state.inventory import Inventory

    inv = Inventory.open(lab["dir"] / "sites" / "s1" / "inventory.db")
    try:
        veth = str(inv.row("hosts", name=host)["veth"])  # type: ignore[index]
    finally:
        inv.close()
    return veth, alias_for(lab["name"], "veth", host)


def test_destination_link_cut(lab: dict[str, Any]) -> None:
    from labctl.drivers.netlink import set_link_state

    src = vm_host(lab)
    dst = other(src)
    veth, alias = _veth(lab, dst)
    proc = start_migrate(lab, dst)
    time.sleep(4.0)
    set_link_state(veth, False, alias)
    t = time.monotonic()
    try:
        _, err = proc.communicate(timeout=40)
        assert time.monotonic() - t < 15
        assert proc.returncode == 1 and "stalled" in err, err
        alive(lab, src)
    finally:
        set_link_state(veth, True, alias)
    dest_clean(lab, dst, within=12)


def test_migrate_at_once_after_a_link_comes_back(lab: dict[str, Any]) -> None:
    """The fault seen on a fresh machine: a migration to a host whose link was just restored
    (its neighbour entry for the portal still unresolved) failed with QEMU's 'Can not
    reconnect right now'. The destination waits for the portal and retries a transient open
    failure; a failed QEMU's logs would be kept, its last error line in the message."""
    from labctl.drivers.netlink import set_link_state

    src = vm_host(lab)
    dst = other(src)
    veth, alias = _veth(lab, dst)
    portal = json.loads(labctl("--lab", lab["name"], "datastore", "show", "ds1",
                               "--json").stdout)["portal"]
    set_link_state(veth, False, alias)
    try:
        # the host tries the portal while cut off: its neighbour entry for it fails
        cut = in_ns(lab["name"], dst, "iscsi-ls", "-i", host_iqn(lab["name"], dst),
                    f"iscsi://{portal}")
    finally:
        set_link_state(veth, True, alias)
    # the fault is there before the migration: the login failed, and the destination's
    # neighbour entry for the portal is unresolved though its link is back
    assert cut.returncode != 0, cut.stdout
    neigh = json.loads(in_ns(lab["name"], dst, "ip", "-j", "neigh", "show",
                             portal.split(":")[0]).stdout or "[]")
    assert any({"FAILED", "INCOMPLETE"} & set(n.get("state", [])) for n in neigh), neigh
    res = json.loads(labctl("--lab", lab["name"], "migrate", "vm1", "--to", dst,
                            "--json").stdout)
    assert res["state"] == "completed" and res["heartbeat"]["continues"], res
    alive(lab, dst)


def test_ctrl_c_cancels_cleanly(lab: dict[str, Any]) -> None:
    src = vm_host(lab)
    dst = other(src)
    proc = start_migrate(lab, dst)
    time.sleep(4.0)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)  # an impatient second Ctrl-C must not abandon the cleanup
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "migration cancelled" in err and "keeps running on the source" in err, err
    alive(lab, src)
    dest_clean(lab, dst)
    last = json.loads(labctl("--lab", lab["name"], "migrations", "--json").stdout)[-1]
    assert last["state"] == "cancelled"


def test_source_qemu_killed(lab: dict[str, Any]) -> None:
    """The source QEMU dies mid-migration: one clear message at once (not a stall later), the
    destination is dropped, and `vm start` brings the VM back with its disk counter intact."""
    src = vm_host(lab)
    dst = other(src)
    disk_before = int(labctl("--lab", lab["name"], "vm", "console", "vm1", "read")
                      .stdout.split()[-1])
    pidfile = lab["dir"] / "hosts" / src / "vms" / "vm1" / "qemu.pid"
    pid = int(pidfile.read_text().split()[0])
    proc = start_migrate(lab, dst)
    time.sleep(3.0)
    os.kill(pid, signal.SIGKILL)
    t = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - t < 3.0, err  # noticed at once, not after the stall timeout
    assert proc.returncode == 1, err
    assert f"the source QEMU of vm1 on {src} exited during the migration" in err, err
    dest_clean(lab, dst)
    st = json.loads(labctl("--lab", lab["name"], "status", "--json").stdout)
    assert next(v for v in st["vms"] if v["name"] == "vm1")["state"] == "failed"
    out = labctl("--lab", lab["name"], "vm", "start", "vm1")
    assert "had died" in out.stderr, out.stderr
    alive(lab, src)
    read = labctl("--lab", lab["name"], "vm", "console", "vm1", "read").stdout
    assert int(read.split()[-1]) >= disk_before, read  # no disk data lost
