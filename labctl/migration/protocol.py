"""The host agent's migration protocol: what a migration driver asks of the source and the
destination host (and what a mobility agent posing as one of them must answer).

Imports only ``labctl.core`` and the host's VM protocol (:mod:`labctl.hosts.protocol`, for
the VM spec). Times are ``time.monotonic()`` seconds on the answering host (the host agents
of a lab share one machine, so one clock); QEMU's own answers (``query-migrate``) are passed
through as they came (:data:`~labctl.core.wire.Json`), read with :func:`qmp_int` & co.

A migration, in the order the driver calls (S: source host, D: destination host)::

    S mig_source_info        is the VM there and running? its spec, disk size, heartbeat
    S mig_dirty_rate         (optional, before anything else) QEMU's calc-dirty-rate
    D mig_prepare            incoming QEMU started (-incoming defer), storage made ready
                             (early), listening: answers the URI; D now holds a lease;
                             with export_disk its disk is also an NBD export (the mirror's)
    S mig_start              capabilities, parameters, migrate to the URI; with mirror_to,
                             first a block mirror of the disk into D's export (status
                             "mirror"), the migration once the mirror is in sync
    loop:
      S mig_status           passes and status changes since the last call
      D mig_renew            keep the lease (else D drops the incoming VM by itself)
      S mig_set              new parameters (policy: raise the downtime limit, throttle)
      S mig_postcopy         switch to post-copy (policy)
      S mig_mirror_complete  the mirror completed, in the pre-switchover window (the guest
                             is stopped: the destination's disk is the source's) ...
      D mig_late_storage     late storage preparation, in the pre-switchover window ...
      S mig_continue         ... after which the source is let go on
    completed:   D mig_dest_finish (guest verified there), S mig_source_finish (told what
                 the destination verified)
    otherwise:   S mig_cancel (guest runs on the source again), D mig_dest_abort

The source publishes event ``migration`` (:class:`MigrationProgress`) to its RPC
subscribers on every pass and status change, so the driver need not poll fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from labctl.core.rpc import Handler
from labctl.core.wire import Json, Message, Method
from labctl.hosts.protocol import VmName, VmSpec, VmStopped

EVENT_PROGRESS = "migration"

#: a QEMU migration parameter value (``migrate-set-parameters``: sizes, limits, names)
ParamValue = int | bool | str
#: QEMU migration parameters by QEMU's names (``downtime-limit``, ``max-bandwidth``...)
Parameters = dict[str, ParamValue]
#: QEMU migration capabilities by QEMU's names (``events``, ``postcopy-ram``...)
Capabilities = dict[str, bool]
StorageMode = Literal["early", "late"]


@dataclass(frozen=True)
class MigrationProgress(Message):
    """Event ``migration``: a pass started or QEMU's migration status changed on the source.
    Subscribers use it to wake up and ask ``mig_status``."""

    vm: str
    t: float
    status: str | None = None
    pass_no: int | None = None


# --- shared parts ----------------------------------------------------------------------------

@dataclass(frozen=True)
class HeartbeatStamp(Message):
    """One ``HB`` line of the guest's console, as the host agent received it."""

    counter: int
    #: the guest's disk counter in that line (None: the guest has no disk)
    disk_counter: int | None
    #: arrival of the line at the host agent
    t: float


@dataclass(frozen=True)
class Stamp(Message):
    """The answer of a command that only has to be carried out: when it was."""

    t: float


# --- destination -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Prepare(Message):
    """``mig_prepare`` (to the destination, first): start the incoming QEMU for ``spec``
    (the source's exact machine and devices; the disk as the destination reaches it) with
    ``-incoming defer``, listen on ``listen`` (an IPv4 address of the destination).

    ``storage`` early: open the real disk, check the datastore and read the disk through
    QEMU now; late: a placeholder node of ``disk_size`` bytes until ``mig_late_storage``.
    ``capabilities`` / ``parameters`` are the migration's; the destination applies those
    that must match on both sides (multifd, postcopy-ram). The incoming VM then holds a
    lease of ``lease_s`` seconds, renewed by ``mig_renew``: if it lapses before
    ``mig_dest_finish``, the destination drops the VM by itself."""

    spec: VmSpec
    listen: str
    storage: StorageMode = "early"
    capabilities: Capabilities = field(default_factory=dict)
    parameters: Parameters = field(default_factory=dict)
    disk_size: int | None = None
    lease_s: float = 15.0
    #: also export the opened disk over NBD, writable: the target of the source's block
    #: mirror when the sites share no storage (early storage only)
    export_disk: bool = False


@dataclass(frozen=True)
class IscsiDatastoreCheck(Message):
    """The LUN as the destination host sees it now (scan: NAA ID, capacity)."""

    naa: str
    size_bytes: int
    kind: Literal["iscsi"] = "iscsi"


@dataclass(frozen=True)
class FileDatastoreCheck(Message):
    """The disk file as the destination host sees it (readable, its size)."""

    path: str
    size_bytes: int
    kind: Literal["file"] = "file"


@dataclass(frozen=True)
class ReadCheck(Message):
    """Sector 0 read through the incoming QEMU's own (inactive) disk node."""

    bytes: int
    #: the guest's disk counter record found there (None: no valid record)
    disk_counter: int | None


@dataclass(frozen=True)
class QemuDied(Message):
    """The incoming QEMU exited on its own."""

    returncode: int | None
    stderr: list[str]


@dataclass(frozen=True)
class StorageChecks(Message):
    """What the destination checked of the VM's storage (None: not done yet / no disk)."""

    datastore: IscsiDatastoreCheck | FileDatastoreCheck | None = None
    read: ReadCheck | None = None
    died: QemuDied | None = None


@dataclass(frozen=True)
class Prepared(Message):
    """Answer to ``mig_prepare``, once the incoming QEMU listens: the URI the source must
    migrate to, and what each step took (``timings``: ``qemu_start_s``, ``listen_s``,
    ``prepare_s``, with early storage ``datastore_check_s``, ``read_check_s``)."""

    uri: str
    pid: int | None
    storage: StorageMode
    timings: dict[str, float]
    checks: StorageChecks
    run_dir: str
    #: the disk's NBD export (``nbd:HOST:PORT:exportname=NAME``) with ``export_disk``
    nbd: str | None = None


@dataclass(frozen=True)
class Renew(Message):
    """``mig_renew`` (to the destination, every few seconds while the migration runs):
    the driver is still there; keep the incoming VM ``lease_s`` more seconds."""

    name: str
    lease_s: float = 15.0


@dataclass(frozen=True)
class Renewed(Message):
    """Answer to ``mig_renew``: the lease now ends at ``lease_until``."""

    lease_until: float


@dataclass(frozen=True)
class DestStorage(Message):
    """Answer to ``mig_late_storage`` (to the destination, in the pre-switchover window,
    request :class:`~labctl.hosts.protocol.VmName`, late storage only): the real disk
    opened and swapped under the placeholder, checked and read; all timings and checks so
    far (``qemu_open_s``, ``late_storage_s`` added)."""

    timings: dict[str, float]
    checks: StorageChecks


@dataclass(frozen=True)
class DestFinish(Message):
    """``mig_dest_finish`` (to the destination, once the source says completed): wait up
    to ``timeout`` s for a guest heartbeat above ``after_counter`` (the last one seen on
    the source) and read the guest's disk counter there. The lease ends: the VM is the
    destination's own from now on."""

    name: str
    after_counter: int | None = None
    timeout: float = 20.0
    #: the source's last heartbeat (a mobility agent passes it to its peer site, whose
    #: record then measures the real blackout)
    source_heartbeat: HeartbeatStamp | None = None


@dataclass(frozen=True)
class DestFinished(Message):
    """Answer to ``mig_dest_finish``: how the guest resumed on the destination."""

    #: the first heartbeat line of the guest on the destination
    first_heartbeat: HeartbeatStamp | None
    #: the latest one
    heartbeat: HeartbeatStamp | None
    #: the incoming QEMU's RESUME event: arrival at the agent, QEMU's own stamp
    resume_t: float | None
    resume_qemu_t: float | None
    #: QEMU's ``vmstate_downtime_checkpoint`` trace points (``dst-...``)
    checkpoints: dict[str, float]
    #: the guest's answer to ``read`` (``DISK read <counter>``)
    disk_read: str
    #: QEMU's run state (``running`` when all is well)
    status: str | None
    pid: int | None
    timings: dict[str, float]
    checks: StorageChecks


@dataclass(frozen=True)
class DestAborted(Message):
    """Answer to ``mig_dest_abort`` (to the destination when the migration failed or was
    cancelled; request :class:`~labctl.hosts.protocol.VmName`; idempotent): whether an
    incoming VM was there and is now stopped and its run directory removed."""

    name: str
    removed: bool


# --- source ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SourceInfo(Message):
    """Answer to ``mig_source_info`` (to the source, first; request
    :class:`~labctl.hosts.protocol.VmName`): the VM as the source runs it."""

    spec: VmSpec
    #: QEMU's run state (``running`` to be migratable)
    status: str | None
    #: the virtual size of the disk node (late storage needs it for the placeholder)
    disk_size: int | None
    heartbeat: HeartbeatStamp | None
    pid: int | None
    #: the QEMU process: running, stopped, failed...
    process: str
    #: a migration of this VM is under way already
    migrating: bool


@dataclass(frozen=True)
class DirtyRateRequest(Message):
    """``mig_dirty_rate`` (to the source, before the migration starts, optional): measure
    the guest's dirty rate with QEMU's ``calc-dirty-rate`` (page sampling)."""

    name: str
    calc_time_s: int = 1
    sample_pages: int = 8192


@dataclass(frozen=True)
class DirtyRate(Message):
    """Answer to ``mig_dirty_rate``: QEMU's figures (``query-dirty-rate``)."""

    dirty_rate_mib_s: int | None
    mode: str | None
    calc_time_s: int | None
    sample_pages: int | None
    took_s: float


@dataclass(frozen=True)
class Start(Message):
    """``mig_start`` (to the source, after ``mig_prepare`` answered): set ``capabilities``
    and ``parameters`` and ``migrate`` to ``uri``. The source listens to QEMU's events
    from before the first command."""

    name: str
    uri: str
    capabilities: Capabilities
    parameters: Parameters = field(default_factory=dict)
    #: mirror the disk into this NBD export (``nbd:HOST:PORT:exportname=NAME``) first and
    #: migrate once the mirror is in sync (status ``mirror`` until then); the capability
    #: pause-before-switchover must be on: the mirror completes in that window
    mirror_to: str | None = None


@dataclass(frozen=True)
class MirrorCompleted(Message):
    """Answer to ``mig_mirror_complete``: the mirror's last bytes are on the destination
    and the job is gone (the guest is stopped: nothing more is written)."""

    t: float
    #: bytes the mirror copied in all, and how long completing it took
    bytes: int
    took_s: float


@dataclass(frozen=True)
class SourceFinish(Message):
    """``mig_source_finish``: the migration completed and the destination verified the
    guest; ``dest`` is what it reported (a mobility agent passes it to its peer site)."""

    name: str
    dest: DestFinished | None = None


@dataclass(frozen=True)
class Started(Message):
    """Answer to ``mig_start``: when ``migrate`` was sent (the origin of every ``t_rel``)."""

    t0: float


@dataclass(frozen=True)
class PassRecord(Message):
    """One pre-copy pass: QEMU's ``query-migrate`` taken by the source right after its
    ``MIGRATION_PASS`` event. Byte counts and rates are QEMU's (``ram``)."""

    pass_: int  # "pass" on the wire
    #: seconds since ``migrate`` was sent (the origin of the migration's own time axis)
    t_rel: float
    status: str | None
    dirty_sync_count: int | None
    transferred: int | None
    #: dirty memory left to send at the pass start (bytes)
    remaining: int | None
    total: int | None
    dirty_pages_rate: float
    #: QEMU's dirty-pages-rate times the page size (bytes/s; 0: not known yet)
    dirty_rate_bytes: float
    expected_downtime_ms: int | None
    throttle_pct: int
    mbps: float | None
    #: set by the driver: the previous pass's length, and the pages dirtied during it over
    #: that length (bytes/s)
    prev_pass_s: float | None = None
    dirty_rate_est_bytes: float | None = None


@dataclass(frozen=True)
class StatusChange(Message):
    """QEMU's ``MIGRATION`` event on the source: the migration's status changed."""

    #: seconds since ``migrate`` was sent
    t_rel: float
    status: str


@dataclass(frozen=True)
class StatusRequest(Message):
    """``mig_status`` (to the source, while the migration runs): its state, with the
    passes from index ``since`` on (the driver passes how many it has)."""

    name: str
    since: int = 0


@dataclass(frozen=True)
class SourceStatus(Message):
    """Answer to ``mig_status``. ``status`` is QEMU's migration status, final
    (``completed``, ``failed``, ``cancelled``) only once ``final`` holds QEMU's last
    ``query-migrate``; ``process`` says whether the source QEMU still runs at all."""

    status: str
    t0: float
    passes: list[PassRecord]
    statuses: list[StatusChange]
    #: QEMU's ``query-migrate`` now (None if QEMU cannot answer)
    now: Json
    #: QEMU's last ``query-migrate`` once the migration ended (None before)
    final: Json
    #: the source QEMU's STOP event: arrival at the agent, QEMU's own stamp
    stop_t: float | None
    stop_qemu_t: float | None
    #: QEMU's ``vmstate_downtime_checkpoint`` trace points (``src-...``), once final
    checkpoints: dict[str, float]
    heartbeat: HeartbeatStamp | None
    process: str
    returncode: int | None
    t: float


@dataclass(frozen=True)
class SetParameters(Message):
    """``mig_set`` (to the source, while the migration runs): ``migrate-set-parameters``
    (the policy raises the downtime limit or starts throttling). Answer: :class:`Stamp`."""

    name: str
    parameters: Parameters


@dataclass(frozen=True)
class Cancel(Message):
    """``mig_cancel`` (to the source, when the migration is given up; safe when nothing
    runs): ``migrate_cancel``, then wait up to ``timeout`` s until QEMU says the migration
    is over, and let the guest run again if QEMU left it paused."""

    name: str
    timeout: float = 15.0
    #: why the caller gives up (recorded by a mobility agent standing in for the source)
    reason: str | None = None


@dataclass(frozen=True)
class Cancelled(Message):
    """Answer to ``mig_cancel``."""

    #: QEMU's migration status after the cancel (``cancelled``, ``failed``, ``none``...)
    status: str
    #: QEMU's run state of the VM after it
    vm_status: str | None
    #: the VM was paused and ``cont`` was sent
    resumed_by_us: bool
    took_s: float


# mig_continue, mig_postcopy, mig_mirror_complete take a VmName: resume after the
# pre-switchover pause, switch to post-copy, complete the block mirror

MIG_PREPARE = Method("mig_prepare", Prepare, Prepared)
MIG_RENEW = Method("mig_renew", Renew, Renewed)
MIG_LATE_STORAGE = Method("mig_late_storage", VmName, DestStorage)
MIG_DEST_FINISH = Method("mig_dest_finish", DestFinish, DestFinished)
MIG_DEST_ABORT = Method("mig_dest_abort", VmName, DestAborted)
MIG_SOURCE_INFO = Method("mig_source_info", VmName, SourceInfo)
MIG_DIRTY_RATE = Method("mig_dirty_rate", DirtyRateRequest, DirtyRate)
MIG_START = Method("mig_start", Start, Started)
MIG_STATUS = Method("mig_status", StatusRequest, SourceStatus)
MIG_SET = Method("mig_set", SetParameters, Stamp)
MIG_CONTINUE = Method("mig_continue", VmName, Stamp)
MIG_POSTCOPY = Method("mig_postcopy", VmName, Stamp)
MIG_CANCEL = Method("mig_cancel", Cancel, Cancelled)
MIG_SOURCE_FINISH = Method("mig_source_finish", SourceFinish, VmStopped)
MIG_MIRROR_COMPLETE = Method("mig_mirror_complete", VmName, MirrorCompleted)

#: the whole protocol: what a host agent, and a mobility agent posing as one, serve
MIG_METHODS: tuple[Method[Any, Any], ...] = (
    MIG_PREPARE, MIG_RENEW, MIG_LATE_STORAGE, MIG_DEST_FINISH, MIG_DEST_ABORT, MIG_SOURCE_INFO,
    MIG_DIRTY_RATE, MIG_START, MIG_STATUS, MIG_SET, MIG_CONTINUE, MIG_POSTCOPY, MIG_CANCEL,
    MIG_SOURCE_FINISH, MIG_MIRROR_COMPLETE)


def served_by(impl: object) -> list[tuple[str, Handler]]:
    """Handler entries for every method of the protocol, each served by ``impl``'s method
    of the same name (``mig_prepare``...): one table for every agent that answers it."""
    return [m.serve(getattr(impl, m.name)) for m in MIG_METHODS]

FINAL_STATUSES = ("completed", "failed", "cancelled")


# --- reading QEMU's answers ------------------------------------------------------------------

def qmp_get(answer: Json, *path: str) -> Json:
    """``answer[path[0]][path[1]]...`` of a QEMU answer, or None where it has no such key."""
    for key in path:
        if not isinstance(answer, dict):
            return None
        answer = answer.get(key)
    return answer


def qmp_int(answer: Json, *path: str) -> int | None:
    """An integer of a QEMU answer (None if absent or not an integer)."""
    v = qmp_get(answer, *path)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def qmp_float(answer: Json, *path: str) -> float | None:
    """A number of a QEMU answer (None if absent or not a number)."""
    v = qmp_get(answer, *path)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def qmp_str(answer: Json, *path: str) -> str | None:
    """A string of a QEMU answer (None if absent or not a string)."""
    v = qmp_get(answer, *path)
    return v if isinstance(v, str) else None
