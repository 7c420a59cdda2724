"""Units: the ID registry, allocation policy, datastore ID parsing, event formatting."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from labctl.core.errors import LabError, LabStateError
from labctl.core.ids import naa_from_unit_serial, normal_id
from labctl.core.wire import WallTime
from labctl.datastores import rescan
from labctl.datastores.protocol import CacheEntry
from labctl.datastores.registry import IdRegistry
from labctl.datastores.service import check_hosts, check_size, pick_node, resize
from labctl.datastores.tables import DATASTORES, RescanEvent
from labctl.state.context import LabContext
from labctl.state.inventory import Inventory
from labctl.state.labdir import LabDir


def test_registry_issues_lio_naa_ids_once(tmp_path: Path) -> None:
    reg = IdRegistry(tmp_path / "ids.db")
    got = [reg.issue("lab", tmp_path, "stor1", f"ds{i}") for i in range(200)]
    naas = [naa for _, naa in got]
    assert len(set(naas)) == len(naas)
    for serial, naa in got:
        assert len(serial) == 32 and naa == "naa." + naa_from_unit_serial(serial)
        assert naa.startswith("naa.6001405")
    reg.release(naas[0])
    row = reg.get(naas[0])
    assert row is not None and row.released is not None  # kept after a delete
    assert len(reg.all()) == 200


def test_registry_never_reissues_a_colliding_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                ) -> None:
    import uuid

    reg = IdRegistry(tmp_path / "ids.db")
    fixed = [uuid.UUID("0123456789abcdef0123456789abcdef"),
             uuid.UUID("0123456789abcdef0123456789abcd00"),  # same first 25 digits: same NAA
             uuid.UUID("fedcba9876543210fedcba9876543210")]
    monkeypatch.setattr(uuid, "uuid4", lambda: fixed.pop(0))
    a = reg.issue("lab", tmp_path, "stor1", "a")
    b = reg.issue("lab2", tmp_path, "stor2", "b")
    assert a[1] != b[1] and b[0].startswith("fedcba")


def test_a_damaged_registry_is_one_line(tmp_path: Path) -> None:
    """``datastore show`` of a lab that is down read it: sqlite3.DatabaseError."""
    path = tmp_path / "ids.db"
    path.write_bytes(bytes(range(256)) * 20)
    with pytest.raises(LabStateError) as exc:
        IdRegistry(path).get("naa.6001405" + "0" * 25)
    assert exc.value.message == (f"cannot read the datastore ID registry {path} "
                                 "(file is not a database)")


def _inv(tmp_path: Path) -> Inventory:
    inv = Inventory.open(tmp_path / "inv.db", [DATASTORES])
    for name, cap, state in (("s1", 1 << 30, "up"), ("s2", 2 << 30, "up"), ("s3", 8 << 30, "down")):
        inv.upsert("storage_nodes", name=name, site="a", address="10.0.0.2", target_iqn="iqn.x",
                   domain="d", tap="t", agent_port=1, capacity=cap, state=state)
    inv.upsert("datastores", name="big", node="s2", size_bytes=(1 << 30) + (512 << 20),
               unit_serial="0" * 32, naa=None, lun=None, disk_serial="lc-big", backing_path="/x",
               state="exported", created=time.time())
    return inv


def test_pick_node_most_free_space_and_refusal(tmp_path: Path) -> None:
    inv = _inv(tmp_path)
    assert pick_node(inv, 256 << 20, "a") == "s1"  # s1 1G free, s2 512M free, s3 down
    assert pick_node(inv, 256 << 20, "a", node="s2") == "s2"
    with pytest.raises(LabStateError) as exc:
        pick_node(inv, 2 << 30, "a")
    assert exc.value.message == ("no storage node has room for 2G (s1: 1G free of 1G; "
                                 "s2: 512M free of 2G; s3: 8G free of 8G (down))")
    with pytest.raises(LabStateError, match="no storage node in site b"):
        pick_node(inv, 1 << 20, "b")


@pytest.mark.parametrize("size", ["1" * 400, "1" * 400 + "M", "99999T"])
def test_an_absurd_datastore_size_is_refused(size: str) -> None:
    """``datastore create --size`` and ``datastore resize``: a long number used to overflow."""
    with pytest.raises(LabStateError) as exc:
        check_size(size)
    assert "more than 1024T; use a number with K, M, G or T" in exc.value.message
    assert check_size("1.5M") == 3 << 19


def test_check_hosts_says_what_is_wrong_with_the_list(tmp_path: Path) -> None:
    """``datastore create --hosts ''`` named no host: it said "name each host once"."""
    inv = _inv(tmp_path)
    for name, site in (("h1", "a"), ("h2", "a"), ("h3", "b")):
        inv.upsert("hosts", name=name, site=site, address="10.0.0.11", initiator_iqn="iqn.h",
                   netns="n", veth="v", agent_port=1, memory=1 << 30)
    assert check_hosts(inv, ["h1", "h2"]) == "a"
    for hosts, message in (
            ([], "no host named: --hosts lists the hosts that share the datastore, "
                 "comma-separated (hosts: h1, h2, h3)"),
            (["h1", "h1"], "host h1 is named twice in --hosts: name each host once"),
            (["h1", "h9"], "unknown host 'h9' (hosts: h1, h2, h3)"),
            (["h1", "h3"], "the hosts of a datastore must be in one site (['a', 'b'])")):
        with pytest.raises(LabStateError) as exc:
            check_hosts(inv, hosts)
        assert exc.value.message == message


def test_normal_id() -> None:
    assert normal_id("NAA.6001405ABC" + "0" * 22) == "naa.6001405abc" + "0" * 22
    assert normal_id("6001405abcdef0123456789012345678") == "naa.6001405abcdef0123456789012345678"
    for bad in ("", "naa.xyz", "naa.1234"):
        with pytest.raises(LabError):
            normal_id(bad)


def test_agreement_rules() -> None:
    unit = "naa." + "6" * 32
    ok = CacheEntry(naa=unit, datastore="ds1", portal="10.0.0.2:3260", target_iqn="iqn.x", lun=0,
                    size_bytes=10, state="ok", seen_naa=unit, scanned_at=1.0, scans=1,
                    scsi_commands=2, error=None)
    agrees = rescan.RescanService._agrees
    assert agrees(ok, rescan.Expected("ok", 10), unit)
    assert not agrees(ok, rescan.Expected("ok", 11), unit)
    assert not agrees(ok.replace(seen_naa="naa.1"), rescan.Expected("ok", 10), unit)
    assert agrees(ok.replace(state="unreachable"), rescan.Expected("unreachable"), unit)
    assert rescan.Expected("unreachable").record() == {"state": "unreachable"}
    assert rescan.Expected("ok", 10).record() == {"state": "ok", "size_bytes": 10}


def test_format_event() -> None:
    ev = RescanEvent(
        id=3, at=WallTime(time.time()), source="storage:stor1", kind="lun_capacity_changed",
        naa="naa.6001", datastore="ds1", detail={}, state="partial", coalesced_into=None,
        lookup="inventory", size_bytes=96 << 20, expected={"state": "ok"}, hosts_sharing=None,
        hosts_polled=None, hosts_refreshed=["h1"], hosts_stale=["h2"], hosts_disagree=[],
        hosts_late=[], scsi_commands=None, vms_resized=[], agreed_ms=None, agreed_at=None,
        finished_at=None, message=None)
    line = rescan.format_event(ev)
    assert "size 96 MiB; lookup inventory; refreshed h1; stale h2 [partial]" in line
    assert "coalesced into #3" in rescan.format_event(ev.replace(state="coalesced",
                                                                 coalesced_into=3))


def _ctx(tmp_path: Path) -> LabContext:
    d = LabDir("t", tmp_path)
    d.create()
    inv = _inv(tmp_path / "t")
    inv.upsert("datastores", name="ds1", node="s1", size_bytes=64 << 20, unit_serial="1" * 32,
               naa="naa.6001405" + "1" * 25, lun=0, disk_serial="lc-ds1", backing_path="/b",
               state="exported", created=time.time())
    return LabContext("t", d, inv)


def test_resize_to_the_size_it_has_is_done_and_smaller_refused(tmp_path: Path) -> None:
    """Like any idempotent request, asking for the size a datastore already has succeeds
    (nothing is touched: no libvirt is reached here); a smaller size is refused."""
    ctx = _ctx(tmp_path)
    try:
        same = asyncio.run(resize(ctx, "ds1", "64M", wait=0))
        assert same.changed is False and same.size_bytes == 64 << 20 and same.event is None
        with pytest.raises(LabStateError, match="a LUN only grows"):
            asyncio.run(resize(ctx, "ds1", "32M", wait=0))
    finally:
        ctx.inv.close()
