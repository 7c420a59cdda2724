"""What labctl reads of an image file's header: its format, virtual size, backing file and
the backing file's format, straight from the bytes (qcow2 header, version 2 and 3), so the
storage agent can walk a chain without starting ``qemu-img`` per layer.

Standard library only: it runs inside the storage node. A file that is not qcow2 is
``raw``: its virtual size is its length and it has no backing file.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

MAGIC = b"QFI\xfb"
_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")  # up to snapshots_offset (72 bytes)
_EXT_BACKING_FORMAT = 0xE2792ACA
_EXT_EXTERNAL_DATA = 0x44415441
_INCOMPAT_DATA_FILE = 1 << 2
_MAX_BACKING_NAME = 1023  # QEMU's own limit


class ImageHeaderError(ValueError):
    """The file claims to be qcow2 but its header cannot be used."""


@dataclass(frozen=True)
class ImageHeader:
    format: str  # "qcow2" or "raw"
    virtual_size: int
    backing_file: str | None
    backing_format: str | None
    cluster_size: int | None = None
    version: int | None = None
    backing_file_offset: int = 0

    def backing_name_ranges(self) -> tuple[tuple[int, int], ...]:
        """The bytes that name the backing file and nothing else: the name's length field
        and the header cluster from the name on. ``qemu-img rebase -u`` changes only these
        (the same backing format kept), so a layer's data is the rest."""
        if self.format != "qcow2" or not self.backing_file_offset or not self.cluster_size:
            return ()
        return ((16, 20), (self.backing_file_offset, self.cluster_size))


def read_header(path: str) -> ImageHeader:
    with open(path, "rb") as f:
        return parse_header(f.read(65536), os.fstat(f.fileno()).st_size, path)


def parse_header(head: bytes, file_size: int, where: str = "image") -> ImageHeader:
    """The header of an image whose first bytes are ``head`` (64 KiB hold any sane header)."""
    if head[:4] != MAGIC:
        return ImageHeader("raw", file_size, None, None)
    if len(head) < _HEADER.size:
        raise ImageHeaderError(f"{where}: qcow2 header cut short ({len(head)} bytes)")
    (_magic, version, bf_off, bf_size, cluster_bits, size, _crypt, _l1_size, _l1_off,
     _rc_off, _rc_clusters, _nb_snap, _snap_off) = _HEADER.unpack_from(head)
    if version not in (2, 3):
        raise ImageHeaderError(f"{where}: qcow2 version {version} is not supported")
    if not 9 <= cluster_bits <= 21:
        raise ImageHeaderError(f"{where}: qcow2 cluster_bits {cluster_bits} out of range")
    header_len = 72
    incompat = 0
    if version == 3:
        if len(head) < 104:
            raise ImageHeaderError(f"{where}: qcow2 v3 header cut short")
        incompat = struct.unpack_from(">Q", head, 72)[0]
        header_len = struct.unpack_from(">I", head, 100)[0]
    if incompat & _INCOMPAT_DATA_FILE:
        raise ImageHeaderError(f"{where}: qcow2 with an external data file is not supported")
    backing: str | None = None
    if bf_off:
        if bf_size > _MAX_BACKING_NAME or bf_off + bf_size > len(head):
            raise ImageHeaderError(f"{where}: backing file name out of range "
                                   f"(offset {bf_off}, {bf_size} bytes)")
        try:
            backing = head[bf_off:bf_off + bf_size].decode()
        except UnicodeDecodeError as exc:
            raise ImageHeaderError(f"{where}: backing file name is not UTF-8") from exc
    backing_format = None
    off = header_len
    limit = bf_off if bf_off else len(head)
    while off + 8 <= min(limit, len(head)):
        ext_type, ext_len = struct.unpack_from(">II", head, off)
        if ext_type == 0:
            break
        data = head[off + 8: off + 8 + ext_len]
        if ext_type == _EXT_BACKING_FORMAT:
            backing_format = data.decode(errors="replace")
        elif ext_type == _EXT_EXTERNAL_DATA:
            raise ImageHeaderError(f"{where}: qcow2 with an external data file is not supported")
        off += 8 + (ext_len + 7) // 8 * 8
    return ImageHeader("qcow2", size, backing, backing_format if backing else None,
                       cluster_size=1 << cluster_bits, version=version,
                       backing_file_offset=bf_off)
