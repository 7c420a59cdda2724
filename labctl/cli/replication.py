"""``labctl replicate`` and ``labctl replication list|show``: the command-line face of
``labctl/lab/replicate.py``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from labctl.cli.progress import Progress
from labctl.core import userfile
from labctl.core.errors import LabError
from labctl.lab.face import Lab
from labctl.replication import timeline
from labctl.replication.switchover import SwitchoverError, duration, policy_from, rate


def _switchover(text: str | None) -> str | dict[str, Any] | None:
    """A criterion as written, or a YAML policy file's mapping (checked here, before the
    lab is looked at)."""
    if text is None:
        return None
    if Path(text).is_file():
        import yaml

        try:
            data = yaml.safe_load(userfile.read_text(text, "a switchover policy (YAML text)"))
        except yaml.YAMLError as exc:
            raise SwitchoverError(f"{text}: invalid YAML: {' '.join(str(exc).split())[:160]}"
                                  ) from None
        policy_from(data, text)
        return data if isinstance(data, dict) else str(data)
    policy_from(text)
    return text


def _rate(text: str | None) -> float | None:
    return None if text is None else rate(text, "--limit")


#: the lab of the running ``labctl replicate``, and the last replication before it (for
#: the Ctrl-C message)
_interrupted: dict[str, Any] = {}


def interrupted_message() -> str:
    """What a Ctrl-C left: the replication's own record, written as it was given back."""
    lab: Lab | None = _interrupted.get("lab")
    try:
        rows = [r for r in (lab.replications() if lab is not None else [])
                if r.id > _interrupted.get("before", 0)]
    except Exception:  # the message must be printed whatever the inventory says
        rows = []
    if not rows:
        return "labctl: replication cancelled (Ctrl-C) before it began; nothing was made"
    r = rows[-1]
    if r.state == "failed":
        return (f"labctl: replication {r.id} cancelled (Ctrl-C): the source {r.vm} is left "
                f"as it was, the destination in {r.to_site} deleted")
    return f"labctl: replication {r.id} cancelled (Ctrl-C): {r.state}; {r.error or ''}"


async def run(args: argparse.Namespace, progress: Progress) -> int:
    if args.cmd == "replicate":
        switchover = _switchover(args.switchover)
        limit = _rate(args.limit)
        stall = duration(args.stall, "--stall")
        if stall > 3600:
            raise SwitchoverError(f"--stall {args.stall}: at most 1h (a pass's channel "
                                  "silent longer is gone)", value=args.stall)
    lab = Lab.find(args.lab, progress=progress, site=args.site)
    if args.cmd == "replicate":
        lab.require_up()
        _interrupted["lab"] = lab
        _interrupted["before"] = max((r.id for r in lab.replications()), default=0)
        rec = await lab.replicate(args.vm, args.to_cloud, switchover, args.tracking,
                                  args.compress, limit, stall, args.verify)
        if rec.state != "completed":
            if not args.json:
                _print(rec.to_wire())
            raise LabError(f"replication {rec.id} of {rec.vm} to {rec.to_site} {rec.state}: "
                           f"{rec.error}", replication=rec.to_wire())
        if args.json:
            print(json.dumps(rec.to_wire(), indent=2, default=str))
        else:
            _print(rec.to_wire())
        return 0
    if args.action == "approve":
        row = lab.approve_replication(args.id, args.withdraw)
        if args.json:
            print(json.dumps(row.to_wire(), indent=2, default=str))
        elif args.withdraw:
            progress(f"replication {row.id} of {row.vm}: its approval is withdrawn; it passes "
                     "on until approved again (a cutover under way goes on)")
        else:
            progress(f"replication {row.id} of {row.vm}: its cutover is approved; it goes when "
                     "the rest of its criterion holds")
        return 0
    if args.action == "show":
        shown = lab.replications(args.id)
        if args.plot is not None:
            progress(f"timeline written to {timeline.plot(shown.to_wire(), args.plot)}")
        if args.json:
            print(json.dumps(shown.to_wire(), indent=2, default=str))
        else:
            _print(shown.to_wire())
        return 0
    rows = lab.replications()
    if args.json:
        print(json.dumps([r.to_wire() for r in rows], indent=2, default=str))
        return 0
    for r in rows:
        outage = f"outage {r.outage_s:.1f} s" if r.outage_s is not None else ""
        print(f"{r.id:3}  {r.vm:12} {r.from_site} -> {r.to_site}  {r.state:9} "
              f"{r.passes} passes  {outage}{'  ' + r.error if r.error else ''}")
    return 0


def _free(p: dict[str, Any]) -> str:
    """A pass's free space on the source (records from before it was measured: none)."""
    free = p.get("free_bytes")
    return "" if free is None else f"  free {free / (1 << 20):.0f} MiB"


def _print(r: dict[str, Any]) -> None:
    print(f"replication {r['id']}: {r['vm']} {r['from_site']} -> {r['to_site']}  {r['state']}"
          f" in {r['seconds']:.1f} s ({r['tracking']} tracking; switch over when "
          f"{r['switchover']})")
    for p in r.get("passes") or []:
        if p["how"] == "failed":
            print(f"  pass #{p['n']:<3} failed after {p['seconds']:.1f} s: {p['error']}")
            continue
        if p["how"] == "precheck":  # the criterion asked again after it: it did not hold
            print(f"  check #{p['n']:<2} both disks compared in {p['seconds']:.1f} s: "
                  f"{p['todo_blocks']} blocks to send, next {p['predicted_next_s']:.1f} s  "
                  f"{p['decision']}: {p['why']}")
            continue
        print(f"  pass #{p['n']:<3} {p['how']:6} {p['blocks']:6} blocks "
              f"{p['bytes'] / (1 << 20):8.1f} MiB in {p['seconds']:6.1f} s  dirty "
              f"{p['dirty_rate'] / (1 << 20):5.2f} MiB/s  link {p['link_rate'] / (1 << 20):6.2f}"
              f" MiB/s  next {p['predicted_next_s']:.1f} s{_free(p)}  {p['decision']}: "
              f"{p['why']}")
    c = r.get("cutover")
    if c:
        told = ("" if c.get("criterion_predicted_s") is None else
                f"; {c['criterion_predicted_s']:.2f} s before the comparison")
        print(f"  cutover  final pass {c['final_s']:.2f} s (predicted "
              f"{c['final_predicted_s']:.2f} s{told}, error {c['final_prediction_error']:.0%}); "
              f"blocks equal: {c['verify'].get('equal')}; steps "
              + ", ".join(f"{k} {v:.1f} s" for k, v in c["steps"].items()))
        if c.get("outage_s") is not None:
            print(f"  outage   {c['outage_s']:.2f} s: record {c['source_last_acked']} acknowledged"
                  f" on the source, {c['dest_first_acked']} the first on the destination")
        elif c.get("outage_unmeasured"):
            print(f"  outage   not measured: {c['outage_unmeasured']}")
    if r.get("error"):
        print(f"  error    {r['error']}")
