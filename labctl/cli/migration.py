"""``labctl migrate`` and ``labctl migration list|show|policies``: the command-line face of
``labctl/migration/``."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from typing import TYPE_CHECKING

from labctl.cli.progress import Progress
from labctl.core.errors import LabStateError, MigrationError, ProtocolError
from labctl.core.wire import Json
from labctl.lab.face import Lab
from labctl.migration import timeline
from labctl.migration.policy import BUILTIN_POLICIES, load_policy
from labctl.migration.protocol import PassRecord
from labctl.migration.report import fmt_num as _n
from labctl.migration.report import pass_line, print_result
from labctl.migration.result import Record

if TYPE_CHECKING:
    from labctl.lab.crosssite import CrossSite

#: the lab of the running ``labctl migrate`` (for the Ctrl-C message)
_interrupted: dict[str, Lab] = {}


def interrupted_message() -> str:
    lab: Lab | None = _interrupted.get("lab")
    rec: dict[str, Json] = {}
    if lab is not None:
        try:
            rows = lab.migrations()
            if rows:
                rec = lab.migrations(rows[-1].id).get("recovery") or {}
        except Exception:  # the message must be printed whatever the inventory says
            rec = {}
    src = rec.get("source") or {}
    dest = rec.get("dest") or {}
    where = "destination cleaned up" if dest.get("removed") else \
        "nothing left on the destination" if dest else \
        (rec.get("dest_error") or "destination cleanup unknown")
    alive = "the VM keeps running on the source" if src.get("alive") else \
        f"source state: {src.get('status', 'unknown')}"
    return f"labctl: migration cancelled (Ctrl-C): {alive}; {where}"


async def run(args: argparse.Namespace, progress: Progress) -> int:
    if args.cmd != "migrate" and args.action == "policies":
        return await dispatch(None, args)
    if args.cmd == "migrate":
        # a policy file that is no policy is refused before the lab is even looked at
        args.policy = load_policy(args.policy)
    lab = Lab.find(args.lab, progress=progress, site=args.site)
    if args.cmd == "migrate":
        lab.require_up()
    return await dispatch(lab, args)


async def dispatch(lab: Lab | None, args: argparse.Namespace) -> int:
    if args.cmd == "migrate" and args.to_site:
        assert lab is not None
        moved = await lab.migrate_to_site(args.vm, args.to_site, host=args.dest_host,
                                          policy=args.policy, compress=args.compress,
                                          keep_source=args.keep_source)
        if moved.state != "completed":  # an error like any failed command; both halves in it
            if not args.json:
                _print_cross_site(moved)
            raise MigrationError(f"migration of {moved.vm} to site {moved.to_site} failed: "
                                 f"{moved.error}", cross_site=moved.to_wire())
        if args.json:
            print(json.dumps(moved.to_wire(), indent=2, default=str))
        else:
            _print_cross_site(moved)
        return 0
    if args.cmd == "migrate":
        assert lab is not None
        if args.dest_host or args.compress or args.keep_source:
            raise LabStateError("--host, --compress and --keep-source go with --to-site (a "
                                "migration to another site)")
        _interrupted["lab"] = lab
        res = await _migrate_with_ctrl_c(lab, args)
        if args.json:
            print(json.dumps(res, indent=2, default=str))
        else:
            print_result(res)
        return 0
    if args.action == "policies":
        if args.json:
            print(json.dumps([pol.to_wire() for pol in BUILTIN_POLICIES.values()], indent=2))
            return 0
        for name, pol in BUILTIN_POLICIES.items():
            print(f"{name:9} downtime {pol.downtime_limit_ms} ms, bandwidth "
                  f"{pol.max_bandwidth_mib_s or 'uncapped'} MiB/s, on non-convergence: "
                  f"{' -> '.join(pol.convergence.actions)}, storage {pol.storage}")
        return 0
    assert lab is not None
    if args.action == "show":
        # the same record as `labctl migrate --json` printed (schema migrate.schema.json)
        res = lab.migrations(args.id)
        if args.plot:
            wrote = timeline.plot(res, args.plot)
            print(f"wrote {wrote}", file=sys.stderr if args.json else sys.stdout)
        if args.json:
            print(json.dumps(res, indent=2, default=str))
        elif not args.plot:
            print_result(res)
            for p in res["pass_records"]:
                print("  " + _stored_pass_line(p))
        return 0
    rows = lab.migrations()
    if args.json:
        print(json.dumps([r.to_wire() for r in rows], indent=2))
        return 0
    if not rows:
        print("no migrations recorded")
        return 0
    print(f"{'id':>3} {'vm':8} {'from':8} {'to':8} {'policy':9} {'storage':7} {'state':10} "
          f"{'total ms':>8} {'downtime':>8} {'stop>res':>8} {'blackout':>8} {'passes':>6} "
          f"{'MiB':>6}  error")
    for r in rows:
        print(f"{r.id:>3} {r.vm:8} {r.source:8} {r.dest:8} {r.policy or '':9} "
              f"{r.storage:7} {r.state:10} {_n(r.total_ms)} {_n(r.downtime_ms)} "
              f"{_n(r.stop_to_resume_ms)} {_n(r.blackout_ms)} {_n(r.passes, 6)} "
              f"{_n((r.bytes_sent or 0) >> 20, 6)}  "
              f"{(r.error or '')[:60]}")
    return 0


def _print_cross_site(m: CrossSite) -> None:
    """A migration between sites: the real source's record, then both halves and the relay."""
    if isinstance(m.record, dict) and m.record.get("state") == "completed":
        print_result(m.record)
    mib = {k: round(v / (1 << 20), 1) for k, v in m.relay_bytes.items()}
    print(f"VM {m.vm}: {m.from_site}/{m.source} -> {m.to_site}/{m.dest}  {m.state}"
          f"{f' ({m.error})' if m.error else ''} in {m.seconds:.1f} s, migration {m.id}")
    for h in m.halves:
        print(f"  {h.site:8} half #{h.id}: {h.source} -> {h.dest}  {h.state}"
              + (f"  ({h.error})" if h.error else ""))
    rate = f", {m.relay_mbit_s} Mbit/s" if m.relay_mbit_s is not None else ""
    print(f"  relay    {', '.join(f'{k} {v} MiB' for k, v in mib.items()) or 'nothing'}{rate}")
    for w in m.wan:
        print(f"  wan      {w.name}: {w.params.describe()}")
    if m.state == "completed":
        print(f"  disk     now on datastore {m.datastore} of {m.to_site}; {m.from_site}'s "
              f"{m.source_datastore}: {m.source_datastore_state}")
    else:
        print(f"  the VM runs on in {m.from_site}; {m.to_site} freed the datastore it had made")


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
