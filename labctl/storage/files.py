"""File datastores inside the storage node: an ext4 filesystem on the datastore's virtio
disk, its image files exported over NFSv3, and the **content ID** of every file on it.

Layout of a file datastore's filesystem (mounted at ``/srv/labctl/<name>``)::

    images/            the export: image files, flat (no subdirectories)
    .labctl/ids.json   content IDs, on the datastore itself (they travel with it)
    .labctl/incoming/  copies being received; never listed, never a match

**The content ID rule** (docs/chaincopy.md says the same for users):

* A file gets an ID (``cid.`` and 32 hex digits) the first time its ID is read.
* The agent watches the export with inotify (writes through NFS reach the server's VFS,
  so they raise ``IN_MODIFY`` like local ones). A write marks the file *changed*; the next
  read of its ID then draws a new one. So the ID changes exactly once after any number of
  writes that follow its last read or use: the first change after a read is what matters.
* A file written since its writer last closed it is *being written*: it has no usable ID
  (listed with ``content_id: null``) until quiesced.
* The agent also keeps each file's ``(inode, size, mtime, ctime)`` as the ID's stamp. A
  file whose stamp differs when its ID is read (written while the agent was not watching,
  for instance before a restart) gets a new ID too.
* A layer's content is its own data *and the content ID of its parent*, not the parent's
  path: a copy that is byte-identical, or identical but for its backing file's name
  re-pointed to a file with the same content ID (``qemu-img rebase -u``), carries its
  source's ID. Each file records the ID its parent had when the file's own ID was issued
  (``parent_content_id``); a parent whose ID moved on since is *stale* for that child.

Standard library only (plus ``qemu-img`` for ``rebase -u``): it runs inside the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import re
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from labctl.core.errors import StorageNodeError
from labctl.core.proc import run
from labctl.core.rpc import RpcClient, Stream
from labctl.drivers.lio import find_disk_by_serial
from labctl.drivers.nfsd import NfsServer, unmount_served
from labctl.drivers.qcow2 import ImageHeader, ImageHeaderError, parse_header
from labctl.drivers.sparse import (
    Digest,
    blocks,
    file_digest,
    receive_extents,
    send_extents,
)
from labctl.storage import protocol as p

log = logging.getLogger("labctl.storage.files")

FS_ROOT = Path("/srv/labctl")
IMAGES = "images"
META = ".labctl"
#: a copy whose source sends nothing for this long is given up (a cut link, a dead node)
STALL_S = 30.0
#: a file written and not closed is "being written" until this long after its last write
WRITE_QUIET_S = 10.0
_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")
_UUID_RE = re.compile(r"^[0-9a-f]{32}$")

IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_Q_OVERFLOW = 0x4000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_WATCH = IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE \
    | IN_DELETE
_EVENT = struct.Struct("iIII")


def regular(path: Path) -> os.stat_result | None:
    """``path``'s stat if it is a regular file itself (a symlink is not: a host can make one
    through NFS pointing anywhere on the node), else None."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def open_regular(path: Path) -> int:
    """A read-only descriptor of the regular file ``path``, never through a symlink."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise StorageNodeError(f"{path.name} is not a regular file of the datastore "
                               f"({exc.strerror})", file=path.name) from None


def header_of(path: Path) -> ImageHeader:
    fd = open_regular(path)
    try:
        return parse_header(os.pread(fd, 65536, 0), os.fstat(fd).st_size, path.name)
    finally:
        os.close(fd)


def link_into_place(tmp: Path, final: Path) -> None:
    """Put a finished file in place under its final name, never over a file that appeared
    there meanwhile (a host can create files through NFS at any time)."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise StorageNodeError(f"{final.name} appeared on the datastore while it was being "
                               "made: left alone, nothing written over it",
                               file=final.name) from None
    os.unlink(tmp)
    fsync_dir(final.parent)


def check_file_name(name: str) -> str:
    if not isinstance(name, str) or not _FILE_RE.match(name):
        raise StorageNodeError(f"bad file name {name!r}: 1-128 of A-Z a-z 0-9 _ . + - "
                               "(files of a datastore are flat)", file=name)
    return name


def new_content_id() -> str:
    return "cid." + os.urandom(16).hex()


# --- inotify (ctypes: the node has no pip packages) ---------------------------------------

class Inotify:
    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise StorageNodeError(f"inotify_init1: {os.strerror(ctypes.get_errno())}")
        self.fd: int = fd

    def add(self, path: Path) -> int:
        wd: int = self._libc.inotify_add_watch(self.fd, str(path).encode(), _WATCH)
        if wd < 0:
            raise StorageNodeError(f"inotify_add_watch {path}: "
                                   f"{os.strerror(ctypes.get_errno())}", path=str(path))
        return wd

    def remove(self, wd: int) -> None:
        self._libc.inotify_rm_watch(self.fd, wd)

    def read(self) -> list[tuple[int, int, str]]:
        """Every queued event as (wd, mask, name); [] when none is queued."""
        out: list[tuple[int, int, str]] = []
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            off = 0
            while off + _EVENT.size <= len(buf):
                wd, mask, _cookie, length = _EVENT.unpack_from(buf, off)
                raw = buf[off + _EVENT.size: off + _EVENT.size + length]
                out.append((wd, mask, raw.split(b"\0", 1)[0].decode(errors="replace")))
                off += _EVENT.size + length


# --- one datastore's IDs ------------------------------------------------------------------

@dataclass
class _Record:
    content_id: str
    stamp: list[int]
    parent_content_id: str | None = None
    issued_at: float = 0.0


@dataclass
class Filestore:
    """One mounted file datastore and the IDs of its files."""

    name: str
    mount: Path
    fs_uuid: str
    wd: int = -1
    records: dict[str, _Record] = field(default_factory=dict)
    #: written since the ID was last read (a new ID is drawn at the next read)
    changed: set[str] = field(default_factory=set)
    #: written since its writer last closed it (no usable ID)
    writing: dict[str, float] = field(default_factory=dict)
    #: files the agent itself is writing (its own writes do not change IDs)
    busy: set[str] = field(default_factory=set)
    #: file -> the VM that writes it (its top layer); kept on the datastore
    leases: dict[str, str] = field(default_factory=dict)
    clients: list[str] = field(default_factory=list)

    @property
    def images(self) -> Path:
        return self.mount / IMAGES

    @property
    def meta(self) -> Path:
        return self.mount / META

    @property
    def incoming(self) -> Path:
        return self.meta / "incoming"

    def path(self, name: str) -> Path:
        return self.images / check_file_name(name)

    def part(self, name: str) -> Path:
        """Where a new file ``name`` is made before it is linked into place: never listed,
        never a match; cleared when the datastore is mounted again."""
        return self.incoming / f"{check_file_name(name)}.{os.urandom(4).hex()}.part"

    # the ID database, on the datastore itself ---------------------------------------------

    def load(self) -> None:
        db = self.meta / "ids.json"
        try:
            data = json.loads(db.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            # unreadable: every file gets a new ID when next read (never a wrong match)
            log.error("%s: content ID database unreadable (%s): IDs start afresh", self.name, exc)
            return
        self.leases = {str(k): str(v) for k, v in dict(data.get("leases", {})).items()}
        for n, r in dict(data.get("files", {})).items():
            with contextlib.suppress(TypeError, KeyError):
                self.records[n] = _Record(str(r["content_id"]), [int(x) for x in r["stamp"]],
                                          r.get("parent_content_id"),
                                          float(r.get("issued_at", 0.0)))

    def save(self) -> None:
        db = self.meta / "ids.json"
        tmp = db.with_suffix(".tmp")
        data = {"datastore": self.name, "fs_uuid": self.fs_uuid,
                "files": {n: vars(r) for n, r in sorted(self.records.items())},
                "leases": dict(sorted(self.leases.items()))}
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, db)
        fsync_dir(self.meta)  # the rename too: a node stopped hard must not lose an ID

    # watching -----------------------------------------------------------------------------

    def on_event(self, mask: int, name: str) -> None:
        if not name or name in self.busy:
            return
        if mask & (IN_DELETE | IN_MOVED_FROM):
            self.leases.pop(name, None)
            self.records.pop(name, None)
            self.changed.discard(name)
            self.writing.pop(name, None)
            return
        if mask & (IN_MODIFY | IN_CREATE | IN_MOVED_TO | IN_ATTRIB):
            self.changed.add(name)
        if mask & IN_MODIFY:
            self.writing[name] = time.monotonic()
        if mask & IN_CLOSE_WRITE:
            self.writing.pop(name, None)

    # the rule -----------------------------------------------------------------------------

    def is_writing(self, name: str) -> bool:
        """Written since its writer last closed it, and not long ago (a truncate by path, an
        NFS size change, raise a write but never a close)."""
        at = self.writing.get(name)
        if at is not None and time.monotonic() - at > WRITE_QUIET_S:
            del self.writing[name]
            at = None
        return at is not None

    def content_id(self, name: str, parent: str | None) -> str | None:
        """The file's content ID as of now (drawing a new one if it changed since last read);
        None while it is being written. ``parent``: its parent's content ID as of now."""
        if self.is_writing(name) or name in self.leases:
            return None
        stamp = self.stamp(name)
        rec = self.records.get(name)
        if rec is None or name in self.changed or rec.stamp != stamp:
            rec = _Record(new_content_id(), stamp, parent, time.time())
            self.records[name] = rec
            self.changed.discard(name)
            self.save()
        return rec.content_id

    def set_record(self, name: str, content_id: str, parent: str | None) -> None:
        """The agent wrote ``name`` itself (a received copy): it carries ``content_id``."""
        self.records[name] = _Record(content_id, self.stamp(name), parent, time.time())
        self.changed.discard(name)
        self.writing.pop(name, None)
        self.save()

    def stamp(self, name: str) -> list[int]:
        """What tells a file changed while nobody watched: inode, size, mtime, ctime."""
        st = os.lstat(self.path(name))
        return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]

    def names(self) -> list[str]:
        return sorted(e.name for e in os.scandir(self.images)
                      if e.is_file(follow_symlinks=False) and _FILE_RE.match(e.name))

    def exists(self, name: str) -> bool:
        """Anything under that name, a symlink included."""
        return os.path.lexists(self.path(name))


# --- the agent's part ---------------------------------------------------------------------

class Filestores:
    """Every file datastore of the node; the NFS server; the watch; copies in and out."""

    def __init__(self, node: str, ip: str, secret: bytes, port: int,
                 root: Path = FS_ROOT, sys_block: Path = Path("/sys/block"),
                 find_disk: Callable[[str], str] | None = None,
                 nfs: NfsServer | None = None) -> None:
        self.node = node
        self.ip = ip
        self.port = port
        self._secret = secret
        self.root = root
        self.sys_block = sys_block
        #: a data disk's device by its serial: a VM's virtio disk, a machine's loop device
        self.find_disk = find_disk or (lambda serial: find_disk_by_serial(serial, sys_block))
        self.nfs = nfs or NfsServer()
        self.stores: dict[str, Filestore] = {}
        self._inotify: Inotify | None = None
        self._by_wd: dict[int, Filestore] = {}
        self._lock = asyncio.Lock()

    # lifecycle ----------------------------------------------------------------------------

    def _watch(self) -> Inotify:
        if self._inotify is None:
            self._inotify = Inotify()
            asyncio.get_running_loop().add_reader(self._inotify.fd, self.drain)
        return self._inotify

    def drain(self) -> None:
        """Apply every queued inotify event (also called right after the agent's own writes,
        before it stops ignoring the file: the kernel queues events at write time)."""
        if self._inotify is None:
            return
        for wd, mask, name in self._inotify.read():
            if mask & IN_Q_OVERFLOW:  # events were lost: every file counts as changed
                for each in self.stores.values():
                    each.changed.update(each.records)
                continue
            fs = self._by_wd.get(wd)
            if fs is not None:
                fs.on_event(mask, name)

    async def ensure(self, req: p.EnsureFilestore) -> p.FilestoreInfo:
        name = req.name
        fs_uuid = req.fs_uuid.lower().replace("-", "")
        if not _UUID_RE.match(fs_uuid):
            raise StorageNodeError(f"bad filesystem UUID {req.fs_uuid!r}", fs_uuid=req.fs_uuid)
        async with self._lock:
            created = False
            fs = self.stores.get(name)
            if fs is None:
                device = self.find_disk(req.disk_serial)
                mount = self.root / name
                if not _is_mounted(mount):
                    have = _ext4_uuid(device)
                    if have is None:
                        await run(["mkfs.ext4", "-q", "-F", "-U", _dashed(fs_uuid), "-L",
                                   name[:16], "-E", "lazy_itable_init=1,lazy_journal_init=1",
                                   device], timeout=300, what=f"mkfs.ext4 for {name}")
                        created = True
                    elif have != fs_uuid:
                        raise StorageNodeError(
                            f"the disk of {name} holds filesystem {have}, not {fs_uuid}: "
                            "refusing to use another datastore's disk", have=have,
                            want=fs_uuid)
                    mount.mkdir(mode=0o700, parents=True, exist_ok=True)
                    await run(["mount", "-t", "ext4", "-o", "noatime", device, str(mount)],
                              timeout=120, what=f"mount {name}")
                fs = Filestore(name, mount, fs_uuid)
                for d in (fs.images, fs.meta, fs.incoming):
                    d.mkdir(exist_ok=True)
                marker = fs.images / p.NFS_MARKER  # what hosts read to check the export
                if regular(marker) is None:
                    with contextlib.suppress(FileNotFoundError):
                        marker.unlink()  # not a regular file: replaced
                    marker.write_bytes(bytes(512))
                for partial in fs.incoming.iterdir():  # interrupted copies: never a match
                    partial.unlink()
                fs.load()
                fs.wd = self._watch().add(fs.images)
                self._by_wd[fs.wd] = fs
                self.stores[name] = fs
            fs.clients = sorted(set(req.clients))
        await self.nfs.export(str(fs.images), fs.clients)
        return self._info(fs, created)

    async def delete(self, name: str) -> p.FilestoreDeleted:
        """Unexport and unmount it; the agent forgets it only once it is unmounted (nfsd
        keeps files it served open a while: it is told to let go of the filesystem)."""
        async with self._lock:
            fs = self.stores.get(name)
            if fs is None:
                return p.FilestoreDeleted(name=name, deleted=False)
            if fs.leases:
                raise StorageNodeError(
                    f"{name} holds the disks of VM {', '.join(sorted(set(fs.leases.values())))}"
                    ": delete refused", datastore=name, leases=dict(fs.leases))
            await self.nfs.unexport(str(fs.images))
            fs.save()
            problem = await asyncio.to_thread(unmount_served, fs.mount)
            if problem is not None:
                await self.nfs.export(str(fs.images), fs.clients)  # as it was
                raise StorageNodeError(f"cannot unmount {name}: {problem}", datastore=name)
            del self.stores[name]
            if self._inotify is not None:
                self._inotify.remove(fs.wd)
                self._by_wd.pop(fs.wd, None)
            return p.FilestoreDeleted(name=name, deleted=True)

    def store(self, name: str) -> Filestore:
        fs = self.stores.get(name)
        if fs is None:
            raise StorageNodeError(f"no file datastore {name!r} on node {self.node} "
                                   f"(have: {', '.join(sorted(self.stores)) or 'none'})",
                                   datastore=name)
        return fs

    def _info(self, fs: Filestore, created: bool = False) -> p.FilestoreInfo:
        st = os.statvfs(fs.mount)
        return p.FilestoreInfo(name=fs.name, export=str(fs.images), fs_uuid=fs.fs_uuid,
                               size_bytes=st.f_blocks * st.f_frsize,
                               free_bytes=st.f_bavail * st.f_frsize, clients=fs.clients,
                               created=created, files=len(fs.names()))

    # listing ------------------------------------------------------------------------------

    def entry(self, fs: Filestore, name: str, seen: dict[str, p.FileEntry] | None = None
              ) -> p.FileEntry:
        """One file as it is now; reading its ID counts as a read (see the rule), and so does
        reading its ancestors' (a file is ``parent-changed`` when any of them moved on)."""
        self.drain()
        return self._entry(fs, name, {} if seen is None else seen, set())

    def _entry(self, fs: Filestore, name: str, seen: dict[str, p.FileEntry],
               below: set[str]) -> p.FileEntry:
        if name in seen:
            return seen[name]
        path = fs.path(name)
        st = regular(path)
        if st is None:
            raise StorageNodeError(f"no file {name} in datastore {fs.name}", datastore=fs.name,
                                   file=name)
        problem: str | None = None
        try:
            head = header_of(path)
            fmt, vsize, backing, bfmt = (head.format, head.virtual_size, head.backing_file,
                                         head.backing_format)
        except (ImageHeaderError, OSError, StorageNodeError) as exc:
            fmt, vsize, backing, bfmt, problem = "unknown", 0, None, None, str(exc)
        parent: p.FileEntry | None = None
        if backing is not None:
            if not _FILE_RE.match(backing) or regular(fs.images / backing) is None:
                problem = f"backing file {backing!r} is not a file of this datastore"
            elif backing in below or backing == name:
                problem = f"the backing chain loops at {backing}"
            else:
                parent = self._entry(fs, backing, seen, below | {name})
        parent_id = parent.content_id if parent is not None else None
        cid = fs.content_id(name, parent_id)
        rec = fs.records.get(name)
        recorded_parent = rec.parent_content_id if rec is not None else None
        holder = fs.leases.get(name)
        state = "quiet" if cid is not None else "in-use" if holder is not None else "writing"
        if cid is not None and backing is not None and (
                parent is None or recorded_parent != parent_id or parent.state != "quiet"):
            state = "parent-changed"
        e = p.FileEntry(
            name=name, format=fmt, virtual_size=vsize, size_bytes=st.st_size,
            allocated_bytes=st.st_blocks * 512, backing_file=backing, backing_format=bfmt,
            content_id=cid, parent_content_id=recorded_parent if cid is not None else None,
            state=state, problem=problem, in_use_by=holder)
        seen[name] = e
        return e

    async def list_files(self, req: p.DatastoreName) -> p.FileList:
        fs = self.store(req.datastore)
        seen: dict[str, p.FileEntry] = {}
        files = [self.entry(fs, n, seen) for n in fs.names()]
        info = self._info(fs)
        return p.FileList(datastore=fs.name, export=info.export, size_bytes=info.size_bytes,
                          free_bytes=info.free_bytes, files=files)

    async def chain(self, req: p.FileRef) -> p.Chain:
        """The file and its ancestors, top first; every layer must live here, be readable and
        not loop (its state says whether it is quiet)."""
        fs = self.store(req.datastore)
        seen: dict[str, p.FileEntry] = {}
        layers = [self.entry(fs, req.name, seen)]
        while True:
            e = layers[-1]
            if e.problem is not None:
                raise StorageNodeError(f"{e.name}: {e.problem}", file=e.name)
            if e.backing_file is None:
                return p.Chain(datastore=fs.name, layers=layers)
            layers.append(seen[e.backing_file])

    async def digest(self, req: p.FileRef) -> p.FileDigest:
        fs = self.store(req.datastore)
        cid = self.entry(fs, req.name).content_id
        t0 = time.monotonic()
        path = fs.path(req.name)
        d = await asyncio.to_thread(file_digest, path, header_of(path).backing_name_ranges())
        after = self.entry(fs, req.name).content_id
        return p.FileDigest(datastore=fs.name, name=req.name, digest=d,
                            content_id=cid if cid == after else None,
                            seconds=round(time.monotonic() - t0, 3))

    async def delete_file(self, req: p.FileRef) -> p.FileDeleted:
        fs = self.store(req.datastore)
        path = fs.path(req.name)
        if req.name in fs.leases:
            raise StorageNodeError(f"{req.name} is the disk of VM {fs.leases[req.name]}: "
                                   "delete refused", file=req.name, vm=fs.leases[req.name])
        users = [n for n in fs.names() if n != req.name and _backing_of(fs.path(n)) == req.name]
        if users:
            raise StorageNodeError(f"{req.name} is the backing file of {', '.join(users)}: "
                                   "delete refused", file=req.name, children=users)
        try:
            path.unlink()
        except FileNotFoundError:
            return p.FileDeleted(datastore=fs.name, name=req.name, deleted=False)
        self.drain()
        fs.records.pop(req.name, None)
        fs.save()
        return p.FileDeleted(datastore=fs.name, name=req.name, deleted=True)

    # copies -------------------------------------------------------------------------------

    async def send(self, stream: Stream, params: dict[str, object]) -> dict[str, object]:
        """(stream method ``file_send``) Stream one file's data extents; refuse if its
        content ID is not ``expect`` any more, and say so at the end if it changed while
        being read (the receiver then throws its copy away)."""
        ref = p.SendFile.from_wire(params, "file_send request")
        fs = self.store(ref.datastore)
        e = self.entry(fs, ref.name)
        if e.content_id is None or e.content_id != ref.expect:
            raise StorageNodeError(f"{ref.name} on {fs.name} is {e.content_id or 'being written'}"
                                   f", not {ref.expect}: it changed", file=ref.name)
        fd = open_regular(fs.path(ref.name))
        try:
            size = os.fstat(fd).st_size
            d = Digest() if ref.digest else None
            sent = await send_extents(stream, fd, size, d)
        finally:
            os.close(fd)
        after = self.entry(fs, ref.name).content_id
        digest = d.hexdigest(size) if d is not None else None
        await stream.send({"end": True, "size": size, "digest": digest,
                           "changed": after != ref.expect})
        return {"bytes": sent, "digest": digest, "changed": after != ref.expect}

    async def pull(self, req: p.PullFile) -> p.Pulled:
        """Copy a file from a storage agent (maybe this one) into ``req.datastore`` under
        ``req.name``; re-point its backing file at ``req.backing`` (checked to still carry
        ``req.backing_id``); give it the source's content ID. The copy is written under
        ``.labctl/incoming`` and renamed into place only when whole and checked."""
        fs = self.store(req.datastore)
        check_file_name(req.name)
        if req.backing is not None:
            check_file_name(req.backing)
        if fs.exists(req.name):
            raise StorageNodeError(f"{req.name} already exists on {fs.name}", file=req.name)
        tmp = fs.part(req.name)
        t0 = time.monotonic()
        try:
            got = await self._receive(req, tmp)
            rebased = None
            if req.backing is not None:
                head = header_of(tmp)
                if head.backing_file != req.backing:
                    await run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", req.backing,
                               "-F", req.backing_format or "qcow2", str(tmp)],
                              timeout=120, what=f"qemu-img rebase -u {req.name}")
                    rebased = head.backing_file
                # the match's own ID (and its chain's), read again at the moment of use
                now = self.entry(fs, req.backing)
                if now.content_id != req.backing_id or now.state != "quiet":
                    have = now.content_id or "being written"
                    raise StorageNodeError(
                        f"{req.backing} on {fs.name} changed ({have}, {now.state}; was "
                        f"{req.backing_id}): not used as a parent", file=req.backing)
            fs.busy.add(req.name)
            try:
                link_into_place(tmp, fs.path(req.name))
                self.drain()
                fs.set_record(req.name, req.expect, req.backing_id)
            finally:
                fs.busy.discard(req.name)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return p.Pulled(datastore=fs.name, name=req.name, content_id=req.expect,
                        bytes_moved=got[0], digest=got[1], rebased_from=rebased,
                        seconds=round(time.monotonic() - t0, 3))

    async def _receive(self, req: p.PullFile, tmp: Path) -> tuple[int, str | None]:
        if req.source_address == self.ip and req.source_port == self.port:
            return await self._local_copy(req, tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        d = Digest() if req.verify else None
        try:
            stream = await RpcClient.open_stream(
                req.source_address, req.source_port, self._secret, "file_send",
                p.SendFile(datastore=req.source_datastore, name=req.source_name,
                           expect=req.expect, digest=req.verify).to_wire(),
                peer=f"storage agent {req.source_address}")
            msg = await self._stream_into(stream, fd, d, f"the copy of {req.source_name}")
        except TimeoutError:
            raise StorageNodeError(f"{req.source_name}: the source sent nothing for "
                                   f"{STALL_S:g} s: copy given up", file=req.source_name
                                   ) from None
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            raise StorageNodeError(f"{req.source_name}: lost the source mid-copy ({exc!r})",
                                   file=req.source_name) from None
        finally:
            os.close(fd)
        moved, size = int(str(msg["moved"])), int(str(msg["size"]))
        if msg.get("changed"):
            raise StorageNodeError(f"{req.source_name} changed while it was copied: copy "
                                   "dropped", file=req.source_name)
        if d is None:  # every frame's MAC already proved the bytes are the source's
            return moved, None
        digest = d.hexdigest(size)
        if digest != msg.get("digest"):
            raise StorageNodeError(f"{req.source_name}: the copy's digest {digest} is not the "
                                   f"source's {msg.get('digest')}", file=req.source_name)
        return moved, digest

    async def _stream_into(self, stream: Stream, fd: int, d: Digest | None, what: str
                           ) -> dict[str, object]:
        """Write a ``file_send`` stream's data into ``fd``; its end frame, with the bytes
        moved added as ``moved``."""
        async with stream:
            msg, moved = await receive_extents(stream, fd, what, d, stall=STALL_S)
            await stream.result()
        return {**msg, "moved": moved}

    async def _local_copy(self, req: p.PullFile, tmp: Path) -> tuple[int, str | None]:
        """Both datastores on this node: the data extents copied in a worker thread; the ID
        checks before and after stay on the event loop (they share the watch's state)."""
        src_fs = self.store(req.source_datastore)
        e = self.entry(src_fs, req.source_name)
        if e.content_id != req.expect:
            raise StorageNodeError(f"{req.source_name} on {src_fs.name} changed "
                                   f"({e.content_id or 'being written'}, was {req.expect})",
                                   file=req.source_name)
        moved, digest = await asyncio.to_thread(
            _copy_extents, src_fs.path(req.source_name), tmp, req.verify)
        if self.entry(src_fs, req.source_name).content_id != req.expect:
            raise StorageNodeError(f"{req.source_name} changed while it was copied: copy "
                                   "dropped", file=req.source_name)
        return moved, digest

    async def receive_upload(self, stream: Stream, params: dict[str, object]
                             ) -> dict[str, object]:
        """(stream method ``file_upload``) A new file from the controller (``image import``):
        data frames as ``file_send`` writes them; the file gets a new content ID."""
        req = p.Upload.from_wire(params, "file_upload request")
        fs = self.store(req.datastore)
        check_file_name(req.name)
        if fs.exists(req.name):
            raise StorageNodeError(f"{req.name} already exists on {fs.name}", file=req.name)
        st = os.statvfs(fs.mount)
        if req.allocated_bytes > st.f_bavail * st.f_frsize:
            raise StorageNodeError(
                f"{fs.name} has {st.f_bavail * st.f_frsize} bytes free, {req.name} needs "
                f"{req.allocated_bytes}", free_bytes=st.f_bavail * st.f_frsize,
                need_bytes=req.allocated_bytes)
        await stream.send({"ready": True})
        tmp = fs.part(req.name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            try:
                _end, moved = await receive_extents(stream, fd, f"{req.name} on {fs.name}")
            finally:
                os.close(fd)
            head = header_of(tmp)
            if head.backing_file is not None and not (
                    _FILE_RE.match(head.backing_file)
                    and regular(fs.path(head.backing_file)) is not None):
                raise StorageNodeError(
                    f"{req.name} is backed by {head.backing_file!r}, which is not a file of "
                    f"{fs.name}: import its backing file first, or a self-contained image "
                    "(qemu-img convert)", file=req.name, backing=head.backing_file)
            link_into_place(tmp, fs.path(req.name))
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        e = self.entry(fs, req.name)
        return {"file": e.to_wire(), "bytes": moved}

    async def peer_copy(self, req: p.PeerCopy) -> p.PeerCopied:
        """The benchmark's peers: the chain copied by a tool everyone has, through the kernel's
        NFS client onto the target's export (which must list this node as a client)."""
        fs = self.store(req.datastore)
        names = [check_file_name(n) for n in req.names]
        if req.method not in ("flatten", "rsync") or not names:
            raise StorageNodeError(f"peer_copy: unknown method {req.method!r} (flatten, rsync)")
        check_file_name(req.prefix + names[0])
        await run(["modprobe", "nfsv3"], timeout=60, what="modprobe nfsv3")
        mnt = Path("/run/labctl/peer") / os.urandom(4).hex()
        mnt.mkdir(parents=True)
        try:
            await run(["mount", "-t", "nfs", "-o", "vers=3,nolock,proto=tcp",
                       f"{req.target_address}:{req.target_export}", str(mnt)], timeout=120,
                      what="mount the target's export")
        except BaseException:
            mnt.rmdir()
            raise
        try:
            t0 = time.monotonic()
            if req.method == "flatten":
                written = [req.prefix + names[0]]
                await run(["qemu-img", "convert", "-O", "qcow2", "-S", "64k",
                           str(fs.path(names[0])), str(mnt / written[0])], timeout=3600,
                          what="qemu-img convert (flatten)")
            else:
                written = [req.prefix + n for n in names]
                for n, w in zip(names, written, strict=True):
                    await run(["rsync", "-S", str(fs.path(n)), str(mnt / w)], timeout=3600,
                              what=f"rsync {n}")
            await asyncio.to_thread(os.sync)
            seconds = time.monotonic() - t0
            allocated = sum(os.stat(mnt / w).st_blocks * 512 for w in written)
        finally:
            await run(["umount", str(mnt)], timeout=120, check=False, what="umount the peer")
            with contextlib.suppress(OSError):
                mnt.rmdir()
        return p.PeerCopied(method=req.method, seconds=round(seconds, 3), files=written,
                            allocated_bytes=allocated)

    async def lease(self, req: p.LeaseFile) -> p.FileEntry:
        """VM ``holder`` writes the file from now on, or (``release``) no longer."""
        fs = self.store(req.datastore)
        check_file_name(req.name)
        if regular(fs.path(req.name)) is None:
            raise StorageNodeError(f"no file {req.name} in datastore {fs.name}", file=req.name)
        have = fs.leases.get(req.name)
        if req.release:
            if have == req.holder:
                del fs.leases[req.name]
                fs.changed.add(req.name)  # what the VM wrote: a new ID when next read
        elif have not in (None, req.holder):
            raise StorageNodeError(f"{req.name} is already the disk of VM {have}: one writer "
                                   "per image", file=req.name, vm=have)
        else:
            fs.leases[req.name] = req.holder
        fs.save()
        return self.entry(fs, req.name)

    async def create_overlay(self, req: p.CreateOverlay) -> p.FileEntry:
        """A new qcow2 layer ``name`` on top of ``backing`` (a linked clone, a snapshot's new
        top), or without ``backing`` a blank image of ``size_bytes`` (with one: a clone that
        size when larger than its backing)."""
        fs = self.store(req.datastore)
        check_file_name(req.name)
        if req.backing is None:
            if req.size_bytes is None or not 0 < req.size_bytes <= 1 << 40:
                raise StorageNodeError("a blank image needs size_bytes (1 B .. 1 TiB)")
            argv, size = ["-f", "qcow2"], req.size_bytes
        else:
            parent = self.entry(fs, check_file_name(req.backing))
            if parent.content_id is None and (req.holder is None
                                              or parent.in_use_by != req.holder):
                raise StorageNodeError(
                    f"{req.backing} is {parent.state}"
                    + (f" by VM {parent.in_use_by}" if parent.in_use_by else "")
                    + ": no layer on top of it now", file=req.backing)
            # -u: the backing is not opened (it may be a running VM's top, shared read-only)
            argv = ["-f", "qcow2", "-u", "-b", req.backing, "-F", parent.format]
            size = parent.virtual_size
            if req.size_bytes is not None:  # a larger clone: the rest reads as zeros
                if not parent.virtual_size <= req.size_bytes <= 1 << 40:
                    raise StorageNodeError(
                        f"a clone of {req.backing} needs {parent.virtual_size} .. {1 << 40} "
                        f"bytes, not {req.size_bytes}", file=req.name)
                size = req.size_bytes
        if fs.exists(req.name):
            raise StorageNodeError(f"{req.name} already exists on {fs.name}", file=req.name)
        tmp = fs.part(req.name)
        try:
            # made aside, then linked in
            await run(["qemu-img", "create", "-q", *argv, str(tmp), str(size)],
                      timeout=120, cwd=fs.images, what=f"qemu-img create {req.name}")
            link_into_place(tmp, fs.path(req.name))
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return self.entry(fs, req.name)


def _copy_extents(src_path: Path, dst_path: Path, digest: bool) -> tuple[int, str | None]:
    """Copy a file's data extents into a new sparse file (synced); bytes moved, and with
    ``digest`` the content's digest."""
    src = open_regular(src_path)
    dst = os.open(dst_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    moved = 0
    d = Digest() if digest else None
    try:
        size = os.fstat(src).st_size
        for off, data in blocks(src, size):
            os.pwrite(dst, data, off)
            if d is not None:
                d.update(off, data)
            moved += len(data)
        os.ftruncate(dst, size)
        os.fsync(dst)
    finally:
        os.close(src)
        os.close(dst)
    return moved, d.hexdigest(size) if d is not None else None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _backing_of(path: Path) -> str | None:
    try:
        return header_of(path).backing_file
    except (ImageHeaderError, OSError):
        return None


def _dashed(u: str) -> str:
    return f"{u[:8]}-{u[8:12]}-{u[12:16]}-{u[16:20]}-{u[20:]}"


def _ext4_uuid(device: str) -> str | None:
    """The UUID of the ext4 filesystem on ``device`` (hex, no dashes), or None if none."""
    with open(device, "rb") as f:
        f.seek(1024)
        sb = f.read(1024)
    if len(sb) < 0x78 or sb[56:58] != b"\x53\xef":
        return None
    return sb[0x68:0x78].hex()


def _is_mounted(path: Path) -> bool:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            if line.split()[1:2] == [str(path)]:
                return True
    return False
