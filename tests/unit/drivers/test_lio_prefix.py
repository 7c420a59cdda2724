"""Two labs' storage nodes on one machine share its LIO, where a backstore's name is the
kernel's, machine-wide: each node names its own with its prefix and sees only those. LIO
itself is faked here (no configfs on this kernel); the real one is in the storage
machine's end-to-end test."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

from labctl.drivers.lio import Lio


class _NotInCFS(Exception):
    pass


class _So:
    def __init__(self, name: str, wwn: str, plugin: str = "block") -> None:
        self.name, self.wwn, self.plugin = name, wwn, plugin
        self.udev_path, self.size, self.path = f"/dev/loop-{name}", 64 << 20, "/nowhere"


def _lio_with(objects: list[_So], prefix: str, tmp: Path) -> Lio:
    looked: list[str] = []

    def block(name: str) -> _So:
        looked.append(name)
        for so in objects:
            if so.name == name:
                return so
        raise _NotInCFS(name)

    def target(_fabric: Any, _iqn: str, _mode: str) -> Any:
        raise _NotInCFS("no target")

    fake = types.SimpleNamespace(
        RTSRoot=lambda: types.SimpleNamespace(storage_objects=objects),
        BlockStorageObject=block, FabricModule=lambda _n: None, Target=target,
        RTSLibNotInCFS=_NotInCFS, RTSLibError=RuntimeError)
    lio = Lio("stor1", "iqn.2026-01.test:lab", "10.0.0.2", sys_block=tmp, prefix=prefix)
    lio._rts = fake
    lio.looked = looked  # type: ignore[attr-defined]
    return lio


def test_each_lab_sees_only_its_own_backstores_by_their_datastore_names(
        tmp_path: Path) -> None:
    objects = [_So("a.1f2e.stor1:ds1", "11" * 16), _So("b.9c0d.stor1:ds1", "22" * 16),
               _So("someone-elses", "33" * 16), _So("a.1f2e.stor1:ds2", "44" * 16),
               _So("a.1f2e.stor1:f", "55" * 16, plugin="fileio")]
    a = _lio_with(objects, "a.1f2e.stor1:", tmp_path)
    b = _lio_with(objects, "b.9c0d.stor1:", tmp_path)
    assert [(lun.name, lun.serial) for lun in a.status().luns] == [
        ("ds1", "11" * 16), ("ds2", "44" * 16)]
    assert [(lun.name, lun.serial) for lun in b.status().luns] == [("ds1", "22" * 16)]
    # a datastore is looked up under the node's own name for it
    assert b.capacity("ds1").name == "ds1" and b.looked == ["b.9c0d.stor1:ds1"]  # type: ignore[attr-defined]
    assert a.delete_lun("ds9").deleted is False
    # a node VM's LIO is its own: no prefix, every iblock backstore is the node's
    vm = _lio_with(objects, "", tmp_path)
    assert len(vm.status().luns) == 4
