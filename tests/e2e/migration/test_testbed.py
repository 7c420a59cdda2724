"""Live migration end to end at the host-agent level: two real host agents in two throwaway
namespaces on their own bridge, a real QEMU guest whose disk is a raw file both QEMUs open.
Every check looks at the guest itself (heartbeat, disk counter) and, from outside, at the
processes and files that must (not) exist."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from labctl.core.errors import MigrationError
from labctl.hosts import protocol as hp
from labctl.migration.policy import load_policy
from labctl.migration.testbed import PairTestbed, qemu_pids_under
from tests.conftest import outside_qmp

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces)"),
]

SLOW = replace(load_policy("capped"), name="slow", max_bandwidth_mib_s=16, stall_timeout_s=4,
               lease_s=6)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def tb(tmp_path_factory: pytest.TempPathFactory, lab_home: Path
             ) -> AsyncIterator[PairTestbed]:
    """Two host agents and a VM on a shared raw file, for the module (one event loop)."""
    work = tmp_path_factory.mktemp("mig")
    async with PairTestbed(work, memory_mib=192) as bed:
        await bed.start_vm(rate_mib_s=10, wss_mib=48)
        yield bed


async def _alive_on(tb: PairTestbed, host: str) -> dict[str, Any]:
    """The guest runs on ``host``: heartbeats advance and the disk counter reads back."""
    c = tb.clients[host]
    s1 = await hp.VM_STATUS.call(c, hp.VmName(tb.vm))
    await asyncio.sleep(0.6)
    s2 = await hp.VM_STATUS.call(c, hp.VmName(tb.vm))
    assert s2.state == "running", s2
    assert s1.heartbeat is not None and s2.heartbeat is not None
    assert s2.heartbeat.counter >= s1.heartbeat.counter + 3, (s1, s2)
    read = (await hp.VM_CONSOLE.call(c, hp.ConsoleCommand(tb.vm, "read"))).answer
    assert int(read.split()[2]) >= (s1.disk_counter or 0)
    return s2.to_wire()


async def _dest_clean(tb: PairTestbed, host: str, within: float = 3.0) -> None:
    run_dir = tb.lab_dir / "hosts" / host / "vms" / tb.vm
    deadline = time.monotonic() + within
    while True:
        vms = (await hp.VM_LIST.call(tb.clients[host])).vms
        left = [v.name for v in vms] + [f"pid {p}" for p in qemu_pids_under(run_dir)]
        if run_dir.exists():
            left.append(f"dir {run_dir}")
        if not left:
            return
        assert time.monotonic() < deadline, f"destination {host} leftovers: {left}"
        await asyncio.sleep(0.2)


@pytest.mark.asyncio(loop_scope="module")
async def test_back_and_forth_guest_survives(tb: PairTestbed) -> None:
    for rate in (10, 40):
        await tb.clients[tb.vm_host].call("vm_console", name=tb.vm, command=f"rate {rate}")
        src = tb.vm_host
        res = await tb.migrate(load_policy("default"))
        dst = res["dest"]
        assert res["state"] == "completed" and dst != src
        assert res["heartbeat"]["continues"]
        assert res["disk"]["ok"] and res["disk"]["dest_read"] >= res["disk"]["source_last"]
        assert res["downtime_ms"] > 0 and res["total_ms"] >= res["downtime_ms"]
        # host-observed switchover: STOP then RESUME, and the blackout adds up exactly
        sw = res["switchover"]
        assert res["stop_t_rel"] < res["resume_t_rel"] and res["stop_to_resume_ms"] > 0, sw
        assert abs(sw["hb_before_stop_ms"] + sw["stop_to_resume_ms"] + sw["after_resume_ms"]
                   - res["blackout_ms"]) < 0.5, sw
        assert {"src-downtime-end", "dst-precopy-loadvm-completed"} <= set(sw["checkpoints_ms"])
        assert res["passes"] >= 2 and res["pass_records"][0]["pass"] == 1
        assert res["prepare"]["checks"]["read"]["bytes"] == 512
        # outside: the destination's QEMU says running, the source's QEMU is gone
        run_dir = tb.lab_dir / "hosts" / dst / "vms" / tb.vm
        st = await asyncio.to_thread(outside_qmp, run_dir / "qmp-check.sock", "query-status")
        assert st["status"] == "running"
        assert qemu_pids_under(tb.lab_dir / "hosts" / src / "vms") == []
        assert (await hp.VM_LIST.call(tb.clients[src])).vms == []
        await _alive_on(tb, dst)
    assert tb.inv is not None
    rows = tb.inv.rows("migrations")
    assert len(rows) >= 2 and all(r["state"] == "completed" for r in rows[-2:])
    assert tb.inv.rows("migration_passes", migration=rows[-1]["id"])
    await tb.clients[tb.vm_host].call("vm_console", name=tb.vm, command="rate 10")



@pytest.mark.asyncio(loop_scope="module")
async def test_early_vs_late_storage(tb: PairTestbed) -> None:
    early = await tb.migrate(load_policy("default"))
    late = await tb.migrate(load_policy("late"))
    assert late["storage"] == "late" and "late_window" in late
    assert late["late_window"]["dest"]["checks"]["read"]["bytes"] == 512
    assert "qemu_open_s" in late["late_window"]["dest"]["timings"]  # opened in the window
    assert "qemu_open_s" not in early["prepare"]["timings"]
    for r in (early, late):
        assert r["heartbeat"]["continues"] and r["disk"]["ok"]
    await _alive_on(tb, tb.vm_host)



@pytest.mark.asyncio(loop_scope="module")
async def test_same_host_and_unknown_vm_refused(tb: PairTestbed) -> None:
    with pytest.raises(MigrationError, match="already runs on"):
        await tb.migration(load_policy("default"), to=tb.vm_host).run()
    await _alive_on(tb, tb.vm_host)



@pytest.mark.asyncio(loop_scope="module")
async def test_destination_qemu_killed(tb: PairTestbed) -> None:
    src, dst = tb.vm_host, tb.other(tb.vm_host)
    task = asyncio.ensure_future(tb.migrate(SLOW))
    run_dir = tb.lab_dir / "hosts" / dst / "vms" / tb.vm
    pid = None
    for _ in range(100):
        pids = qemu_pids_under(run_dir)
        if pids and not task.done():
            pid = pids[0]
            break
        await asyncio.sleep(0.1)
    assert pid is not None
    await asyncio.sleep(1.0)
    os.kill(pid, signal.SIGKILL)  # a QEMU this test's testbed started
    with pytest.raises(MigrationError, match="failed"):
        await task
    assert tb.vm_host == src
    await _alive_on(tb, src)
    await _dest_clean(tb, dst)



@pytest.mark.asyncio(loop_scope="module")
async def test_destination_link_cut(tb: PairTestbed) -> None:
    src, dst = tb.vm_host, tb.other(tb.vm_host)
    task = asyncio.ensure_future(tb.migrate(SLOW))
    await asyncio.sleep(2.0)
    assert not task.done()
    await tb.set_link(dst, up=False)
    t_cut = time.monotonic()
    try:
        with pytest.raises(MigrationError, match="stalled"):
            await task
        detected = time.monotonic() - t_cut
        assert detected < SLOW.stall_timeout_s + 8, detected
        await _alive_on(tb, src)
    finally:
        await tb.set_link(dst, up=True)
    await tb.reconnect(dst)
    await _dest_clean(tb, dst, within=SLOW.lease_s + 5)



@pytest.mark.asyncio(loop_scope="module")
async def test_cancel_by_user(tb: PairTestbed) -> None:
    src, dst = tb.vm_host, tb.other(tb.vm_host)
    task = asyncio.ensure_future(tb.migrate(SLOW))
    await asyncio.sleep(2.0)
    task.cancel()  # what Ctrl-C does to the CLI's main task
    with pytest.raises(asyncio.CancelledError):
        await task
    await _alive_on(tb, src)
    await _dest_clean(tb, dst)
    assert tb.inv is not None
    last = tb.inv.rows("migrations")[-1]
    assert last["state"] == "cancelled" and "cancelled by the user" in last["error"]



@pytest.mark.asyncio(loop_scope="module")
async def test_non_convergence_detected_and_cancelled(tb: PairTestbed) -> None:
    src = tb.vm_host
    await tb.clients[src].call("vm_console", name=tb.vm, command="rate 40")
    strict = replace(load_policy("strict"), max_bandwidth_mib_s=8)
    try:
        with pytest.raises(MigrationError, match="did not converge"):
            await tb.migrate(strict)
    finally:
        await tb.clients[src].call("vm_console", name=tb.vm, command="rate 10")
    assert tb.inv is not None
    mid = tb.inv.rows("migrations")[-1]["id"]
    decisions = tb.inv.rows("migration_decisions", migration=mid)
    assert decisions and decisions[0]["action"] == "cancel"
    reason = decisions[0]["reason"]
    assert decisions[0]["at_pass"] <= 5, decisions
    assert "not falling" in reason or "as fast as it is sent" in reason, reason
    await _alive_on(tb, src)
    await _dest_clean(tb, tb.other(src))
