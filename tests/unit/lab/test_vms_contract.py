"""The controller's VM logic (labctl.lab.vms) against a fake host agent that speaks the typed
host protocol: what a host is handed to start a VM, the already-running check, a VM whose
QEMU died, and a malformed answer."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio

from labctl.core.errors import LabStateError, ProtocolError
from labctl.core.ids import normal_naa
from labctl.core.rpc import Handler, RpcServer
from labctl.core.wire import Json, handlers
from labctl.datastores import protocol as dp
from labctl.datastores.tables import DATASTORES
from labctl.hosts import protocol as hp
from labctl.lab import vms
from labctl.state.context import LabContext
from labctl.state.labdir import LabDir

NAA = normal_naa("6001405" + "ab" * 12 + "c")


@dataclass
class FakeHost:
    """A host agent in memory: records each call, answers by the protocol."""

    calls: list[str] = field(default_factory=list)
    started: list[hp.VmStart] = field(default_factory=list)
    process: str = "running"
    bad_start_reply: bool = False

    def table(self) -> dict[str, Handler]:
        async def attach(req: dp.StorageAttach) -> dp.Attached:
            self.calls.append("storage_attach")
            u = req.units[0]
            return dp.Attached(units=[dp.Scan(
                naa=u.naa, datastore=u.datastore, portal=u.portal, target_iqn=u.target_iqn,
                lun=u.lun, size_bytes=64 << 20, state="ok", seen_naa=u.naa,
                scanned_at=time.time(), scans=1, scsi_commands=2, error=None,
                commands_this_scan=2)])

        async def start(req: hp.VmStart) -> hp.VmStarted:
            self.calls.append("vm_start")
            assert self.calls[-2:] == ["storage_attach", "vm_start"], self.calls
            self.started.append(req)
            return hp.VmStarted(name=req.spec.name, pid=4242, run_dir="/x",
                                first_heartbeat_s=0.5, accel="tcg")

        async def status(req: hp.VmName) -> hp.VmStatus:
            self.calls.append("vm_status")
            return hp.VmStatus(name=req.name, state=self.process, process=self.process,
                               pid=4242, returncode=None if self.process == "running" else -9,
                               heartbeat=None, disk_counter=None, first_heartbeat_s=None,
                               qmp_check_socket="/q", console_log="/c")

        table = handlers(dp.STORAGE_ATTACH.serve(attach), hp.VM_STATUS.serve(status),
                         hp.VM_START.serve(start))
        if self.bad_start_reply:
            async def bad(**_: Json) -> Json:
                return {"name": "vm1", "pid": "not a pid"}
            table["vm_start"] = bad
        return table


@pytest_asyncio.fixture
async def lab(tmp_path: Path) -> AsyncIterator[tuple[LabContext, FakeHost]]:
    fake = FakeHost()
    server = RpcServer(b"k" * 32, fake.table(), name="fake host h1")
    await server.start("127.0.0.1", 0)
    assert server._server is not None
    port = server._server.sockets[0].getsockname()[1]
    d = LabDir("t", tmp_path)
    d.create()
    d.secret_path.write_text((b"k" * 32).hex() + "\n")  # the fake's secret
    inv = d.inventory([DATASTORES])
    inv.upsert("hosts", name="h1", site="s", address="127.0.0.1", initiator_iqn="iqn.2026-11.x:h1",
               netns="n", veth="v", agent_port=port, memory=1 << 30, agent_pid=None, state="up")
    inv.upsert("storage_nodes", name="stor1", site="s", address="10.0.0.2",
               target_iqn="iqn.2026-11.x:stor1", domain="d", tap="t", agent_port=1,
               capacity=1 << 30, state="up")
    inv.upsert("datastores", name="ds1", node="stor1", size_bytes=64 << 20,
               unit_serial="ab" * 16, naa=NAA, lun=0, disk_serial="lc-ds1", backing_path="/b",
               state="exported", created=time.time())
    inv.upsert("datastore_hosts", datastore="ds1", host="h1", seen_naa=None, seen_size=None,
               scanned_at=None)
    inv.upsert("vms", name="vm1", host="h1", datastore="ds1", memory=192 << 20, vcpus=1,
               dirty_rate=10.0, working_set=48 << 20, state="stopped", pid=None, started_at=None,
               heartbeat_ms=20)
    inv.set_meta("guest_kernel", "/k/vmlinuz")
    inv.set_meta("guest_initrd", "/k/initrd")
    try:
        yield LabContext("t", d, inv), fake
    finally:
        inv.close()
        await server.close()


@pytest.mark.asyncio
async def test_start_hands_the_mapping_then_the_spec(lab: tuple[LabContext, FakeHost]) -> None:
    ctx, fake = lab
    res = await vms.start(ctx, "vm1")
    assert res.pid == 4242 and fake.calls == ["storage_attach", "vm_start"]
    spec = fake.started[0].spec
    assert spec.accel == "auto"  # the host's own probe decides
    assert spec.memory_mib == 192 and spec.heartbeat_ms == 20
    assert spec.append is not None and "labctl.hb_ms=20" in spec.append.split()
    assert "labctl.rate=10" in spec.append.split() and "labctl.wss=48" in spec.append.split()
    assert isinstance(spec.disk, hp.IscsiDisk) and spec.disk.naa == NAA
    assert spec.disk.initiator_iqn == "iqn.2026-11.x:h1" and spec.disk.portal == "10.0.0.2:3260"
    row = ctx.inv.row("vms", name="vm1")
    assert row is not None and row["state"] == "running" and row["pid"] == 4242


@pytest.mark.asyncio
async def test_running_vm_is_refused_a_dead_one_restarted(lab: tuple[LabContext, FakeHost]
                                                         ) -> None:
    ctx, fake = lab
    ctx.inv.update("vms", {"name": "vm1"}, state="running")
    with pytest.raises(LabStateError, match="already running on h1"):
        await vms.start(ctx, "vm1")
    assert fake.calls == ["vm_status"]
    fake.process = "failed"
    await vms.start(ctx, "vm1")
    assert fake.calls == ["vm_status", "vm_status", "storage_attach", "vm_start"]


@pytest.mark.asyncio
async def test_a_malformed_answer_is_a_protocol_error(lab: tuple[LabContext, FakeHost]) -> None:
    ctx, fake = lab
    fake.bad_start_reply = True
    bad = RpcServer(b"k" * 32, fake.table())
    await bad.start("127.0.0.1", 0)
    assert bad._server is not None
    ctx.inv.update("hosts", {"name": "h1"}, agent_port=bad._server.sockets[0].getsockname()[1])
    try:
        with pytest.raises(ProtocolError, match=r"vm_start reply from host h1\.pid: the string "
                                                r"'not a pid' fits none of int"):
            await vms.start(ctx, "vm1")
    finally:
        await bad.close()
    row = ctx.inv.row("vms", name="vm1")
    assert row is not None and row["state"] == "stopped"  # nothing recorded from a bad answer
