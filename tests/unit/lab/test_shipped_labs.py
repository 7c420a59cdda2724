"""Every topology file shipped in labs/ is valid (what `labctl validate` checks of the file)."""

from __future__ import annotations

from pathlib import Path

import pytest

from labctl.lab import topology

LABS = sorted((Path(__file__).resolve().parents[3] / "labs").glob("*.yaml"))


@pytest.mark.parametrize("path", LABS, ids=[p.name for p in LABS])
def test_a_shipped_lab_loads(path: Path) -> None:
    topo = topology.load(path)
    assert topo.hosts and topo.sites


def test_the_chain_copy_lab_has_a_file_datastore_per_site_and_a_vm_on_a_clone() -> None:
    topo = topology.load(LABS[0].parent / "chain-copy.yaml")
    kinds = {d.name: (d.kind, topo.storage_node(d.node).site) for d in topo.datastores}
    assert kinds == {"fs-a": ("file", "site-a"), "fs-b": ("file", "site-b")}
    vm = topo.vm("vm1")
    assert (vm.datastore, vm.base) == ("fs-a", "labctl-guest.qcow2") and topo.wan
