"""SSH to a machine the lab manages (a server guest, a host reached over SSH): commands
as argument lists (each word quoted for the remote shell with :func:`shlex.join`, never
pasted into a command string), files over SFTP. The host key is pinned (a guest printed it
on its console before anyone connected; a host's is in the topology), never trusted on first
use."""

from __future__ import annotations

import asyncio
import shlex
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import TracebackType

import asyncssh

from labctl.core.errors import LabError
from labctl.core.proc import CommandResult


class SshError(LabError):
    """A management channel could not be opened, or a command on it failed."""


#: a machine that stops answering (powered off, its network cut) is given up after this
#: many keepalives this far apart, not after a command's whole timeout
KEEPALIVE_S = 5.0
KEEPALIVE_COUNT = 4


class SshMachine:
    """``async with SshMachine(...) as m: await m.run([...])``."""

    def __init__(self, name: str, address: str, client_key: Path, host_key: str,
                 user: str = "root", port: int = 22,
                 pinned_by: str = "its console printed", connect_timeout: float = 60.0
                 ) -> None:
        self.name = name
        self.address = address
        self.client_key = client_key
        self.host_key = host_key
        self.user = user
        self.port = port
        #: where the pinned key came from, for the refusal's words
        self.pinned_by = pinned_by
        #: how long ``async with`` waits for a machine that does not listen yet
        self.connect_timeout = connect_timeout
        self._conn: asyncssh.SSHClientConnection | None = None

    async def connect(self, timeout: float = 60.0) -> None:
        """Connect, trying again until ``timeout`` while the machine is not listening yet."""
        trusted = asyncssh.import_public_key(self.host_key)
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                self._conn = await asyncio.wait_for(asyncssh.connect(
                    self.address, self.port, username=self.user,
                    client_keys=[str(self.client_key)], known_hosts=([trusted], [], []),
                    agent_path=None, config=[], keepalive_interval=KEEPALIVE_S,
                    keepalive_count_max=KEEPALIVE_COUNT),
                    timeout=max(1.0, deadline - time.monotonic()))
                return
            except asyncssh.HostKeyNotVerifiable as exc:
                raise SshError(f"{self.name} ({self.address}) presented another host key than "
                               f"the one {self.pinned_by}", machine=self.name) from exc
            except asyncssh.PermissionDenied as exc:
                # the machine answers and refuses the key: trying again changes nothing (a
                # server guest has its key before its sshd starts)
                raise SshError(f"no SSH session with {self.name} ({self.address}): it refused "
                               f"the key {self.client_key.name} for {self.user} ({exc.reason})",
                               machine=self.name, address=self.address,
                               user=self.user) from exc
            except (OSError, asyncssh.Error, TimeoutError) as exc:
                last = exc
                await asyncio.sleep(0.5)
        raise SshError(f"no SSH session with {self.name} ({self.address}) within {timeout:g} s: "
                       f"{last}", machine=self.name, address=self.address)

    async def __aenter__(self) -> SshMachine:
        if self._conn is None:
            await self.connect(self.connect_timeout)
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            await self._conn.wait_closed()
            self._conn = None

    def _need(self) -> asyncssh.SSHClientConnection:
        if self._conn is None:
            raise SshError(f"no SSH session with {self.name}", machine=self.name)
        return self._conn

    async def run(self, argv: list[str], check: bool = True, timeout: float = 120.0,
                  stdin: str | None = None) -> CommandResult:
        """Run ``argv`` on the machine (its words quoted for the remote shell); its output
        as text (bytes that are not UTF-8 replaced: :meth:`run_bytes` keeps them)."""
        code, out, err = await self.run_bytes(
            argv, timeout=timeout, stdin=None if stdin is None else stdin.encode())
        ran = CommandResult(argv, code, out.decode(errors="replace"),
                            err.decode(errors="replace"))
        if check and not ran.ok:
            tail = (ran.stderr or ran.stdout).strip().splitlines()[-3:]
            raise SshError(f"{self.name}: {argv[0]} exited with {code}: {' / '.join(tail)}",
                           machine=self.name, argv=argv, returncode=code,
                           stderr=ran.stderr[-2000:])
        return ran

    async def run_bytes(self, argv: list[str], timeout: float = 120.0,
                        stdin: bytes | None = None) -> tuple[int, bytes, bytes]:
        """Run ``argv`` on the machine: its exit status (-1: none, a signal or a lost
        channel) and its output exactly as it wrote it."""
        try:
            res = await asyncio.wait_for(self._need().run(
                shlex.join(argv), input=stdin, check=False, encoding=None), timeout)
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            raise self._failed(argv, exc) from exc
        code = res.exit_status if res.exit_status is not None else -1
        return code, _raw(res.stdout), _raw(res.stderr)

    async def stream(self, argv: list[str], sink: Callable[[int, bytes], object],
                     timeout: float = 120.0) -> int:
        """Run ``argv`` on the machine and hand each piece of its output to ``sink`` as it
        comes (1: its standard output, 2: its standard error), for a long command whose
        caller shows its progress; its exit status (-1: none, a signal or a lost channel).
        Past ``timeout`` its session is closed."""
        conn = self._need()
        try:
            proc = await conn.create_process(shlex.join(argv), encoding=None)
        except (asyncssh.Error, OSError) as exc:
            raise self._failed(argv, exc) from exc

        async def pump(reader: asyncssh.SSHReader[bytes], fd: int) -> None:
            while chunk := await reader.read(65536):
                sink(fd, chunk)

        try:
            proc.stdin.write_eof()
            await asyncio.wait_for(asyncio.gather(pump(proc.stdout, 1), pump(proc.stderr, 2)),
                                   timeout)
            await asyncio.wait_for(proc.wait_closed(), 10.0)
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            raise self._failed(argv, exc) from exc
        finally:
            proc.close()
        return proc.exit_status if proc.exit_status is not None else -1

    async def follow(self, argv: list[str]) -> AsyncIterator[str]:
        """Run ``argv`` (``tail -F``, ``journalctl -f``) on the machine and yield each line
        it writes until it ends or the caller stops. It runs on a terminal of its own:
        stopping closes that terminal, which hangs the command up, so nothing is left
        running on the machine (without one it would go on until its next write failed)."""
        conn = self._need()
        try:
            proc = await conn.create_process(shlex.join(argv), term_type="dumb",
                                             encoding="utf-8", errors="replace")
        except (asyncssh.Error, OSError) as exc:
            raise self._failed(argv, exc) from exc
        try:
            async for line in proc.stdout:
                yield line.rstrip("\r\n")
        except (asyncssh.Error, OSError) as exc:
            raise self._failed(argv, exc) from exc
        finally:
            proc.close()
        await proc.wait_closed()
        if proc.exit_status:
            raise SshError(f"{self.name}: {argv[0]} exited with {proc.exit_status}",
                           machine=self.name, argv=argv, returncode=proc.exit_status)

    def _failed(self, argv: list[str], exc: BaseException) -> SshError:
        """A command the session could not run (or lost), as one error naming it."""
        return SshError(f"{self.name}: {shlex.join(argv)}: {exc!r}", machine=self.name,
                        argv=argv)

    async def put(self, data: bytes, remote: str, mode: int = 0o644) -> None:
        """Write ``data`` to ``remote`` (replaced whole: written beside it, then renamed)."""
        try:
            async with self._need().start_sftp_client() as sftp:
                tmp = f"{remote}.labctl-new"
                async with sftp.open(tmp, "wb", attrs=asyncssh.SFTPAttrs(
                        permissions=mode)) as f:
                    await f.write(data)
                await sftp.chmod(tmp, mode)
                await sftp.posix_rename(tmp, remote)
        except (asyncssh.Error, OSError) as exc:
            raise SshError(f"{self.name}: cannot write {remote}: {exc}", machine=self.name,
                           path=remote) from exc


def _raw(data: bytes | str | None) -> bytes:
    """Output asked for without an encoding (bytes); str only if asyncssh decoded it."""
    if isinstance(data, str):
        return data.encode()
    return data or b""
