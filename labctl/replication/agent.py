"""The replication agents, standard library only: the orchestrator copies this file and
``blocks.py`` into the source and the destination guest over their management channel,
runs them with the guest's ``python3``, and removes them after the cutover::

    python3 agent.py target --disk /dev/vda --listen 0.0.0.0:7900 --tls DIR --state DIR
    python3 agent.py pass   --disk /dev/nvme0n1 --to 10.1.2.101:7900 --tls DIR --state DIR
                            [--full] [--compress] [--limit BYTES_PER_S]
    python3 agent.py verify --disk /dev/nvme0n1 --to 10.1.2.101:7900 --tls DIR
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

**The channel**: mutual TLS (the lab's CA; each agent's certificate names its address), the
source connecting. Frames: kind (u8), a (u32), b (u64), then ``b`` bytes of payload for a
block. A block may go compressed (zlib) when that saves a tenth. ``--limit`` caps the
source's sending rate.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import ssl
import struct
import sys
import time
import zlib
from pathlib import Path

try:
    from labctl.replication import blocks
except ImportError:  # in a guest: blocks.py beside this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import blocks  # type: ignore[no-redef, import-not-found, unused-ignore]

_FRAME = struct.Struct(">BIQ")
HELLO, DIGESTS, BLOCK, ZBLOCK, FLUSH, BYE = 1, 2, 3, 4, 5, 6
_REPLY = struct.Struct(">Q")
#: the map is saved (after the target's fsync) at least every this many bytes sent
CHECKPOINT = 32 << 20
_WORTH = 0.9
DIGEST = 16
#: seconds a send or a reply may stall before the pass is given up (a cut WAN)
IO_TIMEOUT = 30.0


class AgentError(Exception):
    """A refusal or a broken channel, said in one line."""


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
def _serve_one(conn: ssl.SSLSocket, disk: Path) -> None:
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
                os.pwrite(fd, data, a * blocks.BLOCK)
                written += 1
                nbytes += len(data)
            elif kind == FLUSH:
                os.fsync(fd)
                _reply(conn, json.dumps({"blocks": written, "bytes": nbytes}).encode())
            elif kind == DIGESTS:
                _reply(conn, b"".join(blocks.digests(disk)))
            elif kind == BYE:
                return
            else:
                raise AgentError(f"unknown frame kind {kind}")
    finally:
        os.fsync(fd)
        os.close(fd)


def serve(disk: Path, listen: str, tls: Path, state: Path) -> None:
    host, _, port = listen.rpartition(":")
    ctx = _tls(tls, server=True)
    with socket.create_server((host or "0.0.0.0", int(port)), reuse_port=False) as srv:
        (state / "target.ready").write_text(f"{os.getpid()}\n")
        while True:
            raw, peer = srv.accept()
            try:
                with ctx.wrap_socket(raw, server_side=True) as conn:
                    _serve_one(conn, disk)
            except (ssl.SSLError, OSError, AgentError, ValueError, zlib.error) as exc:
                print(f"target: {peer[0]}: {exc}", flush=True)


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


# -- source ---------------------------------------------------------------------------------
def _connect(to: str, tls: Path, timeout: float = 15.0) -> ssl.SSLSocket:
    host, _, port = to.rpartition(":")
    raw = socket.create_connection((host, int(port)), timeout=timeout)
    raw.settimeout(IO_TIMEOUT)  # a cut WAN: the pass fails after this long without progress
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
    sock.settimeout(SCAN_TIMEOUT)
    raw = _read_reply(sock)
    sock.settimeout(IO_TIMEOUT)
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


def _save_map(state: Path, held: list[bytes]) -> None:
    tmp = state / "map.new"
    tmp.write_bytes(b"".join(held))
    os.replace(tmp, state / "map")


def _flush(sock: ssl.SSLSocket) -> None:
    sock.sendall(_FRAME.pack(FLUSH, 0, 0))
    _read_reply(sock)


def one_pass(disk: Path, to: str, tls: Path, state: Path, full: bool, compress: bool,
             limit: float | None) -> dict[str, object]:
    """One pass; what it saw and did."""
    t0 = time.monotonic()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    state.mkdir(parents=True, exist_ok=True)
    size = blocks.size_of(disk)
    count = (size + blocks.BLOCK - 1) // blocks.BLOCK
    with _connect(to, tls) as sock:
        _hello(sock, size)
        held = None if full else _load_map(state, count)
        how = "full" if full else "map"
        read = 0
        if full:
            held = _zero_map(size)  # a new target disk reads as zeros
        elif held is None:  # the map is gone (a reboot): what the target holds, by hashing
            held = _target_digests(sock, count)
            how = "rehash"
        t_digest = time.monotonic()
        now = blocks.digests(disk)
        read += size
        t_digest = time.monotonic() - t_digest
        todo = [i for i in range(count) if now[i] != held[i]]
        sent = wire = since_flush = 0
        t_send = time.monotonic()
        with open(disk, "rb", buffering=0) as f:
            for i in todo:
                f.seek(i * blocks.BLOCK)
                data = f.read(blocks.BLOCK)
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
                    since_flush = 0
                if limit:
                    ahead = wire / limit - (time.monotonic() - t_send)
                    if ahead > 0:
                        time.sleep(ahead)
        _flush(sock)
        _save_map(state, held)
        sock.sendall(_FRAME.pack(BYE, 0, 0))
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"how": how, "size": size, "blocks": len(todo), "bytes": sent, "wire_bytes": wire,
            "read_bytes": read, "seconds": round(time.monotonic() - t0, 3),
            "digest_seconds": round(t_digest, 3),
            "send_seconds": round(time.monotonic() - t_send, 3),
            "cpu_seconds": round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 3)}


def verify(disk: Path, to: str, tls: Path) -> dict[str, object]:
    """Every block's digest, here and there."""
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
    theirs = [raw[i:i + DIGEST] for i in range(0, len(raw), DIGEST)]
    differ = [i for i in range(count) if ours[i] != theirs[i]]
    return {"blocks": count, "equal": not differ, "differ": differ[:20],
            "differ_count": len(differ)}


def stop(state: Path, name: str = "target") -> dict[str, object]:
    try:
        pid = int((state / f"{name}.pid").read_text())
        os.kill(pid, signal.SIGTERM)
    except (FileNotFoundError, ValueError, ProcessLookupError):
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
    v = sub.add_parser("verify")
    for x in (p, v):
        x.add_argument("--to", required=True)
    for x in (t, p, v):
        x.add_argument("--disk", type=Path, required=True)
        x.add_argument("--tls", type=Path, required=True)
    s = sub.add_parser("stop")
    for x in (t, p, s):
        x.add_argument("--state", type=Path, required=True)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "target":
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
            print(json.dumps(one_pass(args.disk, args.to, args.tls, args.state, args.full,
                                      args.compress, args.limit)))
            return 0
        if args.cmd == "verify":
            result = verify(args.disk, args.to, args.tls)
            print(json.dumps(result))
            return 0 if result["equal"] else 1
        print(json.dumps(stop(args.state)))
        return 0
    except (AgentError, OSError, ssl.SSLError, ValueError) as exc:
        print(f"agent: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
