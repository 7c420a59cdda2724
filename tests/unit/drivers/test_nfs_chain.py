"""A VM's disk on a file datastore: the explicit block graph QEMU is started with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from labctl.drivers.qemu import build_argv, chain_nodes
from labctl.hosts import protocol as hp

DISK = hp.NfsChainDisk(server="10.9.0.2", layers=[
    hp.NfsLayer("/srv/labctl/fs1/images/vm1.s1.qcow2"),
    hp.NfsLayer("/srv/labctl/fs1/images/vm1.qcow2"),
    hp.NfsLayer("/srv/labctl/fs1/images/base.raw", "raw")])


def test_the_graph_names_each_layers_backing_node() -> None:
    nodes = chain_nodes(DISK)
    formats = [n for n in nodes if n["driver"] != "nfs"]
    assert [n["node-name"] for n in formats] == ["disk0-l2", "disk0-l1", "disk0"]
    assert formats[0] == {"node-name": "disk0-l2", "driver": "raw", "file": "disk0-l2-file"}
    assert formats[1]["backing"] == "disk0-l2" and formats[2]["backing"] == "disk0-l1"
    files = {n["node-name"]: n for n in nodes if n["driver"] == "nfs"}
    assert files["disk0-file"]["path"] == "/srv/labctl/fs1/images/vm1.s1.qcow2"
    assert files["disk0-file"]["server"] == {"type": "inet", "host": "10.9.0.2"}


def test_qemu_gets_the_graph_as_json_blockdevs(tmp_path: Path) -> None:
    spec = hp.VmSpec(name="vm1", memory_mib=128, vcpus=1, kernel=Path("/k"),
                     initrd=Path("/i"), append="", disk=DISK)
    argv = build_argv(spec, tmp_path)
    blockdevs = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-blockdev"]
    assert blockdevs == chain_nodes(DISK)
    assert "virtio-blk-pci,drive=disk0,id=vda" in argv


@pytest.mark.parametrize("bad", [
    {"server": "nfs.example", "layers": [{"path": "/a"}]},
    {"server": "10.0.0.1", "layers": []},
    {"server": "10.0.0.1", "layers": [{"path": "relative.qcow2"}]},
    {"server": "10.0.0.1", "layers": [{"path": "/a/../etc/shadow"}]},
    {"server": "10.0.0.1", "layers": [{"path": "/a", "format": "vmdk"}]},
])
def test_a_bad_chain_is_refused(bad: dict[str, object]) -> None:
    from labctl.core.errors import ProtocolError

    with pytest.raises((ValueError, ProtocolError)):
        hp.NfsChainDisk.from_wire(bad)
