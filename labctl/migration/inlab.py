"""Migration in a lab: the checks that refuse an impossible request before anything starts,
then a :class:`~labctl.migration.driver.Migration` between the two host agents, recorded
in the lab's inventory, and the VM moved there.

Takes a :class:`~labctl.state.context.LabContext` (held under the lab lock by the caller)
and what other features know, as plain data: which hosts share the VM's datastore and the
disk as the destination reaches it.
"""

from __future__ import annotations

import time
from dataclasses import replace

from labctl.core.errors import MigrationError
from labctl.hosts import protocol as hp
from labctl.migration.driver import Endpoint, Migration
from labctl.migration.policy import Policy, load_policy
from labctl.migration.records import Recorder
from labctl.migration.result import Record
from labctl.state.context import LabContext

MEM_RESERVE = 64 << 20  # bytes a QEMU needs beyond guest RAM (code, TCG translation cache)


async def migrate(ctx: LabContext, vm: str, to: str, *, sharing: list[str] | None,
                  dest_disk: hp.IscsiDisk | None, policy: str | Policy | None = None,
                  late_storage: bool | None = None,
                  measure_dirty_rate: bool = False) -> Record:
    """Migrate ``vm`` to host ``to``; ``sharing`` lists the hosts that share its datastore
    (None: it has none). Returns the recorded result (``labctl migrations show ID``)."""
    pol = load_policy(policy)
    if late_storage is not None:
        pol = replace(pol, storage="late" if late_storage else "early")
    inv = ctx.inv
    row = inv.row("vms", name=vm)
    if row is None:
        known = ", ".join(r["name"] for r in inv.rows("vms")) or "none"
        raise MigrationError(f"unknown VM {vm!r} (VMs: {known})", vm=vm)
    if row["state"] != "running":
        raise MigrationError(f"VM {vm} is not running (state {row['state']}): start it "
                             f"first with 'labctl vm start {vm}'", vm=vm, state=row["state"])
    if row["guest"] == "server":  # its address is routed by its host
        raise MigrationError(f"VM {vm} is a server guest whose address its host routes: "
                             "live migration does not carry that route yet (move it to "
                             "another cloud with labctl replicate)", vm=vm)
    src_host = row["host"]
    dst = inv.row("hosts", name=to)
    if dst is None:
        known = ", ".join(h["name"] for h in inv.rows("hosts", kind="host"))
        raise MigrationError(f"unknown host {to!r} (hosts: {known})", host=to)
    if dst["kind"] == "mobility":
        raise MigrationError(f"{to} is the site's mobility agent, the end of migrations to "
                             f"and from other sites: labctl migrate {vm} --to-site SITE",
                             host=to)
    if to == src_host:
        raise MigrationError(f"VM {vm} already runs on {to}: nothing to migrate", vm=vm, host=to)
    if sharing is not None and to not in sharing:
        raise MigrationError(
            f"host {to} cannot reach datastore {row['datastore']} of VM {vm}: it is "
            f"exported only to {', '.join(sharing)}; migrate to one of those", vm=vm,
            host=to, datastore=row["datastore"], sharing=sharing)
    used = sum(v["memory"] for v in inv.rows("vms", host=to, state="running"))
    if used + row["memory"] > dst["memory"]:
        raise MigrationError(
            f"host {to} lacks memory for VM {vm}: it needs {row['memory'] >> 20} MiB, "
            f"{to} has {(dst['memory'] - used) >> 20} MiB free of {dst['memory'] >> 20} MiB",
            vm=vm, host=to)
    src_row = inv.row("hosts", name=src_host)
    assert src_row is not None
    async with ctx.host_client(src_host) as sc, ctx.host_client(to) as dc:
        # the topology's offer is a budget; the machine must also really have the RAM
        # (the incoming QEMU preallocates it all)
        avail = (await hp.PING.call(dc, timeout=10)).mem_available
        if avail is not None and row["memory"] + MEM_RESERVE > avail:
            raise MigrationError(
                f"host {to} lacks memory for VM {vm}: it needs {row['memory'] >> 20} MiB "
                f"plus {MEM_RESERVE >> 20} MiB for QEMU, the machine has "
                f"{avail >> 20} MiB available", vm=vm, host=to, mem_available=avail)
        mig = Migration(vm, Endpoint(src_host, sc, src_row["address"]),
                        Endpoint(to, dc, dst["address"]), pol,
                        dest_disk=dest_disk,
                        recorder=Recorder(inv), progress=ctx.progress,
                        measure_dirty_rate=measure_dirty_rate,
                        heartbeat_ms=int(row["heartbeat_ms"]))
        result = await mig.run()
    inv.update("vms", {"name": vm}, host=to, pid=result.get("dest_pid"), started_at=time.time())
    return result
