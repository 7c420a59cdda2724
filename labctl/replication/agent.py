"""The replication agents, standard library only: the orchestrator copies this file and
``blocks.py`` into the source and the destination guest over their management channel,
runs them with the guest's ``python3``, and removes them after the cutover::

    python3 agent.py target --disk /dev/vda --listen 0.0.0.0:7900 --tls DIR --state DIR
    python3 agent.py pass   --disk /dev/mapper/root --to 10.1.2.101:7900 --tls DIR --state DIR
                            [--full] [--tracking era|hash] [--compress] [--limit BYTES_PER_S]
    python3 agent.py verify --disk /dev/mapper/root --to 10.1.2.101:7900 --tls DIR
    python3 agent.py untrack --state DIR
    python3 agent.py stop   --state DIR

``target`` detaches and serves one source at a time: blocks written where they belong,
fsynced on a flush, its disk's digests on request. ``pass`` runs one replication pass from
the source and prints what it did as one JSON line. ``verify`` compares every block's
digest on both sides.

**What changed** (hash tracking): the source keeps, in its state directory, the digest of
every block *as the target holds it* (after pass 1: the digests of what it sent, and the
zero block's elsewhere, the target disk being new). A pass digests the source disk, sends
the blocks whose digest differs from that map, and records the digest of the bytes it
sent. The map is saved at every flush (each :data:`CHECKPOINT` bytes), so a pass cut short
(a WAN cut, a killed agent) resumes where its last flush left it; a source that lost its
map (a reboot: the state directory is on tmpfs) asks the target for its digests first.

**What changed** (era tracking, :class:`Era`): the source's root disk is the device-mapper
map ``root`` (its initramfs made it linear); pass 1 swaps that table for a dm-era table live
(its metadata on a loop device over a file in the state directory) before it reads a
block. A later pass asks dm-era which blocks were written since the era the previous pass
began in (a metadata snapshot read by ``era_invalidate``) and reads only those: no scan of
the disk. The blocks a pass still has to send are saved at every flush, so a cut pass
resumes with them. A reboot brings the root back linear and empties the state directory:
the next pass finds no tracker, starts one, and falls back to the rehash pass above.

**The channel**: mutual TLS (the lab's CA; each agent's certificate names its address), the
source connecting. Frames: kind (u8), a (u32), b (u64), then ``b`` bytes of payload for a
block. A block may go compressed (zlib) when that saves a tenth. ``--limit`` caps the
source's sending rate.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

try:
    from labctl.replication import blocks
except ImportError:  # in a guest: blocks.py beside this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import blocks  # type: ignore[no-redef, import-not-found, unused-ignore]

_FRAME = struct.Struct(">BIQ")
HELLO, DIGESTS, BLOCK, ZBLOCK, FLUSH, BYE, SOME_DIGESTS = 1, 2, 3, 4, 5, 6, 7
_INDEX = struct.Struct(">I")
_REPLY = struct.Struct(">Q")
#: the map is saved (after the target's fsync) at least every this many bytes sent
CHECKPOINT = 32 << 20
_WORTH = 0.9
DIGEST = 16
#: seconds a send or a reply may stall before the pass is given up (a cut WAN); a pass's
#: ``--stall`` says otherwise
IO_TIMEOUT = 30.0


class DeadlineCut(Exception):
    """The pass's time (``--until``) ran out: it stops at the next block, after a flush."""


class AgentError(Exception):
    """A refusal or a broken channel, said in one line."""


class PassCut(AgentError):
    """A pass that did not finish, with how far it got: what its last flush made durable
    on the target (a later pass does not send it again)."""

    def __init__(self, message: str, progress: dict[str, object]) -> None:
        super().__init__(message)
        self.progress = progress


# -- TLS ------------------------------------------------------------------------------------
def _tls(directory: Path, server: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    ctx.load_verify_locations(directory / "ca.pem")
    ctx.verify_mode = ssl.CERT_REQUIRED  # both ends: a certificate of the lab's CA
    if not server:
        ctx.check_hostname = True  # the target's certificate names its address
    return ctx


def _recv_exact(sock: ssl.SSLSocket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise AgentError("the channel closed")
        buf += chunk
    return bytes(buf)


def _reply(sock: ssl.SSLSocket, payload: bytes) -> None:
    sock.sendall(_REPLY.pack(len(payload)) + payload)


def _read_reply(sock: ssl.SSLSocket) -> bytes:
    (n,) = _REPLY.unpack(_recv_exact(sock, _REPLY.size))
    return _recv_exact(sock, n)


# -- target ---------------------------------------------------------------------------------
class _Turn:
    """Whose turn it is to write the target disk: the newest connection's. A source whose
    WAN was cut cannot say goodbye; its connection would hold the target for ever, so a
    new one takes over, and the old one's thread writes nothing more (each write checks
    the turn under the lock the new connection took it with)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.turn = 0
        self.sock: socket.socket | None = None

    def take(self, sock: socket.socket) -> int:
        with self.lock:
            self.turn += 1
            if self.sock is not None:
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)  # its reader wakes up and ends
                except OSError:
                    pass
            self.sock = sock
            return self.turn

    def check(self, mine: int) -> None:
        if self.turn != mine:
            raise AgentError("a newer connection took over")


def _serve_one(conn: ssl.SSLSocket, disk: Path, turn: _Turn, mine: int) -> None:
    fd = os.open(disk, os.O_RDWR)
    size = os.lseek(fd, 0, os.SEEK_END)
    written = nbytes = 0
    try:
        while True:
            kind, a, b = _FRAME.unpack(_recv_exact(conn, _FRAME.size))
            if kind == HELLO:
                hello = json.loads(_recv_exact(conn, b))
                ok = hello.get("size") == size and hello.get("block") == blocks.BLOCK
                _reply(conn, json.dumps({"ok": ok, "size": size}).encode())
                if not ok:
                    return
            elif kind in (BLOCK, ZBLOCK):
                data = _recv_exact(conn, b)
                if kind == ZBLOCK:
                    data = zlib.decompress(data)
                if a * blocks.BLOCK + len(data) > size:
                    raise AgentError(f"block {a} past the end of {disk}")
                with turn.lock:
                    turn.check(mine)
                    os.pwrite(fd, data, a * blocks.BLOCK)
                written += 1
                nbytes += len(data)
            elif kind == FLUSH:
                turn.check(mine)
                os.fsync(fd)
                _reply(conn, json.dumps({"blocks": written, "bytes": nbytes}).encode())
            elif kind == DIGESTS:
                _reply(conn, b"".join(blocks.digests(disk)))
            elif kind == SOME_DIGESTS:  # the blocks the payload lists, in its order
                raw = _recv_exact(conn, b)
                wanted = [_INDEX.unpack_from(raw, k)[0] for k in range(0, len(raw), 4)]
                if any(i * blocks.BLOCK >= size for i in wanted):
                    raise AgentError("a block past the end of the disk was asked for")
                _reply(conn, b"".join(blocks.digest(data) for _, data in
                                      blocks.read_blocks(disk, wanted)))
            elif kind == BYE:
                return
            else:
                raise AgentError(f"unknown frame kind {kind}")
    finally:
        os.fsync(fd)
        os.close(fd)


def serve(disk: Path, listen: str, tls: Path, state: Path) -> None:
    """Serve sources, the newest connection's frames only (:class:`_Turn`), each in a
    thread: a stalled handshake or a dead peer never blocks the next source."""
    host, _, port = listen.rpartition(":")
    ctx = _tls(tls, server=True)
    turn = _Turn()

    def one(raw: socket.socket, peer: str) -> None:
        mine = turn.take(raw)
        raw.settimeout(SCAN_TIMEOUT)  # a peer silent this long is gone
        try:
            with ctx.wrap_socket(raw, server_side=True) as conn:
                _serve_one(conn, disk, turn, mine)
        except (ssl.SSLError, OSError, AgentError, ValueError, zlib.error) as exc:
            print(f"target: {peer}: {exc}", flush=True)
        finally:
            raw.close()

    with socket.create_server((host or "0.0.0.0", int(port)), reuse_port=False) as srv:
        (state / "target.ready").write_text(f"{os.getpid()}\n")
        while True:
            raw, peer = srv.accept()
            threading.Thread(target=one, args=(raw, peer[0]), daemon=True).start()


def detach(state: Path, name: str) -> int | None:
    """Fork into the background (a new session, stdio to ``<name>.log`` in ``state``): the
    daemon's pid in the caller, None in the daemon."""
    state.mkdir(parents=True, exist_ok=True)
    r, w = os.pipe()
    if os.fork() > 0:
        os.close(w)
        with os.fdopen(r) as f:
            return int(f.read() or "0")
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    (state / f"{name}.pid").write_text(f"{os.getpid()}\n")
    log = os.open(state / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.write(w, str(os.getpid()).encode())
    os.close(w)
    return None


# -- the write tracker -----------------------------------------------------------------------
ERA_MAP = "root"
"""The device-mapper map the server's initramfs put its root disk under."""
ERA_META_BYTES = 16 << 20
_ERA_RANGE = re.compile(r'<range begin\s*=\s*"(\d+)"\s+end\s*=\s*"(\d+)"')
_ERA_BLOCK = re.compile(r'<block block\s*=\s*"(\d+)"')


def _cmd(*argv: str) -> str:
    ran = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    if ran.returncode != 0:
        raise AgentError(f"{' '.join(argv[:3])}: {ran.stderr.strip() or ran.returncode}")
    return ran.stdout


class Era:
    """dm-era under the root filesystem: which blocks were written since a pass began."""

    def __init__(self, state: Path, name: str = ERA_MAP) -> None:
        self.state, self.name = state, name
        self.file = state / "era.json"

    def _table(self) -> list[str]:
        return _cmd("dmsetup", "table", self.name).split()

    def _swap(self, table: str) -> None:
        _cmd("dmsetup", "load", self.name, "--table", table)
        _cmd("dmsetup", "suspend", self.name)
        _cmd("dmsetup", "resume", self.name)

    def era(self) -> int:
        # <metadata block size> <used>/<total> <current era> <held metadata root | ->
        return int(_cmd("dmsetup", "status", self.name).split()[5])

    def active(self) -> bool:
        return self.file.exists() and self._table()[2:3] == ["era"]

    def start(self) -> dict[str, object]:
        """Swap the linear table for an era table (fresh metadata); what it is tracking."""
        table = self._table()
        if table[2:3] != ["linear"] or len(table) != 5 or table[4] != "0":
            raise AgentError(f"the map {self.name} is not a linear map of a whole disk: "
                             f"{' '.join(table)}")
        length, origin = table[1], table[3]
        meta = self.state / "era.meta"
        with open(meta, "wb") as f:  # fresh (zeroed) metadata: dm-era formats it
            f.truncate(ERA_META_BYTES)
        loop = _cmd("losetup", "--find", "--show", str(meta)).strip()
        try:
            self._swap(f"0 {length} era {loop} {origin} {blocks.BLOCK // 512}")
        except AgentError:
            _cmd("losetup", "-d", loop)
            raise
        # which tracker this is: a new one counts its eras from the start again
        info = {"loop": loop, "origin": origin, "length": length, "since": self.era(),
                "id": os.urandom(8).hex()}
        self.file.write_text(json.dumps(info))
        return info

    def ident(self) -> str | None:
        """This tracker's identity (None: none runs, or one started before identities)."""
        try:
            got = json.loads(self.file.read_text()).get("id")
        except (FileNotFoundError, ValueError):
            return None
        return str(got) if got else None

    def written(self, since: int | None = None) -> tuple[list[int], int]:
        """The blocks written since the era saved by the last :meth:`commit` (or the start),
        or since the era ``since`` of this tracker, and the era to commit once they are
        safe elsewhere."""
        info = json.loads(self.file.read_text())
        if since is not None:
            info["since"] = since
        _cmd("dmsetup", "message", self.name, "0", "checkpoint")
        _cmd("dmsetup", "message", self.name, "0", "take_metadata_snap")
        try:
            now = self.era()  # later writes are in this era or after it
            xml = _cmd("era_invalidate", "--written-since", str(info["since"]),
                       "--metadata-snapshot", str(info["loop"]))
        finally:
            _cmd("dmsetup", "message", self.name, "0", "drop_metadata_snap")
        found: set[int] = set()
        for begin, end in _ERA_RANGE.findall(xml):
            found.update(range(int(begin), int(end)))
        found.update(int(b) for b in _ERA_BLOCK.findall(xml))
        return sorted(found), now

    def since(self) -> int:
        """The era the last :meth:`commit` saved: :meth:`written` says what came after it."""
        return int(json.loads(self.file.read_text())["since"])

    def commit(self, since: int) -> None:
        info = json.loads(self.file.read_text())
        info["since"] = since
        _replace(self.file, json.dumps(info).encode())

    def stop(self) -> bool:
        """The linear table back, the metadata gone; False when nothing was tracking."""
        if not self.file.exists():
            return False
        info = json.loads(self.file.read_text())
        if self._table()[2:3] == ["era"]:
            self._swap(f"0 {info['length']} linear {info['origin']} 0")
        _cmd("losetup", "-d", str(info["loop"]))
        self.file.unlink()
        (self.state / "era.meta").unlink(missing_ok=True)
        return True


def _load_pending(state: Path) -> list[int]:
    try:
        return [int(x) for x in (state / "pending").read_text().split()]
    except FileNotFoundError:
        return []


def _save_pending(state: Path, todo: list[int]) -> None:
    _replace(state / "pending", " ".join(map(str, todo)).encode())


# -- source ---------------------------------------------------------------------------------
def _connect(to: str, tls: Path, timeout: float = 15.0, stall: float = IO_TIMEOUT
             ) -> ssl.SSLSocket:
    host, _, port = to.rpartition(":")
    raw = socket.create_connection((host, int(port)), timeout=timeout)
    raw.settimeout(stall)  # a cut WAN: the pass fails after this long without progress
    return _tls(tls, server=False).wrap_socket(raw, server_hostname=host)


def _hello(sock: ssl.SSLSocket, size: int) -> None:
    body = json.dumps({"size": size, "block": blocks.BLOCK}).encode()
    sock.sendall(_FRAME.pack(HELLO, 0, len(body)) + body)
    answer = json.loads(_read_reply(sock))
    if not answer.get("ok"):
        raise AgentError(f"the target's disk has {answer.get('size')} bytes, the source's {size}")


#: how long a digest scan of the target may take (its whole disk is read)
SCAN_TIMEOUT = 1800.0


def _target_digests(sock: ssl.SSLSocket, count: int) -> list[bytes]:
    sock.sendall(_FRAME.pack(DIGESTS, 0, 0))
    stall = sock.gettimeout()
    sock.settimeout(SCAN_TIMEOUT)
    raw = _read_reply(sock)
    sock.settimeout(stall)
    if len(raw) != count * DIGEST:
        raise AgentError(f"the target sent {len(raw) // DIGEST} digests, not {count}")
    return [raw[i:i + DIGEST] for i in range(0, len(raw), DIGEST)]


def _zero_map(size: int) -> list[bytes]:
    count = (size + blocks.BLOCK - 1) // blocks.BLOCK
    out = [blocks.digest(bytes(blocks.BLOCK))] * count
    if count and size % blocks.BLOCK:
        out[-1] = blocks.digest(bytes(size % blocks.BLOCK))
    return out


def _load_map(state: Path, count: int) -> list[bytes] | None:
    try:
        raw = (state / "map").read_bytes()
    except FileNotFoundError:
        return None
    if len(raw) != count * DIGEST:
        return None
    return [raw[i:i + DIGEST] for i in range(0, len(raw), DIGEST)]


def _replace(path: Path, data: bytes) -> None:
    """``path`` replaced whole: written beside it, then renamed over it."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _save_map(state: Path, held: list[bytes]) -> None:
    _replace(state / "map", b"".join(held))


def _flush(sock: ssl.SSLSocket) -> None:
    sock.sendall(_FRAME.pack(FLUSH, 0, 0))
    _read_reply(sock)


def free_bytes(disk: Path, mounts: Path = Path("/proc/self/mounts")) -> int | None:
    """Bytes free to an unprivileged writer on the file system ``disk`` holds (where the
    application writes), None when ``disk`` is not mounted here."""
    return free_bytes_of(os.stat(disk).st_rdev, mounts)


def free_bytes_of(device: int, mounts: Path = Path("/proc/self/mounts")) -> int | None:
    """:func:`free_bytes` of the file system on device number ``device``: found by the
    device of each mount point, not by the name the mount table gives (the root a kernel
    mounted reads ``/dev/root`` there, a path that need not exist)."""
    for line in mounts.read_text().splitlines():
        fields = line.split()
        if len(fields) < 2:
            continue
        # the mount table escapes blanks in mount points as octal (\040)
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
        try:
            if os.stat(point).st_dev != device:
                continue
            st = os.statvfs(point)
        except OSError:  # a mount point this process cannot reach
            continue
        return st.f_bavail * st.f_frsize
    return None


def one_pass(disk: Path, to: str, tls: Path, state: Path, full: bool, compress: bool,
             limit: float | None, tracking: str = "hash", stall: float = IO_TIMEOUT,
             until: float | None = None) -> dict[str, object]:
    """One pass; what it saw and did. ``until``: seconds this pass may take; past them it
    stops at the next block, what it sent flushed and mapped (a :class:`PassCut` whose
    progress says ``deadline``)."""
    t0 = time.monotonic()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    state.mkdir(parents=True, exist_ok=True)
    size = blocks.size_of(disk)
    count = (size + blocks.BLOCK - 1) // blocks.BLOCK
    era = Era(state) if tracking == "era" else None
    # ``how`` stays None until the pass knows it (a failure before that, at its connection,
    # began nothing: no new tracker)
    progress: dict[str, object] = {"how": None, "todo_blocks": 0, "carried_blocks": 0,
                                   "flushed_blocks": 0, "flushed_bytes": 0}
    try:
        return _pass(disk, to, tls, state, full, compress, limit, era, size, count, t0, cpu0,
                     progress, stall, None if until is None else t0 + until)
    except DeadlineCut:
        progress.update(deadline=True, free_bytes=free_bytes(disk),
                        seconds=round(time.monotonic() - t0, 3))
        raise PassCut(f"its time ({until:g} s) ran out", progress) from None
    except (AgentError, OSError, ssl.SSLError) as exc:
        raise PassCut(str(exc) or type(exc).__name__, progress) from exc


def _pass(disk: Path, to: str, tls: Path, state: Path, full: bool, compress: bool,
          limit: float | None, era: Era | None, size: int, count: int, t0: float,
          cpu0: resource.struct_rusage, progress: dict[str, object], stall: float,
          end: float | None) -> dict[str, object]:
    with _connect(to, tls, stall=stall) as sock:
        _hello(sock, size)
        held = None if full else _load_map(state, count)
        read = 0
        t_digest = time.monotonic()
        commit: int | None = None
        era_since: int | None = None
        if era is not None and not full and held is not None and era.active():
            how = "era"  # the tracker says what changed: no scan
            era_since = era.since()
            written, commit = era.written()
            carried = _load_pending(state)
            progress["carried_blocks"] = len(carried)
            todo = sorted(set(written) | set(carried))
        else:
            if full:
                how, held = "full", _zero_map(size)  # a new target disk reads as zeros
            elif held is None:  # the map is gone (a reboot): what the target holds
                how, held = "rehash", _target_digests(sock, count)
            else:
                how = "map"
            if era is not None:  # track from before the scan (again, after a reboot)
                era.stop()
                era.start()
            now = blocks.digests(disk)
            read += size
            todo = [i for i in range(count) if now[i] != held[i]]
        assert held is not None
        progress["how"] = how  # a failed attempt's too: a full, map or rehash pass began a
        progress["todo_blocks"] = len(todo)  # new tracker
        _save_pending(state, todo)
        _replace(state / "last-todo", " ".join(map(str, todo)).encode())  # what a tracked
        # verification of this pass reads
        if era is not None and commit is not None:  # those blocks are pending now: the era
            era.commit(commit)  # may move on
        t_digest = time.monotonic() - t_digest
        sent = wire = since_flush = 0
        t_send = time.monotonic()
        with blocks.Reader(disk) as reader:
            for k, i in enumerate(todo):
                if end is not None and time.monotonic() >= end:
                    _flush(sock)  # what was sent is durable there and mapped here
                    _save_map(state, held)
                    _save_pending(state, todo[k:])
                    progress["flushed_blocks"], progress["flushed_bytes"] = k, sent
                    sock.sendall(_FRAME.pack(BYE, 0, 0))
                    raise DeadlineCut
                data = reader.read(i)
                read += len(data)
                kind, payload = BLOCK, data
                if compress:
                    packed = zlib.compress(data, 1)
                    if len(packed) < len(data) * _WORTH:
                        kind, payload = ZBLOCK, packed
                sock.sendall(_FRAME.pack(kind, i, len(payload)) + payload)
                held[i] = blocks.digest(data)
                sent += len(data)
                wire += len(payload)
                since_flush += len(payload)
                if since_flush >= CHECKPOINT:
                    _flush(sock)
                    _save_map(state, held)
                    _save_pending(state, todo[k + 1:])
                    progress["flushed_blocks"], progress["flushed_bytes"] = k + 1, sent
                    since_flush = 0
                if limit:
                    ahead = wire / limit - (time.monotonic() - t_send)
                    if ahead > 0:
                        time.sleep(ahead)
        _flush(sock)
        _save_map(state, held)
        _save_pending(state, [])
        sock.sendall(_FRAME.pack(BYE, 0, 0))
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"how": how, "era_since": era_since,
            "tracker": era.ident() if era is not None else None, "size": size,
            "blocks": len(todo), "bytes": sent, "wire_bytes": wire,
            "carried_blocks": progress["carried_blocks"],
            "read_bytes": read, "seconds": round(time.monotonic() - t0, 3),
            "digest_seconds": round(t_digest, 3),
            "send_seconds": round(time.monotonic() - t_send, 3),
            "cpu_seconds": round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 3),
            "free_bytes": free_bytes(disk)}


def _all_digests(disk: Path, to: str, tls: Path) -> tuple[list[bytes], list[bytes]]:
    """Every block's digest, here and there (both disks read whole, at once)."""
    size = blocks.size_of(disk)
    count = (size + blocks.BLOCK - 1) // blocks.BLOCK
    with _connect(to, tls) as sock:
        _hello(sock, size)
        sock.sendall(_FRAME.pack(DIGESTS, 0, 0))  # it digests its disk while we do ours
        ours = blocks.digests(disk)
        sock.settimeout(SCAN_TIMEOUT)
        raw = _read_reply(sock)
        sock.sendall(_FRAME.pack(BYE, 0, 0))
    if len(raw) != count * DIGEST:
        raise AgentError(f"the target sent {len(raw) // DIGEST} digests, not {count}")
    return ours, [raw[i:i + DIGEST] for i in range(0, len(raw), DIGEST)]


def _some_digests(disk: Path, to: str, tls: Path, wanted: list[int]
                  ) -> tuple[list[bytes], list[bytes]]:
    """The digests of the blocks ``wanted``, here and there."""
    size = blocks.size_of(disk)
    with _connect(to, tls) as sock:
        _hello(sock, size)
        body = b"".join(_INDEX.pack(i) for i in wanted)
        sock.sendall(_FRAME.pack(SOME_DIGESTS, 0, len(body)) + body)
        ours = [blocks.digest(data) for _, data in blocks.read_blocks(disk, wanted)]
        sock.settimeout(SCAN_TIMEOUT)
        raw = _read_reply(sock)
        sock.sendall(_FRAME.pack(BYE, 0, 0))
    if len(raw) != len(wanted) * DIGEST:
        raise AgentError(f"the target sent {len(raw) // DIGEST} digests, not {len(wanted)}")
    return ours, [raw[i:i + DIGEST] for i in range(0, len(raw), DIGEST)]


def verify(disk: Path, to: str, tls: Path, only: list[int] | None = None) -> dict[str, object]:
    """Every block's digest compared here and there (``full``); with ``only``, the digests
    of those blocks alone (``tracked``: the rest was compared by :func:`precheck`)."""
    if only is None:
        ours, theirs = _all_digests(disk, to, tls)
        indexes = list(range(len(ours)))
    else:
        indexes = sorted(set(only))
        ours, theirs = _some_digests(disk, to, tls, indexes)
    differ = [indexes[k] for k in range(len(indexes)) if ours[k] != theirs[k]]
    return {"mode": "full" if only is None else "tracked", "blocks": len(indexes),
            "equal": not differ, "differ": differ[:20], "differ_count": len(differ)}


def precheck(disk: Path, to: str, tls: Path, state: Path) -> dict[str, object]:
    """Both disks compared whole while the source still runs (before its freeze): every
    block that differs must be one the tracker says was written since the last pass began
    its era (or one a cut pass left to send). What it found is saved for the cutover's
    tracked verification, which then reads only what was written since that era."""
    era = Era(state)
    if not era.active():
        raise AgentError("the write tracker is not running (a tracked verification needs "
                         "it): verify the whole disk instead")
    t0 = time.monotonic()
    since = era.since()
    ours, theirs = _all_digests(disk, to, tls)
    written, _now = era.written()  # read after the scan: the writes during it count
    pending = _load_pending(state)
    expected = set(written) | set(pending)
    differ = [i for i in range(len(ours)) if ours[i] != theirs[i]]
    unexplained = [i for i in differ if i not in expected]
    found: dict[str, object] = {
        "since": since, "tracker": era.ident(), "blocks": len(ours),
        "differ_count": len(differ), "written": len(written), "to_send": len(expected),
        "unexplained": unexplained[:20], "unexplained_count": len(unexplained),
        "seconds": round(time.monotonic() - t0, 3)}
    _replace(state / "precheck.json", json.dumps(found).encode())
    # what a pass cut short had left to send: it may differ, and is checked at the cutover
    _replace(state / "precheck-pending", " ".join(map(str, pending)).encode())
    return found


def since_precheck(state: Path, since: int, tracker: str) -> list[int]:
    """The blocks a tracked verification reads, the source frozen, when the precheck began
    at era ``since`` of the tracker that still runs: every block written since then, those
    a cut pass had left to send then, and those the final pass sent. The precheck found
    every other block equal on both sides, and nothing wrote them since; passes in between
    change nothing about that. ``tracker``: the precheck's tracker, which must be the one
    that runs (another counts its eras from the start again)."""
    era = Era(state)
    if not era.active():
        raise AgentError("the write tracker is not running: verify the whole disk instead")
    if era.ident() != tracker:
        raise AgentError(f"the write tracker {era.ident()} is not the precheck's ({tracker}): "
                         "verify the whole disk instead")
    try:
        left, sent = _indexes(state / "precheck-pending"), _indexes(state / "last-todo")
    except FileNotFoundError as exc:
        raise AgentError(f"no precheck and pass of this tracker to verify after: {exc}"
                         ) from None
    written, _now = era.written(since)
    return sorted(set(written) | set(left) | set(sent))


def _indexes(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()]


def running(state: Path, name: str = "target") -> int | None:
    """The pid of this state directory's ``name`` daemon when it is alive, else None."""
    try:
        pid = int((state / f"{name}.pid").read_text())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    # this agent running that command (not, say, ``agent.py stop --name pass``)
    at = [i for i, a in enumerate(argv) if os.path.basename(a) == b"agent.py"]
    return pid if at and argv[at[0] + 1:at[0] + 2] == [name.encode()] else None


def stop(state: Path, name: str = "target") -> dict[str, object]:
    """SIGTERM to this state directory's ``name`` process (the target's daemon, or a pass
    or precheck still running after its caller went away), if its command line is this
    agent's."""
    pid = running(state, name)
    if pid is None:
        return {"stopped": False}
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return {"stopped": False}
    (state / f"{name}.pid").unlink(missing_ok=True)
    return {"stopped": True, "pid": pid}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="agent.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("target")
    t.add_argument("--listen", required=True)
    p = sub.add_parser("pass")
    p.add_argument("--full", action="store_true")
    p.add_argument("--compress", action="store_true")
    p.add_argument("--limit", type=float, default=None)
    p.add_argument("--tracking", choices=("hash", "era"), default="hash")
    p.add_argument("--stall", type=float, default=IO_TIMEOUT,
                   help="seconds the channel may stall before the pass fails")
    p.add_argument("--until", type=float, default=None,
                   help="seconds this pass may take: then it stops, its progress flushed")
    v = sub.add_parser("verify")
    only = v.add_mutually_exclusive_group()
    only.add_argument("--only", type=Path, default=None,
                      help="a file of block indexes: compare only those")
    only.add_argument("--since-precheck", type=int, default=None, metavar="ERA",
                      help="a tracked verification: compare the blocks written since this "
                           "era, when the precheck began (with --state)")
    v.add_argument("--state", type=Path, default=None)
    v.add_argument("--tracker", default=None,
                   help="with --since-precheck: the precheck's tracker, which must still run")
    pc = sub.add_parser("precheck", help="compare both disks whole before the freeze; every "
                                          "difference must be a block the tracker saw written")
    sc = sub.add_parser("scan", help="digest every block of --disk, as a hash pass reads "
                                     "it; say how long that took")
    sc.add_argument("--disk", type=Path, required=True)
    sc.add_argument("--depth", type=int, default=blocks.SCAN_DEPTH)
    for x in (p, v, pc):
        x.add_argument("--to", required=True)
    for x in (t, p, v, pc):
        x.add_argument("--disk", type=Path, required=True)
        x.add_argument("--tls", type=Path, required=True)
    s = sub.add_parser("stop")
    s.add_argument("--name", choices=("target", "pass", "precheck"), default="target")
    u = sub.add_parser("untrack")
    for x in (t, p, s, u, pc):
        x.add_argument("--state", type=Path, required=True)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "target":
            alive = running(args.state)
            if alive is not None:  # asked again (after a failed pass): it is there
                print(json.dumps({"pid": alive, "already": True}))
                return 0
            args.state.mkdir(parents=True, exist_ok=True)
            (args.state / "target.ready").unlink(missing_ok=True)
            pid = detach(args.state, "target")
            if pid is not None:  # the caller: wait until it listens
                deadline = time.monotonic() + 10
                while not (args.state / "target.ready").exists():
                    if time.monotonic() > deadline:
                        raise AgentError("the target did not start listening within 10 s")
                    time.sleep(0.05)
                print(json.dumps({"pid": pid}))
                return 0
            serve(args.disk, args.listen, args.tls, args.state)
            return 0
        if args.cmd == "pass":
            args.state.mkdir(parents=True, exist_ok=True)
            # a pass whose caller went away (Ctrl-C, a deadline) is found and stopped by it
            (args.state / "pass.pid").write_text(f"{os.getpid()}\n")
            try:
                print(json.dumps(one_pass(args.disk, args.to, args.tls, args.state, args.full,
                                          args.compress, args.limit, args.tracking,
                                          args.stall, args.until)))
            except PassCut as exc:  # how far it got, for the record; the reason on stderr
                print(json.dumps({"failed": str(exc), **exc.progress}))
                raise
            finally:
                (args.state / "pass.pid").unlink(missing_ok=True)
            return 0
        if args.cmd == "verify":
            wanted = None if args.only is None else _indexes(args.only)
            if args.since_precheck is not None:
                if args.state is None or args.tracker is None:
                    raise AgentError("--since-precheck needs --state and --tracker")
                wanted = since_precheck(args.state, args.since_precheck, args.tracker)
            result = verify(args.disk, args.to, args.tls, wanted)
            print(json.dumps(result))
            return 0 if result["equal"] else 1
        if args.cmd == "precheck":
            # like a pass: found and stopped by its PID when its caller went away
            (args.state / "precheck.pid").write_text(f"{os.getpid()}\n")
            try:
                found = precheck(args.disk, args.to, args.tls, args.state)
            finally:
                (args.state / "precheck.pid").unlink(missing_ok=True)
            print(json.dumps(found))
            return 0 if not found["unexplained_count"] else 1
        if args.cmd == "scan":
            t0 = time.monotonic()
            cpu0 = resource.getrusage(resource.RUSAGE_SELF)
            got = blocks.digests(args.disk, depth=args.depth)
            cpu1 = resource.getrusage(resource.RUSAGE_SELF)
            print(json.dumps({
                "blocks": len(got), "depth": args.depth,
                "read_bytes": len(blocks.allocated(args.disk)) * blocks.BLOCK,
                "seconds": round(time.monotonic() - t0, 3),
                "cpu_seconds": round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime
                                     - cpu0.ru_stime, 3)}))
            return 0
        if args.cmd == "untrack":
            print(json.dumps({"untracked": Era(args.state).stop()}))
            return 0
        print(json.dumps(stop(args.state, args.name)))
        return 0
    except (AgentError, OSError, ssl.SSLError, ValueError, subprocess.SubprocessError) as exc:
        print(f"agent: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
