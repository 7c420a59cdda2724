"""CLI for a lab of Vagrant machines (docs/hardware.md).

    labctl vagrant up [FILE] [--no-provision] [--json]
    labctl vagrant down [FILE] [--json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from labctl.cli.args import DEFAULT_TOPOLOGY
from labctl.cli.progress import Progress
from labctl.core.paths import repo_root
from labctl.lab import topology, vagrant


async def run(args: argparse.Namespace, progress: Progress) -> int:
    path = Path(args.file) if args.file else repo_root() / DEFAULT_TOPOLOGY
    topo = topology.load(path)
    if args.action == "up":
        got = await vagrant.up(topo, path, provision=not args.no_provision, progress=progress)
        if args.json:
            print(json.dumps(got.to_wire(), indent=2))
        else:
            print(f"lab {got.lab}: {len(got.machines)} Vagrant machines up (box {got.box}"
                  f"{'' if got.provisioned else ', not provisioned'})")
            for m in got.machines:
                print(f"  {m.group:7} {m.name:8} {m.address:15} ssh {m.user}@{m.address} "
                      f"-i {m.key}  host key {m.host_key_file}")
            if got.topology:
                print(f"next: labctl up {got.topology}")
        return 0
    done = await vagrant.down(topo, path, progress=progress)
    if args.json:
        print(json.dumps(done.to_wire(), indent=2))
    else:
        print(f"lab {done.lab}: {len(done.removed)} Vagrant machines destroyed")
    return 0
