"""Entry point of a libvirt cloud's API endpoint (:mod:`labctl.replication.cloudapi`).

    python -m labctl.agents.cloudapi --state-dir DIR --secret-file FILE --host NAME \\
        --listen IP:PORT --api-port PORT --tls-dir DIR --allow NAME [--allow NAME ...] \\
        [--libvirt-socket PATH]

It serves the cloud's operators on the API port (libvirt's TLS transport, certificates of
the cloud's own CA in ``--tls-dir``: ``NAME.pem``, ``NAME.key``, ``ca.pem``) and answers its
site's controller on ``--listen`` (the site's secret, as a host agent does: it is pinged and
lists no VM).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from labctl.agents.host import (
    drop_pidfile,
    parse_listen,
    run_agent,
    site_agent_parser,
    stop_on_signals,
    tls_files,
)
from labctl.core.rpc import RpcServer
from labctl.core.secret import read_secret
from labctl.core.wire import Empty, handlers
from labctl.hosts import protocol as hp
from labctl.replication.cloudapi import ApiGate, GateFiles

log = logging.getLogger("labctl.cloudapi")

LIBVIRT_SOCKET = Path("/var/run/libvirt/libvirt-sock")


async def serve(state_dir: Path, secret_file: Path, name: str, listen: str, api_port: int,
                tls_dir: Path, allowed: set[str], upstream: Path) -> None:
    addr, port = parse_listen(listen)
    secret = read_secret(secret_file)
    files = GateFiles(*tls_files("cloud API", tls_dir, name, "the cloud's CA"))
    gate = ApiGate(addr, api_port, files, allowed, upstream)

    async def ping(_: Empty) -> hp.HostPing:
        return hp.HostPing(host=name, pid=os.getpid(), qemu_version=None, accel="none",
                           mem_available=None)

    async def vm_list(_: Empty) -> hp.VmList:
        return hp.VmList(vms=[])  # the cloud's VMs are libvirt's, listed through the API

    server = RpcServer(secret, handlers(hp.PING.serve(ping), hp.VM_LIST.serve(vm_list)),
                       name=f"cloud API {name}")
    stop = stop_on_signals()
    await gate.start()
    await server.start(addr, port)
    log.info("cloud API %s: libvirt over TLS on %s:%d for %s, controller on %d (pid %d)",
             name, addr, api_port, ", ".join(sorted(allowed)), port, os.getpid())
    try:
        await stop.wait()
    finally:
        await server.close()
        await gate.close()
        drop_pidfile(state_dir)
        log.info("cloud API %s: stopped (%d callers served, %d refused)", name,
                 gate.counts.accepted, gate.counts.refused)


def main(argv: list[str] | None = None) -> int:
    ap = site_agent_parser("labctl.agents.cloudapi", __doc__)
    ap.add_argument("--api-port", required=True, type=int)
    ap.add_argument("--tls-dir", required=True, type=Path)
    ap.add_argument("--allow", action="append", required=True,
                    help="a common name of a caller's certificate the endpoint serves")
    ap.add_argument("--libvirt-socket", type=Path, default=LIBVIRT_SOCKET)
    args = ap.parse_args(argv)
    return run_agent("cloud API", args.state_dir,
                     lambda: serve(args.state_dir, args.secret_file, args.host, args.listen,
                                   args.api_port, args.tls_dir, set(args.allow),
                                   args.libvirt_socket))


if __name__ == "__main__":
    sys.exit(main())
