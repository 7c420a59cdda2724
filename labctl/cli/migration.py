"""``labctl migrate`` and ``labctl migrations``: the command-line face of labctl/migration.py."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from pathlib import Path
from typing import Any

from labctl.core.errors import ProtocolError
from labctl.core.wire import Json
from labctl.lab.face import Lab
from labctl.migration import timeline
from labctl.migration.policy import BUILTIN_POLICIES
from labctl.migration.protocol import PassRecord
from labctl.migration.report import fmt_num as _n
from labctl.migration.report import pass_line, print_result
from labctl.migration.result import Record

#: the lab of the running ``labctl migrate`` (for the Ctrl-C message)
_interrupted: dict[str, Lab] = {}


def add_parsers(sub: Any) -> None:
    mig = sub.add_parser("migrate", help="live-migrate a VM to another host (pre-copy over QMP)",
                         description="Live-migrate a VM. The destination's QEMU, disks and "
                         "datastore are made ready before the source is asked to migrate. "
                         "Ctrl-C cancels the migration cleanly (the VM keeps running on the "
                         "source).")
    mig.add_argument("vm")
    mig.add_argument("--to", required=True, metavar="HOST", help="destination host")
    mig.add_argument("--policy", default="default", metavar="FILE|NAME",
                     help=f"built-in policy ({', '.join(BUILTIN_POLICIES)}) or a YAML file")
    prep = mig.add_mutually_exclusive_group()
    prep.add_argument("--late-storage", dest="late", action="store_true", default=None,
                      help="prepare the destination's storage in the pause-before-switchover "
                           "window (after the source stopped), for comparison")
    prep.add_argument("--early-storage", dest="late", action="store_false",
                      help="prepare it before the migration starts (the default)")
    mig.add_argument("--measure-dirty-rate", action="store_true",
                     help="first measure the guest's dirty rate with QEMU's calc-dirty-rate "
                          "(page sampling, 1 s) and record it with the migration")
    mig.add_argument("--json", action="store_true", help="print the full record as JSON")
    ms = sub.add_parser("migrations", help="list recorded migrations, or show one")
    ms.add_argument("action", nargs="?", choices=["list", "show", "policies"], default="list")
    ms.add_argument("id", nargs="?", type=int)
    ms.add_argument("--json", action="store_true")
    ms.add_argument("--plot", metavar="FILE", type=Path, help="write a timeline PNG (show)")


def interrupted_message() -> str:
    lab: Lab | None = _interrupted.get("lab")
    rec: dict[str, Json] = {}
    if lab is not None:
        try:
            rows = lab.migrations()
            if rows:
                rec = lab.migrations(rows[-1]["id"])["result"].get("recovery") or {}
        except Exception:  # the message must be printed whatever the inventory says
            rec = {}
    src = rec.get("source") or {}
    dest = "destination cleaned up" if rec.get("dest") else \
        (rec.get("dest_error") or "destination cleanup unknown")
    alive = "the VM keeps running on the source" if src.get("alive") else \
        f"source state: {src.get('status', 'unknown')}"
    return f"labctl: migration cancelled (Ctrl-C): {alive}; {dest}"


async def dispatch(lab: Lab, args: argparse.Namespace) -> int:
    if args.cmd == "migrate":
        _interrupted["lab"] = lab
        res = await _migrate_with_ctrl_c(lab, args)
        if args.json:
            print(json.dumps(res, indent=2, default=str))
        else:
            print_result(res)
        return 0
    if args.action == "policies":
        for name, pol in BUILTIN_POLICIES.items():
            print(f"{name}: {json.dumps(pol.to_dict())}" if args.json else
                  f"{name:9} downtime {pol.downtime_limit_ms} ms, bandwidth "
                  f"{pol.max_bandwidth_mib_s or 'uncapped'} MiB/s, on non-convergence: "
                  f"{' -> '.join(pol.convergence.actions)}, storage {pol.storage}")
        return 0
    if args.action == "show" or args.id is not None:
        if args.id is None:
            raise SystemExit("labctl migrations show: give a migration ID (see labctl migrations)")
        m = lab.migrations(args.id)
        # passes and decisions are stored in their own tables, not in the result
        res = {**m["result"], "state": m["state"], "id": m["id"],
               "pass_records": m["pass_records"], "decisions": m["decisions"]}
        if args.plot:
            timeline.plot(res, args.plot)
            print(f"wrote {args.plot}")
        if args.json:
            print(json.dumps(m, indent=2, default=str))
        elif not args.plot:
            print_result(res)
            for p in m["pass_records"]:
                print("  " + _stored_pass_line(p))
        return 0
    rows = lab.migrations()
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print("no migrations recorded")
        return 0
    print(f"{'id':>3} {'vm':8} {'from':8} {'to':8} {'policy':9} {'storage':7} {'state':10} "
          f"{'total ms':>8} {'downtime':>8} {'stop>res':>8} {'blackout':>8} {'passes':>6} "
          f"{'MiB':>6}  error")
    for r in rows:
        print(f"{r['id']:>3} {r['vm']:8} {r['source']:8} {r['dest']:8} {r['policy'] or '':9} "
              f"{r['storage']:7} {r['state']:10} {_n(r['total_ms'])} {_n(r['downtime_ms'])} "
              f"{_n(r.get('stop_to_resume_ms'))} {_n(r['blackout_ms'])} {_n(r['passes'], 6)} "
              f"{_n((r['bytes'] or 0) >> 20, 6)}  "
              f"{(r['error'] or '')[:60]}")
    return 0


def _stored_pass_line(p: Json) -> str:
    """A stored pass record as a line (as JSON if it is not a pass record as this version
    writes them)."""
    try:
        return pass_line(PassRecord.from_wire(p, "stored pass record"))
    except ProtocolError:
        return json.dumps(p, default=str)


async def _migrate_with_ctrl_c(lab: Lab, args: argparse.Namespace) -> Record:
    """Ctrl-C cancels the migration (the source keeps the VM, the destination is cleaned up);
    a second Ctrl-C only says the cleanup is still running, it cannot abandon it halfway."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    interrupted = False

    def on_sigint() -> None:
        nonlocal interrupted
        if interrupted:
            lab.progress("still cancelling the migration and checking the source; please wait")
            return
        interrupted = True
        if task is not None:
            task.cancel()

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        return await lab.migrate(args.vm, args.to, args.policy, args.late,
                                 measure_dirty_rate=args.measure_dirty_rate)
    except asyncio.CancelledError:
        if interrupted:
            raise KeyboardInterrupt from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGINT)
