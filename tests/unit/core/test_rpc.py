"""The agent RPC: both sides must hold the lab secret; tampered frames end the session."""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import Any

import pytest

from labctl.core.errors import AgentUnreachable, AuthenticationFailed, RemoteError, StorageNodeError
from labctl.core.rpc import MAX_UNAUTHENTICATED as MAX_UNAUTH
from labctl.core.rpc import RpcClient, RpcServer

SECRET = b"s" * 32


async def _server(calls: list[dict[str, Any]] | None = None) -> tuple[RpcServer, int]:
    """A server on a free port; every call of its ``echo`` is appended to ``calls``."""

    async def echo(**kw: Any) -> Any:
        if calls is not None:
            calls.append(kw)
        return kw

    async def boom() -> None:
        raise StorageNodeError("no room on the node", free=0)

    server = RpcServer(SECRET, {"echo": echo, "boom": boom})
    await server.start("127.0.0.1", 0)
    assert server._server is not None
    port = server._server.sockets[0].getsockname()[1]
    return server, port


def test_call_and_remote_error() -> None:
    async def go() -> None:
        server, port = await _server()
        async with await RpcClient.connect("127.0.0.1", port, SECRET) as c:
            assert await c.call("echo", a=1, b=[2]) == {"a": 1, "b": [2]}
            with pytest.raises(RemoteError) as info:
                await c.call("boom")
            assert info.value.remote_type == "StorageNodeError"
            assert info.value.evidence["remote"] == {"free": 0}
            with pytest.raises(RemoteError):
                await c.call("nope")
        await server.close()

    asyncio.run(go())


def test_wrong_secret_refused() -> None:
    async def go() -> None:
        server, port = await _server()
        with pytest.raises(AuthenticationFailed):
            await RpcClient.connect("127.0.0.1", port, b"x" * 32)
        assert server.rejected == 1
        await server.close()

    asyncio.run(go())


def test_unauthenticated_raw_request_gets_nothing() -> None:
    async def go() -> None:
        server, port = await _server()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        import json
        import struct
        head = await reader.readexactly(36)  # the hello frame
        await reader.readexactly(struct.unpack(">I", head[:4])[0])
        # send a request instead of the handshake answer
        body = json.dumps({"id": 1, "method": "echo", "params": {"x": 1}}).encode()
        writer.write(struct.pack(">I", len(body)) + bytes(32) + body)
        await writer.drain()
        data = await reader.read(65536)
        assert b'"x"' not in data and b"AuthenticationFailed" in data
        writer.close()
        await server.close()

    asyncio.run(go())


def test_tampered_frame_drops_connection() -> None:
    async def go() -> None:
        calls: list[dict[str, Any]] = []
        server, port = await _server(calls)
        c = await RpcClient.connect("127.0.0.1", port, SECRET)
        c._chan.key = b"k" * 32  # frames now carry a MAC the server cannot verify
        with pytest.raises(AgentUnreachable):  # the server dropped the connection
            await c.call("echo", timeout=2, a=1)
        assert calls == []  # the server refused the frame before running the method
        await c.close()
        await server.close()

    asyncio.run(go())


def test_resubscribe_replays_missed_events_and_a_restart_replays_all() -> None:
    async def go() -> None:
        server, port = await _server()
        seen: list[Any] = []
        c = await RpcClient.connect("127.0.0.1", port, SECRET)
        assert await c.subscribe(lambda ev, d: seen.append(d)) == 0
        server.publish("e", 1)
        await asyncio.sleep(0.05)
        cursor = c.cursor
        await c.close()
        server.publish("e", 2)  # nobody listening
        server.publish("e", 3)
        c = await RpcClient.connect("127.0.0.1", port, SECRET)
        assert await c.subscribe(lambda ev, d: seen.append(d), cursor) == 2
        server.publish("e", 4)
        await asyncio.sleep(0.05)
        assert seen == [1, 2, 3, 4]  # nothing lost, nothing twice, in order
        cursor = c.cursor
        await c.close()
        await server.close()

        # the agent restarts and publishes before the subscriber is back
        server, port = await _server()
        server.publish("e", "after-restart")
        c = await RpcClient.connect("127.0.0.1", port, SECRET)
        assert await c.subscribe(lambda ev, d: seen.append(d), cursor) == 1
        await asyncio.sleep(0.05)
        assert seen[-1] == "after-restart"
        # a first subscription (no cursor) gets only what comes next
        fresh: list[Any] = []
        c2 = await RpcClient.connect("127.0.0.1", port, SECRET)
        assert await c2.subscribe(lambda ev, d: fresh.append(d)) == 0
        await c.close()
        await c2.close()
        await server.close()

    asyncio.run(go())


def test_typed_call_whose_request_has_a_timeout_field() -> None:
    """A request field called ``timeout`` (vm_stop's, mig_cancel's) is the method's own
    parameter, not the RPC's timeout."""
    from dataclasses import dataclass

    from labctl.core.wire import Message, Method, handlers

    @dataclass(frozen=True)
    class Stop(Message):
        name: str
        timeout: float = 10.0

    @dataclass(frozen=True)
    class Stopped(Message):
        waited: float

    stop = Method("stop", Stop, Stopped)

    async def serve(req: Stop) -> Stopped:
        return Stopped(req.timeout)

    async def go() -> None:
        server = RpcServer(SECRET, handlers(stop.serve(serve)))
        await server.start("127.0.0.1", 0)
        assert server._server is not None
        port = server._server.sockets[0].getsockname()[1]
        async with await RpcClient.connect("127.0.0.1", port, SECRET) as c:
            assert (await stop.call(c, Stop("vm1", timeout=3.0), timeout=5)).waited == 3.0
        await server.close()

    asyncio.run(go())


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """True if the peer closes the connection within ``seconds`` (whatever it sent first)."""
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(4096):
                pass
        return True
    except TimeoutError:
        return False


def test_a_large_frame_before_authentication_is_refused_unread() -> None:
    """An unauthenticated peer announcing a 16 MiB frame is dropped at once: the server does
    not wait for (or buffer) the payload."""
    async def go() -> None:
        server, port = await _server()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = await reader.readexactly(36)  # the hello ...
        await reader.readexactly(struct.unpack(">I", head[:4])[0])
        writer.write(struct.pack(">I", 16 << 20) + bytes(32))  # ... and a huge frame's header
        await writer.drain()
        assert await _closed_within(reader, 2.0), "the server waited for a 16 MiB payload"
        writer.close()
        await server.close()

    asyncio.run(go())


def test_unauthenticated_connections_are_bounded() -> None:
    async def go() -> None:
        server, port = await _server()
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(MAX_UNAUTH)]
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await _closed_within(reader, 2.0), "a connection beyond the bound was kept"
        assert server.rejected >= 1
        for _, w in held:
            w.close()
        await asyncio.sleep(0.1)
        async with await RpcClient.connect("127.0.0.1", port, SECRET) as c:  # room again
            assert await c.call("echo", a=1) == {"a": 1}
        writer.close()
        await server.close()

    asyncio.run(go())


def test_malformed_handshakes_leave_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        server, port = await _server()
        for payload in (b"[1, 2]", b"\xff\xfe not json", b'{"nonce": 5, "proof": "zz"}',
                        b'"a string"'):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await reader.read(4096)  # the hello
            writer.write(struct.pack(">I", len(payload)) + bytes(32) + payload)
            await writer.drain()
            assert await _closed_within(reader, 2.0)
            writer.close()
        async with await RpcClient.connect("127.0.0.1", port, SECRET) as c:  # still serving
            assert await c.call("echo", a=2) == {"a": 2}
        await asyncio.sleep(0.1)  # the server sees the client go before the loop ends
        await server.close()

    with caplog.at_level(logging.DEBUG):
        asyncio.run(go())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], \
        [r.getMessage() for r in caplog.records]


def test_a_limited_key_opens_its_methods_alone() -> None:
    """Storage nodes of different sites share a key that lets one read a file of another
    (the stream ``file_send``), never drive it; the node's own secret still opens all."""
    peer_key = b"p" * 32

    async def go() -> None:
        calls: list[dict[str, Any]] = []

        async def echo(**kw: Any) -> Any:
            calls.append(kw)
            return kw

        async def send(stream: Any, params: dict[str, Any]) -> Any:
            await stream.send({"chunk": 1})
            return {"sent": params}

        server = RpcServer(SECRET, {"echo": echo}, streams={"file_send": send},
                           limited={peer_key: frozenset({"file_send"})})
        await server.start("127.0.0.1", 0)
        assert server._server is not None
        port = server._server.sockets[0].getsockname()[1]
        async with await RpcClient.open_stream("127.0.0.1", port, peer_key, "file_send",
                                               {"name": "a"}) as stream:
            assert await stream.recv() == {"chunk": 1}
            assert await stream.result() == {"sent": {"name": "a"}}
        async with await RpcClient.connect("127.0.0.1", port, peer_key) as c:
            with pytest.raises(RemoteError, match="not open to this peer's key") as info:
                await c.call("echo", a=1)
            assert info.value.remote_type == "AuthenticationFailed"
        assert calls == []
        async with await RpcClient.open_stream("127.0.0.1", port, SECRET, "file_send",
                                               {"name": "b"}) as stream:
            assert await stream.recv() == {"chunk": 1}
            assert await stream.result() == {"sent": {"name": "b"}}
        async with await RpcClient.connect("127.0.0.1", port, SECRET) as c:
            assert await c.call("echo", a=2) == {"a": 2}
        with pytest.raises(AuthenticationFailed):  # a third key opens nothing
            await RpcClient.connect("127.0.0.1", port, b"x" * 32)
        await server.close()

    asyncio.run(go())
