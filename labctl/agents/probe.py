"""``python -m labctl.agents.probe``: which accelerator this machine really has, as JSON
(``{"accel": "kvm"}`` or ``{"accel": "tcg"}``). Agent side: the controller asks this
process instead of running QEMU itself; the answer is cached per boot."""

from __future__ import annotations

import json
import sys

from labctl.hosts.accel import kvm_usable


def main() -> int:
    print(json.dumps({"accel": "kvm" if kvm_usable() else "tcg"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
