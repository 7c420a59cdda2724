"""Entry point of the host agent: one per lab host, inside the host's network namespace.

    python -m labctl.agents.host --state-dir DIR --secret-file FILE --host NAME --listen IP:PORT

It composes the agent's RPC table from the host's VM registry
(:mod:`labctl.hosts.agent`), the host's storage cache
(:mod:`labctl.datastores.hostcache`) and the host side of live migration
(:mod:`labctl.migration.hostside`), and serves it with the secret it was given.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from labctl.core.errors import LabError
from labctl.core.names import HOST_AGENT_PORT
from labctl.core.rpc import RpcServer
from labctl.core.secret import read_secret
from labctl.datastores.hostcache import HostStorage
from labctl.hosts.agent import HostAgent
from labctl.migration.hostside import MigrationHandlers

log = logging.getLogger("labctl.agents.host")

def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(HOST_AGENT_PORT)
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        portnum = int(port)
    except ValueError as exc:
        raise LabError(f"--listen wants IP:PORT, not {text!r}") from exc
    if not 0 < portnum < 65536:
        raise LabError(f"--listen: bad port {portnum}")
    return host, portnum


async def serve(state_dir: Path, secret_file: Path, host: str, listen: str) -> None:
    addr, port = parse_listen(listen)
    secret = read_secret(secret_file)
    agent = HostAgent(state_dir, host, lab_secret=secret)
    storage = HostStorage(agent)
    migration = MigrationHandlers(agent, storage.probe_disk)
    agent.vm_event_hooks.append(storage.on_vm_event)
    server = RpcServer(secret, {**agent.handlers(), **storage.handlers(),
                                                  **migration.handlers()},
                       name=f"host-agent {host}")
    agent.server = server
    stop = stop_on_signals()
    adopted = await agent.adopt_running()
    if adopted:
        log.info("host agent %s: took over running VMs %s", host, ", ".join(adopted))
    await server.start(addr, port)
    log.info("host agent %s listening on %s:%d (pid %d)", host, addr, port, os.getpid())
    try:
        await stop.wait()
        log.info("host agent %s: stopping", host)
    finally:
        await server.close()
        await agent.stop_all()
        drop_pidfile(state_dir)
        log.info("host agent %s: stopped", host)


def stop_on_signals() -> asyncio.Event:
    """An event SIGTERM and SIGINT set (an agent's way to stop cleanly)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def drop_pidfile(state_dir: Path) -> None:
    """Remove the agent's pidfile if it is still this process's."""
    pidfile = state_dir / "agent.pid"
    with contextlib.suppress(OSError):
        if pidfile.read_text().strip() == str(os.getpid()):
            pidfile.unlink()


def run_agent(what: str, state: Path, work: Callable[[], Coroutine[Any, Any, None]]) -> int:
    """An agent process's life in its state directory: the directory (0700), the pidfile
    first of all (teardown finds the process through it even if the controller that
    started it was killed before it could journal the PID), the log in ``agent.log``, then
    ``work`` run; a LabError is one line on stderr and exit 1."""
    try:
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        print(f"{what}: cannot create {state}: {exc}", file=sys.stderr)
        return 1
    (state / "agent.pid").write_text(f"{os.getpid()}\n")
    logging.basicConfig(filename=state / "agent.log", level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("qemu.qmp").setLevel(logging.WARNING)
    try:
        asyncio.run(work())
    except LabError as exc:
        log.error("%s", exc)
        print(f"{what}: {exc}", file=sys.stderr)
        return 1
    return 0


def tls_files(what: str, tls_dir: Path, name: str, ca: str) -> tuple[Path, Path, Path]:
    """An agent's certificate, key and CA certificate in ``tls_dir`` (``NAME.pem``,
    ``NAME.key``, ``ca.pem``), each there or a one-line error naming the CA (``ca``) its
    certificate comes from."""
    files = (tls_dir / f"{name}.pem", tls_dir / f"{name}.key", tls_dir / "ca.pem")
    for f in files:
        if not f.exists():
            raise LabError(f"{what} {name}: no {f} (its certificate comes from {ca})")
    return files


def site_agent_parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    """The command line every agent a site's controller starts shares: its directory, the
    site's secret, its name and where it answers."""
    ap = argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state-dir", required=True, type=Path,
                    help="the agent's own directory (its log and pidfile, VM run directories)")
    ap.add_argument("--secret-file", required=True, type=Path,
                    help="the site's secret (hex, mode 0600) the provider delivered")
    ap.add_argument("--host", required=True, help="the agent's name in its site")
    ap.add_argument("--listen", default=f"0.0.0.0:{HOST_AGENT_PORT}")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = site_agent_parser("labctl.agents.host", __doc__).parse_args(argv)
    return run_agent("host agent", args.state_dir,
                     lambda: serve(args.state_dir, args.secret_file, args.host, args.listen))


if __name__ == "__main__":
    sys.exit(main())
