"""File datastores and chain copy, end to end: a storage node in each of two sites joined
by a WAN link (a router VM with real netem) exports file datastores over NFSv3 (kernel nfsd
in the node VM); hosts write image layers through QEMU's own NFS client; chain copy moves
layers agent to agent across the WAN (or within one node) and reuses parents by content ID.

Checked from outside labctl: QEMU's NFS client in the hosts' namespaces (refused where the
datastore is not exported), qemu-storage-daemon opening each chain as an explicit blockdev
graph over NFS, ``qemu-img compare`` of the two chains' guest views."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from labctl.cli.records import SCHEMA_DIR
from labctl.guest.image import ensure_guest_image
from labctl.guest.protocol import boot_args, decode_disk_record
from tests.conftest import (
    E2E,
    LabCli,
    free_subnet,
    in_ns,
    module_lab,
    outside_qmp,
    unique_lab,
    wait,
)

pytestmark = E2E

TOPO = """
name: {name}
sites: [{{name: site1, subnet: {net}}}, {{name: site2, subnet: {net2}}}]
storage_nodes:
  - {{name: stor1, site: site1, capacity: 1G}}
  - {{name: stor2, site: site2, capacity: 1G}}
hosts: [{{name: host1, site: site1}}, {{name: host3, site: site1}}, {{name: host2, site: site2}}]
datastores:
  - {{name: fs1, kind: file, size: 384M, node: stor1, hosts: [host1]}}
  - {{name: fs2, kind: file, size: 256M, node: stor2, hosts: [host2]}}
  - {{name: fs3, kind: file, size: 64M, node: stor1, hosts: [host1, host3]}}
wan: [{{name: wan1, sites: [site1, site2], delay: 5ms}}]
vms:
  - {{name: vm1, host: host1, disk: {{datastore: fs1, base: labctl-guest.qcow2}}, memory: 128M,
      working_set: 16M, dirty_rate: 1}}
  - {{name: vm2, host: host1, disk: {{datastore: fs3, base: labctl-guest.qcow2}}, memory: 128M,
      working_set: 16M, dirty_rate: 2}}
"""
#: the host each datastore's chains are opened from (one that shares it)
READER = {"fs1": "host1", "fs2": "host2", "fs3": "host1"}


@pytest.fixture(scope="module")
def lab(lab_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    name = unique_lab("chain")
    net, net2 = free_subnet(), free_subnet()
    with module_lab(name, TOPO.format(name=name, net=net, net2=net2), lab_home,
                    tmp_path_factory):
        cli = LabCli(name)
        yield {"name": name, "cli": cli, "work": tmp_path_factory.mktemp("images"),
               "nodes": {"stor1": str(net[2]), "stor2": str(net2[2])}}


def make_image(path: Path, size: str, *writes: str) -> Path:
    """A qcow2 file on this machine with ``writes`` (qemu-io commands) done to it."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    for w in writes:
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", w, str(path)], check=True,
                       capture_output=True)
    return path


def files(lab: dict[str, Any], ds: str) -> dict[str, dict[str, Any]]:
    return {f["name"]: f for f in lab["cli"].json("datastore", "files", ds)["files"]}


def node_of(ds: str) -> str:
    return "stor2" if ds == "fs2" else "stor1"


def graph(lab: dict[str, Any], ds: str, chain: list[str], top_name: str,
          read_only: bool = False) -> list[str]:
    """qemu-storage-daemon --blockdev arguments opening ``chain`` (top first) of ``ds``
    over NFS as an explicit graph: each layer's backing is the next node, the base's none."""
    server = {"type": "inet", "host": lab["nodes"][node_of(ds)]}
    args: list[str] = []
    below: str | None = None
    for i, name in enumerate(reversed(chain)):
        node = top_name if i == len(chain) - 1 else f"{top_name}-{i}"
        ro = {"read-only": True} if read_only else {}
        args += ["--blockdev", json.dumps({
            "node-name": f"{node}-file", "driver": "nfs", "server": server,
            "path": f"/srv/labctl/{ds}/images/{name}", **ro})]
        args += ["--blockdev", json.dumps({
            "node-name": node, "driver": "qcow2", "file": f"{node}-file", "backing": below,
            **ro})]
        below = node
    return args


@contextlib.contextmanager
def chains_over_nbd(lab: dict[str, Any], tmp: Path, *chains: tuple[str, list[str]],
                    writable: bool = True) -> Iterator[list[str]]:
    """Each (datastore, chain) opened through QEMU's NFS client by a qemu-storage-daemon in
    the namespace of a host sharing the datastore (one daemon per host), and exported over
    NBD on a unix socket: the chains' guest views as ``nbd+unix`` URLs. The daemons are
    ended by their PIDs."""
    by_host: dict[str, list[int]] = {}
    for i, (ds, _chain) in enumerate(chains):
        by_host.setdefault(READER[ds], []).append(i)
    urls = [""] * len(chains)
    procs = []
    try:
        for host, indexes in by_host.items():
            sock = tmp / f"qsd-{host}-{time.monotonic_ns()}.sock"
            argv = ["ip", "netns", "exec", f"labctl-{lab['name']}-{host}",
                    "qemu-storage-daemon", "--nbd-server", f"addr.type=unix,addr.path={sock}"]
            for i in indexes:
                ds, chain = chains[i]
                argv += graph(lab, ds, chain, f"c{i}", read_only=not writable)
                argv += ["--export", f"type=nbd,id=e{i},node-name=c{i},name=c{i},"
                                     f"writable={'on' if writable else 'off'}"]
                urls[i] = f"nbd+unix:///c{i}?socket={sock}"
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
            procs.append(proc)
            wait(functools.partial(_listening, sock, proc), 30, "qemu-storage-daemon")
            if proc.poll() is not None:
                pytest.fail("qemu-storage-daemon failed: "
                            f"{proc.stdout.read() if proc.stdout else ''}")
        yield urls
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


def _listening(sock: Path, proc: subprocess.Popen[str]) -> bool:
    return sock.exists() or proc.poll() is not None


def qemu_io(url: str, *cmds: str) -> str:
    argv = ["qemu-io", "-f", "raw"]
    for c in cmds:
        argv += ["-c", c]
    res = subprocess.run([*argv, url], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "Pattern verification failed" not in res.stdout, \
        res.stdout + res.stderr
    return res.stdout


def quiet(lab: dict[str, Any], ds: str, name: str) -> dict[str, Any]:
    """The file once its writer has let go of it (the NFS server closes it a few seconds
    after the last write): it has a content ID again."""
    return wait(lambda: (f := files(lab, ds).get(name)) and f["content_id"] and f, 60,
                f"{ds}:{name} to be quiet")


def test_a_file_datastore_is_exported_to_exactly_its_hosts(lab: dict[str, Any]) -> None:
    img = make_image(lab["work"] / "probe.qcow2", "16M", "write -P 0x5a 0 1M")
    lab["cli"]("image", "import", str(img), "--to", "fs1")
    url = f"nfs://{lab['nodes']['stor1']}/srv/labctl/fs1/images/probe.qcow2"
    ok = in_ns(lab["name"], "host1", "qemu-img", "info", "--output=json", url)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["virtual-size"] == 16 << 20
    # host3 is in the same site and shares another datastore of the node, not this one
    denied = in_ns(lab["name"], "host3", "qemu-img", "info", url)
    assert denied.returncode != 0 and "MNT3ERR_ACCES" in denied.stderr, denied.stderr
    shown = lab["cli"].json("datastore", "show", "fs1")
    assert shown["kind"] == "file" and shown["hosts"] == ["host1"]
    # each sharing host read the export itself, with QEMU's NFS client, at bring-up
    assert {h: c["state"] for h, c in shown["checked_by"].items()} == {"host1": "ok"}
    fs3 = lab["cli"].json("datastore", "show", "fs3")["checked_by"]
    assert {h: c["state"] for h, c in fs3.items()} == {"host1": "ok", "host3": "ok"}
    assert shown["naa"].startswith("naa.6001405")
    assert shown["url"] == f"nfs://{lab['nodes']['stor1']}/srv/labctl/fs1/images/"


def test_chain_copy_moves_only_the_missing_layers(lab: dict[str, Any], tmp_path: Path) -> None:
    cli = lab["cli"]
    base = make_image(lab["work"] / "base.qcow2", "64M", "write -P 0x11 0 8M")
    cli("image", "import", str(base), "--to", "fs1")
    cli("image", "clone", "fs1:base.qcow2", "clone-a.qcow2")
    cli("image", "clone", "fs1:base.qcow2", "clone-b.qcow2")
    # a host writes the clone through QEMU's NFS client; then a snapshot layer on top of it
    with chains_over_nbd(lab, tmp_path, ("fs1", ["clone-a.qcow2", "base.qcow2"])
                         ) as (url,):
        qemu_io(url, "write -P 0x22 4M 2M")
    quiet(lab, "fs1", "clone-a.qcow2")
    cli("image", "clone", "fs1:clone-a.qcow2", "snap-a.qcow2")
    with chains_over_nbd(lab, tmp_path,
                         ("fs1", ["snap-a.qcow2", "clone-a.qcow2", "base.qcow2"])) as (url,):
        qemu_io(url, "write -P 0x33 12M 3M")
    src = {n: quiet(lab, "fs1", n) for n in ("snap-a.qcow2", "clone-a.qcow2", "base.qcow2")}
    assert src["snap-a.qcow2"]["parent_content_id"] == src["clone-a.qcow2"]["content_id"]

    # the base first: nothing on fs2, so it is copied
    first = cli.json("chain", "copy", "fs1:base.qcow2", "--to", "fs2")
    assert [x["action"] for x in first["layers"]] == ["copied"]
    # then the snapshot: its two layers are missing, the base is reused by content ID
    done = cli.json("chain", "copy", "fs1:snap-a.qcow2", "--to", "fs2")
    assert [(x["source"], x["action"]) for x in done["layers"]] == [
        ("snap-a.qcow2", "copied"), ("clone-a.qcow2", "copied"), ("base.qcow2", "reused")]
    assert done["layers"][2]["target"] == "base.qcow2"
    missing = src["snap-a.qcow2"]["allocated_bytes"] + src["clone-a.qcow2"]["allocated_bytes"]
    assert done["missing_bytes"] == missing
    assert done["bytes_moved"] <= missing * 1.01
    assert done["bytes_moved"] < done["chain_bytes"] - 8 * 2**20  # the base did not move
    got = files(lab, "fs2")
    for n in ("snap-a.qcow2", "clone-a.qcow2", "base.qcow2"):
        assert got[n]["content_id"] == src[n]["content_id"], n
    assert got["snap-a.qcow2"]["backing_file"] == "clone-a.qcow2"
    # from outside: the two chains' guest views are identical, and the data reads back
    with chains_over_nbd(lab, tmp_path,
                         ("fs1", ["snap-a.qcow2", "clone-a.qcow2", "base.qcow2"]),
                         ("fs2", ["snap-a.qcow2", "clone-a.qcow2", "base.qcow2"])) as (a, b):
        res = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", a, b],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0 and "Images are identical" in res.stdout, res.stdout
        qemu_io(b, "read -P 0x11 0 4M", "read -P 0x22 4M 2M", "read -P 0x33 12M 3M",
                "read -P 0 16M 1M")
    # the same chain again: everything is there
    again = cli.json("chain", "copy", "fs1:snap-a.qcow2", "--to", "fs2")
    assert [x["action"] for x in again["layers"]] == ["reused"] and again["bytes_moved"] == 0


def test_a_file_with_the_parents_name_but_other_content_is_not_reused(
        lab: dict[str, Any], tmp_path: Path) -> None:
    cli = lab["cli"]
    real = make_image(lab["work"] / "n-real.qcow2", "32M", "write -P 0x44 0 2M")
    other = make_image(lab["work"] / "n-other.qcow2", "32M", "write -P 0x55 0 2M")
    cli("image", "import", str(real), "--to", "fs1", "--name", "nbase.qcow2")
    cli("image", "import", str(other), "--to", "fs2", "--name", "nbase.qcow2")
    cli("image", "clone", "fs1:nbase.qcow2", "nchild.qcow2")
    done = cli.json("chain", "copy", "fs1:nchild.qcow2", "--to", "fs2")
    base = done["layers"][1]
    assert base["action"] == "copied" and base["renamed"] and base["target"] != "nbase.qcow2"
    got = files(lab, "fs2")
    assert got["nchild.qcow2"]["backing_file"] == base["target"]
    assert got["nbase.qcow2"]["content_id"] != got[base["target"]]["content_id"]
    with chains_over_nbd(lab, tmp_path,
                         ("fs2", ["nchild.qcow2", base["target"]])) as (url,):
        qemu_io(url, "read -P 0x44 0 2M")


def test_a_parent_written_after_its_id_was_read_is_not_reused(
        lab: dict[str, Any], tmp_path: Path) -> None:
    cli = lab["cli"]
    img = make_image(lab["work"] / "s.qcow2", "32M", "write -P 0x66 0 2M")
    cli("image", "import", str(img), "--to", "fs1", "--name", "sbase.qcow2")
    cli("chain", "copy", "fs1:sbase.qcow2", "--to", "fs2")
    before = files(lab, "fs2")["sbase.qcow2"]["content_id"]
    # someone writes the target's copy through NFS: its content, so its ID, is no more
    with chains_over_nbd(lab, tmp_path, ("fs2", ["sbase.qcow2"])) as (url,):
        qemu_io(url, "write -P 0x77 1M 64k")
    after = quiet(lab, "fs2", "sbase.qcow2")["content_id"]
    assert after != before
    cli("image", "clone", "fs1:sbase.qcow2", "schild.qcow2")
    done = cli.json("chain", "copy", "fs1:schild.qcow2", "--to", "fs2")
    assert [x["action"] for x in done["layers"]] == ["copied", "copied"]
    assert done["layers"][1]["renamed"]
    with chains_over_nbd(lab, tmp_path,
                         ("fs2", ["schild.qcow2", done["layers"][1]["target"]])) as (url,):
        qemu_io(url, "read -P 0x66 0 2M")


def test_a_copy_within_one_node_reuses_parents_too(lab: dict[str, Any],
                                                    tmp_path: Path) -> None:
    cli = lab["cli"]
    img = make_image(lab["work"] / "l.qcow2", "16M", "write -P 0x41 0 3M")
    cli("image", "import", str(img), "--to", "fs1", "--name", "lbase.qcow2")
    cli("chain", "copy", "fs1:lbase.qcow2", "--to", "fs3")
    cli("image", "clone", "fs1:lbase.qcow2", "lchild.qcow2")
    with chains_over_nbd(lab, tmp_path, ("fs1", ["lchild.qcow2", "lbase.qcow2"])) as (url,):
        qemu_io(url, "write -P 0x42 1M 1M")
    quiet(lab, "fs1", "lchild.qcow2")
    done = lab["cli"].json("chain", "copy", "fs1:lchild.qcow2", "--to", "fs3")
    assert [x["action"] for x in done["layers"]] == ["copied", "reused"]
    with chains_over_nbd(lab, tmp_path, ("fs1", ["lchild.qcow2", "lbase.qcow2"]),
                         ("fs3", ["lchild.qcow2", "lbase.qcow2"])) as (a, b):
        res = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", a, b],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0 and "Images are identical" in res.stdout, res.stdout


def test_no_room_is_refused_before_anything_is_copied(lab: dict[str, Any]) -> None:
    cli = lab["cli"]
    big = make_image(lab["work"] / "big.qcow2", "128M", "write -P 0x12 0 72M")
    cli("image", "import", str(big), "--to", "fs1")
    before = files(lab, "fs3")
    res = cli("chain", "copy", "fs1:big.qcow2", "--to", "fs3", check=False)
    assert res.returncode == 1
    line = res.stderr.strip()
    assert len(line.splitlines()) == 1 and "no room" in line and "free" in line, line
    assert "Traceback" not in res.stderr
    assert files(lab, "fs3") == before


def test_the_top_of_a_chain_being_written_is_refused(lab: dict[str, Any],
                                                     tmp_path: Path) -> None:
    cli = lab["cli"]
    img = make_image(lab["work"] / "w.qcow2", "16M", "write -P 0x21 0 1M")
    cli("image", "import", str(img), "--to", "fs1", "--name", "wbase.qcow2")
    cli("image", "clone", "fs1:wbase.qcow2", "wtop.qcow2")
    with chains_over_nbd(lab, tmp_path, ("fs1", ["wtop.qcow2", "wbase.qcow2"])
                         ) as (url,):
        # a writer that keeps writing (every 0.3 s for 15 s) while the copy is asked for
        cmds: list[str] = []
        for i in range(50):
            cmds += ["-c", f"write -P 0x31 {i * 64}k 64k", "-c", "sleep 300"]
        writer = subprocess.Popen(["qemu-io", "-f", "raw", *cmds, url],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            wait(lambda: files(lab, "fs1")["wtop.qcow2"]["state"] == "writing", 30,
                 "the agent to see wtop.qcow2 being written")
            res = cli("chain", "copy", "fs1:wtop.qcow2", "--to", "fs2", check=False)
            assert res.returncode == 1 and "being written" in res.stderr, res.stderr
            assert writer.poll() is None  # it was still writing when the copy was refused
        finally:
            writer.wait(timeout=60)
        assert writer.returncode == 0, writer.stderr.read() if writer.stderr else ""
    assert "wtop.qcow2" not in files(lab, "fs2")
    # once the writer is gone the file is quiet again, with a new ID, and copies
    quiet(lab, "fs1", "wtop.qcow2")
    done = cli.json("chain", "copy", "fs1:wtop.qcow2", "--to", "fs2")
    assert [x["action"] for x in done["layers"]] == ["copied", "copied"]


def test_a_copy_cut_by_killing_the_target_node_leaves_no_partial_file(
        lab: dict[str, Any]) -> None:
    cli = lab["cli"]
    img = make_image(lab["work"] / "cut.qcow2", "96M", "write -P 0x5c 0 80M")
    cli("image", "import", str(img), "--to", "fs1", "--name", "cut.qcow2")
    source_id = files(lab, "fs1")["cut.qcow2"]["content_id"]
    copy = subprocess.Popen([sys.executable, "-m", "labctl.cli", "--lab", lab["name"], "chain",
                             "copy", "fs1:cut.qcow2", "--to", "fs2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)  # the copy is under way (80 MiB across the WAN takes a few s)
        assert copy.poll() is None, copy.communicate()
        # the target's storage node dies mid-copy, its agent with it (no reset is sent)
        subprocess.run(["virsh", "-c", "qemu:///system", "destroy",
                        f"labctl-{lab['name']}-stor2"], check=True, capture_output=True)
        _out, err = copy.communicate(timeout=120)
    finally:
        if copy.poll() is None:
            copy.kill()
            copy.wait()
    assert copy.returncode == 1 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and "stor2" in err, err
    assert files(lab, "fs1")["cut.qcow2"]["content_id"] == source_id  # the source untouched
    cli("storage", "restart", "stor2", timeout=300)
    got = files(lab, "fs2")
    assert "cut.qcow2" not in got  # the partial copy was dropped, never listed or matched
    done = cli.json("chain", "copy", "fs1:cut.qcow2", "--to", "fs2")
    assert done["layers"][0]["action"] == "copied"


def test_a_file_datastore_is_made_and_removed_while_the_lab_runs(lab: dict[str, Any]) -> None:
    cli = lab["cli"]
    made = cli.json("datastore", "create", "fs9", "--kind", "file", "--size", "96M",
                    "--hosts", "host1", "--node", "stor1")
    assert made["kind"] == "file" and made["checked_by"]["host1"]["state"] == "ok"
    url = f"nfs://{lab['nodes']['stor1']}/srv/labctl/fs9/images/.labctl-export"
    assert in_ns(lab["name"], "host1", "qemu-img", "info", url).returncode == 0
    denied = in_ns(lab["name"], "host3", "qemu-img", "info", url)
    assert denied.returncode != 0 and "MNT3ERR_ACCES" in denied.stderr, denied.stderr
    img = make_image(lab["work"] / "f9.qcow2", "8M", "write -P 0x39 0 1M")
    cli("image", "import", str(img), "--to", "fs1", "--name", "f9.qcow2")
    assert cli.json("chain", "copy", "fs1:f9.qcow2", "--to", "fs9")["bytes_moved"] > 0
    assert "fs9" in {d["name"] for d in cli.json("datastore", "list")}
    cli("datastore", "delete", "fs9")
    assert "fs9" not in {d["name"] for d in cli.json("datastore", "list")}
    gone = in_ns(lab["name"], "host1", "qemu-img", "info", url)
    assert gone.returncode != 0, gone.stdout
    # its ID is never handed out again, also to a datastore of the same name
    again = cli.json("datastore", "create", "fs9", "--kind", "file", "--size", "96M",
                     "--hosts", "host1", "--node", "stor1")
    assert again["naa"] != made["naa"] and files(lab, "fs9") == {}
    cli("datastore", "delete", "fs9")


def test_bad_requests_are_one_line_each(lab: dict[str, Any]) -> None:
    cli = lab["cli"]
    for args, why in ((("chain", "copy", "fs1", "--to", "fs2"), "DATASTORE:FILE"),
                      (("chain", "copy", "fs1:nope.qcow2", "--to", "fs2"), "no file nope"),
                      (("chain", "copy", "fs1:probe.qcow2", "--to", "fs1"), "already on"),
                      (("chain", "copy", "fs1:probe.qcow2", "--to", "ds9"),
                       "has no datastore 'ds9' in any site (datastores: fs1 (site1),"),
                      (("image", "import", "/nonexistent.qcow2", "--to", "fs1"), "cannot read"),
                      (("datastore", "resize", "fs1", "1G"), "file datastore")):
        res = cli(*args, check=False)
        assert res.returncode == 1 and why in res.stderr, (args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr


def vm_state(lab: dict[str, Any]) -> dict[str, Any]:
    return next(v for v in lab["cli"].json("status")["vms"] if v["name"] == "vm1")


def test_a_vm_on_a_linked_clone_is_snapshotted_and_its_chain_boots_elsewhere(
        lab: dict[str, Any], tmp_path: Path) -> None:
    cli = lab["cli"]
    got = files(lab, "fs1")
    assert got["vm1.qcow2"]["state"] == "in-use" and got["vm1.qcow2"]["in_use_by"] == "vm1"
    assert got["vm1.qcow2"]["backing_file"] == "labctl-guest.qcow2"
    assert got["labctl-guest.qcow2"]["state"] == "quiet"
    first = wait(lambda: (v := vm_state(lab))["disk_counter"] and v["disk_counter"] > 1 and v,
                 60, "vm1's disk counter")
    # its top is being written: refused, with the way out
    res = cli("chain", "copy", "vm1", "--to", "fs2", check=False)
    assert res.returncode == 1 and "--snapshot" in res.stderr, res.stderr
    # one writer per image: the top cannot be deleted under the VM
    res = cli("image", "delete", "fs1:vm1.qcow2", check=False)
    assert res.returncode == 1 and "disk of VM vm1" in res.stderr, res.stderr
    done = cli.json("chain", "copy", "vm1", "--to", "fs2", "--snapshot")
    assert [(x["source"], x["action"]) for x in done["layers"]] == [
        ("vm1.qcow2", "copied"), ("labctl-guest.qcow2", "copied")]
    # the guest went on writing, into the new top
    got = files(lab, "fs1")
    assert got["vm1.s1.qcow2"]["state"] == "in-use"
    assert got["vm1.s1.qcow2"]["backing_file"] == "vm1.qcow2"
    assert got["vm1.qcow2"]["state"] == "quiet"
    after = wait(lambda: (v := vm_state(lab))["disk_counter"] > first["disk_counter"] + 2
                 and v, 60, "vm1's disk counter to go on after the snapshot")
    assert after["state"] == "running" and after["heartbeat"]["age_s"] < 5
    # from outside: the copy is the chain as it was at the snapshot, record and all
    chain = ["vm1.qcow2", "labctl-guest.qcow2"]
    with chains_over_nbd(lab, tmp_path, ("fs1", chain), ("fs2", chain),
                         writable=False) as (a, b):
        res = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", a, b],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0 and "Images are identical" in res.stdout, res.stdout
        sector = subprocess.run(["qemu-img", "dd", "-f", "raw", "-O", "raw", f"if={b}",
                                 f"of={tmp_path / 's0'}", "bs=512", "count=1"],
                                capture_output=True, text=True, timeout=60)
        assert sector.returncode == 0, sector.stderr
    record = decode_disk_record((tmp_path / "s0").read_bytes())
    assert record is not None and first["disk_counter"] <= record <= after["disk_counter"]
    # a new VM booted from the copied chain in site2 reads that record back
    console = tmp_path / "console.log"
    image = asyncio.run(ensure_guest_image())
    qemu = subprocess.Popen(
        ["ip", "netns", "exec", f"labctl-{lab['name']}-host2", "qemu-system-x86_64",
         "-nodefaults", "-display", "none", "-machine", "q35", "-accel", "tcg", "-m", "128",
         "-kernel", str(image.kernel), "-initrd", str(image.initrd),
         "-append", boot_args(0, 16), "-serial", f"file:{console}",
         *graph(lab, "fs2", chain, "disk0"), "-device", "virtio-blk-pci,drive=disk0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        line = wait(lambda: next((ln for ln in console.read_text(errors="replace").splitlines()
                                  if ln.startswith("DISK boot")), None)
                    if console.exists() else None, 120, "the copied VM's DISK boot line")
        assert line == f"DISK boot {record}", line
    finally:
        qemu.terminate()
        qemu.wait(timeout=30)
    # nothing wrote the layer below the snapshot meanwhile; the new top grew
    got = files(lab, "fs1")
    assert got["vm1.qcow2"]["content_id"] == done["layers"][0]["content_id"]
    assert got["vm1.s1.qcow2"]["allocated_bytes"] > 0
    # a second snapshot by hand, then a restart from the four-layer chain
    snap = cli.json("vm", "snapshot", "vm1")
    assert snap["top"] == "vm1.s2.qcow2" and snap["previous"] == "vm1.s1.qcow2"
    assert snap["layers"] == ["vm1.s2.qcow2", "vm1.s1.qcow2", "vm1.qcow2",
                              "labctl-guest.qcow2"]
    cli("vm", "stop", "vm1")
    last = vm_state(lab)
    assert files(lab, "fs1")["vm1.s2.qcow2"]["in_use_by"] is None  # the lease went with it
    cli("vm", "start", "vm1")
    assert files(lab, "fs1")["vm1.s2.qcow2"]["in_use_by"] == "vm1"
    before_stop = after["disk_counter"]
    again = wait(lambda: (v := vm_state(lab))["disk_counter"] and v["disk_counter"] >
                 before_stop and v, 60, "vm1's disk counter after its restart")
    assert again["state"] == "running", (last, again)


def test_a_vm_on_a_file_datastore_migrates_between_the_hosts_sharing_it(
        lab: dict[str, Any]) -> None:
    cli = lab["cli"]
    for to in ("host3", "host1"):
        res = cli.json("migrate", "vm2", "--to", to)
        assert res["state"] == "completed", res.get("error")
        assert res["storage"] == "early" and res["heartbeat"]["continues"], res["heartbeat"]
        assert res["disk"]["ok"] and res["disk"]["dest_read"], res["disk"]
        v = next(x for x in cli.json("status")["vms"] if x["name"] == "vm2")
        assert v["host"] == to and v["state"] == "running"
        # its top layer is still held by vm2 alone (the lease names the VM, not the host)
        assert files(lab, "fs3")["vm2.qcow2"]["in_use_by"] == "vm2"
        # its own QMP, asked from outside labctl, says it runs there
        assert f"/hosts/{to}/" in v["qmp_check_socket"]
        assert outside_qmp(v["qmp_check_socket"], "query-status")["status"] == "running"
    # a host of the other site (it cannot reach fs3) is refused before anything starts
    res = cli("migrate", "vm2", "--to", "host2", check=False)
    assert res.returncode == 1 and "host host2 is in site site2 and VM vm2 in site site1" \
        in res.stderr, res.stderr
    res = cli("migrate", "vm2", "--to", "host3", "--late-storage", check=False)
    assert res.returncode in (1, 2) and "late" in res.stderr, res.stderr


def test_json_outputs_match_their_shipped_schemas(lab: dict[str, Any]) -> None:
    cli = lab["cli"]

    def schema(name: str) -> dict[str, Any]:
        return dict(json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text()))

    for ds in cli.json("datastore", "list"):
        jsonschema.validate(ds, schema("datastore" if ds.get("kind") != "file"
                                       else "file-datastore"))
    jsonschema.validate(cli.json("datastore", "show", "fs1"), schema("file-datastore"))
    jsonschema.validate(cli.json("datastore", "files", "fs1"), schema("datastore-files"))
    img = make_image(lab["work"] / "j.qcow2", "8M", "write -P 0x1 0 64k")
    jsonschema.validate(cli.json("image", "import", str(img), "--to", "fs1"),
                        schema("image-import"))
    jsonschema.validate(cli.json("image", "clone", "fs1:j.qcow2", "jc.qcow2"),
                        schema("image-clone"))
    jsonschema.validate(cli.json("chain", "copy", "fs1:jc.qcow2", "--to", "fs2"),
                        schema("chain-copy"))
    status = cli.json("status")
    kinds = {d["name"]: d["kind"] for d in status["datastores"]}
    assert kinds == {"fs1": "file", "fs2": "file", "fs3": "file"}


def test_content_ids_survive_a_storage_node_restart(lab: dict[str, Any]) -> None:
    before = {n: f["content_id"] for n, f in files(lab, "fs2").items()}
    assert before
    lab["cli"]("storage", "restart", "stor2", timeout=300)
    after = {n: f["content_id"] for n, f in files(lab, "fs2").items()}
    assert after == before
    # the export is back, for exactly its hosts; the route to the other site too
    url = f"nfs://{lab['nodes']['stor2']}/srv/labctl/fs2/images/sbase.qcow2"
    res = in_ns(lab["name"], "host2", "qemu-img", "info", url)
    assert res.returncode == 0, res.stderr
    res = in_ns(lab["name"], "host1", "qemu-img", "info", url)  # routed there, not exported
    assert res.returncode != 0 and "MNT3ERR_ACCES" in res.stderr, res.stderr
    img = make_image(lab["work"] / "after.qcow2", "8M", "write -P 0x2 0 1M")
    lab["cli"]("image", "import", str(img), "--to", "fs1")
    done = lab["cli"].json("chain", "copy", "fs1:after.qcow2", "--to", "fs2")
    assert done["layers"][0]["action"] == "copied"
