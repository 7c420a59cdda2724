"""Entry point of the storage agent. Inside a storage node VM the node's PID 1
(``images/storage/init.py``) imports this module and calls :func:`serve` with its config
disk's ``config.json``. On a machine of its own (a Vagrant or hardware lab, provisioned by
``playbooks/roles/storage``) systemd runs::

    python -m labctl.agents.storage --config /etc/labctl/storage.json \\
        --secret-file /etc/labctl/secret

where the config is a :class:`~labctl.storage.protocol.NodeConfig` without its ``secret``
(the secret stays in its own 0600 file, never in the config or on a command line).

On a machine whose node labctl started over SSH (the config names ``disk_dir``),
``--release`` instead removes what that node made in the machine's kernel (its iSCSI
target, the backstores and loop devices on its disks) once its agent is stopped, printing
one line per object: teardown by ownership on a machine that outlives the lab.

Standard library only (plus rtslib-fb, imported when LIO is first used).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path

from labctl.core.errors import LabError
from labctl.core.secret import read_secret
from labctl.storage.agent import serve
from labctl.storage.machine import release
from labctl.storage.protocol import NodeConfig

__all__ = ["main", "serve"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m labctl.agents.storage", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, type=Path,
                    help="the node's config (JSON: lab, node, address, gateway, mac, "
                         "target_iqn, agent_port), without the secret")
    ap.add_argument("--secret-file", type=Path,
                    help="the site's secret (hex, mode 0600) the provider delivered")
    ap.add_argument("--release", action="store_true",
                    help="remove this node's target, backstores and loop devices (a "
                         "machine's node, its agent stopped) and exit")
    ap.add_argument("--peer-secret-file", type=Path,
                    help="the key the lab's storage nodes share for copies between sites "
                         "(hex, mode 0600; without it the site's secret serves)")
    args = ap.parse_args(argv)
    try:
        config = json.loads(args.config.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
        if "secret" in config or "peer_secret" in config:
            raise ValueError("it holds a secret: secrets go in --secret-file and "
                             "--peer-secret-file only")
        if args.release:
            return _release(config)
        if args.secret_file is None:
            ap.error("--secret-file is required to serve")
        config["secret"] = read_secret(args.secret_file).hex()
        if args.peer_secret_file is not None:
            config["peer_secret"] = read_secret(args.peer_secret_file).hex()
    except (OSError, ValueError) as exc:
        print(f"storage agent: bad config {args.config}: {exc}", file=sys.stderr)
        return 1
    except LabError as exc:
        print(f"storage agent: {exc.message}", file=sys.stderr)
        return 1
    try:
        asyncio.run(_serve_until_stopped(config))
    except LabError as exc:
        print(f"storage agent: {exc.message}", file=sys.stderr)
        return 1
    return 0


def _release(config: dict[str, object]) -> int:
    try:
        conf = NodeConfig.from_wire({**config, "secret": ""}, "storage agent config")
        for line in release(conf):
            print(line, flush=True)
    except LabError as exc:
        print(f"storage agent: {exc.message}", file=sys.stderr)
        return 1
    return 0


async def _serve_until_stopped(config: dict[str, object]) -> None:
    """Serve until SIGTERM or SIGINT (systemd's stop), then close the server cleanly."""
    task = asyncio.ensure_future(serve(config))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        pass


if __name__ == "__main__":
    sys.exit(main())
