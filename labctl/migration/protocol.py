"""The host agent's migration protocol: what a migration driver asks of the source and the
destination host (and what a mobility agent posing as one of them must answer).

Imports only ``labctl.core``.
"""

from __future__ import annotations

from dataclasses import dataclass

from labctl.core.wire import Message

EVENT_PROGRESS = "migration"


@dataclass(frozen=True)
class MigrationProgress(Message):
    """Event ``migration``: a pass started or QEMU's migration status changed on the source.
    Subscribers use it to wake up and ask ``mig_status``."""

    vm: str
    t: float
    status: str | None = None
    pass_no: int | None = None
