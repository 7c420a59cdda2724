"""Authenticated JSON RPC between the controller and its agents.

Standard library only: the same module runs inside the storage node VM.

Wire format: each frame is ``len(4, big endian) | mac(32) | payload``.
Handshake (both sides prove they hold the lab secret, nothing is replayable):

1. server -> ``{"hello": PROTO, "nonce": sn}`` (mac all zero)
2. client -> ``{"nonce": cn, "proof": HMAC(secret, "client"|sn|cn)}``
3. server -> ``{"proof": HMAC(secret, "server"|sn|cn)}`` or an error, then close

After it, every frame is authenticated with a session key
``HMAC(secret, "session"|sn|cn)`` over ``direction | seq | payload``; a frame
with a bad MAC ends the connection. Requests are ``{"id", "method",
"params"}``; answers ``{"id", "result"}`` or ``{"id", "error": {"type",
"message", "data"}}``; a server may push ``{"event", "data", "epoch", "seq"}`` at
any time to a client that called ``subscribe``.

Events are numbered per server instance (``epoch`` is random per start, ``seq``
counts up) and the last ``EVENT_LOG`` of them are kept, so a subscriber that
reconnects loses nothing: it passes the cursor it last saw, and the server
replays what came after it -- all it has when the epoch is not its own (the
agent restarted and may have published before the subscriber got back).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import os
import socket
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from labctl.core.errors import AgentUnreachable, AuthenticationFailed, LabError, remote_error

PROTO = "labctl-rpc/1"
MAX_FRAME = 16 * 1024 * 1024
#: before a peer has proved it holds the secret: the handshake needs a few hundred bytes, so
#: a larger frame is refused before anything of it is read
MAX_PREAUTH_FRAME = 1024
#: connections that have not authenticated yet, per server; more are closed at once
MAX_UNAUTHENTICATED = 16
EVENT_LOG = 512
#: bytes a connection buffers each way before it stops reading or makes a writer wait: a few
#: data frames, so reading the next chunk, its MAC and the network overlap
STREAM_BUFFER = 4 << 20
_ZERO_MAC = bytes(32)
log = logging.getLogger(__name__)

Handler = Callable[..., Awaitable[Any]]
StreamHandler = Callable[["Stream", dict[str, Any]], Awaitable[Any]]
EventSink = Callable[[str, Any], None]
Cursor = tuple[str, int]


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"|".join(parts), hashlib.sha256).digest()


class _Channel:
    """A framed, MAC-checked stream. ``send_dir``/``recv_dir`` keep the two directions apart."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, send_dir: bytes
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.key: bytes | None = None
        self.send_dir = send_dir
        self.recv_dir = b"s" if send_dir == b"c" else b"c"
        self.send_seq = 0
        self.recv_seq = 0
        #: the methods a peer that proved a limited key may call (None: every method)
        self.allowed: frozenset[str] | None = None

    def write(self, obj: Any) -> None:
        """Queue one frame; frames go out in the order of these calls."""
        self.write_bytes(json.dumps(obj, separators=(",", ":")).encode())

    def write_bytes(self, payload: bytes) -> None:
        """Queue one frame carrying ``payload`` as it is (a stream's data)."""
        if len(payload) > MAX_FRAME:
            raise ValueError(f"a frame of {len(payload)} bytes is over the limit {MAX_FRAME}")
        mac = _ZERO_MAC
        if self.key is not None:
            mac = _mac(self.key, self.send_dir, str(self.send_seq).encode(), payload)
            self.send_seq += 1
        self.writer.write(struct.pack(">I", len(payload)) + mac + payload)

    async def send(self, obj: Any) -> None:
        self.write(obj)
        await self.writer.drain()

    async def recv(self) -> Any:
        msg = json.loads(await self.recv_bytes())
        if not isinstance(msg, dict):
            raise ValueError("a frame is not a JSON object")
        return msg

    async def recv_bytes(self) -> bytes:
        """The next frame's payload, its MAC checked."""
        head = await self.reader.readexactly(36)
        (length,) = struct.unpack(">I", head[:4])
        limit = MAX_FRAME if self.key is not None else MAX_PREAUTH_FRAME
        if length > limit:
            raise ConnectionError(f"frame of {length} bytes is too large (limit {limit})")
        payload = await self.reader.readexactly(length)
        if self.key is not None:
            want = _mac(self.key, self.recv_dir, str(self.recv_seq).encode(), payload)
            if not hmac.compare_digest(want, head[4:]):
                raise AuthenticationFailed("a frame failed its integrity check")
            self.recv_seq += 1
        return payload

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class RpcServer:
    """Serves ``handlers`` to clients that prove they know ``secret``; a client that proves
    one of the ``limited`` keys instead may call that key's methods alone (storage nodes of
    different sites: a peer may read a file, never drive the node)."""

    def __init__(self, secret: bytes, handlers: dict[str, Handler], name: str = "agent",
                 streams: dict[str, StreamHandler] | None = None,
                 limited: dict[bytes, frozenset[str]] | None = None) -> None:
        self.secret = secret
        self.limited = {k: v for k, v in (limited or {}).items() if k != secret}
        self.handlers = handlers
        #: methods that take the connection over (bulk data both ways, see :class:`Stream`)
        self.streams = streams or {}
        self.name = name
        self._server: asyncio.base_events.Server | None = None
        self._subscribers: set[_Channel] = set()
        self._tasks: set[asyncio.Future[None]] = set()
        self.rejected = 0
        self._unauthenticated = 0
        self.epoch = os.urandom(8).hex()
        self._seq = 0
        self._log: deque[dict[str, Any]] = deque(maxlen=EVENT_LOG)

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port, reuse_address=True,
                                                  limit=STREAM_BUFFER)

    async def serve_forever(self) -> None:
        assert self._server is not None
        await self._server.serve_forever()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def publish(self, event: str, data: Any) -> None:
        """Push an event to every client that called ``subscribe`` and keep it for replay."""
        self._seq += 1
        msg = {"event": event, "data": data, "epoch": self.epoch, "seq": self._seq}
        self._log.append(msg)
        for chan in list(self._subscribers):
            task = asyncio.ensure_future(chan.send(msg))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(functools.partial(self._drop_on_error, chan=chan))

    def _drop_on_error(self, task: asyncio.Future[None], chan: _Channel) -> None:
        if task.cancelled() or task.exception() is not None:
            self._subscribers.discard(chan)

    async def _handshake(self, chan: _Channel) -> bool:
        sn = os.urandom(16).hex()
        await chan.send({"hello": PROTO, "nonce": sn})
        async with asyncio.timeout(10):
            msg = await chan.recv()
        cn = str(msg.get("nonce", ""))
        proof = bytes.fromhex(str(msg.get("proof", "")))
        key: bytes | None = None
        if len(cn) >= 32:
            # every key is tried (no early exit): which one matched does not show in the time
            for candidate, allowed in ((self.secret, None), *self.limited.items()):
                if hmac.compare_digest(proof, _mac(candidate, b"client", sn.encode(),
                                                   cn.encode())) and key is None:
                    key, chan.allowed = candidate, allowed
        if key is None:
            self.rejected += 1
            log.warning("%s: refused a client that failed authentication", self.name)
            await chan.send({"error": {"type": "AuthenticationFailed", "message": "bad proof"}})
            return False
        await chan.send({"proof": _mac(key, b"server", sn.encode(), cn.encode()).hex()})
        chan.key = _mac(key, b"session", sn.encode(), cn.encode())
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        chan = _Channel(reader, writer, b"s")
        if self._unauthenticated >= MAX_UNAUTHENTICATED:
            self.rejected += 1
            chan.close()
            return
        self._unauthenticated += 1
        authenticated = False
        try:
            try:
                authenticated = await self._handshake(chan)
            finally:
                self._unauthenticated -= 1
            if not authenticated:
                return
            while True:
                req = await chan.recv()
                method = str(req.get("method", ""))
                if chan.allowed is not None and method not in chan.allowed:
                    log.warning("%s: refused %r to a peer with a limited key", self.name,
                                method[:64])
                    await chan.send({"id": req.get("id"), "error": {
                        "type": "AuthenticationFailed",
                        "message": f"{method[:64]!r} is not open to this peer's key"}})
                    return
                if method in self.streams:
                    await self._stream(chan, req)
                    return
                task = asyncio.ensure_future(self._answer(chan, req))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, ValueError):
            pass
        except AuthenticationFailed:
            log.warning("%s: dropped a connection with a bad frame MAC", self.name)
        finally:
            self._subscribers.discard(chan)
            chan.close()

    async def _answer(self, chan: _Channel, req: dict[str, Any]) -> None:
        rid = req.get("id")
        method = str(req.get("method", ""))
        reply: dict[str, Any]
        if method == "subscribe":
            self._subscribe(chan, rid, req.get("params", {}))
            with contextlib.suppress(ConnectionError, RuntimeError):
                await chan.writer.drain()
            return
        if method not in self.handlers:
            reply = {"id": rid, "error": {"type": "UnknownMethod", "message": f"no method {method!r}"}}
        else:
            try:
                result = await self.handlers[method](**req.get("params", {}))
                reply = {"id": rid, "result": result}
            except LabError as exc:
                reply = {"id": rid, "error": exc.to_wire()}
            except Exception as exc:  # the agent must survive any one bad request
                log.exception("%s: %s failed", self.name, method)
                reply = {"id": rid, "error": {"type": type(exc).__name__, "message": str(exc)}}
        with contextlib.suppress(ConnectionError, RuntimeError):
            await chan.send(reply)

    async def _stream(self, chan: _Channel, req: dict[str, Any]) -> None:
        """Hand the connection to a stream method; its result (or error) is the last frame."""
        rid, method = req.get("id"), str(req.get("method"))
        params = req.get("params", {})
        reply: dict[str, Any]
        try:
            result = await self.streams[method](Stream(chan, method=method),
                                                params if isinstance(params, dict) else {})
            reply = {"id": rid, "result": result}
        except LabError as exc:
            reply = {"id": rid, "error": exc.to_wire()}
        except (asyncio.IncompleteReadError, ConnectionError, AuthenticationFailed):
            raise
        except Exception as exc:  # the agent must survive any one bad request
            log.exception("%s: %s failed", self.name, method)
            reply = {"id": rid, "error": {"type": type(exc).__name__, "message": str(exc)}}
        with contextlib.suppress(ConnectionError, RuntimeError):
            await chan.send(reply)

    def _subscribe(self, chan: _Channel, rid: Any, params: dict[str, Any]) -> None:
        """Add a subscriber, replaying what it missed; no await, so nothing interleaves."""
        epoch, since = params.get("epoch"), params.get("since")
        first = None  # the first seq the subscriber has not seen, if it asked for a replay
        if isinstance(epoch, str) and epoch != self.epoch:
            first = 1  # we restarted since it last heard from us
        elif epoch == self.epoch and isinstance(since, int):
            first = since + 1
        replay = [m for m in self._log if first is not None and m["seq"] >= first]
        if first is not None and self._seq >= first and (not replay or replay[0]["seq"] > first):
            log.warning("%s: a subscriber missed events older than the last %d",
                        self.name, EVENT_LOG)
        self._subscribers.add(chan)
        for msg in replay:
            chan.write(msg)
        chan.write({"id": rid, "result": {"epoch": self.epoch, "seq": self._seq,
                                          "replayed": len(replay)}})


class RpcClient:
    """One authenticated connection to an agent. Use ``await RpcClient.connect(...)``."""

    def __init__(self, chan: _Channel, peer: str) -> None:
        self._chan = chan
        self.peer = peer
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._on_event: EventSink | None = None
        self.cursor: Cursor | None = None
        self._reader_task = asyncio.ensure_future(self._read_loop())

    @classmethod
    async def connect(
        cls, host: str, port: int, secret: bytes, timeout: float = 10.0, peer: str = ""
    ) -> RpcClient:
        peer = peer or f"{host}:{port}"
        return cls(await _client_channel(host, port, secret, timeout, peer), peer)

    @staticmethod
    async def open_stream(host: str, port: int, secret: bytes, method: str,
                          params: dict[str, Any], timeout: float = 10.0, peer: str = ""
                          ) -> Stream:
        """A new connection given over to the stream method ``method`` (see :class:`Stream`)."""
        peer = peer or f"{host}:{port}"
        chan = await _client_channel(host, port, secret, timeout, peer)
        try:
            await chan.send({"id": 1, "method": method, "params": params})
        except (ConnectionError, RuntimeError) as exc:
            chan.close()
            raise AgentUnreachable(f"lost the connection to {peer} during {method}",
                                   peer=peer, method=method) from exc
        return Stream(chan, peer=peer, method=method)

    async def call(self, method: str, timeout: float = 60.0, **params: Any) -> Any:
        """Call ``method`` with keyword ``params``; its result, or the agent's error raised
        as its own class (see :func:`labctl.core.errors.remote_error`)."""
        return await self.request(method, params, timeout)

    async def request(self, method: str, params: dict[str, Any], timeout: float = 60.0) -> Any:
        """Like :meth:`call`, with the parameters as one object (a parameter may then be
        called ``timeout`` too)."""
        self._next_id += 1
        rid = self._next_id
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await self._chan.send({"id": rid, "method": method, "params": params})
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancellation
            # of the caller that races the reply (a Ctrl-C'd migration then ran on)
            async with asyncio.timeout(timeout):
                reply = await fut
        except TimeoutError as exc:
            raise AgentUnreachable(
                f"{self.peer} did not answer {method} within {timeout:g} s", peer=self.peer,
                method=method,
            ) from exc
        except (ConnectionError, RuntimeError) as exc:
            raise AgentUnreachable(f"lost the connection to {self.peer} during {method}",
                                   peer=self.peer, method=method) from exc
        finally:
            self._pending.pop(rid, None)
        if "error" in reply:
            err = reply["error"]
            msg = str(err.get("message", "failed"))
            raise remote_error(
                f"{self.peer}: {msg if msg.startswith(method + ':') else f'{method}: {msg}'}",
                remote_type=str(err.get("type", "Error")),
                peer=self.peer, method=method, params=params, remote=err.get("data", {}),
            )
        return reply.get("result")

    async def subscribe(self, sink: EventSink, cursor: Cursor | None = None) -> int:
        """Receive events from now on; with ``cursor`` (the ``cursor`` of an earlier
        client to the same agent) first those published after it. Returns how many
        were replayed."""
        self._on_event = sink
        params: dict[str, Any] = {}
        if cursor is not None:
            params = {"epoch": cursor[0], "since": cursor[1]}
            self.cursor = cursor
        result = await self.call("subscribe", **params)
        if isinstance(result, dict):
            self._advance(str(result["epoch"]), int(result["seq"]))
            return int(result.get("replayed", 0))
        return 0

    def _advance(self, epoch: str, seq: int) -> None:
        if self.cursor is None or self.cursor[0] != epoch or seq > self.cursor[1]:
            self.cursor = (epoch, seq)

    async def _read_loop(self) -> None:
        exc: BaseException = ConnectionError("connection closed")
        try:
            while True:
                msg = await self._chan.recv()
                if "event" in msg:
                    if isinstance(msg.get("epoch"), str) and isinstance(msg.get("seq"), int):
                        self._advance(msg["epoch"], msg["seq"])
                    if self._on_event is not None:
                        self._on_event(str(msg["event"]), msg.get("data"))
                    continue
                fut = self._pending.get(msg.get("id"))
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        except (asyncio.IncompleteReadError, ConnectionError, AuthenticationFailed, OSError,
                ValueError) as e:
            exc = e if isinstance(e, ConnectionError) else ConnectionError(str(e))
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionError(str(exc)))

    async def close(self) -> None:
        self._reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader_task
        self._chan.close()

    async def __aenter__(self) -> RpcClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _client_channel(host: str, port: int, secret: bytes, timeout: float, peer: str
                          ) -> _Channel:
    """Connect and authenticate both ways; the channel then carries MAC'd frames."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, limit=STREAM_BUFFER)
    except (OSError, TimeoutError) as exc:
        raise AgentUnreachable(
            f"cannot reach the agent of {peer} at {host}:{port}: {exc or 'timed out'}",
            peer=peer, address=f"{host}:{port}",
        ) from exc
    _keepalive(writer)
    chan = _Channel(reader, writer, b"c")
    try:
        async with asyncio.timeout(timeout):
            hello = await chan.recv()
        if hello.get("hello") != PROTO:
            raise AgentUnreachable(f"{peer} does not speak {PROTO}", peer=peer, hello=hello)
        sn, cn = str(hello["nonce"]), os.urandom(16).hex()
        proof = _mac(secret, b"client", sn.encode(), cn.encode())
        await chan.send({"nonce": cn, "proof": proof.hex()})
        async with asyncio.timeout(timeout):
            answer = await chan.recv()
        want = _mac(secret, b"server", sn.encode(), cn.encode())
        if "proof" not in answer or not hmac.compare_digest(
            bytes.fromhex(answer["proof"]), want
        ):
            raise AuthenticationFailed(
                f"{peer} refused our credentials or failed to prove its own", peer=peer,
                answer=answer,
            )
    except (asyncio.IncompleteReadError, ConnectionError, TimeoutError) as exc:
        chan.close()
        raise AgentUnreachable(f"{peer} closed the connection during the handshake",
                               peer=peer) from exc
    except LabError:
        chan.close()
        raise
    chan.key = _mac(secret, b"session", sn.encode(), cn.encode())
    return chan


#: a peer that stops answering TCP keepalive probes (its VM was destroyed, its link cut) is
#: given up after about KEEPALIVE_IDLE + KEEPALIVE_COUNT * KEEPALIVE_INTERVAL seconds
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 5, 2, 3


def _keepalive(writer: asyncio.StreamWriter) -> None:
    """A connection to a peer that vanished without a reset (a destroyed VM never sends
    one) fails in seconds instead of waiting for a call's own timeout (an hour for a copy)."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)


class Stream:
    """A connection given over to one stream method: JSON frames and data frames both
    ways, every frame MAC'd like any other; the server's last frame is the method's result.

    The client opens one with :meth:`RpcClient.open_stream`; the server's stream handler
    gets the other end."""

    def __init__(self, chan: _Channel, peer: str = "", method: str = "") -> None:
        self._chan = chan
        self.peer = peer
        self.method = method
        with contextlib.suppress(AttributeError, RuntimeError):
            chan.writer.transport.set_write_buffer_limits(high=STREAM_BUFFER)

    async def send(self, obj: dict[str, Any]) -> None:
        await self._chan.send(obj)

    async def recv(self) -> dict[str, Any]:
        msg: dict[str, Any] = await self._chan.recv()
        return msg

    def write_bytes(self, data: bytes) -> None:
        self._chan.write_bytes(data)

    async def drain(self) -> None:
        await self._chan.writer.drain()

    async def recv_bytes(self) -> bytes:
        return await self._chan.recv_bytes()

    async def result(self, timeout: float = 600.0) -> Any:
        """(client) The method's result frame; its error raised as its own class."""
        try:
            async with asyncio.timeout(timeout):
                reply = await self._chan.recv()
        except TimeoutError as exc:
            raise AgentUnreachable(f"{self.peer} did not finish {self.method} within "
                                   f"{timeout:g} s", peer=self.peer, method=self.method) from exc
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            raise AgentUnreachable(f"lost the connection to {self.peer} during {self.method}",
                                   peer=self.peer, method=self.method) from exc
        if "error" in reply:
            err = reply["error"]
            msg = str(err.get("message", "failed"))
            raise remote_error(f"{self.peer}: {self.method}: {msg}",
                               remote_type=str(err.get("type", "Error")), peer=self.peer,
                               method=self.method, remote=err.get("data", {}))
        return reply.get("result")

    def close(self) -> None:
        self._chan.close()

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
