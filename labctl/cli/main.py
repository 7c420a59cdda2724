"""The labctl command line: a thin face over ``labctl.lab.Lab``."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from labctl.cli import migration as migration_cli
from labctl.cli import storage as storage_cli
from labctl.core.errors import LabError
from labctl.core.paths import repo_root
from labctl.lab import topology
from labctl.lab.face import Lab
from labctl.lab.status import LabStatus
from labctl.scenarios import demo

DEFAULT_TOPOLOGY = "labs/default.yaml"


class _Progress:
    def __init__(self, quiet: bool) -> None:
        self.t0 = time.monotonic()
        self.quiet = quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def _default_topology() -> Path:
    here = Path(DEFAULT_TOPOLOGY)
    return here if here.exists() else repo_root() / DEFAULT_TOPOLOGY


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="labctl", description="Lab testbed for virtualization scenarios.")
    p.add_argument("--lab", help="which lab (default: the only one, or the topology's name)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="bring a lab up from a topology file")
    up.add_argument("file", nargs="?", help=f"topology file (default {DEFAULT_TOPOLOGY})")
    st = sub.add_parser("status", help="show the lab")
    st.add_argument("--json", action="store_true")
    vm = sub.add_parser("vm", help="start or stop a VM, or talk to its test guest")
    vm.add_argument("action", choices=["start", "stop", "console"])
    vm.add_argument("name")
    vm.add_argument("command", nargs="*",
                    help="with console: rate MB/s | wss MiB | read | sync "
                         "(none: print the last console lines)")
    sub.add_parser("down", help="tear the lab down (removes exactly what it created)")
    demo = sub.add_parser("demo", help="bring up the default lab, show its VM alive, migrate it "
                                          "there and back, grow its datastore, tear down")
    demo.add_argument("file", nargs="?", help=f"topology file (default {DEFAULT_TOPOLOGY})")
    demo.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    val = sub.add_parser("validate", help="check a topology file without building anything")
    val.add_argument("file")
    migration_cli.add_parsers(sub)
    storage_cli.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    progress = _Progress(args.quiet)
    try:
        return asyncio.run(_dispatch(args, progress))
    except LabError as exc:
        # a topology file's problems come all at once, one line each
        for line in exc.message.splitlines():
            print(f"labctl: error: {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.cmd == "migrate":
            print(migration_cli.interrupted_message(), file=sys.stderr)
            return 130
        print("labctl: interrupted; 'labctl down' removes whatever the lab had created",
              file=sys.stderr)
        return 130


async def _dispatch(args: argparse.Namespace, progress: _Progress) -> int:
    if args.cmd == "validate":
        topo = topology.load(args.file)
        Lab(topo.name, progress=progress).check(topo)
        counts = ((len(topo.hosts), "host"), (len(topo.storage_nodes), "storage node"),
                  (len(topo.datastores), "datastore"), (len(topo.vms), "VM"))
        print(f"{args.file}: lab {topo.name}: "
              + ", ".join(f"{n} {w}{'' if n == 1 else 's'}" for n, w in counts) + ": valid")
        return 0
    if args.cmd in ("up", "demo"):
        topo = topology.load(args.file or _default_topology())
        lab = Lab(args.lab or topo.name, progress=progress)
        status = await lab.up(topo)
        _print_status(status)
        if args.cmd == "demo":
            return await demo.run(lab, status, args.keep)
        return 0
    lab = Lab.find(args.lab, progress=progress)
    if args.cmd == "status":
        status = await lab.status()
        if args.json:
            print(json.dumps(status.to_wire(), indent=2))
        else:
            _print_status(status)
        return 0
    if args.cmd == "vm":
        if args.action == "console":
            if args.command:
                print(await lab.vm_console(args.name, " ".join(args.command)))
            else:
                print("\n".join(await lab.vm_console_tail(args.name)))
        elif args.action == "start":
            res = await lab.vm_start(args.name)
            print(f"VM {args.name} running (pid {res.pid}), first heartbeat after "
                  f"{res.first_heartbeat_s or 0:.1f} s")
        else:
            await lab.vm_stop(args.name)
            print(f"VM {args.name} stopped")
        return 0
    if args.cmd in ("datastore", "host", "events", "rescan", "storage"):
        return await storage_cli.dispatch(lab, args)
    if args.cmd in ("migrate", "migrations"):
        return await migration_cli.dispatch(lab, args)
    if args.cmd == "down":
        removed = await lab.down()
        print(f"lab {lab.name} is down ({len(removed)} objects removed)")
        return 0
    raise AssertionError(args.cmd)


def _print_status(s: LabStatus) -> None:
    print(f"lab {s.lab}: {s.state} (accel {s.accel})")
    for n in s.storage_nodes:
        print(f"  storage {n.name:8} {n.address:15} {n.target_iqn}  [agent {n.agent}]")
    for h in s.hosts:
        print(f"  host    {h.name:8} {h.address:15} {h.initiator_iqn}  [agent {h.agent}]")
    for d in s.datastores:
        print(f"  datastore {d.name:6} {d.naa}  {d.size_bytes >> 20} MiB  "
              f"on {d.node} lun {d.lun}  hosts {','.join(d.hosts)}")
        for host, seen in d.seen_by.items():
            if seen.naa:
                print(f"    seen by {host} over iSCSI: {seen.naa}, {seen.size_bytes} bytes")
    for v in s.vms:
        beat = f"  heartbeat #{v.heartbeat.counter}" if v.heartbeat else ""
        print(f"  vm      {v.name:8} on {v.host:8} {v.state}{beat}")


if __name__ == "__main__":
    sys.exit(main())
