"""Sparse files: their data extents (``SEEK_DATA``/``SEEK_HOLE``), read in chunks, sent
over and received from an authenticated stream, and a digest of their content that does
not depend on how it is stored (holes, zero blocks).

Standard library and :mod:`labctl.core` only: the storage agent and the controller use the
same code."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from labctl.core.errors import StorageNodeError
from labctl.core.rpc import Stream

CHUNK = 1 << 20
#: the digest's block: an all-zero block counts as a hole
DIGEST_BLOCK = 64 << 10


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of every data extent of an open file (SEEK_DATA/SEEK_HOLE)."""
    off = 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, min(end, size) - start
        off = end


def blocks(fd: int, size: int) -> Iterator[tuple[int, bytes]]:
    """The file's non-zero blocks (at most CHUNK bytes each) at their offsets."""
    for start, length in data_extents(fd, size):
        pos, end = start, start + length
        while pos < end:
            data = os.pread(fd, min(CHUNK, end - pos), pos)
            if not data:
                return
            yield pos, data
            pos += len(data)


class Digest:
    """SHA-256 of a file's content independent of how it is stored: the index and bytes of
    every DIGEST_BLOCK-aligned block that is not all zeros (holes read as zeros), then the
    file's length. Data must come in increasing offsets (as extents are read)."""

    def __init__(self, mask: tuple[tuple[int, int], ...] = ()) -> None:
        self._h = hashlib.sha256()
        self._zero = bytes(DIGEST_BLOCK)
        self._index = -1
        self._block = bytearray(DIGEST_BLOCK)
        #: byte ranges [start, end) read as zeros (see :func:`layer_digest`)
        self._mask = mask

    def _flush(self) -> None:
        base = self._index * DIGEST_BLOCK
        for start, end in self._mask:
            lo, hi = max(start, base), min(end, base + DIGEST_BLOCK)
            if lo < hi:
                self._block[lo - base:hi - base] = self._zero[:hi - lo]
        if self._index >= 0 and self._block != self._zero:
            self._h.update(struct.pack(">Q", self._index))
            self._h.update(self._block)
        self._index = -1

    def update(self, offset: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            index, within = divmod(offset + pos, DIGEST_BLOCK)
            if index != self._index:
                if index < self._index:
                    raise ValueError("digest data must come in increasing offsets")
                self._flush()
                self._index = index
                self._block[:] = self._zero
            n = min(len(data) - pos, DIGEST_BLOCK - within)
            self._block[within:within + n] = data[pos:pos + n]
            pos += n

    def hexdigest(self, size: int) -> str:
        self._flush()
        self._h.update(struct.pack(">Q", size))
        return self._h.hexdigest()


def file_digest(path: Path, mask: tuple[tuple[int, int], ...] = ()) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        d = Digest(mask)
        for off, data in blocks(fd, size):
            d.update(off, data)
        return d.hexdigest(size)
    finally:
        os.close(fd)


async def send_extents(stream: Stream, fd: int, size: int, digest: Digest | None = None
                       ) -> int:
    """Every data extent of ``fd`` (``size`` bytes long) over ``stream``: a header frame
    ``{"at", "len"}`` then a data frame, each MAC'd; the file is read in a worker thread.
    Returns the bytes sent (the caller sends the end frame)."""
    sent = 0
    for start, length in await asyncio.to_thread(lambda: list(data_extents(fd, size))):
        pos, end = start, start + length
        while pos < end:
            data = await asyncio.to_thread(os.pread, fd, min(CHUNK, end - pos), pos)
            if not data:
                break
            if digest is not None:
                digest.update(pos, data)
            await stream.send({"at": pos, "len": len(data)})
            stream.write_bytes(data)
            await stream.drain()
            sent += len(data)
            pos += len(data)
    return sent


async def receive_extents(stream: Stream, fd: int, what: str, digest: Digest | None = None,
                          stall: float | None = None) -> tuple[dict[str, Any], int]:
    """Write what :func:`send_extents` sends into ``fd`` up to the end frame (``{"end",
    "size", ...}``), then give the file that length and sync it; returns the end frame and
    the bytes received. ``stall``: seconds a frame may take (TimeoutError after). A write
    that fails does not stop the reading: the stream is read to its end, so that the sender
    hears why rather than a reset connection, then StorageNodeError names ``what``."""
    moved = 0
    failed: OSError | None = None
    while True:
        async with asyncio.timeout(stall) if stall else contextlib.nullcontext():
            msg = await stream.recv()
        if "error" in msg:
            err = msg["error"]
            raise StorageNodeError(f"the sender refused: {err.get('message')}", remote=err)
        if msg.get("end"):
            break
        at, length = int(msg["at"]), int(msg["len"])
        async with asyncio.timeout(stall) if stall else contextlib.nullcontext():
            data = await stream.recv_bytes()
        if len(data) != length:
            raise StorageNodeError("a data frame does not match its header")
        if failed is None:
            try:
                await asyncio.to_thread(os.pwrite, fd, data, at)
            except OSError as exc:
                failed = exc
        if digest is not None:
            digest.update(at, data)
        moved += len(data)
    if failed is not None:
        raise StorageNodeError(f"writing {what} failed: {failed.strerror}", errno=failed.errno)
    os.ftruncate(fd, int(msg["size"]))
    os.fsync(fd)
    return msg, moved

