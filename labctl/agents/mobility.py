"""Entry point of a site's mobility agent (:mod:`labctl.mobility.agent`).

    python -m labctl.agents.mobility --state-dir DIR --secret-file FILE --host NAME \\
        --listen IP:PORT --relay-port PORT --tls-dir DIR

It answers its site's controller (the site's secret, as a host agent does) and its peer
agents of other sites on the relay port (mutual TLS with the lab's certificates in
``--tls-dir``: ``NAME.pem``, ``NAME.key``, ``ca.pem``).
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
from labctl.mobility.agent import MobilityAgent, TlsFiles

log = logging.getLogger("labctl.mobility")


async def serve(state_dir: Path, secret_file: Path, name: str, listen: str, relay_port: int,
                tls_dir: Path) -> None:
    addr, port = parse_listen(listen)
    secret = read_secret(secret_file)
    tls = TlsFiles(*tls_files("mobility agent", tls_dir, name, "the lab's CA"))
    agent = MobilityAgent(name, addr, relay_port, tls)
    server = RpcServer(secret, agent.handlers(), name=f"mobility agent {name}")
    agent.server = server
    stop = stop_on_signals()
    await agent.start_relay()
    await server.start(addr, port)
    log.info("mobility agent %s listening on %s:%d, relay %d (pid %d)", name, addr, port,
             relay_port, os.getpid())
    try:
        await stop.wait()
    finally:
        await server.close()
        await agent.close()
        drop_pidfile(state_dir)
        log.info("mobility agent %s: stopped", name)


def main(argv: list[str] | None = None) -> int:
    ap = site_agent_parser("labctl.agents.mobility", __doc__)
    ap.add_argument("--relay-port", required=True, type=int)
    ap.add_argument("--tls-dir", required=True, type=Path)
    args = ap.parse_args(argv)
    return run_agent("mobility agent", args.state_dir,
                     lambda: serve(args.state_dir, args.secret_file, args.host, args.listen,
                                   args.relay_port, args.tls_dir))


if __name__ == "__main__":
    sys.exit(main())
