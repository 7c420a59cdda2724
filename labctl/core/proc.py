"""Running programs: argument lists only, never a shell; results as a small dataclass."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from labctl.core.errors import CommandFailed, MissingDependency


@dataclass(frozen=True)
class CommandResult:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def netns_argv(netns: str | None, argv: list[str]) -> list[str]:
    """Prefix ``argv`` so that it runs inside network namespace ``netns`` (None: here)."""
    if netns is None:
        return list(argv)
    return ["nsenter", f"--net=/run/netns/{netns}", "--", *argv]


def cmdline_names(pid: int, path: Path) -> bool:
    """Whether process ``pid`` has ``path``, or a path inside it, as one of its command-line
    arguments (``/a/lab`` never matches ``/a/lab2``): how labctl proves a process is the one
    it started for a lab or a VM, without finding anything by name."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    own = str(path.absolute()).encode()
    return any(a == own or own + b"/" in a for a in args)


def process_identity(pid: int) -> str | None:
    """Process ``pid`` as ``PID:START`` (its start in clock ticks after boot, which tells it
    from a later process given the same PID), or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # after the command name, which may hold spaces
    return f"{pid}:{fields[19]}" if len(fields) > 19 else None


def which(program: str, hint: str = "") -> str:
    path = shutil.which(program)
    if path is None:
        raise MissingDependency(
            f"{program} is not installed{': ' + hint if hint else ''} (run scripts/setup.sh)",
            program=program,
        )
    return path


async def run(
    argv: list[str],
    *,
    check: bool = True,
    timeout: float | None = 120.0,
    netns: str | None = None,
    input: bytes | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    what: str = "",
) -> CommandResult:
    """Run ``argv`` (optionally inside ``netns``) and return its result.

    Raises CommandFailed when ``check`` and the exit status is non-zero, or when
    the program does not end within ``timeout`` seconds (it is killed then).
    """
    full = netns_argv(netns, argv)
    which(full[0])
    proc = await asyncio.create_subprocess_exec(
        *full,
        stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **env} if env else None,
        cwd=cwd,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate(input)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise CommandFailed(full, -9, "", f"timed out after {timeout} s", what=what) from None
    except asyncio.CancelledError:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    res = CommandResult(full, proc.returncode or 0, out.decode(errors="replace"),
                        err.decode(errors="replace"))
    if check and not res.ok:
        raise CommandFailed(full, res.returncode, res.stdout, res.stderr, what=what)
    return res


def cmdlines() -> Iterator[tuple[int, bytes]]:
    """(PID, command line with its NUL separators) of every process this one can read."""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                yield int(pid), Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:  # gone meanwhile, or not ours to read
                continue
