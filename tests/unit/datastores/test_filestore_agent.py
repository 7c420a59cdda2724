"""The storage agent's file datastore logic on this machine's own filesystem: the content
ID rule driven by real inotify events, qcow2 headers as qemu-img writes them, and copies
between two agents over the authenticated stream (both in this process, on loopback).

The end-to-end tests run the same code inside the storage node against its NFS export."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from labctl.core.errors import AgentError, LabStateError, RemoteError, StorageNodeError
from labctl.core.rpc import RpcClient, RpcServer
from labctl.core.wire import handlers
from labctl.datastores.chaincopy import check_chain, plan, target_name
from labctl.drivers.qcow2 import read_header
from labctl.drivers.sparse import Digest, blocks, file_digest
from labctl.storage import files
from labctl.storage import protocol as p
from labctl.storage.files import Filestore, Filestores, link_into_place

SECRET = b"s" * 32
pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def qemu_io(path: Path, cmd: str) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmd, str(path)], check=True,
                   capture_output=True)


def add_store(agent: Filestores, root: Path, name: str) -> Filestore:
    """A datastore on a plain directory (the node mounts a disk there; the rest is the same)."""
    fs = Filestore(name, root / name, "0" * 32)
    for d in (fs.images, fs.meta, fs.incoming):
        d.mkdir(parents=True, exist_ok=True)
    fs.load()
    fs.wd = agent._watch().add(fs.images)
    agent._by_wd[fs.wd] = fs
    agent.stores[name] = fs
    return fs


class Node:
    def __init__(self, root: Path, port: int) -> None:
        self.agent = Filestores("n", "127.0.0.1", SECRET, port, root=root)
        self.server = RpcServer(SECRET, handlers(
            p.LIST_FILES.serve(self.agent.list_files), p.CHAIN.serve(self.agent.chain),
            p.PULL_FILE.serve(self.agent.pull), p.FILE_DIGEST.serve(self.agent.digest)),
            streams={p.FILE_SEND: self.agent.send, p.FILE_UPLOAD: self.agent.receive_upload})
        self.port = port


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def in_loop(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run the test in a fresh event loop (the agent's watch needs a running one)."""
    @functools.wraps(fn)
    def run(*args: Any, **kw: Any) -> None:
        asyncio.run(fn(*args, **kw))
    return run


@contextlib.asynccontextmanager
async def two_agents(tmp_path: Path) -> AsyncIterator[tuple[Node, Node]]:
    a, b = Node(tmp_path / "a", free_port()), Node(tmp_path / "b", free_port())
    # two agents on one address: the target must not take the source for itself
    b.agent.ip = "127.0.0.2"
    for n in (a, b):
        await n.server.start("127.0.0.1", n.port)
    try:
        yield a, b
    finally:
        for n in (a, b):
            await n.server.close()


def make_chain(images: Path) -> None:
    qemu_img("create", "-q", "-f", "qcow2", str(images / "base.qcow2"), "8M")
    qemu_io(images / "base.qcow2", "write -P 0x11 0 1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
             str(images / "clone.qcow2"))
    qemu_io(images / "clone.qcow2", "write -P 0x22 1M 512k")


@in_loop
async def test_content_id_changes_once_after_a_write_following_a_read(tmp_path: Path) -> None:
    agent = Filestores("n", "127.0.0.1", SECRET, 1, root=tmp_path)
    fs = add_store(agent, tmp_path, "fs1")
    (fs.images / "f.raw").write_bytes(b"a" * 4096)
    first = agent.entry(fs, "f.raw").content_id
    assert first is not None and first.startswith("cid.")
    assert agent.entry(fs, "f.raw").content_id == first  # reading does not change it
    with open(fs.images / "f.raw", "r+b") as f:
        f.write(b"b")
        f.flush()
        assert agent.entry(fs, "f.raw").content_id is None  # open for writing: no usable ID
        f.write(b"c")
    second = agent.entry(fs, "f.raw").content_id
    assert second not in (None, first)
    assert agent.entry(fs, "f.raw").content_id == second
    # the IDs live on the datastore: a new agent reads them back
    again = Filestores("n", "127.0.0.1", SECRET, 1, root=tmp_path)
    fs2 = add_store(again, tmp_path, "fs1")
    assert again.entry(fs2, "f.raw").content_id == second


@in_loop
async def test_a_write_the_agent_did_not_see_still_changes_the_id(tmp_path: Path) -> None:
    agent = Filestores("n", "127.0.0.1", SECRET, 1, root=tmp_path)
    fs = add_store(agent, tmp_path, "fs1")
    (fs.images / "f.raw").write_bytes(b"a" * 4096)
    first = agent.entry(fs, "f.raw").content_id
    fs.save()
    # written while no agent watched (before a restart): the stamp tells
    with open(fs.images / "f.raw", "r+b") as f:
        f.write(b"zz")
    again = Filestores("n", "127.0.0.1", SECRET, 1, root=tmp_path)
    fs2 = add_store(again, tmp_path, "fs1")
    assert again.entry(fs2, "f.raw").content_id not in (None, first)


@in_loop
async def test_qcow2_headers_as_qemu_img_writes_them(tmp_path: Path) -> None:
    make_chain(tmp_path)
    base, clone = read_header(str(tmp_path / "base.qcow2")), read_header(
        str(tmp_path / "clone.qcow2"))
    assert (base.format, base.virtual_size, base.backing_file) == ("qcow2", 8 << 20, None)
    assert (clone.backing_file, clone.backing_format) == ("base.qcow2", "qcow2")
    (tmp_path / "r.raw").write_bytes(b"x" * 1000)
    assert read_header(str(tmp_path / "r.raw")).format == "raw"


def test_the_digest_ignores_holes_and_zero_blocks(tmp_path: Path) -> None:
    sparse, dense = tmp_path / "s", tmp_path / "d"
    with open(sparse, "wb") as f:
        f.truncate(4 << 20)
        f.seek(1 << 20)
        f.write(b"x" * 100)
    data = bytearray(4 << 20)
    data[1 << 20:(1 << 20) + 100] = b"x" * 100
    dense.write_bytes(bytes(data))
    assert file_digest(sparse) == file_digest(dense)
    dense.write_bytes(bytes(data[:-1]) + b"y")
    assert file_digest(sparse) != file_digest(dense)
    fd = os.open(sparse, os.O_RDONLY)
    try:
        moved = sum(len(b) for _o, b in blocks(fd, 4 << 20))
    finally:
        os.close(fd)
    assert moved < 1 << 20  # only the data extent is read
    assert Digest().hexdigest(0) != Digest().hexdigest(1)


@in_loop
async def test_a_pull_between_agents_carries_the_id_and_repoints_the_parent(
        tmp_path: Path) -> None:
    async with two_agents(tmp_path) as (a, b):
        src = add_store(a.agent, a.agent.root, "fs1")
        dst = add_store(b.agent, b.agent.root, "fs2")
        make_chain(src.images)
        chain = await a.agent.chain(p.FileRef("fs1", "clone.qcow2"))
        clone, base = chain.layers
        assert clone.parent_content_id == base.content_id
        # the parent is already there under another name, with the same content ID
        pulled_base = await b.agent.pull(p.PullFile(
            datastore="fs2", name="golden.qcow2", source_address="127.0.0.1", source_port=a.port,
            source_datastore="fs1", source_name="base.qcow2", expect=str(base.content_id)))
        assert pulled_base.content_id == base.content_id
        pulled = await b.agent.pull(p.PullFile(
            datastore="fs2", name="clone.qcow2", source_address="127.0.0.1", source_port=a.port,
            source_datastore="fs1", source_name="clone.qcow2", expect=str(clone.content_id),
            backing="golden.qcow2", backing_format="qcow2", backing_id=base.content_id,
            verify=True))
        assert pulled.rebased_from == "base.qcow2"
        assert pulled.bytes_moved < 2 << 20
        listed = {f.name: f for f in (await b.agent.list_files(p.DatastoreName("fs2"))).files}
        assert listed["clone.qcow2"].content_id == clone.content_id
        assert listed["clone.qcow2"].backing_file == "golden.qcow2"
        assert listed["clone.qcow2"].state == "quiet"
        assert not list(dst.incoming.iterdir())
        subprocess.run(["qemu-img", "compare", "-q", str(src.images / "clone.qcow2"),
                        str(dst.images / "clone.qcow2")], check=True)


@in_loop
async def test_a_source_that_changed_is_refused_and_nothing_is_left(
        tmp_path: Path) -> None:
    async with two_agents(tmp_path) as (a, b):
        src = add_store(a.agent, a.agent.root, "fs1")
        dst = add_store(b.agent, b.agent.root, "fs2")
        make_chain(src.images)
        old = (await a.agent.chain(p.FileRef("fs1", "base.qcow2"))).layers[0].content_id
        qemu_io(src.images / "base.qcow2", "write -P 0x33 2M 4k")
        with pytest.raises((StorageNodeError, RemoteError), match=r"changed|not cid"):
            await b.agent.pull(p.PullFile(
                datastore="fs2", name="base.qcow2", source_address="127.0.0.1",
                source_port=a.port, source_datastore="fs1", source_name="base.qcow2",
                expect=str(old)))
        assert not (dst.images / "base.qcow2").exists()
        assert not list(dst.incoming.iterdir())


@in_loop
async def test_a_stream_needs_the_lab_secret(tmp_path: Path) -> None:
    async with two_agents(tmp_path) as (a, _b):
        add_store(a.agent, a.agent.root, "fs1")
        with pytest.raises(AgentError):
            s = await RpcClient.open_stream("127.0.0.1", a.port, b"x" * 32, p.FILE_SEND,
                                            {"datastore": "fs1", "name": "x", "expect": "y"})
            await s.result()
        await asyncio.sleep(0)
        assert a.server.rejected == 1


@in_loop
async def test_a_copy_between_two_datastores_of_one_node_stays_local(tmp_path: Path) -> None:
    agent = Filestores("n", "127.0.0.1", SECRET, 1, root=tmp_path)  # nobody listens on 1
    src = add_store(agent, tmp_path, "fs1")
    dst = add_store(agent, tmp_path, "fs2")
    make_chain(src.images)
    base = (await agent.chain(p.FileRef("fs1", "base.qcow2"))).layers[0]
    got = await agent.pull(p.PullFile(
        datastore="fs2", name="base.qcow2", source_address="127.0.0.1", source_port=1,
        source_datastore="fs1", source_name="base.qcow2", expect=str(base.content_id),
        verify=True))
    assert got.content_id == base.content_id and got.digest is not None
    assert got.bytes_moved < 2 << 20  # the data extents, not the 8 MiB the file spans
    assert file_digest(dst.images / "base.qcow2") == file_digest(src.images / "base.qcow2")
    assert (await agent.list_files(p.DatastoreName("fs2"))).files[0].content_id \
        == base.content_id


@in_loop
async def test_a_write_below_the_parent_makes_every_layer_above_it_changed(
        tmp_path: Path) -> None:
    agent = Filestores("n", "127.0.0.1", SECRET, 1, root=tmp_path)
    fs = add_store(agent, tmp_path, "fs1")
    make_chain(fs.images)  # base <- clone
    qemu_img("create", "-q", "-f", "qcow2", "-b", "clone.qcow2", "-F", "qcow2",
             str(fs.images / "top.qcow2"))
    before = {f.name: f for f in (await agent.list_files(p.DatastoreName("fs1"))).files}
    assert {f.state for f in before.values()} == {"quiet"}
    qemu_io(fs.images / "base.qcow2", "write -P 0x44 0 4k")
    after = {f.name: f for f in (await agent.list_files(p.DatastoreName("fs1"))).files}
    assert after["base.qcow2"].content_id != before["base.qcow2"].content_id
    assert after["clone.qcow2"].state == "parent-changed"
    # the top's own parent did not change, its grandparent did: not sound either
    assert after["top.qcow2"].content_id == before["top.qcow2"].content_id
    assert after["top.qcow2"].state == "parent-changed"


@in_loop
async def test_a_symlink_in_the_export_is_never_read_through(tmp_path: Path) -> None:
    agent = Filestores("n", "127.0.0.1", SECRET, 1, root=tmp_path)
    fs = add_store(agent, tmp_path, "fs1")
    secret = tmp_path / "secret.json"
    secret.write_text("the lab secret")
    (fs.images / "x.raw").symlink_to(secret)
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "x.raw", "-F", "raw",
             str(fs.images / "child.qcow2"), "1M")
    assert [f.name for f in (await agent.list_files(p.DatastoreName("fs1"))).files] == [
        "child.qcow2"]
    with pytest.raises(StorageNodeError, match="not a file of this datastore"):
        await agent.chain(p.FileRef("fs1", "child.qcow2"))
    with pytest.raises(StorageNodeError, match=r"no file x\.raw"):
        await agent.chain(p.FileRef("fs1", "x.raw"))


def test_a_finished_copy_never_replaces_a_file_that_appeared(tmp_path: Path) -> None:
    tmp, final = tmp_path / "a.part", tmp_path / "a.qcow2"
    tmp.write_bytes(b"copy")
    final.write_bytes(b"someone else's")
    with pytest.raises(StorageNodeError, match="appeared"):
        link_into_place(tmp, final)
    assert final.read_bytes() == b"someone else's"


@in_loop
async def test_a_write_never_closed_stops_counting_as_writing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "WRITE_QUIET_S", 0.2)
    agent = Filestores("n", "127.0.0.1", SECRET, 1, root=tmp_path)
    fs = add_store(agent, tmp_path, "fs1")
    (fs.images / "f.raw").write_bytes(b"a" * 4096)
    first = agent.entry(fs, "f.raw").content_id
    os.truncate(fs.images / "f.raw", 8192)  # a write by path: no close ever follows
    assert agent.entry(fs, "f.raw").content_id is None
    await asyncio.sleep(0.3)
    assert agent.entry(fs, "f.raw").content_id not in (None, first)


def entry(name: str, cid: str | None, parent: str | None = None, fmt: str = "qcow2",
          vsize: int = 1 << 20, state: str = "quiet") -> p.FileEntry:
    return p.FileEntry(name=name, format=fmt, virtual_size=vsize, size_bytes=1,
                       allocated_bytes=4096, backing_file=None, backing_format=None,
                       content_id=cid, parent_content_id=parent, state=state)


def test_the_plan_matches_by_content_id_only_when_sound() -> None:
    chain = [entry("top", "cid.t", "cid.m"), entry("mid", "cid.m", "cid.b"),
             entry("base", "cid.b")]
    assert [x.name for x in plan(chain, []).copy] == ["top", "mid", "base"]
    got = plan(chain, [entry("golden", "cid.b")])
    assert [x.name for x in got.copy] == ["top", "mid"] and got.anchor is not None \
        and got.anchor.name == "golden"
    # the same name with another ID is no match
    assert plan(chain, [entry("base", "cid.other")]).anchor is None
    # same ID, but another size, format, state or parent: not sound
    for bad in (entry("m2", "cid.m", "cid.b", vsize=2 << 20),
                entry("m2", "cid.m", "cid.b", fmt="raw"),
                entry("m2", "cid.m", "cid.b", state="parent-changed"),
                entry("m2", "cid.m", "cid.x")):
        assert plan(chain, [bad]).anchor is None, bad
    # the highest sound match wins: nothing above the top is copied
    assert plan(chain, [entry("t2", "cid.t", "cid.m"), entry("golden", "cid.b")]).copy == []


def test_a_taken_name_gets_part_of_the_content_id() -> None:
    assert target_name("base.qcow2", "cid.0123456789", set()) == ("base.qcow2", False)
    assert target_name("base.qcow2", "cid.0123456789", {"base.qcow2"}) == (
        "base.01234567.qcow2", True)
    assert target_name("base.qcow2", "cid.0123456789",
                       {"base.qcow2", "base.01234567.qcow2"}) == ("base.01234567-2.qcow2", True)
    assert target_name("raw", "cid.ab", {"raw"}) == ("raw.ab", True)


def test_a_chain_is_refused_for_the_first_reason_that_applies() -> None:
    ok = [entry("top", "cid.t", "cid.b"), entry("base", "cid.b")]
    check_chain("fs1", ok)
    with pytest.raises(LabStateError, match="top on fs1 is being written"):
        check_chain("fs1", [entry("top", None, None, state="writing"), entry("base", "cid.b")])
    with pytest.raises(LabStateError, match="parent whose content has changed"):
        check_chain("fs1", [entry("top", "cid.t", "cid.b", state="parent-changed"),
                            entry("base", "cid.b")])
    with pytest.raises(LabStateError, match="changed while it was read"):
        check_chain("fs1", [entry("top", "cid.t", "cid.old"), entry("base", "cid.b")])


@in_loop
async def test_one_writer_per_image_and_only_the_holder_lets_go(tmp_path: Path) -> None:
    agent = Filestores("n", "127.0.0.1", SECRET, 1, root=tmp_path)
    fs = add_store(agent, tmp_path, "fs1")
    make_chain(fs.images)
    e = await agent.lease(p.LeaseFile("fs1", "clone.qcow2", "vm1"))
    assert (e.state, e.in_use_by, e.content_id) == ("in-use", "vm1", None)
    with pytest.raises(StorageNodeError, match="already the disk of VM vm1"):
        await agent.lease(p.LeaseFile("fs1", "clone.qcow2", "vm2"))
    with pytest.raises(StorageNodeError, match="disk of VM vm1"):
        await agent.delete_file(p.FileRef("fs1", "clone.qcow2"))
    # a release by another VM changes nothing; the holder's does
    assert (await agent.lease(p.LeaseFile("fs1", "clone.qcow2", "vm2", release=True))
            ).in_use_by == "vm1"
    # the holder may put a new top on its own layer (a snapshot); nobody else may
    with pytest.raises(StorageNodeError, match="in-use by VM vm1"):
        await agent.create_overlay(p.CreateOverlay("fs1", "x.qcow2", "clone.qcow2"))
    released = await agent.lease(p.LeaseFile("fs1", "clone.qcow2", "vm1", release=True))
    assert released.in_use_by is None and released.content_id is not None
    # the lease is on the datastore: a new agent knows it
    await agent.lease(p.LeaseFile("fs1", "base.qcow2", "vm3"))
    again = Filestores("n", "127.0.0.1", SECRET, 1, root=tmp_path)
    fs2 = add_store(again, tmp_path, "fs1")
    assert again.entry(fs2, "base.qcow2").in_use_by == "vm3"


@pytest.mark.parametrize(("ending", "why"), [
    ("closed", "lost the source mid-copy"),  # the source's node went away
    ("silent", r"sent nothing for 0\.5 s"),  # a cut link: nothing arrives, nothing closes
])
@in_loop
async def test_a_copy_whose_source_fails_midway_leaves_nothing_behind(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ending: str, why: str) -> None:
    monkeypatch.setattr(files, "STALL_S", 0.5)
    async with two_agents(tmp_path) as (a, b):
        src = add_store(a.agent, a.agent.root, "fs1")
        dst = add_store(b.agent, b.agent.root, "fs2")
        make_chain(src.images)
        cid = (await a.agent.chain(p.FileRef("fs1", "base.qcow2"))).layers[0].content_id

        async def fails(stream: Any, _params: dict[str, object]) -> None:
            await stream.send({"at": 0, "len": 4})
            stream.write_bytes(b"QFI\xfb")
            await stream.drain()
            if ending == "closed":
                stream.close()
            else:
                await asyncio.sleep(5)

        a.server.streams[p.FILE_SEND] = fails
        with pytest.raises(StorageNodeError, match=why):
            await b.agent.pull(p.PullFile(
                datastore="fs2", name="base.qcow2", source_address="127.0.0.1",
                source_port=a.port, source_datastore="fs1", source_name="base.qcow2",
                expect=str(cid)))
        assert not list(dst.incoming.iterdir()) and not dst.exists("base.qcow2")
        # the source is untouched: same ID
        again = (await a.agent.chain(p.FileRef("fs1", "base.qcow2"))).layers[0].content_id
        assert again == cid
