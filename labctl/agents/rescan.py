"""Entry point of a lab's rescan service (:mod:`labctl.datastores.rescan`).

    python -m labctl.agents.rescan --lab-dir DIR --lab NAME --site SITE

One per site: it follows that site's agents with that site's secret.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from labctl.core.errors import LabError
from labctl.datastores.rescan import RescanService

log = logging.getLogger("labctl.rescan")


async def serve(lab_dir: Path, lab: str, site: str) -> None:
    svc = RescanService(lab_dir, site)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("rescan service of lab %s, site %s (pid %d)", lab, site, os.getpid())
    await svc.run(stop)
    log.info("rescan service stopped")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m labctl.agents.rescan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lab-dir", required=True, type=Path)
    ap.add_argument("--lab", required=True)
    ap.add_argument("--site", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(filename=args.lab_dir / "sites" / args.site / "rescan.log",
                        level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(args.lab_dir, args.lab, args.site))
    except LabError as exc:
        log.error("%s", exc)
        print(f"rescan service: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
