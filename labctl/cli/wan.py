"""CLI for WAN links between sites.

    labctl wan show [--json]
    labctl wan set LINK [--delay 40ms] [--jitter 5ms] [--loss 0.1%] [--rate 100mbit]
                        [--reorder 1%] [--duplicate 1%] [--loss-mode gso|packet] [--down|--up]
    labctl wan ping LINK [-c N]
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass

from labctl.cli.progress import Progress
from labctl.core.errors import LabStateError
from labctl.core.wire import Message
from labctl.lab.face import Lab
from labctl.wan import service as wan
from labctl.wan.protocol import PARAM_WORDS, WanShown, check_values


async def run(args: argparse.Namespace, progress: Progress) -> int:
    values: dict[str, object] = {}
    if args.action == "set":  # a bad request is named before any lab is looked for
        values = {w: getattr(args, w) for w in PARAM_WORDS if getattr(args, w) is not None}
        if not values and args.state is None:
            raise LabStateError("labctl wan set LINK: say what to change (--delay, --jitter, "
                                "--loss, --rate, --reorder, --duplicate, --loss-mode, --down, "
                                "--up)")
        check_values(values)
    lab = Lab.find(args.lab, progress=progress, site=args.site)
    lab.require_up()
    if args.action == "show":
        with lab.lab_context() as ctx:
            shown = [s for s in await wan.show(ctx) if not args.site or args.site in s.sites]
        if args.json:
            print(json.dumps([s.to_wire() for s in shown], indent=2))
        elif not shown:
            print(f"lab {lab.name} has no WAN link")
        else:
            for s in shown:
                _print(s)
        return 0
    if args.action == "set":
        with lab.lab_context() as ctx, ctx.lock():
            changed: WanShown | None = None
            if values:
                changed = await wan.set_params(ctx, args.link, values)
            if args.state is not None:
                changed = await wan.set_up(ctx, args.link, args.state == "up")
        assert changed is not None
        if args.json:
            print(json.dumps(changed.to_wire(), indent=2))
        else:
            _print(changed)
        return 0
    if args.action == "ping":
        with lab.lab_context() as ctx:
            got = await wan.rtt_ms(ctx, args.link, count=args.count)
        if args.json:
            print(json.dumps(WanPing(link=args.link, rtt_ms=got).to_wire(), indent=2))
        else:
            print(f"{args.link}: {len(got)} round trips, min {min(got):.2f} / median "
                  f"{statistics.median(got):.2f} / max {max(got):.2f} ms")
        return 0
    raise AssertionError(args.action)


@dataclass(frozen=True)
class WanPing(Message):
    """``labctl wan ping LINK``: round trips across the link, measured from a host of one of
    its sites to the router's leg on the other, in ms, in the order they came back."""

    link: str
    rtt_ms: list[float]


def _print(s: WanShown) -> None:
    print(f"{s.name}  {s.sites[0]} ({s.addresses[0]}) <-> {s.sites[1]} ({s.addresses[1]})  "
          f"{s.state}")
    print(f"  asked: {s.params.describe()}")
    if s.router is not None:
        for leg in s.router.legs:
            print(f"  leg {leg.site} ({leg.ifname}, {'up' if leg.up else 'down'}): {leg.qdisc}; "
                  f"{leg.sent_packets} packets sent, {leg.dropped} dropped")
    if s.error:
        print(f"  router: {s.error}")
