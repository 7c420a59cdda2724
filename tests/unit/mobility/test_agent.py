"""Two mobility agents over their real relay (real sockets, the lab's certificates, mutual
TLS), driven through the host agent's migration protocol as each site's ordinary driver
would: site A's agent answers as a destination, site B's as a source. The far ends (site
B's incoming QEMU and its NBD export) are stand-in servers that hash what reaches them;
QEMU itself is the end-to-end test's."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from labctl.core.errors import MigrationError, RemoteError
from labctl.core.rpc import RpcClient, RpcServer
from labctl.hosts import protocol as hp
from labctl.migration import protocol as mp
from labctl.mobility import agent as mobility
from labctl.mobility import protocol as p
from labctl.mobility.agent import MobilityAgent, TlsFiles
from labctl.state.pki import LabPki

SECRET_A, SECRET_B = b"a" * 32, b"b" * 32
SPEC = hp.VmSpec(name="vm1", memory_mib=128, vcpus=1, kernel=Path("/k"), initrd=Path("/i"),
                 append="labctl.hb_ms=100")


async def _sink() -> tuple[asyncio.Server, int, list[str]]:
    """A stand-in for a stream's far end: reads to EOF, keeps the SHA-256 of what came."""
    got: list[str] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        h = hashlib.sha256()
        while data := await r.read(1 << 16):
            h.update(data)
        got.append(h.hexdigest())
        w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, int(srv.sockets[0].getsockname()[1]), got


@asynccontextmanager
async def _agents(tmp_path: Path, lab_b: str = "lab1"
                  ) -> AsyncIterator[tuple[RpcClient, RpcClient, MobilityAgent]]:
    """Agent A (lab1) and agent B (of ``lab_b``), each behind its site's RPC server."""
    tls = {}
    for name, lab in (("mobility-a", "lab1"), ("mobility-b", lab_b)):
        issued = LabPki(lab, tmp_path / lab / "pki").issue(name, ["127.0.0.1"],
                                                           tmp_path / name)
        tls[name] = TlsFiles(issued.cert, issued.key, issued.ca)
    b_relay = _free_port()
    a = MobilityAgent("mobility-a", "127.0.0.1", _free_port(), tls["mobility-a"])
    b = MobilityAgent("mobility-b", "127.0.0.1", b_relay, tls["mobility-b"])
    await b.start_relay()
    servers = []
    clients = []
    for agent, secret in ((a, SECRET_A), (b, SECRET_B)):
        srv = RpcServer(secret, agent.handlers(), name=agent.name)
        agent.server = srv
        await srv.start("127.0.0.1", 0)
        assert srv._server is not None
        port = srv._server.sockets[0].getsockname()[1]
        servers.append(srv)
        clients.append(await RpcClient.connect("127.0.0.1", port, secret))
    try:
        await p.MOB_OUTGOING.call(clients[0], p.Outgoing(
            vm="vm1", migration="x1", peer="mobility-b", peer_address="127.0.0.1",
            peer_port=b_relay))
        await p.MOB_INCOMING.call(clients[1], p.Incoming(vm="vm1", migration="x1",
                                                         peer="mobility-a"))
        yield clients[0], clients[1], b
    finally:
        for c in clients:
            await c.close()
        for srv in servers:
            await srv.close()
        await a.close()
        await b.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _send(uri: str, data: bytes) -> None:
    host, port = uri.split(":")[1], int(uri.split(":")[2])
    _, w = await asyncio.open_connection(host, port)
    w.write(data)
    await w.drain()
    w.close()


def test_a_migration_passes_through_both_agents(tmp_path: Path) -> None:
    async def go() -> None:
        mem_srv, mem_port, mem_got = await _sink()
        disk_srv, disk_port, disk_got = await _sink()
        async with _agents(tmp_path) as (ca, cb, _):
            # site B's driver asks its "source" first: it waits for site A's spec
            info_b = asyncio.ensure_future(mp.MIG_SOURCE_INFO.call(cb, hp.VmName("vm1")))
            prep_a = asyncio.ensure_future(mp.MIG_PREPARE.call(ca, mp.Prepare(
                spec=SPEC, listen="127.0.0.1", export_disk=True, disk_size=1 << 20),
                timeout=30))
            info = await info_b
            assert info.spec == SPEC and info.disk_size == 1 << 20
            assert not prep_a.done()  # site A's destination answers once B's listens
            await mp.MIG_START.call(cb, mp.Start(
                "vm1", f"tcp:127.0.0.1:{mem_port}", capabilities={},
                mirror_to=f"nbd:127.0.0.1:{disk_port}:exportname=disk0"))
            prep = await prep_a
            assert prep.uri.startswith("tcp:127.0.0.1:") and prep.nbd is not None
            memory, disk = os.urandom(3 << 20), os.urandom(1 << 20)
            await _send(prep.nbd, disk)
            await _send(prep.uri, memory)
            await asyncio.sleep(0.3)
            assert mem_got == [hashlib.sha256(memory).hexdigest()]
            assert disk_got == [hashlib.sha256(disk).hexdigest()]
            st = await mp.MIG_STATUS.call(cb, mp.StatusRequest("vm1"))
            assert st.status == "active"
            assert mp.qmp_int(st.now, "ram", "transferred") == len(memory)
            assert mp.qmp_int(st.now, "disk", "transferred") == len(disk)
            # site A's source completed: B learns it, with the source's last heartbeat
            hb = mp.HeartbeatStamp(counter=41, disk_counter=7, t=1.0)
            finish_a = asyncio.ensure_future(mp.MIG_DEST_FINISH.call(
                ca, mp.DestFinish("vm1", after_counter=41, source_heartbeat=hb), timeout=30))
            for _ in range(100):
                st = await mp.MIG_STATUS.call(cb, mp.StatusRequest("vm1"))
                if st.status == "completed":
                    break
                await asyncio.sleep(0.02)
            assert st.status == "completed" and st.heartbeat == hb
            dest = mp.DestFinished(
                first_heartbeat=mp.HeartbeatStamp(counter=43, disk_counter=8, t=1.4),
                heartbeat=None, resume_t=1.3, resume_qemu_t=None, checkpoints={},
                disk_read="DISK read 8", status="running", pid=4242, timings={},
                checks=mp.StorageChecks())
            await mp.MIG_SOURCE_FINISH.call(cb, mp.SourceFinish("vm1", dest=dest))
            assert await finish_a == dest  # site A's driver verifies what B's host saw
            stats = await p.MOB_STATS.call(ca, hp.VmName("vm1"))
            assert stats.state == "completed"
            assert stats.out["memory"] == len(memory) and stats.out["disk"] == len(disk)
        mem_srv.close()
        disk_srv.close()

    asyncio.run(go())


def test_site_a_giving_up_fails_site_b_s_half(tmp_path: Path) -> None:
    async def go() -> None:
        mem_srv, mem_port, _ = await _sink()
        async with _agents(tmp_path) as (ca, cb, _):
            prep_a = asyncio.ensure_future(mp.MIG_PREPARE.call(ca, mp.Prepare(
                spec=SPEC, listen="127.0.0.1"), timeout=30))
            await mp.MIG_SOURCE_INFO.call(cb, hp.VmName("vm1"))
            await mp.MIG_START.call(cb, mp.Start("vm1", f"tcp:127.0.0.1:{mem_port}",
                                                 capabilities={}))
            await prep_a
            await mp.MIG_DEST_ABORT.call(ca, hp.VmName("vm1"))
            for _ in range(100):
                st = await mp.MIG_STATUS.call(cb, mp.StatusRequest("vm1"))
                if st.status == "failed":
                    break
                await asyncio.sleep(0.02)
            assert st.status == "failed"
            assert "site A gave up" in str(mp.qmp_str(st.final, "error-desc"))
        mem_srv.close()

    asyncio.run(go())


def test_site_b_gives_up_on_a_silent_site_a(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    monkeypatch.setattr(mobility, "PEER_SILENCE_S", 1.0)

    async def go() -> None:
        async with _agents(tmp_path) as (ca, cb, _b):
            prep_a = asyncio.ensure_future(mp.MIG_PREPARE.call(ca, mp.Prepare(
                spec=SPEC, listen="127.0.0.1"), timeout=30))
            await mp.MIG_SOURCE_INFO.call(cb, hp.VmName("vm1"))
            # site A's agent stops talking (a cut WAN looks the same from B)
            a_tasks = [t for t in asyncio.all_tasks() if "_keep_talking" in repr(t.get_coro())]
            for t in a_tasks:
                t.cancel()
            for _ in range(200):
                st = await mp.MIG_STATUS.call(cb, mp.StatusRequest("vm1"))
                if st.status == "failed":
                    break
                await asyncio.sleep(0.02)
            assert st.status == "failed" and "no word from mobility-a" in str(st.final)
            prep_a.cancel()

    asyncio.run(go())


def test_an_agent_of_another_lab_gets_no_relay(tmp_path: Path) -> None:
    async def go() -> None:
        async with _agents(tmp_path, lab_b="lab2") as (ca, _cb, _):
            with pytest.raises((MigrationError, RemoteError), match="cannot reach the mobility"):
                await mp.MIG_PREPARE.call(ca, mp.Prepare(spec=SPEC, listen="127.0.0.1"),
                                          timeout=30)

    asyncio.run(go())


def test_an_unannounced_migration_is_refused(tmp_path: Path) -> None:
    async def go() -> None:
        async with _agents(tmp_path) as (ca, _cb, _):
            other = hp.VmSpec(name="vm9", memory_mib=128, vcpus=1, kernel=Path("/k"),
                              initrd=Path("/i"), append="")
            with pytest.raises(RemoteError, match="has no migration of 'vm9'"):
                await mp.MIG_PREPARE.call(ca, mp.Prepare(spec=other, listen="127.0.0.1"))

    asyncio.run(go())
