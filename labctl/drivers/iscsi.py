"""What a host sees of an iSCSI LUN, through libiscsi (user space, no kernel initiator).

* :func:`probe_unit` — one login in this process (ctypes over libiscsi): READ
  CAPACITY(16) and VPD page 0x83 with every designator in hex (``iscsi-inq`` prints
  binary designators with ``%s``, so an NAA ID is cut at its first zero byte);
* :func:`report_luns` — one login to a target: REPORT LUNS and each LUN's capacity
  (``iscsi-ls`` cannot do it with mutual CHAP: it would demand the target authenticate
  its discovery session too, which LIO only does with one secret for all initiators);
* :func:`wait_portal` — until the portal accepts a TCP connection.

Given CHAP credentials (:class:`~labctl.core.chap.Chap`), both log in with them and check
the target's answer (mutual CHAP).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import functools
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from labctl.core.chap import Chap
from labctl.core.errors import LabError, MissingDependency
from labctl.core.names import ISCSI_PORT
from labctl.core.wire import Message

_TIMEOUT = 30.0
_NAME_RE = re.compile(r"^[A-Za-z0-9.:_-]+$")
_PORTAL_RE = re.compile(r"^([0-9A-Za-z.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?$")


@dataclass(frozen=True)
class LunInfo:
    target_iqn: str
    portal: str
    lun: int
    device_type: str  # e.g. DIRECT_ACCESS
    size_bytes: int | None


@dataclass(frozen=True)
class Designator(Message):
    """One designator of VPD page 0x83 (SPC-4 7.8.6)."""

    type: int  # designator type: 3 = NAA
    association: int  # 0 = the logical unit
    code_set: int  # 1 binary, 2 ASCII, 3 UTF-8
    hex: str
    text: str | None  # the ASCII/UTF-8 ones, as text


@dataclass(frozen=True)
class UnitProbe:
    """What :func:`probe_unit` read of a LUN in one login."""

    naa: str  # naa.<hex>
    size_bytes: int
    block_size: int
    #: SCSI commands sent (a command retried after a unit attention counts twice)
    commands: int
    #: (sense key, ASCQ) of each UNIT ATTENTION met
    unit_attentions: list[tuple[int, int]]


def _check(portal: str, target: str | None = None, lun: int | None = None,
           initiator: str | None = None) -> None:
    if not _PORTAL_RE.match(portal):
        raise LabError(f"bad iSCSI portal {portal!r} (want ip:port)", portal=portal)
    for what, name in (("target", target), ("initiator", initiator)):
        if name is not None and not _NAME_RE.match(name):
            raise LabError(f"bad iSCSI {what} name {name!r}", name=name)
    if lun is not None and (isinstance(lun, bool) or not isinstance(lun, int)
                            or not 0 <= lun < 16384):
        raise LabError(f"bad LUN {lun!r}", lun=lun)


def naa_from_designators(found: list[Designator]) -> str:
    """The logical unit's NAA designator (type 3, association 0) in ``naa.<hex>`` form;
    with several, the richest NAA format (6: registered extended, as LIO has) wins."""
    naas = [d.hex.lower() for d in found if d.type == 3 and d.association == 0 and d.hex]
    if naas:
        return "naa." + max(naas, key=lambda h: int(h[0], 16))
    raise LabError("the LUN reports no NAA designator in VPD page 0x83",
                   designators=[d.to_wire() for d in found])


async def wait_portal(portal: str, budget: float = 10.0) -> float:
    """Wait until the portal accepts a TCP connection (a host whose neighbour entry for it is
    still unresolved after a link came back gets EHOSTUNREACH for a moment); returns the
    seconds waited. LabError naming the last failure once ``budget`` seconds have passed."""
    _check(portal)
    m = _PORTAL_RE.match(portal)
    assert m is not None  # _check matched it
    host, port = m.group(1).strip("[]"), int(m.group(2)[1:]) if m.group(2) else ISCSI_PORT
    t0 = time.monotonic()
    last = "not tried"
    while True:
        try:
            async with asyncio.timeout(max(0.2, min(2.0, budget))):
                _, writer = await asyncio.open_connection(host, port)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return time.monotonic() - t0
        except TimeoutError:  # a subclass of OSError: it goes first
            last = "no answer to a connection attempt"
        except OSError as exc:
            last = exc.strerror or str(exc)
        if time.monotonic() - t0 >= budget:
            raise LabError(f"iSCSI portal {portal} did not answer within {budget:g} s: {last}",
                           portal=portal, budget_s=budget)
        await asyncio.sleep(0.2)


# ---- libiscsi through ctypes (in this process) ----

class _Designator(ctypes.Structure):
    pass


_Designator._fields_ = [
    ("next", ctypes.POINTER(_Designator)),
    ("protocol_identifier", ctypes.c_int),
    ("code_set", ctypes.c_int),
    ("piv", ctypes.c_int),
    ("association", ctypes.c_int),
    ("designator_type", ctypes.c_int),
    ("designator_length", ctypes.c_int),
    ("designator", ctypes.POINTER(ctypes.c_ubyte)),
]


class _DeviceIdentification(ctypes.Structure):
    _fields_ = [
        ("qualifier", ctypes.c_int),
        ("device_type", ctypes.c_int),
        ("pagecode", ctypes.c_int),
        ("designators", ctypes.POINTER(_Designator)),
    ]


_ISCSI_SESSION_NORMAL = 2
_VPD_DEVICE_IDENTIFICATION = 0x83


@functools.cache
def _libiscsi() -> ctypes.CDLL:
    """libiscsi with the prototypes used here, loaded once per process (finding it runs
    ldconfig)."""
    name = ctypes.util.find_library("iscsi") or "libiscsi.so.7"
    try:
        lib = ctypes.CDLL(name)
    except OSError as exc:
        raise MissingDependency("libiscsi is not installed (package libiscsi7, from "
                                "libiscsi-bin; run scripts/setup.sh)") from exc
    vp, cp, ci = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
    for fn, res, args in (
        ("iscsi_create_context", vp, [cp]),
        ("iscsi_set_targetname", ci, [vp, cp]),
        ("iscsi_set_session_type", ci, [vp, ci]),
        ("iscsi_set_initiator_username_pwd", ci, [vp, cp, cp]),
        ("iscsi_set_target_username_pwd", ci, [vp, cp, cp]),
        ("iscsi_full_connect_sync", ci, [vp, cp, ci]),
        ("iscsi_connect_sync", ci, [vp, cp]),
        ("iscsi_login_sync", ci, [vp]),
        ("iscsi_reportluns_sync", vp, [vp, ci, ci]),
        ("iscsi_inquiry_sync", vp, [vp, ci, ci, ci, ci]),
        ("iscsi_readcapacity16_sync", vp, [vp, ci]),
        ("iscsi_get_error", cp, [vp]),
        ("iscsi_logout_sync", ci, [vp]),
        ("iscsi_destroy_context", ci, [vp]),
        ("scsi_datain_getfullsize", ci, [vp]),
        ("scsi_datain_unmarshall", vp, [vp]),
        ("scsi_free_scsi_task", None, [vp]),
    ):
        f = getattr(lib, fn)
        f.restype = res
        f.argtypes = args
    return lib


@dataclass
class Session:
    """A libiscsi context logged in to one target (see :func:`login`)."""

    lib: ctypes.CDLL
    ctx: int
    evidence: dict[str, object]

    def error(self, what: str, **evidence: object) -> LabError:
        """``what`` plus libiscsi's last error, with the session's evidence (updated by
        ``evidence``)."""
        msg = self.lib.iscsi_get_error(self.ctx)
        return LabError(f"{what}: {msg.decode(errors='replace') if msg else 'failed'}",
                        **{**self.evidence, **evidence})


@contextlib.contextmanager
def login(portal: str, target: str, lun: int | None, initiator: str, chap: Chap | None = None,
          **evidence: object) -> Iterator[Session]:
    """A normal session to ``target`` at ``portal`` as ``initiator`` (blocking), with mutual
    CHAP when ``chap`` is given: logged out when the block ends without an error, the
    context destroyed in any case. With a ``lun``, libiscsi clears the unit attention of a
    fresh login on it first; without, the session addresses no LUN. Errors carry portal,
    target, lun and ``evidence``."""
    lib = _libiscsi()
    ctx = lib.iscsi_create_context(initiator.encode())
    if not ctx:
        raise LabError("libiscsi: cannot create a context")
    session = Session(lib, ctx, {"portal": portal, "target": target, "lun": lun, **evidence})
    try:
        lib.iscsi_set_targetname(ctx, target.encode())
        lib.iscsi_set_session_type(ctx, _ISCSI_SESSION_NORMAL)
        if chap is not None and (
                lib.iscsi_set_initiator_username_pwd(ctx, chap.user.encode(),
                                                     chap.password.encode()) != 0
                or lib.iscsi_set_target_username_pwd(ctx, chap.target_user.encode(),
                                                     chap.target_password.encode()) != 0):
            raise session.error("libiscsi: cannot set the CHAP credentials")
        if lun is not None:
            ok = lib.iscsi_full_connect_sync(ctx, portal.encode(), lun) == 0
        else:
            ok = (lib.iscsi_connect_sync(ctx, portal.encode()) == 0
                  and lib.iscsi_login_sync(ctx) == 0)
        if not ok:
            raise session.error(f"iSCSI login to {target} at {portal} failed")
        yield session
        lib.iscsi_logout_sync(ctx)
    finally:
        lib.iscsi_destroy_context(ctx)


def designator_list(inq: int) -> list[Designator]:
    """The designators of an unmarshalled VPD page 0x83 in libiscsi's list order (the
    reverse of the page's)."""
    ident = ctypes.cast(inq, ctypes.POINTER(_DeviceIdentification)).contents
    out: list[Designator] = []
    d = ident.designators
    while d:
        dd = d.contents
        raw = bytes(dd.designator[:dd.designator_length]) if dd.designator else b""
        text = raw.rstrip(b"\0").decode("ascii", "replace") if dd.code_set in (2, 3) else None
        out.append(Designator(type=dd.designator_type, association=dd.association,
                              code_set=dd.code_set, hex=raw.hex(), text=text))
        d = dd.next
    return out


# ---- the probe a host's storage cache uses (in-process, one login) ----

_SCSI_STATUS_GOOD = 0
_SCSI_STATUS_CHECK_CONDITION = 2
_SENSE_UNIT_ATTENTION = 6
# struct scsi_task (libiscsi scsi-lowlevel.h, x86_64): int status @0 ... struct scsi_sense
# {unsigned char error_type; enum key; int ascq;} @48 -> key @52, ascq @56
_TASK_SENSE_KEY = 52
_TASK_SENSE_ASCQ = 56


class _ReadCapacity16(ctypes.Structure):
    _fields_ = [("returned_lba", ctypes.c_uint64), ("block_length", ctypes.c_uint32),
                ("p_type", ctypes.c_uint8), ("prot_en", ctypes.c_uint8),
                ("p_i_exp", ctypes.c_uint8), ("lbppbe", ctypes.c_uint8),
                ("lbpme", ctypes.c_uint8), ("lbprz", ctypes.c_uint8),
                ("lalba", ctypes.c_uint16)]


class _Commands:
    """SCSI commands on one session, counted, a UNIT ATTENTION retried (it is reported once
    per nexus), every other failure a LabError with libiscsi's words."""

    def __init__(self, session: Session) -> None:
        self.s = session
        self.count = 0
        self.attentions: list[tuple[int, int]] = []

    def error(self, what: str) -> LabError:
        return self.s.error(what, scsi_commands=self.count)

    def run(self, issue: Any, what: str) -> Any:
        """The task ``issue()`` sent, once its status is GOOD (the caller frees it: see
        :meth:`data`)."""
        lib = self.s.lib
        for _ in range(3):
            self.count += 1
            task = issue()
            if not task:
                raise self.error(what)
            status = ctypes.cast(task, ctypes.POINTER(ctypes.c_int))[0]
            if status == _SCSI_STATUS_GOOD:
                return task
            if status == _SCSI_STATUS_CHECK_CONDITION:
                key = ctypes.c_int.from_address(task + _TASK_SENSE_KEY).value
                ascq = ctypes.c_int.from_address(task + _TASK_SENSE_ASCQ).value
                lib.scsi_free_scsi_task(task)
                if key == _SENSE_UNIT_ATTENTION:
                    self.attentions.append((key, ascq))
                    continue
                raise self.error(f"{what}: CHECK CONDITION sense key {key:#x} ascq {ascq:#06x}")
            lib.scsi_free_scsi_task(task)
            raise self.error(f"{what}: SCSI status {status:#x}")
        raise self.error(f"{what}: unit attention did not clear")

    @contextlib.contextmanager
    def data(self, issue: Any, what: str) -> Iterator[int]:
        """Send ``issue()`` and yield its unmarshalled data-in; the task is freed after."""
        task = self.run(issue, what)
        try:
            out = self.s.lib.scsi_datain_unmarshall(task)
            if not out:
                raise self.error(f"cannot decode {what}")
            yield out
        finally:
            self.s.lib.scsi_free_scsi_task(task)

    def capacity(self, lun: int) -> tuple[int, int]:
        """(bytes, block size) of ``lun`` by READ CAPACITY(16)."""
        with self.data(lambda: self.s.lib.iscsi_readcapacity16_sync(self.s.ctx, lun),
                       "READ CAPACITY(16)") as rc:
            cap = ctypes.cast(rc, ctypes.POINTER(_ReadCapacity16)).contents
            block = int(cap.block_length)
            return (int(cap.returned_lba) + 1) * block, block


def probe_unit(portal: str, target: str, lun: int, initiator: str,
               chap: Chap | None = None) -> UnitProbe:
    """Log in (with mutual CHAP when ``chap`` is given), read VPD 0x83 and READ
    CAPACITY(16), log out (blocking; run in a thread)."""
    with login(portal, target, lun, initiator, chap) as s:
        cmds = _Commands(s)
        try:
            size, block = cmds.capacity(lun)
            with cmds.data(lambda: s.lib.iscsi_inquiry_sync(
                    s.ctx, lun, 1, _VPD_DEVICE_IDENTIFICATION, 255), "INQUIRY VPD 0x83") as inq:
                found = designator_list(inq)
        except LabError as exc:
            exc.evidence["scsi_commands"] = cmds.count
            raise
    return UnitProbe(naa=naa_from_designators(found), size_bytes=size, block_size=block,
                     commands=cmds.count, unit_attentions=cmds.attentions)


class _ReportLuns(ctypes.Structure):
    _fields_ = [("num", ctypes.c_uint32), ("luns", ctypes.c_uint16 * 0)]


def report_luns(portal: str, target: str, initiator: str,
                chap: Chap | None = None) -> tuple[list[LunInfo], int]:
    """Every LUN ``target`` shows ``initiator`` (REPORT LUNS in a session that addresses no
    LUN, then READ CAPACITY(16) of each; with mutual CHAP when ``chap`` is given) and the
    SCSI commands sent (blocking; run in a thread). A LUN the target reports but cannot
    serve (LIO's stand-in LUN 0 of an ACL with nothing mapped) is left out."""
    with login(portal, target, None, initiator, chap) as s:
        cmds = _Commands(s)
        with cmds.data(lambda: s.lib.iscsi_reportluns_sync(s.ctx, 0, 16384),
                       "REPORT LUNS") as rl:
            head = ctypes.cast(rl, ctypes.POINTER(_ReportLuns)).contents
            arr = ctypes.cast(ctypes.addressof(head) + _ReportLuns.luns.offset,
                              ctypes.POINTER(ctypes.c_uint16))
            numbers = sorted({int(arr[i]) & 0x3fff for i in range(int(head.num))})
        out: list[LunInfo] = []
        for lun in numbers:
            try:
                size, _ = cmds.capacity(lun)
            except LabError:
                continue
            out.append(LunInfo(target_iqn=target, portal=portal, lun=lun,
                               device_type="DIRECT_ACCESS", size_bytes=size))
    return out, cmds.count
