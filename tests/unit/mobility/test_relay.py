"""The relay between two mobility agents on real sockets and real TLS: streams carried
both ways intact and at once, counted per stream, compressed where it pays; a stream with
no target closed at once; a cut channel ends every local connection and says so; an agent
of another lab never gets a channel."""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from labctl.core.tlsctx import client_context, server_context
from labctl.mobility.relay import Counters, EndA, serve_b
from labctl.state.pki import Issued, LabPki


def _certs(tmp_path: Path, lab: str = "lab1") -> tuple[Issued, Issued]:
    pki = LabPki(lab, tmp_path / lab / "pki")
    return (pki.issue("mobility-a", ["127.0.0.1"], tmp_path / lab / "a"),
            pki.issue("mobility-b", ["127.0.0.1"], tmp_path / lab / "b"))


async def _digest_server() -> tuple[asyncio.Server, int]:
    """A stand-in for a stream's real target: reads to EOF, answers the SHA-256 in hex."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        h = hashlib.sha256()
        while data := await r.read(1 << 16):
            h.update(data)
        w.write(h.hexdigest().encode())
        await w.drain()
        w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, int(srv.sockets[0].getsockname()[1])


@asynccontextmanager
async def _relay(tmp_path: Path, targets: dict[str, tuple[str, int]], compress: bool = False,
                 a_certs: Issued | None = None
                 ) -> AsyncIterator[tuple[EndA, Counters, list[asyncio.StreamWriter]]]:
    a, b = _certs(tmp_path)
    a = a_certs or a
    back = Counters()
    conns: list[asyncio.StreamWriter] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conns.append(w)
        try:
            await serve_b(r, w, targets, back, compress)
        except Exception:
            pass

    srv = await asyncio.start_server(handle, "127.0.0.1", 0,
                                     ssl=server_context(b.cert, b.key, b.ca))
    port = int(srv.sockets[0].getsockname()[1])
    end = EndA(Counters(), compress)
    try:
        await end.connect("127.0.0.1", port, client_context(a.cert, a.key, a.ca), "127.0.0.1")
        yield end, back, conns
    finally:
        await end.close()
        srv.close()
        await srv.wait_closed()


async def _send(port: int, data: bytes) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(data)
    await w.drain()
    w.write_eof()
    got = await asyncio.wait_for(r.read(), 30)
    w.close()
    return got


def test_two_streams_at_once_arrive_intact_and_counted(tmp_path: Path) -> None:
    async def go() -> None:
        mem_srv, mem_port = await _digest_server()
        disk_srv, disk_port = await _digest_server()
        memory, disk = os.urandom(8 << 20), os.urandom(3 << 20)
        async with _relay(tmp_path, {"memory": ("127.0.0.1", mem_port),
                                     "disk": ("127.0.0.1", disk_port)}) as (end, back, _):
            pm = await end.listen("memory")
            pd = await end.listen("disk")
            got_m, got_d = await asyncio.gather(_send(pm, memory), _send(pd, disk))
            assert got_m == hashlib.sha256(memory).hexdigest().encode()
            assert got_d == hashlib.sha256(disk).hexdigest().encode()
            assert end.counters.out == {"memory": 8 << 20, "disk": 3 << 20}
            assert end.counters.back == {"memory": 64, "disk": 64}
            assert back.out == end.counters.out and back.back == end.counters.back
            assert end.error is None
        mem_srv.close()
        disk_srv.close()

    asyncio.run(go())


def test_compression_pays_only_where_it_pays(tmp_path: Path) -> None:
    async def go() -> None:
        srv, port = await _digest_server()
        zeros, noise = bytes(4 << 20), os.urandom(1 << 20)
        async with _relay(tmp_path, {"memory": ("127.0.0.1", port)}, compress=True) as (
                end, _, _):
            p = await end.listen("memory")
            assert await _send(p, zeros + noise) == hashlib.sha256(zeros + noise).hexdigest().encode()
            wire, carried = end.counters.wire["memory"], end.counters.out["memory"]
            assert carried == 5 << 20
            assert (1 << 20) <= wire < (1 << 20) + (512 << 10), wire  # zeros ~free, noise not
        srv.close()

    asyncio.run(go())


def test_a_stream_without_a_target_is_closed_at_once(tmp_path: Path) -> None:
    async def go() -> None:
        async with _relay(tmp_path, {}) as (end, _, _):
            p = await end.listen("memory")
            assert await _send(p, b"x" * 1000) == b""

    asyncio.run(go())


def test_a_cut_channel_ends_every_local_connection_and_says_so(tmp_path: Path) -> None:
    async def go() -> None:
        async def stall(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await r.read()  # never answers before EOF

        srv = await asyncio.start_server(stall, "127.0.0.1", 0)
        port = int(srv.sockets[0].getsockname()[1])
        async with _relay(tmp_path, {"memory": ("127.0.0.1", port)}) as (end, _, conns):
            p = await end.listen("memory")
            r, w = await asyncio.open_connection("127.0.0.1", p)
            w.write(b"y" * (1 << 20))
            await w.drain()
            for _ in range(100):  # until B has the channel
                if conns:
                    break
                await asyncio.sleep(0.05)
            conns[0].transport.abort()  # the WAN cut under the relay
            try:  # the local side is ended: closed, or reset (it still had data in flight)
                got = await asyncio.wait_for(r.read(), 10)
            except ConnectionResetError:
                got = b""
            assert got == b""
            for _ in range(100):
                if end.error:
                    break
                await asyncio.sleep(0.05)
            assert end.error and "went away" in end.error
            w.close()
        srv.close()

    asyncio.run(go())


def test_an_agent_of_another_lab_gets_no_channel(tmp_path: Path) -> None:
    other_a, _ = _certs(tmp_path, "lab2")

    async def go() -> None:
        async with _relay(tmp_path, {}, a_certs=other_a):
            pass

    with pytest.raises((ssl.SSLError, ConnectionError)):
        asyncio.run(go())


def test_a_stream_waits_for_credit_beyond_its_window() -> None:
    """Backpressure: a stream's pump may have at most ``window`` bytes unacknowledged; the
    far end's ack lets it go on (the relay buffers about what one TCP flow across the WAN
    keeps in flight, so QEMU sees the WAN's pace)."""
    from labctl.mobility.relay import CHUNK, _Channel

    async def go() -> None:
        r = asyncio.StreamReader()
        chan = _Channel(r, None, False, Counters(), window=2 * CHUNK)  # type: ignore[arg-type]
        await chan.reserve(1, CHUNK)
        await chan.reserve(1, CHUNK)
        third = asyncio.ensure_future(chan.reserve(1, CHUNK))
        await asyncio.sleep(0.05)
        assert not third.done() and chan.inflight[1] == 2 * CHUNK
        await chan.reserve(2, CHUNK)  # another stream has its own window
        chan.acked(1, CHUNK)
        await asyncio.wait_for(third, 1)
        assert chan.inflight[1] == 2 * CHUNK

    asyncio.run(go())


@pytest.mark.parametrize(("rate", "delay_ms", "want"), [
    (100.0, 0.0, 256 << 10),  # 2 x 12.5 MB/s x 10 ms = 250 kB: the floor
    (1000.0, 0.0, 2_500_000),  # 2 x 125 MB/s x 10 ms
    (100.0, 20.0, 1_250_000),  # 2 x 12.5 MB/s x (40 + 10) ms
    (None, 0.0, 5_000_000),  # uncapped: the router's 2 Gbit/s
])
def test_the_relay_window_follows_the_link_s_rate_and_round_trip(
        rate: float | None, delay_ms: float, want: int) -> None:
    """Twice what the link carries in its round trip plus the relay's own 10 ms: the
    source's QEMU sees about what a direct flow across the WAN would keep in flight."""
    from labctl.lab.crosssite import window
    from labctl.wan.protocol import LinkParams, WanShown

    link = WanShown(name="w", sites=["a", "b"], addresses=["1.1.1.1", "2.2.2.2"],
                    params=LinkParams(delay_ms=delay_ms, rate_mbit=rate), state="up")
    assert window(link) == want
