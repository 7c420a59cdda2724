"""Entry point of the storage agent inside a storage node VM: the node's PID 1
(``images/storage/init.py``) imports this module and calls :func:`serve`.

Standard library only (plus rtslib-fb, imported when LIO is first used).
"""

from __future__ import annotations

from labctl.storage.agent import serve

__all__ = ["serve"]
