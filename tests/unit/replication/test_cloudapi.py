"""A libvirt cloud's API endpoint on a real TLS listener, with libvirtd's socket faked by
an echo server (the one edge faked here; the e2e tests drive real libvirt through it): the
operator's certificate gets libvirt's go-ahead byte and a byte-for-byte channel; a
certificate of the cloud's CA with another name gets the refusal byte; one of another CA,
or none, fails the handshake; nothing a refused caller sends reaches libvirtd."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from labctl.core.tlsctx import client_context
from labctl.replication import cloudapi
from labctl.replication.cloudapi import ApiGate, GateFiles
from labctl.state.pki import Issued, LabPki


@dataclass
class Upstream:
    """libvirtd's socket, faked: it echoes, and counts who reached it."""

    path: Path
    reached: int = 0
    got: list[bytes] = field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reached += 1
        while data := await reader.read(4096):
            self.got.append(data)
            writer.write(data)
            await writer.drain()
        writer.close()


@dataclass
class Cloud:
    gate: ApiGate
    upstream: Upstream
    operator: Issued
    pki: LabPki
    tmp: Path


@contextlib.asynccontextmanager
async def _cloud(tmp: Path) -> AsyncIterator[Cloud]:
    pki = LabPki("t cloud-b", tmp / "cloud-ca")
    server = pki.issue("cloud-b-api", ["127.0.0.1"], tmp / "server")
    operator = pki.issue("operator", [], tmp / "operator")
    up = Upstream(tmp / "libvirt-sock")
    usrv = await asyncio.start_unix_server(up.serve, str(up.path))
    gate = ApiGate("127.0.0.1", 0, GateFiles(server.cert, server.key, server.ca), {"operator"},
                   up.path)
    await gate.start()
    assert gate._server is not None
    gate.port = gate._server.sockets[0].getsockname()[1]
    try:
        yield Cloud(gate, up, operator, pki, tmp)
    finally:
        await gate.close()
        usrv.close()


async def _connect(cloud: Cloud, ctx: ssl.SSLContext) -> tuple[asyncio.StreamReader,
                                                                asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", cloud.gate.port, ssl=ctx,
                                         server_hostname="127.0.0.1")


async def _first_byte(cloud: Cloud, ctx: ssl.SSLContext) -> bytes:
    """What the endpoint answers first ('' if the connection ends or fails before)."""
    try:
        reader, writer = await _connect(cloud, ctx)
    except (ssl.SSLError, OSError):
        return b""
    try:
        writer.write(b"secret call")
        await writer.drain()
        return await asyncio.wait_for(reader.read(1), 10)
    except (ssl.SSLError, OSError):
        return b""
    finally:
        writer.close()
        with contextlib.suppress(ssl.SSLError, OSError):
            await writer.wait_closed()


@pytest.mark.asyncio
async def test_the_operator_gets_the_go_ahead_and_a_channel_to_libvirtd(tmp_path: Path) -> None:
    async with _cloud(tmp_path) as cloud:
        op = cloud.operator
        reader, writer = await _connect(cloud, client_context(op.cert, op.key, op.ca))
        assert await asyncio.wait_for(reader.readexactly(1), 10) == cloudapi.CONFIRM_OK
        payload = bytes(range(256)) * 300  # larger than one read and one TLS record
        writer.write(payload)
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(len(payload)), 10) == payload
        writer.close()
        await writer.wait_closed()
        assert cloud.upstream.reached == 1
        assert (cloud.gate.counts.accepted, cloud.gate.counts.refused) == (1, 0)


@pytest.mark.asyncio
async def test_a_name_not_on_the_list_is_refused_before_libvirtd(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with _cloud(tmp_path) as cloud:
        other = cloud.pki.issue("intruder", [], tmp_path / "intruder")
        got = await _first_byte(cloud, client_context(other.cert, other.key, other.ca))
        assert got == cloudapi.CONFIRM_REFUSED
        assert cloud.upstream.reached == 0
        assert cloud.gate.counts.refused == 1
        assert "'intruder' is not on the allow list" in caplog.messages[-1]


@pytest.mark.asyncio
@pytest.mark.parametrize("who", ["another CA", "no certificate"])
async def test_a_caller_without_the_clouds_credentials_fails_the_handshake(
        tmp_path: Path, who: str, caplog: pytest.LogCaptureFixture) -> None:
    async with _cloud(tmp_path) as cloud:
        if who == "another CA":  # the lab's own CA: its agents are no operators of cloud B
            lab = LabPki("t", tmp_path / "lab-ca").issue("operator", [], tmp_path / "lab")
            ctx = client_context(lab.cert, lab.key, cloud.operator.ca)
        else:
            ctx = ssl.create_default_context(cafile=str(cloud.operator.ca))
        got = await _first_byte(cloud, ctx)
        for _ in range(100):  # the endpoint's side of the handshake ends a moment later
            if cloud.gate.counts.refused:
                break
            await asyncio.sleep(0.05)
        assert got == b""
        assert cloud.upstream.reached == 0 and cloud.upstream.got == []
        assert cloud.gate.counts.refused == 1
        assert "TLS handshake failed" in caplog.messages[-1]


def test_common_name_reads_the_subject() -> None:
    cert = {"subject": ((("organizationName", "labctl"),), (("commonName", "operator"),))}
    assert cloudapi.common_name(cert) == "operator"
    assert cloudapi.common_name({"subject": ((("organizationName", "labctl"),),)}) is None
    assert cloudapi.common_name(None) is None
