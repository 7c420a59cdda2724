"""The kernel NFS server of a storage node: started on first use, exports by address.

QEMU's ``nfs://`` driver (libnfs) speaks NFSv3 only and finds the MOUNT service through
the portmapper, so the node runs ``rpcbind``, ``rpc.mountd`` and ``rpc.nfsd`` with v3 on
(v4 off: no client tracking daemon to wait for). Exports are written to one exports file
of their own and applied with ``exportfs -ra``; each names exactly the client addresses
allowed (``rw,sync,no_root_squash``: QEMU runs as root on the hosts).

Standard library plus :mod:`labctl.core`: it runs inside the storage node.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from labctl.core.errors import StorageNodeError
from labctl.core.proc import process_identity, run

EXPORTS = Path("/etc/exports.d/labctl.exports")
_PATH_RE = re.compile(r"^/[A-Za-z0-9_./-]+$")
NFSD_THREADS = 8


#: on a machine: which of the NFS daemons this node's agent started (``STARTED`` in its
#: state directory), so that teardown stops those and no other
STARTED = "nfs-started.json"


class NfsServer:
    """Starts the daemons once and keeps the export table (path -> client addresses).

    In a node VM the daemons are the VM's own. On a machine (``state``: the node's
    directory there) the daemons another service or an earlier agent of the node runs are
    used as they are; those this agent starts run in the foreground in a session of their
    own, and their identities (PID and start time) are recorded for teardown."""

    def __init__(self, exports_file: Path = EXPORTS, state: Path | None = None) -> None:
        self.exports_file = exports_file
        self.state = state
        self.exports: dict[str, list[str]] = {}
        self.started = False
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        async with self._lock:
            if self.started:
                return
            await run(["modprobe", "nfsd"], timeout=60, what="modprobe nfsd")
            _mount("nfsd", "/proc/fs/nfsd", "nfsd")
            _mount("rpc_pipefs", "/run/rpc_pipefs", "rpc_pipefs")
            for d in ("/var/lib/nfs", "/var/lib/nfs/sm", "/run/rpcbind"):
                os.makedirs(d, exist_ok=True)
            self.exports_file.parent.mkdir(parents=True, exist_ok=True)
            if not self.exports_file.exists():
                self.exports_file.write_text("")
            if self.state is None:
                await run(["rpcbind"], timeout=60, what="rpcbind")
                await run(["rpc.mountd", "--no-nfs-version", "4"], timeout=60,
                          what="rpc.mountd")
            else:
                await self._start_on_machine(self.state)
            await run(["rpc.nfsd", "--no-nfs-version", "4", str(NFSD_THREADS)], timeout=60,
                      what="rpc.nfsd")
            self.started = True

    async def _start_on_machine(self, state: Path) -> None:
        record: dict[str, str] = {}
        with contextlib.suppress(OSError, ValueError):
            record = json.loads((state / STARTED).read_text())
        for service, argv in (("portmapper", ["rpcbind", "-f"]),
                              ("mountd", ["rpc.mountd", "-F", "--no-nfs-version", "4"])):
            if service in await registered():
                continue
            with open(state / f"{argv[0]}.log", "ab") as out:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=out, start_new_session=True, close_fds=True)
            identity = process_identity(proc.pid)
            if identity is not None:
                record[argv[0]] = identity
            _save(state / STARTED, record)
            for _ in range(100):  # until it registered with the portmapper
                if service in await registered() or proc.poll() is not None:
                    break
                await asyncio.sleep(0.1)
            if proc.poll() is not None:
                raise StorageNodeError(f"{argv[0]} ended at once (exit status {proc.returncode}"
                                       f"): see {state / (argv[0] + '.log')}", argv=argv)
        record["nfsd"] = record.get("nfsd") or ("" if _nfsd_threads() else "started")
        _save(state / STARTED, record)

    async def export(self, path: str, clients: list[str]) -> None:
        """Export ``path`` to exactly ``clients`` (IPv4 addresses); none: not exported."""
        check_export_path(path)
        checked = sorted({str(ipaddress.IPv4Address(c)) for c in clients})
        await self.start()
        async with self._lock:
            if checked:
                self.exports[path] = checked
            else:
                self.exports.pop(path, None)
            await self._apply()

    async def unexport(self, path: str) -> None:
        async with self._lock:
            if self.exports.pop(path, None) is not None and self.started:
                await self._apply()

    async def _apply(self) -> None:
        tmp = self.exports_file.with_suffix(".tmp")
        tmp.write_text(render_exports(self.exports))
        os.replace(tmp, self.exports_file)
        await run(["exportfs", "-ra"], timeout=60, what="exportfs -ra")


async def registered() -> set[str]:
    """The RPC services the portmapper lists here (empty: no portmapper answers)."""
    got = await run(["rpcinfo", "-p", "127.0.0.1"], timeout=30, check=False, what="rpcinfo")
    return services(got.stdout) if got.ok else set()


def services(listing: str) -> set[str]:
    """The service names of an ``rpcinfo -p`` listing (its fifth column; the header and
    lines of programs without a name skipped)."""
    names = set()
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[0].isdigit():
            names.add(fields[4])
    return names


def _nfsd_threads() -> int:
    try:
        return int(Path("/proc/fs/nfsd/threads").read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def _save(path: Path, record: dict[str, str]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, path)


def unmount_served(mount: Path, tries: int = 20) -> str | None:
    """Unmount a filesystem nfsd served (told first to let go of the files it keeps open
    a while), trying again every 0.5 s; None once unmounted, else umount's last words."""
    said = ""
    for attempt in range(tries):
        with contextlib.suppress(OSError):
            Path("/proc/fs/nfsd/unlock_filesystem").write_text(str(mount))
        done = subprocess.run(["umount", str(mount)], check=False, capture_output=True,
                              text=True, timeout=120)
        if done.returncode == 0:
            return None
        said = done.stderr.strip()
        if attempt < tries - 1:
            time.sleep(0.5)
    return said


def release_machine(state: Path, exports_file: Path, mounts: list[Path]) -> list[str]:
    """At a machine's node teardown (its agent stopped): its exports file removed and the
    table applied again, its file datastores' filesystems unmounted; then, when nothing
    is exported on the machine any more, the daemons this node's agents started (by
    their recorded identities), and nfsd's threads if they started them. One line each."""
    removed: list[str] = []
    if exports_file.exists():
        exports_file.unlink()
        removed.append(f"exports file {exports_file}")
        subprocess.run(["exportfs", "-ra"], check=False, capture_output=True, timeout=60)
    for mount in mounts:
        problem = unmount_served(mount)
        if problem is not None:
            raise StorageNodeError(f"cannot unmount {mount}: {problem}", mount=str(mount))
        removed.append(f"mount {mount}")
        mount.rmdir()
    try:
        record: dict[str, str] = json.loads((state / STARTED).read_text())
    except (OSError, ValueError):
        return removed
    listed = subprocess.run(["exportfs", "-s"], check=False, capture_output=True, text=True,
                            timeout=60)
    if listed.returncode == 0 and listed.stdout.strip():
        return removed  # something else is exported here: the daemons serve it
    if record.get("nfsd"):
        subprocess.run(["rpc.nfsd", "0"], check=False, capture_output=True, timeout=60)
        removed.append("nfsd threads (rpc.nfsd 0)")
    for name in ("rpc.mountd", "rpcbind"):
        identity = record.get(name, "")
        pid = int(identity.split(":")[0]) if identity else 0
        if pid and process_identity(pid) == identity:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
                removed.append(f"process {pid} ({name})")
    (state / STARTED).unlink(missing_ok=True)
    return removed


def check_export_path(path: str) -> str:
    if not _PATH_RE.match(path) or "/../" in path + "/" or path.endswith("/.."):
        raise StorageNodeError(f"bad export path {path!r}", path=path)
    return path


def render_exports(exports: dict[str, list[str]]) -> str:
    """The exports file: one line per path, one entry per client address."""
    lines = ["# written by the labctl storage agent: one line per file datastore"]
    for path in sorted(exports):
        opts = "rw,sync,no_root_squash,no_subtree_check,insecure"
        lines.append(path + " " + " ".join(f"{c}({opts})" for c in exports[path]))
    return "\n".join(lines) + "\n"


def _mount(source: str, target: str, fstype: str) -> None:
    import ctypes  # noqa: PLC0415 (only inside the node)
    import errno  # noqa: PLC0415

    os.makedirs(target, exist_ok=True)
    if os.path.ismount(target):  # a machine's systemd may have mounted it
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(source.encode(), target.encode(), fstype.encode(), 0, None) != 0:
        err = ctypes.get_errno()
        if err != errno.EBUSY:
            raise StorageNodeError(f"mount -t {fstype} {source} {target}: {os.strerror(err)}",
                                   fstype=fstype)
