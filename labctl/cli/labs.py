"""Commands about labs as a whole, their VMs, and the ways into them: ``up``, ``status``,
``ls``, ``down``, ``validate``, ``demo``, ``vm ...``, ``exec``, ``shell``, ``logs``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from labctl.cli.args import CONSOLE_HELP, DEFAULT_TOPOLOGY
from labctl.cli.progress import Progress
from labctl.core.chap import initiator_secret
from labctl.core.errors import LabError, LabStateError
from labctl.core.paths import home, labs_dir, repo_root
from labctl.core.proc import netns_argv
from labctl.core.wire import Json, Message, WallTime
from labctl.hosts.sshhosts import SshAccess, state_dir
from labctl.lab.face import Lab
from labctl.state.labdir import existing_labs, lab_meta

if TYPE_CHECKING:
    from labctl.lab.status import LabStatus


def emit(record: Json) -> None:
    """The command's JSON document on stdout (with --json)."""
    print(json.dumps(record, indent=2, default=str))


async def run(args: argparse.Namespace, progress: Progress) -> int:
    if args.cmd == "validate":
        return _validate(args)
    if args.cmd == "ls":
        return _ls(args)
    if args.cmd in ("up", "demo"):
        return await _up(args, progress)
    lab = Lab.find(args.lab, progress=progress, site=args.site)
    if args.cmd == "status":
        status = await lab.status()  # of the --site site alone, with --site
        if args.json:
            emit(status.to_wire())
        else:
            print_status(status)
        return 0
    if args.cmd == "down":
        done = await lab.down(purge=args.purge)
        if args.json:
            emit(done.to_wire())
        elif done.already_down and not args.purge:
            print(f"lab {lab.name} was already down (its records are in {done.kept}; "
                  "--purge deletes them)")
        else:
            print(f"lab {lab.name} is down ({len(done.removed)} objects removed"
                  + (f"; records kept in {done.kept})" if done.kept else "; directory deleted)"))
        return 0
    if args.cmd == "logs":
        return await _logs(lab, args)
    if args.cmd == "export":
        return _export(lab, args)
    lab.require_up()
    if args.cmd == "vm":
        return await _vm(lab, args)
    if args.cmd in ("exec", "shell"):
        return await _exec(lab, args)
    raise AssertionError(args.cmd)


# ------------------------------------------------------------------------------ labs

def _default_topology() -> Path:
    here = Path(DEFAULT_TOPOLOGY)
    return here if here.exists() else repo_root() / DEFAULT_TOPOLOGY


def _topology_file(args: argparse.Namespace) -> Path:
    """The file ``up`` builds from: the one given; else the topology of the lab named with
    --lab, or of the one lab there is; else labs/default.yaml."""
    if args.file is not None:
        return Path(args.file)
    existing = existing_labs()
    labs = ([args.lab] if args.lab in existing else []) if args.lab else existing
    if len(labs) > 1:
        raise LabStateError(f"several labs exist ({', '.join(labs)}): give a topology file or "
                            "say which lab with --lab NAME")
    if labs:
        meta = lab_meta(labs_dir() / labs[0])
        source = Path(meta.get("topology_source", ""))
        if source.is_file():
            return source
        saved = labs_dir() / labs[0] / "topology.json"
        if saved.is_file():
            return saved
    return _default_topology()


async def _up(args: argparse.Namespace, progress: Progress) -> int:
    from labctl.lab import topology
    from labctl.scenarios import demo

    file = _topology_file(args)
    topo = topology.load(file)
    lab = Lab(args.lab or topo.name, progress=progress)
    status = await lab.up(topo)
    if args.cmd == "demo":
        print_status(status)
        return await demo.run(lab, status, args.keep)
    if args.json:
        emit(status.to_wire())
    else:
        print_status(status)
    return 0


def _validate(args: argparse.Namespace) -> int:
    from labctl.lab import topology

    topo = topology.load(args.file)
    Lab(args.lab or topo.name).check(topo)  # every check of up that builds nothing
    counts = ((len(topo.hosts), "host"), (len(topo.storage_nodes), "storage node"),
              (len(topo.datastores), "datastore"), (len(topo.vms), "VM"),
              (len(topo.wan), "WAN link"))
    if args.json:
        emit(Validated(file=str(args.file), lab=topo.name, valid=True, hosts=len(topo.hosts),
                       storage_nodes=len(topo.storage_nodes), datastores=len(topo.datastores),
                       vms=len(topo.vms), wan=len(topo.wan)).to_wire())
        return 0
    print(f"{args.file}: lab {topo.name}: "
          + ", ".join(f"{n} {w}{'' if n == 1 else 's'}" for n, w in counts
                      if n or w != "WAN link") + ": valid")
    return 0


@dataclass(frozen=True)
class Validated(Message):
    """What ``labctl validate --json`` prints for a topology that passed every check (one
    that did not is an ``error`` record listing every problem)."""

    file: str
    lab: str
    valid: bool
    #: how many of each the topology has
    hosts: int
    storage_nodes: int
    datastores: int
    vms: int
    wan: int


@dataclass(frozen=True)
class Exported(Message):
    """What ``labctl export`` wrote."""

    lab: str
    file: str
    #: files in the archive (the lab's secrets are never among them)
    files: int
    size_bytes: int


@dataclass(frozen=True)
class VmStopped(Message):
    name: str
    state: Literal["stopped"]


@dataclass(frozen=True)
class ConsoleAnswer(Message):
    """``labctl vm console VM CMD``: the guest's answer to a console command."""

    name: str
    command: str
    answer: str


@dataclass(frozen=True)
class ConsoleTail(Message):
    """``labctl vm console VM``: the last lines of its console, as its host agent read them."""

    name: str
    lines: list[str]


@dataclass(frozen=True)
class LabEntry(Message):
    """One line of ``labctl ls``."""

    name: str
    state: str | None
    topology: str | None
    directory: str
    created_at: WallTime | None
    down_at: WallTime | None


@dataclass(frozen=True)
class LabList(Message):
    """What ``labctl ls`` prints: the labs of this machine's labctl home."""

    home: str
    labs: list[LabEntry]


def _ls(args: argparse.Namespace) -> int:
    rows = []
    for name in existing_labs():
        meta = lab_meta(labs_dir() / name)
        rows.append(LabEntry(
            name=name, state=meta.get("state"), topology=meta.get("topology_source"),
            directory=str(labs_dir() / name), created_at=_when(meta.get("created")),
            down_at=_when(meta.get("down_at"))))
    if args.json:
        emit(LabList(home=str(home()), labs=rows).to_wire())
        return 0
    if not rows:
        print(f"no labs in {labs_dir()}")
        return 0
    width = max(len(r.name) for r in rows)
    for r in rows:
        print(f"{r.name:<{width}}  {r.state or '?':<8}  {r.topology or '-'}  ({r.directory})")
    return 0


def _when(stamp: str | None) -> WallTime | None:
    """A time the inventory keeps (Unix time, or ISO 8601); None when there is none or it is
    no time (an inventory edited by hand: ls still lists every lab)."""
    if not stamp:
        return None
    try:
        t = float(stamp)
    except ValueError:
        try:
            t = datetime.fromisoformat(stamp).timestamp()
        except ValueError:
            return None
    return WallTime(t) if math.isfinite(t) and abs(t) < 1e11 else None


def print_status(s: LabStatus) -> None:
    print(f"lab {s.lab}: {s.state} (accel {s.accel})")
    for site in s.sites:
        print(f"  site    {site.name:8} {site.subnet:15} "
              + (f"bridge {site.bridge}" if site.bridge else "routed (SSH hosts)"))
    for n in s.storage_nodes:
        agent = n.agent + (f" {n.agent_uptime_s:.0f} s" if n.agent_uptime_s is not None else "") \
            + (f": {n.agent_reason}" if n.agent_reason else "")
        dom = "" if n.domain_state in (None, "running") else f"; domain {n.domain_state}" + (
            f" ({n.domain_reason})" if n.domain_reason else "")
        where = f"  ssh {n.ssh}" if n.ssh else ""
        print(f"  storage {n.name:8} {n.address:15} {n.target_iqn}{where}  [agent {agent}{dom}]")
    for h in s.hosts:
        why = f": {h.agent_reason}" if h.agent_reason else ""
        what = {"host": h.initiator_iqn, "mobility": f"mobility agent of {h.site}",
                "cloud-api": f"API of cloud {h.site}: qemu+tls://{h.address}/system"}.get(
                    h.kind, h.kind)
        what += f"  ssh {h.ssh}" if h.ssh else ""
        print(f"  host    {h.name:8} {h.address:15} {what}  [agent {h.agent}{why}]")
    for d in s.datastores:
        where = f"lun {d.lun}" if d.kind == "block" else "file (NFS)"
        print(f"  datastore {d.name:6} {d.naa}  {d.size_bytes >> 20} MiB  "
              f"on {d.node} {where}  hosts {','.join(d.hosts)}")
        for host, seen in d.seen_by.items():
            if seen.naa:
                print(f"    seen by {host} over iSCSI: {seen.naa}, {seen.size_bytes} bytes")
    for w in s.wan:
        state = w.state + (f" ({w.reason})" if w.reason else "")
        print(f"  wan     {w.name:8} {w.sites[0]} <-> {w.sites[1]}  {state}  "
              f"{w.params.describe()}" + (f"  [router: {w.error}]" if w.error else ""))
    for v in s.vms:
        beat = f"  heartbeat #{v.heartbeat.counter}" if v.heartbeat else ""
        why = f" ({v.reason})" if v.reason else ""
        print(f"  vm      {v.name:8} on {v.host:8} {v.state}{why}{beat}")
    for c in s.cloud_vms:
        why = f" ({c.reason})" if c.reason else ""
        print(f"  vm      {c.name:8} in {c.cloud} ({c.provider}: {c.runs_on}) {c.state}{why}  "
              f"{c.address}")


#: never in an export: the lab secret and its copies, sockets, the lock
_NOT_EXPORTED = {"secret", ".lock"}


def _export(lab: Lab, args: argparse.Namespace) -> int:
    """The lab directory as a .tar.gz (inventory, topology, migration records, events, agent
    and console logs, plots), without its secrets or sockets."""
    import tarfile  # only here: its compressors are not every command's to import

    out = Path(args.file)
    if not lab.dir.path.is_dir():
        raise LabStateError(f"no lab {lab.name} in {labs_dir()}: nothing to export", lab=lab.name)
    if not out.parent.is_dir():
        raise LabStateError(f"cannot write {out}: {out.parent} is not a directory")
    kept: list[str] = []

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        name = Path(info.name).name
        if name in _NOT_EXPORTED or not (info.isfile() or info.isdir()):
            return None
        if info.isfile():
            kept.append(info.name)
        return info

    try:
        with tarfile.open(out, "w:gz") as tar:
            tar.add(lab.dir.path, arcname=lab.name, filter=keep)
    except OSError as exc:  # the archive's place (a directory, /proc, a full disk)
        where = f" ({exc.filename})" if exc.filename and exc.filename != str(out) else ""
        raise LabStateError(f"cannot export lab {lab.name} to {out}: {exc.strerror or exc}{where}",
                            path=str(out)) from None
    if args.json:
        emit(Exported(lab=lab.name, file=str(out), files=len(kept),
                      size_bytes=out.stat().st_size).to_wire())
    else:
        print(f"lab {lab.name}: {len(kept)} files in {out} ({out.stat().st_size >> 10} KiB; "
              "secrets left out)")
    return 0


# ------------------------------------------------------------------------------ VMs

async def _vm(lab: Lab, args: argparse.Namespace) -> int:
    if args.action == "list":
        status = await lab.status()
        if args.json:
            emit([v.to_wire() for v in status.vms])
            return 0
        for v in status.vms:
            beat = f"heartbeat #{v.heartbeat.counter}" if v.heartbeat else "-"
            print(f"{v.name:10} {v.host:10} {v.state:12} {beat:16} disk counter "
                  f"{v.disk_counter if v.disk_counter is not None else '-'}")
        return 0
    if args.action == "start":
        started = await lab.vm_start(args.name)
        if args.json:
            emit(started.to_wire())
        else:
            print(f"VM {args.name} running (pid {started.pid}), first heartbeat after "
                  f"{started.first_heartbeat_s or 0:.1f} s")
        return 0
    if args.action == "ssh":
        from labctl.replication.switchover import duration

        limit = duration(args.timeout, "--timeout")
        if args.json:
            emit((await lab.vm_ssh(args.name, list(args.command), limit)).to_wire())
            return 0

        def show(fd: int, chunk: bytes) -> None:  # as it comes: a long command's progress
            out = sys.stdout if fd == 1 else sys.stderr
            out.flush()
            out.buffer.write(chunk)
            out.buffer.flush()

        ran = await lab.vm_ssh(args.name, list(args.command), limit, sink=show)
        return int(ran.returncode)
    if args.action == "snapshot":
        snapped = await lab.vm_snapshot(args.name, args.layer)
        if args.json:
            emit(snapped.to_wire())
        else:
            print(f"VM {snapped.vm} writes {snapped.datastore}:{snapped.top} now "
                  f"({snapped.took_ms:.1f} ms); {snapped.previous} is read only; chain "
                  f"{' <- '.join(reversed(snapped.layers))}")
        return 0
    if args.action == "stop":
        await lab.vm_stop(args.name)
        if args.json:
            emit(VmStopped(name=args.name, state="stopped").to_wire())
        else:
            print(f"VM {args.name} stopped")
        return 0
    if args.command:
        answer = await lab.vm_console(args.name, " ".join(args.command))
        if args.json:
            emit(ConsoleAnswer(name=args.name, command=" ".join(args.command),
                               answer=answer).to_wire())
        else:
            print(answer)
        return 0
    if args.attach:
        if args.json:
            raise LabStateError("vm console --attach is interactive: it has no --json")
        return await _attach_console(lab, args)
    if args.follow:
        return await _follow_console(lab, args)
    tail = await lab.vm_console_tail(args.name, args.lines)
    if args.json:
        emit(ConsoleTail(name=args.name, lines=tail).to_wire())
    else:
        print("\n".join(tail))
    return 0


async def _attach_console(lab: Lab, args: argparse.Namespace) -> int:
    """Follow the console (timestamped) and send each line read from stdin as a console
    command, printing the guest's answer (or why it was refused) as it comes; the end of
    stdin or Ctrl-C detaches, the guest keeps running."""
    log = await _console_log(lab, args.name)
    print(f"attached to {args.name}'s console: type a command ({CONSOLE_HELP}); "
          "Ctrl-D or Ctrl-C detaches", file=sys.stderr)
    follow = asyncio.ensure_future(_tail(log, args.lines, follow=True, stamp=True,
                                         as_json=False))
    lines, stop_reading = _stdin_lines()
    try:
        while True:
            line = await lines.get()
            if line is None:
                break
            command = line.strip()
            if not command:
                continue
            try:
                print(f"> {await lab.vm_console(args.name, command)}", flush=True)
            except LabError as exc:  # a refused command does not end the session
                print(f"labctl: {exc.message}", file=sys.stderr, flush=True)
    finally:
        stop_reading()
        follow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follow
    print(f"detached from {args.name}'s console", file=sys.stderr)
    return 0


def _stdin_lines() -> tuple[asyncio.Queue[str | None], Callable[[], None]]:
    """The lines of stdin as they are typed (None at its end), read by the event loop (no
    thread left blocked in a read after Ctrl-C); and how to stop reading."""
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    fd = sys.stdin.fileno()
    pending = b""

    def readable() -> None:
        nonlocal pending
        chunk = os.read(fd, 4096)
        if not chunk:
            loop.remove_reader(fd)
            queue.put_nowait(None)
            return
        *done, pending = (pending + chunk).split(b"\n")
        for line in done:
            queue.put_nowait(line.decode(errors="replace"))

    try:
        loop.add_reader(fd, readable)
    except PermissionError:  # a regular file (< commands.txt): no waiting, read it all now
        for text in sys.stdin.read().splitlines():
            queue.put_nowait(text)
        queue.put_nowait(None)
        return queue, lambda: None

    def stop() -> None:
        loop.remove_reader(fd)

    return queue, stop


async def _console_log(lab: Lab, name: str) -> Path:
    """The console log of running VM ``name``."""
    status = await lab.status()
    vm = next((v for v in status.vms if v.name == name), None)
    if vm is None:
        raise LabStateError(f"unknown VM {name!r} (VMs: "
                            f"{', '.join(v.name for v in status.vms) or 'none'})", vm=name)
    if vm.console_log is None:
        raise LabStateError(f"VM {name} is not running: no console to follow", vm=name)
    return Path(vm.console_log)


async def _follow_console(lab: Lab, args: argparse.Namespace) -> int:
    """Every new console line of the VM, stamped with the (wall-clock) time it was read."""
    await _tail(await _console_log(lab, args.name), args.lines, follow=True, stamp=True,
                as_json=args.json)
    return 0


# ------------------------------------------------------------------------------ a way in

def _host_row(lab: Lab, host: str) -> tuple[dict[str, Any], bytes]:
    """The inventory row of ``host``, and its site's secret (its CHAP credentials derive
    from it)."""
    with lab.context(of=("host", host)) as ctx:
        row = ctx.inv.row("hosts", name=host)
        if row is None:
            known = ", ".join(r["name"] for r in ctx.inv.rows("hosts"))
            raise LabStateError(f"unknown host {host!r} (hosts: {known})", host=host)
        return row, ctx.secret()


async def _exec(lab: Lab, args: argparse.Namespace) -> int:
    """Run a command (an argument list, never a shell string) on a host: in its namespace
    here with this terminal, or over SSH on a machine; its exit status is ours. The
    environment says which lab and host it is and carries the host's iSCSI identity: its
    initiator IQN and CHAP credentials where libiscsi's tools read them (never on a command
    line: over SSH they travel on the session's standard input)."""
    row, secret = _host_row(lab, args.host)
    access = SshAccess.from_json(row["ssh"]) if row.get("ssh") else None
    if args.cmd == "shell":
        if access is not None:
            raise LabStateError(f"host {args.host} is a machine: ssh -i {access.key} "
                                f"-p {access.port} {access.user}@{access.address}",
                                host=args.host)
        argv = [os.environ.get("SHELL") or "/bin/bash"]
    else:
        argv = list(args.argv)
        if argv and argv[0] == "--":
            argv = argv[1:]
        if not argv:
            raise LabStateError("labctl exec HOST -- CMD ...: give the command to run")
    iqn = str(row["initiator_iqn"])
    extra = {"LABCTL_LAB": lab.name, "LABCTL_HOST": args.host,
             "LABCTL_INITIATOR_IQN": iqn, "LIBISCSI_CHAP_USERNAME": iqn,
             "LIBISCSI_CHAP_PASSWORD": initiator_secret(secret, iqn)}
    if access is not None:
        async with access.machine(args.host) as m:
            code, out, err = await m.run_bytes(
                [*access.remote_python(state_dir(lab.dir.tag, args.host)), "-m",
                 "labctl.agents.remote", "exec", "--", *argv], timeout=3600,
                stdin=(json.dumps(extra) + "\n").encode())
        # as the command wrote it: a tool's binary output (iscsi-inq's designators) too
        sys.stdout.buffer.write(out)
        sys.stdout.flush()
        sys.stderr.buffer.write(err)
        return code if code >= 0 else 255
    try:
        return subprocess.run(netns_argv(str(row["netns"]), argv), env={**os.environ, **extra},
                              check=False).returncode
    except FileNotFoundError as exc:
        raise LabStateError(f"cannot run {argv[0]!r} on {args.host}: {exc.strerror}") from exc


async def _logs(lab: Lab, args: argparse.Namespace) -> int:
    """A host agent's log, a storage node's serial console, or the rescan service's log."""
    what = args.what
    # only a name the lab has: 'logs ../../t2/hosts/h1' is no way into another directory
    hosts = sorted(p.name for p in (lab.dir.path / "hosts").glob("*") if p.is_dir())
    nodes = sorted(p.name for p in (lab.dir.path / "storage").glob("*") if p.is_dir())
    machine = _ssh_machine(lab, what)
    if machine is not None:
        return await _ssh_logs(lab, what, *machine, args)
    if what == "rescan":  # the rescan service of the --site site (or of the only one)
        with lab.lab_context() as whole:
            path = lab.dir.site_dir(lab.pick_site(whole)) / "rescan.log"
    elif what in hosts:
        path = lab.dir.host_dir(what) / "agent.log"
    elif what in nodes:
        path = lab.dir.storage_dir(what) / "console.log"
    else:
        raise LabStateError(f"no logs for {what!r} in lab {lab.name} (hosts: "
                            f"{', '.join(hosts) or 'none'}; storage nodes: "
                            f"{', '.join(nodes) or 'none'}; or rescan)", what=what)
    if not path.exists():
        raise LabStateError(f"{path} does not exist (yet)", path=str(path))
    if args.verbose:
        print(f"==> {path}", file=sys.stderr)
    await _tail(path, args.lines, follow=args.follow, stamp=False, as_json=args.json)
    return 0


def _ssh_machine(lab: Lab, name: str) -> tuple[SshAccess, str] | None:
    """How to reach host or storage node ``name`` when it is a machine reached over SSH,
    and its agent's log file there."""
    try:
        row, _secret = _host_row(lab, name)
        log = "agent.log"
    except LabError:  # not a host: a storage node, the rescan service, or nothing
        try:
            with lab.context(of=("node", name)) as ctx:
                row = ctx.inv.row("storage_nodes", name=name) or {}
        except LabError:
            return None
        log = "agent.out"
    return (SshAccess.from_json(str(row["ssh"])), log) if row.get("ssh") else None


async def _ssh_logs(lab: Lab, host: str, access: SshAccess, log: str,
                    args: argparse.Namespace) -> int:
    """The agent's log on a machine: its file in the lab's state directory there, or its
    unit's journal; with ``--follow``, then every new line until Ctrl-C (the command that
    follows it on the machine ends with the session)."""
    lines = str(max(args.lines, 1))
    path = f"{state_dir(lab.dir.tag, host)}/{log}"
    unit = access.unit_for("storage" if log == "agent.out" else "host")
    argv = (["journalctl", "-u", unit, "-n", lines, "--no-pager"]
            if access.agent == "systemd" else ["tail", "-n", lines, path])
    async with access.machine(host) as m:
        if args.follow:
            if access.agent != "systemd":  # tail -F would wait for a file that is not there
                res = await m.run(["test", "-r", path], check=False)
                if not res.ok:
                    raise LabStateError(f"no log of host {host} ({access.where()}): {path} "
                                        "cannot be read there", host=host)
            async for line in m.follow([*argv, "-f" if access.agent == "systemd" else "-F"]):
                _line(line, None, args.json)
            return 0
        res = await m.run(argv, check=False)
    if not res.ok:
        raise LabStateError(f"no log of host {host} ({access.where()}): "
                            f"{(res.stderr or res.stdout).strip()[-300:]}", host=host)
    for line in res.stdout.splitlines():
        _line(line, None, args.json)
    return 0


async def _tail(path: Path, lines: int, follow: bool, stamp: bool, as_json: bool) -> None:
    """The last ``lines`` lines of ``path``; with ``follow``, then every new line as it is
    written (stamped with the time read when ``stamp``), until Ctrl-C."""
    with open(path, "rb") as f:
        text = f.read().decode(errors="replace")
        last = text.splitlines()[-lines:] if lines > 0 else []
        for line in last:
            _line(line, None, as_json)
        pending = ""
        while follow:
            chunk = f.read()
            if not chunk:
                await asyncio.sleep(0.1)
                continue
            pending += chunk.decode(errors="replace")
            *done, pending = pending.split("\n")
            now = time.time()
            for line in done:
                _line(line.rstrip("\r"), now if stamp else None, as_json)


def _line(text: str, at: float | None, as_json: bool) -> None:
    if as_json:
        print(json.dumps(LogLine(at=None if at is None else WallTime(at), line=text).to_wire()),
              flush=True)
    elif at is not None:  # for people: local time
        when = datetime.fromtimestamp(at).astimezone().isoformat(timespec="milliseconds")
        print(f"{when}  {text}", flush=True)
    else:
        print(text, flush=True)


@dataclass(frozen=True)
class LogLine(Message):
    """One line of ``labctl logs --json`` or ``vm console --json`` (JSON lines: one object
    per line of the log or console)."""

    #: when labctl read it (``--follow`` on a console), None for the lines already there
    at: WallTime | None
    line: str

