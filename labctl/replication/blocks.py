"""Blocks of a disk for the replication agents, standard library only (they run in the
guests): which blocks are allocated (pass 1 copies only those), a digest per block (the
hash tracking that finds what changed when no write tracker can say: ``--tracking hash``,
and after the source rebooted and dm-era's state was lost), the blocks that differ between
two digest maps, writing blocks into the target, and the final check that both sides hold
the same blocks.

A block is :data:`BLOCK` bytes; the disk's last block may be shorter. Digests are BLAKE2b
of 16 bytes. A hole reads as zeros: its digest is the zero block's, so a block written
into a hole is found as changed, and a block that went back to zeros as well.

A block device is read with ``O_DIRECT`` (:class:`Reader`): the source's filesystem writes
its files' data to the disk without going through the block device's page cache, so a
cached read of a block read before could return what it held then.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

BLOCK = 64 << 10


def digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


_ZERO = digest(bytes(BLOCK))


def size_of(path: Path) -> int:
    """The size of a file or a block device, in bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


class Reader:
    """Blocks of a file or a block device, read past the page cache on a block device
    (``O_DIRECT`` into a page-aligned buffer; a file is read as usual)."""

    def __init__(self, path: Path, block: int = BLOCK) -> None:
        self.block = block
        flags = os.O_RDONLY | os.O_CLOEXEC
        direct = stat.S_ISBLK(os.stat(path).st_mode) and hasattr(os, "O_DIRECT")
        self.fd = os.open(path, flags | (os.O_DIRECT if direct else 0))
        self.buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT needs

    def read(self, index: int) -> bytes:
        return self.read_at(index * self.block, self.block)

    def read_at(self, offset: int, length: int) -> bytes:
        """``length`` bytes (at most the buffer's, a multiple of 512) from ``offset``; fewer
        at the end of the disk."""
        with memoryview(self.buf) as view:
            n = os.preadv(self.fd, [view[:length]], offset)
        return self.buf[:n]

    def close(self) -> None:
        os.close(self.fd)
        self.buf.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def allocated(path: Path, block: int = BLOCK) -> list[int]:
    """The blocks that hold data (SEEK_DATA/SEEK_HOLE; all of them where the file system
    cannot say): what pass 1 copies."""
    size = size_of(path)
    count = (size + block - 1) // block
    fd = os.open(path, os.O_RDONLY)
    try:
        found: set[int] = set()
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data from here on
                    break
                return list(range(count))  # no SEEK_DATA here: every block counts
            end = os.lseek(fd, start, os.SEEK_HOLE)
            found.update(range(start // block, (end + block - 1) // block))
            pos = end
        return sorted(b for b in found if b < count)
    finally:
        os.close(fd)


#: blocks read at once by a digest scan (1 MiB): fewer, larger reads of the disk
SCAN_RUN = 16
#: reads a digest scan keeps in flight (one thread each, over its own stretch of the
#: disk): a disk behind a network (a file datastore over NFS) answers each read after a
#: round trip, and one read at a time leaves the link idle in between
SCAN_DEPTH = 8


def _runs(todo: list[int]) -> list[tuple[int, int]]:
    """(first block, count) of consecutive blocks, at most :data:`SCAN_RUN` each."""
    runs: list[tuple[int, int]] = []
    i = 0
    while i < len(todo):
        first, n = todo[i], 1
        while n < SCAN_RUN and i + n < len(todo) and todo[i + n] == first + n:
            n += 1
        runs.append((first, n))
        i += n
    return runs


def digests(path: Path, block: int = BLOCK, depth: int = SCAN_DEPTH) -> list[bytes]:
    """A digest per block, in order (holes as zero blocks, without reading them); runs of
    consecutive blocks are read :data:`SCAN_RUN` at a time, ``depth`` reads at once (each
    thread its stretch of the disk, in order: the reads and the digests release the GIL)."""
    size = size_of(path)
    count = (size + block - 1) // block
    out = [_ZERO if block == BLOCK else digest(bytes(block))] * count
    if count and size % block:  # the last block is shorter: so is its zero block
        out[-1] = digest(bytes(size % block))
    runs = _runs(allocated(path, block))
    errors: list[BaseException] = []

    def scan(part: list[tuple[int, int]]) -> None:
        try:
            with Reader(path, block * SCAN_RUN) as r:
                for first, n in part:
                    data = r.read_at(first * block, n * block)
                    for j in range(n):
                        chunk = data[j * block:(j + 1) * block]
                        if chunk:
                            out[first + j] = digest(chunk)
        except BaseException as exc:  # said by the caller, in its thread
            errors.append(exc)

    depth = max(1, min(depth, len(runs)))
    share = (len(runs) + depth - 1) // depth if runs else 0
    parts = [runs[k * share:(k + 1) * share] for k in range(depth)]
    if depth == 1:
        scan(runs)
    else:
        threads = [threading.Thread(target=scan, args=(part,), daemon=True) for part in parts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    return out


def changed(before: list[bytes], after: list[bytes]) -> list[int]:
    """The blocks whose digests differ (the maps must be of disks of one size)."""
    if len(before) != len(after):
        raise ValueError(f"digest maps of {len(before)} and {len(after)} blocks: the disks "
                         "differ in size")
    return [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]


def read_blocks(path: Path, indexes: list[int], block: int = BLOCK
                ) -> Iterator[tuple[int, bytes]]:
    """(index, data) of each block in ``indexes``, read from ``path``."""
    with Reader(path, block) as r:
        for i in indexes:
            yield i, r.read(i)


def write_blocks(path: Path, blocks: Iterator[tuple[int, bytes]], block: int = BLOCK) -> int:
    """Write each (index, data) into ``path`` (which already has the source's size) and
    make it durable; returns the bytes written."""
    fd = os.open(path, os.O_WRONLY)
    written = 0
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        for i, data in blocks:
            if i * block + len(data) > size:
                raise ValueError(f"block {i} ({len(data)} bytes) past the target's end "
                                 f"({size} bytes)")
            written += os.pwrite(fd, data, i * block)
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def same(source: Path, target: Path, block: int = BLOCK) -> list[int]:
    """The blocks where source and target differ (none: the replica is exact)."""
    return changed(digests(source, block), digests(target, block))
