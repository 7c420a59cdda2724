"""The application of a replication's source VM: a small server that writes checksummed,
numbered records to a filesystem on the VM's disk at a set rate, and says which record it
last *acknowledged* (made durable with fsync, then recorded as such). After a cutover the
same program, started on the destination, checks every record and carries on from the
last one: that is how a replication proves it lost nothing a client was told was safe.

Standard library only: the orchestrator copies this file into the guest (it is not baked
into the image) and runs it with the guest's ``python3``::

    python3 app.py run --dir /srv/app --rate 1MiB/s     # until SIGTERM (or SIGINT)
    python3 app.py status --dir /srv/app                # last ack; writer; disk full since
    python3 app.py verify --dir /srv/app                # every record checked, as JSON
    python3 app.py run --dir /srv/app --background      # detached; prints {"pid": N}
    python3 app.py stop --dir /srv/app                  # SIGTERM it; its last ack
    python3 app.py resume --dir /srv/app                # in the background, its last rate
    python3 app.py resume --dir /srv/app --check tail   # the same, the last ack checked first
    python3 app.py verify --dir /srv/app --upto N       # records 1..N against ack N

Files in ``--dir``: ``records`` (4 KiB records: magic, sequence number, time, payload,
SHA-256 of all of it), ``acked`` (the last acknowledged sequence number and its time,
replaced atomically), ``acks.log`` (one line per acknowledgement: ``seq unix_time``, what
the application itself logged, to set against a replication's outage and RPO; made durable
with each acknowledgement, cut after its last whole line when the application starts),
``app.pid`` (the writer's pid, its boot, and since when its disk has been full; one line of
fixed width, written in place and never removed: a disk full to its last block has no
block for a new file, and a replica of such a disk is started on as it is).
A record past the last acknowledged one may be torn by a crash; ``run`` cuts such a tail
off before it appends. A bad record at or before the last acknowledged one is data lost.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import os
import re
import signal
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

RECORD = 4096
MAGIC = b"LBR1"
#: magic, sequence number, wall-clock time in ns; then the payload; the last 32 bytes are
#: the SHA-256 of everything before them
_HEAD = struct.Struct(">4sQQ")
_PAYLOAD = RECORD - _HEAD.size - 32
_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "K": 1 << 10, "M": 1 << 20,
          "G": 1 << 30}


def record(seq: int, t_ns: int) -> bytes:
    """Record ``seq``: its payload is derived from its number (so any record can be
    rebuilt and compared), its checksum covers all of it."""
    head = _HEAD.pack(MAGIC, seq, t_ns)
    seed = hashlib.sha256(seq.to_bytes(8, "big")).digest()
    payload = (seed * (_PAYLOAD // len(seed) + 1))[:_PAYLOAD]
    body = head + payload
    return body + hashlib.sha256(body).digest()


def check(block: bytes, want_seq: int) -> str | None:
    """Why ``block`` is not record ``want_seq`` intact (None when it is)."""
    if len(block) != RECORD:
        return f"short record ({len(block)} bytes)"
    magic, seq, _t = _HEAD.unpack_from(block)
    if magic != MAGIC:
        return "no record (bad magic)"
    if hashlib.sha256(block[:-32]).digest() != block[-32:]:
        return "checksum mismatch"
    if seq != want_seq:
        return f"sequence number {seq}, expected {want_seq}"
    return None


@dataclass(frozen=True)
class Acked:
    seq: int
    at: float


def read_acked(directory: Path) -> Acked:
    try:
        data = json.loads((directory / "acked").read_text())
        return Acked(int(data["seq"]), float(data["at"]))
    except (OSError, ValueError, KeyError, TypeError):
        return Acked(0, 0.0)


def _durable(path: Path, text: str) -> None:
    """``path`` replaced by ``text``, on the disk before this returns (a power cut after a
    plain write can leave an empty file on ext4). A write the disk has no room for leaves
    ``path`` as it was, and no temporary file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_acked(directory: Path, acked: Acked) -> None:
    _durable(directory / "acked", json.dumps({"seq": acked.seq, "at": acked.at}))


#: app.pid's one line, padded to this width: rewritten in place, it needs no new block
_PID_WIDTH = 128


@dataclass(frozen=True)
class PidFile:
    pid: int
    boot: str
    #: since when (unix time) the writer's disk has refused every batch; None: it has not
    full_since: float | None


def read_pid(directory: Path) -> PidFile | None:
    try:
        fields = (directory / "app.pid").read_text().split()
        pid = int(fields[0])
    except (OSError, ValueError, IndexError):
        return None
    full: float | None = None
    if len(fields) > 2 and fields[2] != "-":
        try:
            full = float(fields[2])
        except ValueError:
            full = None
    return PidFile(pid, fields[1] if len(fields) > 1 else "", full)


def write_pid(directory: Path, rec: PidFile) -> None:
    """``app.pid`` rewritten in place (not truncated, not replaced)."""
    line = f"{rec.pid} {rec.boot or '-'} " + (
        "-" if rec.full_since is None else f"{rec.full_since:.6f}")
    fd = os.open(directory / "app.pid", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, line.ljust(_PID_WIDTH - 1).encode() + b"\n", 0)
    finally:
        os.close(fd)


def _say_full(directory: Path, since: float | None) -> None:
    """The writer's ``app.pid`` says since when its disk has been full (None: it is not);
    a writer in the foreground has no pid file, and a full disk's refusals are not this
    state's to fail."""
    rec = read_pid(directory)
    if rec is None or rec.pid != os.getpid():
        return
    with contextlib.suppress(OSError):
        write_pid(directory, PidFile(rec.pid, rec.boot, since))


def verify(directory: Path, upto: int | None = None, tail: bool = False
           ) -> dict[str, object]:
    """Every record checked in order: how many are intact, the first bad one (if any: past
    the last acknowledged record, a tail a crash tore; at or before it, lost data), and
    whether everything acknowledged is there (``ok``). ``upto``: records 1 to ``upto``
    only, against that acknowledgement (the source's, on a replica whose application
    has written on since). ``tail``: from the last acknowledged record on only (it and
    what follows it, a torn tail to cut), the records before it taken as intact: what an
    application must know to append, while the whole is checked after its start."""
    acked = read_acked(directory)
    want = acked.seq if upto is None else upto
    start = max(1, acked.seq) if tail else 1
    intact = start - 1
    bad: str | None = None
    try:
        with open(directory / "records", "rb") as f:
            f.seek(intact * RECORD)
            while upto is None or intact < upto:
                block = f.read(RECORD)
                if not block:
                    break
                why = check(block, intact + 1)
                if why is not None:
                    bad = f"record {intact + 1}: {why}"
                    break
                intact += 1
    except FileNotFoundError:
        intact = 0
    if bad is None and intact < want:
        bad = f"record {intact + 1}: not there (the records end before it)"
    out: dict[str, object] = {"records": intact, "last_acked": want, "acked_at": acked.at,
                              "first_bad": bad, "ok": intact >= want}
    if tail:
        out["checked_from"] = start
    return out


def _repair_log(directory: Path) -> None:
    """``acks.log`` cut after its last whole line: a power cut can leave an appended file
    longer than what was written to it (zeros, on ext4), and lines go after it."""
    path = directory / "acks.log"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    good = 0
    for line in data.splitlines(keepends=True):
        words = line.split()
        if not line.endswith(b"\n") or len(words) != 2 or not words[0].isdigit():
            break
        try:
            float(words[1])
        except ValueError:
            break
        good += len(line)
    if good != len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
            os.fsync(f.fileno())


def run(directory: Path, rate_bytes: float, batch_s: float = 0.1,
        stop_after: float | None = None, checked: dict[str, object] | None = None) -> int:
    """Write records at ``rate_bytes`` per second, acknowledging each batch once durable,
    until SIGTERM/SIGINT (or ``stop_after`` seconds); returns the last acknowledged
    sequence number. Refuses to start when acknowledged data is already missing
    (``checked``: the records were just verified so, by the process this one forked from:
    every record is read once before a start, not twice)."""
    directory.mkdir(parents=True, exist_ok=True)
    state = checked if checked is not None else verify(directory)
    if not state["ok"]:
        raise SystemExit(f"app: {directory}: acknowledged record {state['last_acked']} is "
                         f"not there ({state['first_bad']}): data was lost")
    seq = int(str(state["records"]))
    _repair_log(directory)
    stopping = False

    def stop(_sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    per_s = rate_bytes / RECORD
    # a writer that fell behind (its CPU taken, its fsync slow) writes at most a second's
    # records at once and does not make the rest up: a backlog made up in one batch grew
    # with every batch under TCG (60 MiB built in memory in a 256 MiB guest, minutes
    # between acknowledgements, the guest too busy to answer SSH)
    most = max(1, int(per_s))
    full_since: float | None = None
    fd = os.open(directory / "records", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, seq * RECORD)  # a torn tail past the last intact record goes
        os.lseek(fd, seq * RECORD, os.SEEK_SET)
        t0 = time.monotonic()
        written = 0.0
        log = os.open(directory / "acks.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            while not stopping and (stop_after is None or time.monotonic() - t0 < stop_after):
                due = (time.monotonic() - t0) * per_s - written
                n = min(int(due), most)
                if n > 0:
                    # a batch the disk had no room for is not made up later, nor a backlog
                    written += n if n < most else due
                    now_ns = time.time_ns()
                    try:
                        _append(fd, b"".join(record(seq + i + 1, now_ns) for i in range(n)))
                        os.fsync(fd)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        # a full disk: none of the batch is acknowledged, its torn part goes
                        os.ftruncate(fd, seq * RECORD)
                        os.lseek(fd, seq * RECORD, os.SEEK_SET)
                        _full(f"{n} records not written")
                        if full_since is None:
                            full_since = time.time()
                            _say_full(directory, full_since)
                        time.sleep(batch_s)
                        continue
                    seq += n
                    acked = Acked(seq, time.time())
                    logged = os.lseek(log, 0, os.SEEK_END)
                    try:
                        _write_acked(directory, acked)
                        # the application's own evidence, on the disk too
                        _append(log, f"{acked.seq} {acked.at:.6f}\n".encode())
                        os.fsync(log)
                    except OSError as exc:
                        # written, not acknowledged (or not logged): a later batch's
                        # acknowledgement covers these records (an unacknowledged tail is
                        # allowed); a torn log line goes
                        if exc.errno != errno.ENOSPC:
                            raise
                        os.ftruncate(log, logged)
                        _full(f"records up to {seq} written, not acknowledged")
                        if full_since is None:
                            full_since = time.time()
                            _say_full(directory, full_since)
                    else:
                        if full_since is not None:
                            full_since = None
                            _say_full(directory, None)
                time.sleep(batch_s)
        finally:
            os.close(log)
    finally:
        os.close(fd)
    return seq


def _append(fd: int, data: bytes) -> None:
    """All of ``data`` written: a short write (a disk filling up) goes on where it stopped
    until the rest is written or the write fails."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _full(what: str) -> None:
    # stderr is app.log, on the full disk itself: a line it has no room for is not said
    with contextlib.suppress(OSError):
        print(f"app: no space left on the disk: {what}", file=sys.stderr, flush=True)


def background(directory: Path) -> int | None:
    """Detach (fork twice, a new session, stdio to ``app.log`` in ``directory``): returns
    the daemon's pid in the caller, None in the daemon (which goes on to run)."""
    directory.mkdir(parents=True, exist_ok=True)
    r, w = os.pipe()
    if os.fork() > 0:  # the caller: wait for the daemon's pid (or why it did not start)
        os.close(w)
        with os.fdopen(r) as f:
            said = f.read()
        if not said.isdigit():
            raise SystemExit(f"app: {directory}: the writer did not start: "
                             f"{said or 'it exited without a word'}")
        return int(said)
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    try:
        write_pid(directory, PidFile(os.getpid(), _boot_id(), None))
    except OSError as exc:
        os.write(w, f"no app.pid ({exc.strerror})".encode())
        os._exit(1)
    log = os.open(directory / "app.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.write(w, str(os.getpid()).encode())
    os.close(w)
    return None


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (an exited process its parent has not reaped yet does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _is_app(pid: int) -> bool:
    """Whether ``pid`` runs this program's writer: ``app.py run`` or ``app.py resume``, not
    another command of it such as ``app.py status`` (a pid file left by a VM stopped hard
    may name another process of a later boot)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    name = Path(__file__).name.encode()
    at = [i for i, a in enumerate(argv) if os.path.basename(a) == name]
    return bool(at) and argv[at[0] + 1:at[0] + 2] in ([b"run"], [b"resume"])


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def daemon(directory: Path) -> int | None:
    """The pid of ``directory``'s writer when it runs in this boot. The pid file records
    the boot: one left by a VM stopped hard names no writer, whatever process of a later
    boot has that pid now (with a guest's same boot sequence, it can be this very
    command, started to run the writer again)."""
    rec = _writer(directory)
    return rec.pid if rec is not None else None


def _writer(directory: Path) -> PidFile | None:
    """``directory``'s pid file when it names a writer running in this boot (see
    :func:`daemon`), read once."""
    rec = read_pid(directory)
    if rec is None or rec.pid <= 0 or (rec.boot and rec.boot != _boot_id()):
        return None
    if rec.pid == os.getpid() or not alive(rec.pid) or not _is_app(rec.pid):
        return None
    return rec


def _stopped(directory: Path) -> None:
    """``app.pid`` names no writer any more (rewritten in place, where there is one)."""
    if (directory / "app.pid").exists():
        with contextlib.suppress(OSError):
            write_pid(directory, PidFile(0, "", None))


def status(directory: Path) -> dict[str, object]:
    """The last acknowledgement; the writer's pid (None: none runs) and since when its
    disk has been full (None: it is not, or none runs)."""
    acked = read_acked(directory)
    rec = _writer(directory)
    return {"last_acked": acked.seq, "acked_at": acked.at,
            "writer": rec.pid if rec is not None else None,
            "full_since": rec.full_since if rec is not None else None}


def stop(directory: Path, timeout: float = 10.0) -> dict[str, object]:
    """Stop the daemon of ``directory`` (SIGTERM: it finishes its batch; one still running
    after ``timeout`` is killed: its last acknowledgement is read once it is gone, never
    while it can still write one); its last acknowledgement, and since when its disk had
    been full."""
    before = _writer(directory)
    pid = before.pid if before is not None else None
    if pid is not None:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pid = None
    killed = False
    if pid is not None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and alive(pid):
            time.sleep(0.05)
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            killed = True
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and alive(pid):
                time.sleep(0.05)
    _stopped(directory)  # (none ran: a pid file of an earlier boot names no writer now)
    acked = read_acked(directory)
    return {"stopped": pid is not None, "killed": killed, "last_acked": acked.seq,
            "acked_at": acked.at,
            "full_since": before.full_since if before is not None else None}


def parse_rate(text: str) -> float:
    """``1MiB/s``, ``512KiB/s``, ``100K`` (per second) as bytes per second."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(B|KiB|MiB|GiB|K|M|G)?(?:/s)?\s*", text)
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate (like 1MiB/s)")
    return float(m.group(1)) * _UNITS[m.group(2) or "B"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="app.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="write records until SIGTERM")
    r.add_argument("--rate", type=parse_rate, default=parse_rate("256KiB/s"))
    r.add_argument("--seconds", type=float, default=None, help="stop after this long")
    r.add_argument("--background", action="store_true",
                   help="detach (log and pid in --dir); print the daemon's pid")
    v = sub.add_parser("verify")
    v.add_argument("--upto", type=int, default=None,
                   help="records 1 to N only, against that acknowledgement")
    s = sub.add_parser("resume", help="run in the background at the rate it last had")
    s.add_argument("--check", choices=("all", "tail"), default="all",
                   help="before the start, every record (all) or the last acknowledged one "
                        "and what follows it (tail: the rest is checked after the start)")
    for p in (r, sub.add_parser("status"), v,
              sub.add_parser("stop", help="stop the background writer"), s):
        p.add_argument("--dir", type=Path, required=True)
    args = ap.parse_args(argv)
    checked: dict[str, object] | None = None  # what a background start verified
    resuming = args.cmd == "resume"
    if resuming:  # as it ran before (a cutover's destination starts it so)
        try:
            args.rate = float(json.loads((args.dir / "app.json").read_text())["rate"])
        except (FileNotFoundError, ValueError, KeyError) as exc:
            raise SystemExit(f"app: {args.dir}: no rate to resume with ({exc})") from None
        args.cmd, args.background, args.seconds = "run", True, None
    if args.cmd == "run" and args.background:
        running = daemon(args.dir)
        if running is not None:
            raise SystemExit(f"app: {args.dir}: already written by pid {running}")
        verified = verify(args.dir, tail=getattr(args, "check", "all") == "tail")
        if not verified["ok"]:  # refused here, where the caller sees it
            raise SystemExit(f"app: {args.dir}: acknowledged data is missing: "
                             f"{json.dumps(verified)}")
        args.dir.mkdir(parents=True, exist_ok=True)
        if not resuming:  # (a resume's rate is the one recorded: a full disk keeps it)
            try:
                _durable(args.dir / "app.json", json.dumps({"rate": args.rate}) + "\n")
            except OSError as exc:
                raise SystemExit(f"app: {args.dir}: its rate not recorded: {exc.strerror}"
                                 ) from None
        pid = background(args.dir)
        if pid is not None:
            # the check it started on: a cutover records it as the destination's check
            print(json.dumps({"pid": pid, "verified": verified}))
            return 0
        checked = verified
    if args.cmd == "stop":
        print(json.dumps(stop(args.dir)))
        return 0
    if args.cmd == "run":
        last = run(args.dir, args.rate, stop_after=args.seconds, checked=checked)
        with contextlib.suppress(OSError):  # (a daemon's stdout is app.log, maybe full)
            print(json.dumps({"last_acked": last}), flush=True)
        return 0
    if args.cmd == "status":
        print(json.dumps(status(args.dir)))
        return 0
    result = verify(args.dir, upto=args.upto)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
