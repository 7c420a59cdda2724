"""Progress lines on stderr (never on stdout, which holds results)."""

from __future__ import annotations

import sys
import time


class Progress:
    """Progress lines on stderr, stamped with the time since the command started."""

    def __init__(self, quiet: bool) -> None:
        self.t0 = time.monotonic()
        self.quiet = quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)
