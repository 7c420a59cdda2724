"""The record of one migration: what the driver measured, checked and decided, built from
the agents' typed answers. It is stored in the lab's inventory as JSON
(:meth:`MigrationResult.to_wire`, the ``result`` column without ``pass_records`` and
``decisions``, which have their own tables) and read back as that JSON (a :data:`Record`)
by ``labctl migrations show``, the report and the timeline, whatever version wrote it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from labctl.core.wire import Json, Message, WallTime
from labctl.migration.convergence import Decision
from labctl.migration.protocol import (
    Cancelled,
    DestAborted,
    DestStorage,
    DirtyRate,
    PassRecord,
    Prepared,
    StatusChange,
    StorageMode,
)

#: a migration's record as stored and read back (the JSON of a MigrationResult, maybe
#: written by an older labctl): read it with ``.get``
Record = dict[str, Json]


@dataclass(frozen=True)
class PrepareRecord(Prepared):
    """The destination's answer to ``mig_prepare`` and how long the driver waited for it."""

    wall_s: float = 0.0

    @classmethod
    def of(cls, prep: Prepared, wall_s: float) -> PrepareRecord:
        return cls(uri=prep.uri, pid=prep.pid, storage=prep.storage, timings=prep.timings,
                   checks=prep.checks, run_dir=prep.run_dir, wall_s=wall_s)


@dataclass(frozen=True)
class LateWindow(Message):
    """Late storage preparation in the pre-switchover window (the source stopped)."""

    storage_s: float
    window_s: float
    #: from the source's STOP to the driver noticing the pre-switchover state
    detected_after_stop_s: float
    dest: DestStorage


@dataclass(frozen=True)
class MirrorRecord(Message):
    """The disk's copy by a block mirror (storage not shared: the disk moved too)."""

    #: the destination's NBD export the source mirrored into
    target: str
    #: bytes the mirror copied, and from migrate being asked to the mirror in sync
    bytes: int
    sync_s: float | None
    #: completing it in the pre-switchover window (part of the guest's blackout)
    complete_s: float


@dataclass(frozen=True)
class CrossSiteLink(Message):
    """A half of a migration between sites: the ID both halves carry, and the other half's
    ID in the other site's records."""

    id: str
    from_site: str
    to_site: str
    peer_id: int | None
    #: bytes the mobility agents' relay carried per stream, and on the wire
    relay_bytes: dict[str, int]
    relay_wire_bytes: dict[str, int]
    #: this half: ``outgoing`` (site A: to its mobility agent) or ``incoming`` (site B)
    half: str = ""


@dataclass(frozen=True)
class SideStamps:
    """One host's view of the switchover, on the time.monotonic() axis: the source's STOP
    or the destination's RESUME as its agent received it, QEMU's own stamp of the same
    event, and QEMU's checkpoints there."""

    t: float | None = None
    qemu_t: float | None = None
    checkpoints: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Switchover(Message):
    """Where the guest's blackout goes, in ms (see
    :func:`labctl.migration.driver.switchover_breakdown`); None where a stamp is missing."""

    period_ms: float
    stop_to_resume_ms: float | None
    stop_to_resume_qemu_ms: float | None
    hb_before_stop_ms: float | None
    after_resume_ms: float | None
    restart_overhead_ms: float | None
    #: QEMU's checkpoints (and RESUME's QEMU stamp) in ms after the source's STOP, in order
    checkpoints_ms: dict[str, float | None]


@dataclass(frozen=True)
class Beat(Message):
    """One heartbeat line of the guest's console, as its host agent received it."""

    counter: int
    #: the guest's disk counter in that line (None: the guest has no disk)
    disk_counter: int | None
    #: when it arrived, in seconds since ``migrate`` was sent (the record's own time axis)
    t_rel: float


@dataclass(frozen=True)
class HeartbeatCheck(Message):
    """The guest's heartbeat across the migration: last on the source, first on the
    destination; ``continues`` when the counter went on, and plausibly so for the blackout."""

    source_last: Beat | None
    dest_first: Beat | None
    continues: bool


@dataclass(frozen=True)
class DiskCheck(Message):
    """The guest's disk counter: last on the source, read back on the destination."""

    source_last: int | None
    dest_read: int | None
    ok: bool


@dataclass(frozen=True)
class SourceCheck(Message):
    """After a failed or cancelled migration: does the guest beat on the source again?"""

    status: str
    heartbeat_before: int | None
    heartbeat_after: int | None
    alive: bool


@dataclass(frozen=True)
class Recovery(Message):
    """What the driver did after a failure: cancel on the source, check the guest there,
    drop the destination's incoming VM."""

    note: str | None = None
    cancel: Cancelled | None = None
    source: SourceCheck | None = None
    source_error: str | None = None
    dest: DestAborted | None = None
    dest_error: str | None = None


@dataclass(frozen=True)
class MigrationResult(Message):
    """One migration, as recorded. QEMU's figures (``setup_ms``, ``total_ms``,
    ``downtime_ms``, ``bytes_sent``, ``mbps``) come from its final ``query-migrate``."""

    id: int | None
    vm: str
    source: str
    dest: str
    policy: str
    storage: StorageMode
    started_at: WallTime
    heartbeat_period_ms: int
    dirty_rate_measured: DirtyRate | None = None
    #: completed, failed or cancelled (None while it runs)
    state: str | None = None
    #: None while it runs
    finished_at: WallTime | None = None
    prepare: PrepareRecord | None = None
    late_window: LateWindow | None = None
    mirror: MirrorRecord | None = None
    #: this migration is one site's half of a migration between sites
    cross_site: CrossSiteLink | None = None
    setup_ms: int | None = None
    total_ms: int | None = None
    downtime_ms: int | None = None
    blackout_ms: float | None = None
    passes: int = 0
    bytes_sent: int | None = None
    mbps: float | None = None
    dirty_rate_max_bytes: float | None = None
    dirty_rate_est_bytes: float | None = None
    #: the source's STOP and the destination's RESUME, in seconds since ``migrate`` was sent
    #: (each stamped by its host agent on arrival; every ``t_rel`` is on this axis)
    stop_t_rel: float | None = None
    resume_t_rel: float | None = None
    stop_to_resume_ms: float | None = None
    switchover: Switchover | None = None
    heartbeat: HeartbeatCheck | None = None
    disk: DiskCheck | None = None
    dest_status: str | None = None
    dest_pid: int | None = None
    dest_prepare: DestStorage | None = None
    statuses: list[StatusChange] = field(default_factory=list)
    #: QEMU's final query-migrate on the source
    final: Json = None
    postcopy: bool = False
    pass_records: list[PassRecord] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    error: str | None = None
    recovery: Recovery | None = None
