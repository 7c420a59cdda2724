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
import ipaddress
import os
import re
from pathlib import Path

from labctl.core.errors import StorageNodeError
from labctl.core.proc import run

EXPORTS = Path("/etc/exports.d/labctl.exports")
_PATH_RE = re.compile(r"^/[A-Za-z0-9_./-]+$")
NFSD_THREADS = 8


class NfsServer:
    """Starts the daemons once and keeps the export table (path -> client addresses)."""

    def __init__(self, exports_file: Path = EXPORTS) -> None:
        self.exports_file = exports_file
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
            await run(["rpcbind"], timeout=60, what="rpcbind")
            await run(["rpc.mountd", "--no-nfs-version", "4"], timeout=60, what="rpc.mountd")
            await run(["rpc.nfsd", "--no-nfs-version", "4", str(NFSD_THREADS)], timeout=60,
                      what="rpc.nfsd")
            self.started = True

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
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(source.encode(), target.encode(), fstype.encode(), 0, None) != 0:
        err = ctypes.get_errno()
        if err != errno.EBUSY:
            raise StorageNodeError(f"mount -t {fstype} {source} {target}: {os.strerror(err)}",
                                   fstype=fstype)
