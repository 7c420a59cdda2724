"""What the controller runs on a machine it reaches over SSH (a host of an SSH lab), as
argument lists, never a shell line:

* ``start --log FILE [--pidfile FILE] -- ARGV...``: start ``ARGV`` in a session of its
  own, its output appended to ``FILE``, nothing of the SSH channel held open; prints its
  PID (and writes it to ``--pidfile``, for an agent that does not write its own).
* ``stop --state-dir DIR``: stop the agent whose state directory is ``DIR`` (its PID from
  ``DIR/agent.pid``) and any QEMU it left (``DIR/vms/*/qemu.pid``), each only while its
  command line names ``DIR``: SIGTERM (the agent stops its VMs softly), SIGKILL after
  ``--grace`` s; prints one line per process stopped.
* ``exec -- ARGV...``: run ``ARGV`` with further environment read as one JSON object from
  the first line of standard input (the host's iSCSI CHAP credentials: never on a command
  line, where ``ps`` would show them); its exit status is this one's.

Standard library and ``labctl.core`` only: it runs where labctl's source is all there is.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from labctl.core.proc import cmdline_names


def _start(log: Path, argv: list[str], pidfile: Path | None = None) -> int:
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True, close_fds=True)
    if pidfile is not None:
        fd = os.open(pidfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{proc.pid}\n")
    print(proc.pid, flush=True)
    return 0


def _pids(state: Path) -> list[tuple[str, int]]:
    found: list[tuple[str, int]] = []
    for name, pidfile in [("agent", state / "agent.pid"),
                          *((f"qemu:{p.parent.name}", p)
                            for p in sorted(state.glob("vms/*/qemu.pid")))]:
        with contextlib.suppress(OSError, ValueError, IndexError):
            found.append((name, int(pidfile.read_text().split()[0])))
    return found


def _stop_one(name: str, pid: int, state: Path, grace: float) -> str | None:
    if not cmdline_names(pid, state):
        return None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not cmdline_names(pid, state):
            return f"{name} (pid {pid})"
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return f"{name} (pid {pid}, killed)"


def _stop(state: Path, grace: float) -> int:
    # the agent first: it stops its VMs softly; then whatever QEMU it did not stop
    for name, pid in sorted(_pids(state), key=lambda found: found[0] != "agent"):
        said = _stop_one(name, pid, state, grace)
        if said:
            print(said, flush=True)
    return 0


def _exec(argv: list[str]) -> int:
    line = sys.stdin.readline()
    extra = json.loads(line) if line.strip() else {}
    if not isinstance(extra, dict) or not all(isinstance(v, str) for v in extra.values()):
        print("remote exec: the environment line is not an object of strings",
              file=sys.stderr)
        return 2
    try:
        return subprocess.run(argv, env={**os.environ, **extra}, stdin=subprocess.DEVNULL,
                              check=False).returncode
    except OSError as exc:
        print(f"cannot run {argv[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m labctl.agents.remote")
    sub = ap.add_subparsers(dest="cmd", required=True)
    start = sub.add_parser("start")
    start.add_argument("--log", required=True, type=Path)
    start.add_argument("--pidfile", type=Path)
    start.add_argument("argv", nargs=argparse.REMAINDER)
    stop = sub.add_parser("stop")
    stop.add_argument("--state-dir", required=True, type=Path)
    stop.add_argument("--grace", type=float, default=30.0)
    run = sub.add_parser("exec")
    run.add_argument("argv", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    words = [w for w in getattr(args, "argv", [])]
    if words and words[0] == "--":
        words = words[1:]
    if args.cmd == "start":
        if not words:
            ap.error("start: give the command")
        return _start(args.log, words, args.pidfile)
    if args.cmd == "stop":
        return _stop(args.state_dir.absolute(), args.grace)
    if not words:
        ap.error("exec: give the command")
    return _exec(words)


if __name__ == "__main__":
    sys.exit(main())
