"""Entry point of a site's mobility agent (:mod:`labctl.mobility.agent`).

    python -m labctl.agents.mobility --state-dir DIR --secret-file FILE --host NAME \\
        --listen IP:PORT --relay-port PORT --tls-dir DIR

It answers its site's controller (the site's secret, as a host agent does) and its peer
agents of other sites on the relay port (mutual TLS with the lab's certificates in
``--tls-dir``: ``NAME.pem``, ``NAME.key``, ``ca.pem``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

from labctl.agents.host import parse_listen
from labctl.core.errors import LabError
from labctl.core.rpc import RpcServer
from labctl.core.secret import read_secret
from labctl.mobility.agent import MobilityAgent, TlsFiles

log = logging.getLogger("labctl.mobility")


async def serve(state_dir: Path, secret_file: Path, name: str, listen: str, relay_port: int,
                tls_dir: Path) -> None:
    addr, port = parse_listen(listen)
    secret = read_secret(secret_file)
    tls = TlsFiles(cert=tls_dir / f"{name}.pem", key=tls_dir / f"{name}.key",
                   ca=tls_dir / "ca.pem")
    for f in (tls.cert, tls.key, tls.ca):
        if not f.exists():
            raise LabError(f"mobility agent {name}: no {f} (its certificate comes from the "
                           "lab's CA)")
    agent = MobilityAgent(name, addr, relay_port, tls)
    server = RpcServer(secret, agent.handlers(), name=f"mobility agent {name}")
    agent.server = server
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await agent.start_relay()
    await server.start(addr, port)
    log.info("mobility agent %s listening on %s:%d, relay %d (pid %d)", name, addr, port,
             relay_port, os.getpid())
    try:
        await stop.wait()
    finally:
        await server.close()
        await agent.close()
        with contextlib.suppress(OSError):
            pidfile = state_dir / "agent.pid"
            if pidfile.read_text().strip() == str(os.getpid()):
                pidfile.unlink()
        log.info("mobility agent %s: stopped", name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m labctl.agents.mobility", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state-dir", required=True, type=Path)
    ap.add_argument("--secret-file", required=True, type=Path,
                    help="the site's secret (hex, mode 0600) the provider delivered")
    ap.add_argument("--host", required=True, help="the agent's name in its site")
    ap.add_argument("--listen", required=True)
    ap.add_argument("--relay-port", required=True, type=int)
    ap.add_argument("--tls-dir", required=True, type=Path)
    args = ap.parse_args(argv)
    state = args.state_dir
    try:
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        print(f"mobility agent: cannot create {state}: {exc}", file=sys.stderr)
        return 1
    (state / "agent.pid").write_text(f"{os.getpid()}\n")
    logging.basicConfig(filename=state / "agent.log", level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(state, args.secret_file, args.host, args.listen, args.relay_port,
                          args.tls_dir))
    except LabError as exc:
        log.error("%s", exc)
        print(f"mobility agent: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
