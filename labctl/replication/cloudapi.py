"""A libvirt cloud's API endpoint: libvirt's own remote protocol (``qemu+tls://``) on the
cloud's network, in front of the cloud's libvirtd, answering only the cloud's operators.

A caller presents a client certificate signed by the cloud's CA (its own, not the lab's)
whose common name is on the endpoint's allow list, as libvirtd's ``tls_allowed_dn_list``
would demand; the endpoint checks it, sends libvirt's one-byte confirmation (``1``: go on,
``0``: refused) and then carries the connection to libvirtd's socket byte for byte, so the
caller speaks to libvirt itself (``virsh -c qemu+tls://ADDRESS/system?pkipath=DIR``). A
caller without a certificate, with one of another CA or a name not on the list is
refused and logged; nothing it sent reaches libvirtd.

Agent side: the standard library and :mod:`labctl.core` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labctl.core.tlsctx import server_context

log = logging.getLogger("labctl.cloudapi")

#: libvirt's port for its TLS transport
LIBVIRT_TLS_PORT = 16514
#: what the server sends right after the handshake: the caller may go on, or not
CONFIRM_OK = b"\x01"
CONFIRM_REFUSED = b"\x00"
HANDSHAKE_TIMEOUT = 10.0


@dataclass(frozen=True)
class GateFiles:
    """The endpoint's certificate and key, and the cloud's CA its callers' certificates
    must be signed by."""

    cert: Path
    key: Path
    ca: Path


@dataclass
class GateCounts:
    accepted: int = 0
    #: callers refused (each logged with why)
    refused: int = 0

    def refuse(self, peer: str, why: str) -> None:
        self.refused += 1
        log.warning("refused %s: %s", peer, why)


def common_name(cert: dict[str, Any] | None) -> str | None:
    """The common name of a peer certificate as :meth:`ssl.SSLSocket.getpeercert` gives it."""
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


class ApiGate:
    """The endpoint: listens on ``address:port``, relays accepted callers to libvirtd's
    socket ``upstream``."""

    def __init__(self, address: str, port: int, files: GateFiles, allowed: set[str],
                 upstream: Path) -> None:
        self.address = address
        self.port = port
        self.allowed = allowed
        self.upstream = upstream
        self.counts = GateCounts()
        self.ctx = server_context(files.cert, files.key, files.ca)
        # libvirt reads its confirmation byte as the first record after the handshake: a
        # TLS 1.3 session ticket in its place reads as "nothing yet" and fails the caller
        self.ctx.num_tickets = 0
        self._server: asyncio.Server | None = None
        self.callers: set[_Caller] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Caller(self), self.address,
                                                self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for c in list(self.callers):
            c.close()


class _Caller(asyncio.Protocol):
    """One caller, TLS done by hand (:class:`ssl.SSLObject` over memory buffers) so that a
    refused caller is refused as a TLS server should: the alert sent, what it sends after
    read and dropped until it hangs up (a close with its bytes unread would reset the
    connection under its feet), nothing of it passed on."""

    def __init__(self, gate: ApiGate) -> None:
        self.gate = gate
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = gate.ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.name: str | None = None
        #: handshake, refused, connecting (to libvirtd), relay, closed
        self.state = "handshake"
        self.early: list[bytes] = []  # what the caller sent before libvirtd answered
        self.upstream: asyncio.StreamWriter | None = None
        self.pump: asyncio.Task[None] | None = None
        self.deadline: asyncio.TimerHandle | None = None

    # -- the caller's side ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        host, port = transport.get_extra_info("peername")[:2]
        self.peer = f"{host}:{port}"
        self.gate.callers.add(self)
        self.deadline = asyncio.get_running_loop().call_later(
            HANDSHAKE_TIMEOUT, self._timed_out)

    def data_received(self, data: bytes) -> None:
        if self.state in ("refused", "closed"):
            return  # read and dropped
        self.incoming.write(data)
        if self.state == "handshake":
            self._handshake()
        if self.state in ("connecting", "relay"):
            self._decrypted()

    def eof_received(self) -> bool | None:
        if self.upstream is not None and self.state == "relay":
            with contextlib.suppress(OSError, RuntimeError):
                self.upstream.write_eof()
            return True  # keep our side open: libvirtd may still answer
        self.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.name is not None and self.state == "relay":
            log.info("%s: %s left", self.peer, self.name)
        self.state = "closed"
        self.gate.callers.discard(self)
        if self.deadline is not None:
            self.deadline.cancel()
        if self.upstream is not None:
            self.upstream.close()
        if self.pump is not None:
            self.pump.cancel()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _goodbye(self) -> None:
        """TLS's own end (close_notify) sent, then the connection closed."""
        if self.state == "relay":
            with contextlib.suppress(ssl.SSLError, ValueError):
                self.tls.unwrap()
            self._flush()
        self.close()

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _send(self, data: bytes) -> None:
        with contextlib.suppress(ssl.SSLError):
            self.tls.write(data)
        self._flush()

    def _refuse(self, why: str, confirm: bool) -> None:
        """Refused: libvirt's refusal byte if the handshake got that far, then the
        caller's bytes dropped until it hangs up (or the deadline closes it)."""
        self.gate.counts.refuse(self.peer, why)
        if confirm:
            self._send(CONFIRM_REFUSED)
        else:
            self._flush()  # the handshake's alert
        self.state = "refused"
        if self.deadline is not None:
            self.deadline.cancel()
        self.deadline = asyncio.get_running_loop().call_later(2.0, self.close)

    def _timed_out(self) -> None:
        if self.state == "handshake":
            self._refuse(f"no TLS handshake within {HANDSHAKE_TIMEOUT:g} s", confirm=False)
        self.close()

    def _handshake(self) -> None:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except ssl.SSLError as exc:
            self._refuse(f"TLS handshake failed: {exc.reason or exc}", confirm=False)
            return
        self._flush()
        if self.deadline is not None:
            self.deadline.cancel()
        self.name = common_name(self.tls.getpeercert())
        if self.name not in self.gate.allowed:
            self._refuse(f"certificate {self.name!r} is not on the allow list", confirm=True)
            return
        self.state = "connecting"
        self.pump = asyncio.get_running_loop().create_task(self._connect())

    def _decrypted(self) -> None:
        """What the caller sent, decrypted: to libvirtd (kept until it answers)."""
        while True:
            try:
                data = self.tls.read(1 << 16)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLError):
                self._goodbye()
                break
            if not data:  # the caller's close_notify
                self._goodbye()
                break
            if self.upstream is None:
                self.early.append(data)
            else:
                self.upstream.write(data)
        self._flush()

    # -- libvirtd's side ------------------------------------------------------------------
    async def _connect(self) -> None:
        try:
            reader, self.upstream = await asyncio.open_unix_connection(str(self.gate.upstream))
        except OSError as exc:
            log.error("%s (%s): libvirtd's socket %s does not answer: %s", self.peer,
                      self.name, self.gate.upstream, exc)
            self._send(CONFIRM_REFUSED)
            self.state = "refused"
            self.close()
            return
        self.gate.counts.accepted += 1
        log.info("%s: %s connected", self.peer, self.name)
        self.state = "relay"
        self._send(CONFIRM_OK)
        for data in self.early:
            self.upstream.write(data)
        self.early.clear()
        try:
            while data := await reader.read(1 << 16):
                self._send(data)
                if self.transport is not None and self.transport.get_write_buffer_size() > (
                        4 << 20):
                    await asyncio.sleep(0.01)  # the caller reads slowly: let it catch up
        except OSError:
            pass
        self._goodbye()
