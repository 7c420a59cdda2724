"""The relay between two mobility agents: one mutually authenticated TLS connection across
the WAN (:mod:`labctl.core.tlsctx`, the lab's CA) carrying several named streams at once:
``control``, ``memory`` (the migration stream), ``disk`` (the block mirror's NBD). On site
A the agent listens on a local port per stream, as the destination its site's ordinary
workflow talks to; each connection made there is carried to site B, whose agent connects
to that stream's real target (the incoming QEMU, the NBD export) and pipes both ways.
Bytes are counted per stream and direction, and a frame may be compressed (zlib) when
that makes it smaller.

Frames: stream id (u16), kind (u8: open, data, zdata, close, ack), length (u32), payload.
The open frame's payload is the stream's name; site B refuses a name it has no target for.

**Backpressure.** A stream may have at most ``window`` bytes read from its local peer and
not yet handed to the far peer's socket; the far end acknowledges (``ack``, a u32 count)
what it wrote. The local sockets' receive buffers are kept small. So the relay buffers
about what a direct TCP connection across the WAN would have in flight, and a QEMU that
writes into it sees the WAN's pace, not the speed of its own site's bridge (it measures
its bandwidth on that socket to decide when to switch over).

Standard library only: it runs in the agents.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import zlib
from dataclasses import dataclass, field

_HEAD = struct.Struct(">HBI")
OPEN, DATA, ZDATA, CLOSE, ACK = 1, 2, 3, 4, 5
CHUNK = 256 << 10
_ACK = struct.Struct(">I")
#: bytes a stream may have in flight by default (read here, not yet written there)
WINDOW = 8 << 20
#: the receive buffer of a local peer's socket (the kernel would grow it to megabytes;
#: it doubles what is set): what the source's QEMU has written and the relay not yet read
LOCAL_RCVBUF = 128 << 10
#: a frame is compressed only when that saves at least this fraction
_WORTH = 0.9


class RelayError(Exception):
    """The relay failed (the channel went away, a peer broke the protocol)."""


@dataclass
class Counters:
    """Bytes carried per stream name: ``out`` from site A to B, ``back`` from B to A, and
    what crossed the WAN for them (after compression)."""

    out: dict[str, int] = field(default_factory=dict)
    back: dict[str, int] = field(default_factory=dict)
    wire: dict[str, int] = field(default_factory=dict)

    def add(self, table: dict[str, int], name: str, n: int) -> None:
        table[name] = table.get(name, 0) + n


class _Channel:
    """One end of the TLS connection: frames out (one writer at a time), frames in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 compress: bool, counters: Counters, window: int = WINDOW) -> None:
        self.reader = reader
        self.writer = writer
        self.compress = compress
        self.counters = counters
        self.lock = asyncio.Lock()
        self.names: dict[int, str] = {}
        self.window = max(window, CHUNK)
        #: per stream: bytes sent and not yet acknowledged, and a wake-up for the pump
        self.inflight: dict[int, int] = {}
        self.credit: dict[int, asyncio.Event] = {}

    async def reserve(self, sid: int, n: int) -> None:
        """Wait until stream ``sid`` may have ``n`` more bytes in flight."""
        event = self.credit.setdefault(sid, asyncio.Event())
        while self.inflight.get(sid, 0) + n > self.window:
            event.clear()
            await event.wait()
        self.inflight[sid] = self.inflight.get(sid, 0) + n

    def acked(self, sid: int, n: int) -> None:
        self.inflight[sid] = max(0, self.inflight.get(sid, 0) - n)
        event = self.credit.get(sid)
        if event is not None:
            event.set()

    async def send(self, sid: int, kind: int, payload: bytes = b"") -> None:
        if kind == DATA and self.compress and len(payload) > 512:
            packed = zlib.compress(payload, 1)
            if len(packed) < len(payload) * _WORTH:
                kind, payload = ZDATA, packed
        async with self.lock:
            self.writer.write(_HEAD.pack(sid, kind, len(payload)) + payload)
            await self.writer.drain()
        if kind in (DATA, ZDATA):
            self.counters.add(self.counters.wire, self.names.get(sid, "?"), len(payload))

    async def receive(self) -> tuple[int, int, bytes]:
        try:
            head = await self.reader.readexactly(_HEAD.size)
            sid, kind, n = _HEAD.unpack(head)
            if n > 4 * CHUNK:
                raise RelayError(f"a frame of {n} bytes: not a relay peer")
            payload = await self.reader.readexactly(n)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError) as exc:
            raise RelayError(f"the relay channel went away: {exc!r}") from exc
        if kind == ZDATA:
            try:
                payload, kind = zlib.decompress(payload), DATA
            except zlib.error as exc:
                raise RelayError(f"a bad compressed frame: {exc}") from exc
        return sid, kind, payload


class _Pipes:
    """The local connections of one end, by stream id: bytes from a local peer go out as
    frames; frames from the channel go to the local peer."""

    def __init__(self, channel: _Channel, direction: dict[str, int]) -> None:
        self.channel = channel
        self.direction = direction  # counters of what this end's local peers send
        self.writers: dict[int, asyncio.StreamWriter] = {}
        #: streams whose far side has closed (their local peer was told: EOF)
        self.ended: set[int] = set()
        #: streams whose local peer has closed its sending side (the far side was told)
        self.pumped: set[int] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    def attach(self, sid: int, name: str, reader: asyncio.StreamReader,
               writer: asyncio.StreamWriter) -> None:
        self.channel.names[sid] = name
        self.writers[sid] = writer
        task = asyncio.ensure_future(self._pump(sid, name, reader))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _pump(self, sid: int, name: str, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                self.channel.counters.add(self.direction, name, len(data))
                await self.channel.reserve(sid, len(data))
                await self.channel.send(sid, DATA, data)
        except (ConnectionError, RelayError):
            pass
        finally:
            # the channel may be gone already (its transport closed under this pump)
            with contextlib.suppress(ConnectionError, RelayError, RuntimeError, AttributeError):
                await self.channel.send(sid, CLOSE)
            self.pumped.add(sid)
            self._done(sid)

    async def deliver(self, sid: int, kind: int, payload: bytes) -> None:
        if kind == ACK:
            if len(payload) == _ACK.size:
                self.channel.acked(sid, _ACK.unpack(payload)[0])
            return
        writer = self.writers.get(sid)
        if writer is None:
            return
        if kind == DATA:
            writer.write(payload)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            with contextlib.suppress(ConnectionError, RelayError, RuntimeError, AttributeError):
                await self.channel.send(sid, ACK, _ACK.pack(len(payload)))
        elif kind == CLOSE and sid not in self.ended:
            self.ended.add(sid)  # the other side is done sending: pass its end on
            with contextlib.suppress(OSError, RuntimeError):
                if writer.can_write_eof():
                    writer.write_eof()
            self._done(sid)

    def _done(self, sid: int) -> None:
        """Close a stream's local connection once both directions are over (the writer is
        kept until then: dropping it closes the socket under its reader)."""
        if sid in self.pumped and sid in self.ended:
            writer = self.writers.pop(sid, None)
            if writer is not None:
                writer.close()

    def close_all(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()
        for task in self.tasks:
            task.cancel()
        for event in self.channel.credit.values():
            event.set()  # a pump waiting for credit wakes to find its channel gone


def small_receive_buffer(writer: asyncio.StreamWriter) -> None:
    """Keep a local peer's socket from buffering megabytes the relay has not read yet."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, LOCAL_RCVBUF)


async def serve_b(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  targets: dict[str, tuple[str, int]], counters: Counters,
                  compress: bool = False, window: int = WINDOW) -> None:
    """Site B's end of one relay connection: each stream A opens is connected to its
    target; returns when the channel ends (RelayError when it breaks)."""
    channel = _Channel(reader, writer, compress, counters, window)
    pipes = _Pipes(channel, counters.back)
    try:
        while True:
            sid, kind, payload = await channel.receive()
            if kind == OPEN:
                name = payload.decode(errors="replace")
                if name not in targets:
                    await channel.send(sid, CLOSE)
                    continue
                host, port = targets[name]
                try:
                    r, w = await asyncio.open_connection(host, port)
                except OSError:
                    await channel.send(sid, CLOSE)
                    continue
                small_receive_buffer(w)
                pipes.attach(sid, name, r, w)
            else:
                if kind == DATA:
                    counters.add(counters.out, channel.names.get(sid, "?"), len(payload))
                await pipes.deliver(sid, kind, payload)
    finally:
        pipes.close_all()
        writer.close()


class EndA:
    """Site A's end: one TLS connection to site B, and a local listener per stream name."""

    def __init__(self, counters: Counters, compress: bool = False,
                 window: int = WINDOW) -> None:
        self.counters = counters
        self.compress = compress
        self.window = window
        self.channel: _Channel | None = None
        self.pipes: _Pipes | None = None
        self.servers: dict[str, asyncio.Server] = {}
        self.next_sid = 1
        self.reading: asyncio.Task[None] | None = None
        self.error: str | None = None

    async def connect(self, host: str, port: int, ctx: ssl.SSLContext,
                      server_hostname: str) -> None:
        reader, writer = await asyncio.open_connection(host, port, ssl=ctx,
                                                       server_hostname=server_hostname)
        self.channel = _Channel(reader, writer, self.compress, self.counters, self.window)
        self.pipes = _Pipes(self.channel, self.counters.out)
        self.reading = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.channel is not None and self.pipes is not None
        try:
            while True:
                sid, kind, payload = await self.channel.receive()
                if kind == DATA:
                    self.counters.add(self.counters.back, self.channel.names.get(sid, "?"),
                                      len(payload))
                await self.pipes.deliver(sid, kind, payload)
        except RelayError as exc:
            self.error = str(exc)
        finally:
            self.pipes.close_all()

    async def listen(self, name: str, host: str = "127.0.0.1", port: int = 0) -> int:
        """A local port for stream ``name``: each connection there is carried to site B."""

        async def accepted(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            if self.channel is None or self.pipes is None or self.error is not None:
                w.close()
                return
            small_receive_buffer(w)
            sid = self.next_sid
            self.next_sid += 1
            self.channel.names[sid] = name
            try:
                await self.channel.send(sid, OPEN, name.encode())
            except (ConnectionError, RelayError):  # the channel went away meanwhile
                w.close()
                return
            self.pipes.attach(sid, name, r, w)

        server = await asyncio.start_server(accepted, host, port)
        self.servers[name] = server
        return int(server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        for server in self.servers.values():
            server.close()
        if self.channel is not None:
            self.channel.writer.close()
        if self.reading is not None:
            self.reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reading
