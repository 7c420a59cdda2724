"""Blocks of a disk, on real sparse files: pass 1 reads only the allocated blocks, a hash
pass finds exactly the blocks that changed (a write into a hole and a block zeroed again
included), writing them makes the target equal block for block, and disks of different
sizes are refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from labctl.replication import blocks
from labctl.replication.blocks import BLOCK


def _disk(path: Path, size: int, writes: dict[int, bytes]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in writes.items():
            f.seek(off)
            f.write(data)
    return path


def test_pass_one_copies_the_allocated_blocks_and_the_replica_is_exact(tmp_path: Path) -> None:
    size = 128 * BLOCK + 1000  # a short last block too
    src = _disk(tmp_path / "src", size, {0: os.urandom(BLOCK), 10 * BLOCK + 5: b"x" * 300,
                                          127 * BLOCK: os.urandom(BLOCK + 1000)})
    used = blocks.allocated(src)
    assert set(used) >= {0, 10, 127, 128} and len(used) <= 8, used  # not the 124 holes
    dst = _disk(tmp_path / "dst", size, {})
    written = blocks.write_blocks(dst, blocks.read_blocks(src, used))
    assert written <= 8 * BLOCK
    assert blocks.same(src, dst) == []
    assert blocks.size_of(dst) == size


def test_a_hash_pass_finds_exactly_what_changed(tmp_path: Path) -> None:
    size = 64 * BLOCK
    src = _disk(tmp_path / "src", size, {0: os.urandom(4 * BLOCK), 40 * BLOCK: b"y" * BLOCK})
    dst = _disk(tmp_path / "dst", size, {})
    blocks.write_blocks(dst, blocks.read_blocks(src, blocks.allocated(src)))
    before = blocks.digests(src)
    with open(src, "r+b") as f:
        f.seek(2 * BLOCK + 17)  # inside a written block
        f.write(b"changed")
        f.seek(50 * BLOCK + 3)  # into a hole
        f.write(b"new data")
        f.seek(40 * BLOCK)  # a block back to zeros
        f.write(bytes(BLOCK))
    after = blocks.digests(src)
    delta = blocks.changed(before, after)
    assert delta == [2, 40, 50]
    blocks.write_blocks(dst, blocks.read_blocks(src, delta))
    assert blocks.same(src, dst) == []


def test_disks_of_different_sizes_and_blocks_past_the_end_are_refused(tmp_path: Path) -> None:
    a = _disk(tmp_path / "a", 8 * BLOCK, {})
    b = _disk(tmp_path / "b", 9 * BLOCK, {})
    with pytest.raises(ValueError, match="differ in size"):
        blocks.same(a, b)
    with pytest.raises(ValueError, match="past the target's end"):
        blocks.write_blocks(a, iter([(8, b"z" * 10)]))


@pytest.mark.parametrize("depth", [1, 2, 4, 64])
def test_a_scan_in_parallel_is_the_same_scan(tmp_path: Path, depth: int) -> None:
    """Every depth gives the same map as one read at a time (stretches split between the
    threads, holes and a short last block included)."""
    disk = tmp_path / "disk"
    size = 40 * blocks.BLOCK + 4096
    with open(disk, "wb") as f:
        f.truncate(size)
        for i in (0, 1, 2, 7, 17, 18, 19, 20, 21, 39):
            f.seek(i * blocks.BLOCK)
            f.write(bytes([i + 1]) * blocks.BLOCK)
        f.seek(40 * blocks.BLOCK)
        f.write(b"tail" * 1024)
    one = blocks.digests(disk, depth=1)
    assert blocks.digests(disk, depth=depth) == one
    assert one[3] == blocks.digest(bytes(blocks.BLOCK)) and one[7] == blocks.digest(
        bytes([8]) * blocks.BLOCK)
    assert one[40] == blocks.digest(b"tail" * 1024)


def test_a_scan_that_fails_in_a_thread_fails(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    disk = tmp_path / "disk"
    disk.write_bytes(b"x" * (8 * blocks.BLOCK))

    def broken(self: blocks.Reader, offset: int, length: int) -> bytes:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(blocks.Reader, "read_at", broken)
    with pytest.raises(OSError, match="Input/output error"):
        blocks.digests(disk, depth=4)
