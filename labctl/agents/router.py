"""Entry point of the WAN router's agent inside the router VM: the node image's PID 1
(``images/storage/init.py``) imports the module its config names and calls :func:`serve`.

Standard library only (with ``labctl.core`` and the WAN protocol).
"""

from __future__ import annotations

from labctl.wan.router import serve

__all__ = ["serve"]
