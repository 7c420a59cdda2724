"""``SshMachine.stream``: a long command's output reaches its caller as the command writes
it, not when it ends (``labctl vm ssh``), with its exit status; past its timeout the
session is closed in one error. The SSH server is asyncssh's own, in this process, its
host key pinned as a guest's is."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from labctl.drivers.ssh import SshError, SshMachine


class _Server(asyncssh.SSHServer):
    def __init__(self, client_key: asyncssh.SSHKey) -> None:
        self.client_key = client_key

    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return bool(key.public_data == self.client_key.public_data)


async def _session(gate: asyncio.Event, process: asyncssh.SSHServerProcess[bytes]) -> None:
    """``talk``: a line, then (once the test let it go on) a line on each stream and exit 3;
    anything else: silent until it is closed."""
    if process.command == "talk":
        process.stdout.write(b"first\n")
        await gate.wait()
        process.stdout.write(b"second\n")
        process.stderr.write(b"\xffwarned\n")  # bytes as they are, not decoded
        process.exit(3)
        return
    await asyncio.sleep(3600)


async def _with_server(tmp_path: Path, gate: asyncio.Event, body: Any) -> Any:
    client = asyncssh.generate_private_key("ssh-ed25519")
    key = tmp_path / "client"
    client.write_private_key(str(key))
    key.chmod(0o600)
    host = asyncssh.generate_private_key("ssh-ed25519")
    server = await asyncssh.create_server(
        lambda: _Server(client), "127.0.0.1", 0, server_host_keys=[host], encoding=None,
        process_factory=lambda p: _session(gate, p))
    port = server.sockets[0].getsockname()[1]
    try:
        async with SshMachine("web1", "127.0.0.1", key, host.export_public_key().decode(),
                              port=port) as m:
            return await body(m)
    finally:
        server.close()
        await server.wait_closed()


def test_output_reaches_the_caller_as_the_command_writes_it(tmp_path: Path) -> None:
    async def go() -> tuple[int, list[tuple[int, bytes]]]:
        gate = asyncio.Event()
        got: list[tuple[int, bytes]] = []

        def sink(fd: int, chunk: bytes) -> None:
            got.append((fd, chunk))
            gate.set()  # the command goes on only once its first line was shown

        code = await _with_server(tmp_path, gate,
                                  lambda m: m.stream(["talk"], sink, timeout=20))
        return code, got

    code, got = asyncio.run(go())
    assert code == 3
    assert got[0] == (1, b"first\n")
    assert b"".join(c for fd, c in got if fd == 1) == b"first\nsecond\n"
    assert b"".join(c for fd, c in got if fd == 2) == b"\xffwarned\n"


def test_a_command_past_its_timeout_is_one_error(tmp_path: Path) -> None:
    async def go() -> None:
        await _with_server(tmp_path, asyncio.Event(),
                           lambda m: m.stream(["sleep", "forever"], lambda fd, c: None,
                                              timeout=0.5))

    with pytest.raises(SshError, match=r"^web1: sleep forever: TimeoutError"):
        asyncio.run(go())


def test_a_refused_key_is_said_at_once_not_tried_again(tmp_path: Path) -> None:
    """The server answers and refuses the key: one error naming it at once; the connect
    timeout is for a machine not listening yet."""
    async def go() -> None:
        allowed = asyncssh.generate_private_key("ssh-ed25519")
        other = tmp_path / "other"
        asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(other))
        other.chmod(0o600)
        host = asyncssh.generate_private_key("ssh-ed25519")
        server = await asyncssh.create_server(lambda: _Server(allowed), "127.0.0.1", 0,
                                              server_host_keys=[host])
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(SshError, match=r"no SSH session with web1 \(127\.0\.0\.1\): "
                               r"it refused the key other for root"):
                async with SshMachine("web1", "127.0.0.1", other,
                                      host.export_public_key().decode(), port=port,
                                      connect_timeout=30):
                    pass
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(go())  # (tried again until its timeout, it would say "within 30 s")
