"""The flagship scenario (``labctl demo``): on a lab just brought up, the VM is really alive
(heartbeats advance, its disk counter reads back from the LUN); it live-migrates to another
host that shares its datastore and back, verified each time; its datastore grows at the
storage node and every sharing host, and the guest itself, see the new size."""

from __future__ import annotations

import asyncio
import os
import sys

from labctl.datastores import rescan
from labctl.datastores import service as datastores
from labctl.lab.face import Lab
from labctl.lab.status import LabStatus
from labctl.migration.report import print_result


async def run(lab: Lab, status: LabStatus, keep: bool) -> int:
    """Run the scenario; 0 when every step verified, else 1 (``demo: FAILED: ...``)."""
    failures: list[str] = []
    try:
        for vm in status.vms:
            if vm.state != "running":
                continue
            name = vm.name
            first = vm.heartbeat.counter if vm.heartbeat else 0
            await asyncio.sleep(2)
            again = await lab.status()
            now = again.vm(name)
            last = now.heartbeat.counter if now.heartbeat else 0
            print(f"VM {name} on {now.host}: heartbeat {first} -> {last} in 2 s "
                  f"({last - first} beats)")
            answer = await lab.vm_console(name, "read")
            print(f"VM {name}: disk counter read back from the LUN: {answer.split()[-1]} "
                  f"(last heartbeat reported {now.disk_counter})")
            if last <= first or not answer.startswith("DISK read"):
                failures.append(f"VM {name} shows no heartbeat progress or disk read")
                continue
            ds = again.datastore(now.datastore)
            if ds is None:
                continue
            home = now.host
            peers = [h for h in ds.hosts if h != home]
            for to in peers[:1] + ([home] if peers else []):
                print(f"\n$ labctl migrate {name} --to {to}")
                res = await lab.migrate(name, to)
                print_result(res)
                if not (res.get("heartbeat", {}).get("continues") and res.get("disk", {}).get("ok")):
                    failures.append(f"migration of {name} to {to} did not verify")
            grow = ds.size_bytes + (64 << 20)
            print(f"\n$ labctl datastore resize {ds.name} {grow >> 20}M")
            with lab.context(of=("datastore", ds.name)) as ctx:
                resized = await datastores.resize(ctx, ds.name, grow)
            if resized.event is not None:
                print(rescan.format_event(resized.event))
            size = (await lab.vm_console(name, "size")).split()
            print(f"VM {name}: the guest sees its disk as {size[-1]} bytes "
                  f"({'' if size[-1] == str(grow) else 'NOT '}the new size)")
            if resized.event is None or str(grow) not in size:
                failures.append(f"the resize of {ds.name} did not reach every sharing host "
                                f"and the guest")
    finally:
        if not keep:
            await lab.down()
            print(f"\nlab {lab.name} torn down (run with --keep to leave it up)")
        else:
            print(f"\nlab {lab.name} is kept up; {_how_to_reach()}")
    print("demo: OK" if not failures else "demo: FAILED: " + "; ".join(failures))
    return 0 if not failures else 1


def _how_to_reach() -> str:
    """How the user who ran the demo reaches the lab it kept: as the same user (root, when
    scripts/demo.sh ran it with sudo), with the same labctl home."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0].endswith("labctl") else "labctl"
    if os.environ.get("SUDO_USER") and os.geteuid() == 0:
        keep = " --preserve-env=LABCTL_HOME" if os.environ.get("LABCTL_HOME") else ""
        return (f"it is root's (the demo ran with sudo): 'sudo{keep} {argv0} status' shows it, "
                f"'sudo{keep} {argv0} down --purge' removes it")
    return f"'{argv0} status' shows it, '{argv0} down --purge' removes it"
