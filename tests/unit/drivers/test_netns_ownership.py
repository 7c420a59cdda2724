"""A network namespace is the lab's only if it carries the lab's mark (the alias of its ``lo``),
never because of its name: the same lab name under another ``LABCTL_HOME`` gives the same
namespace name and must neither adopt nor delete the first lab's namespace, and a namespace
made by something else (``ip netns add``) is never taken or removed.

Real namespaces (root): each test uses names of its own (``labctl-lcx<random>-...``) and
removes what is left of them in ``finally``; checks from outside go through ``ip``."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from labctl.core import names
from labctl.core.errors import NetworkSetupError
from labctl.drivers import netlink
from labctl.hosts.provider import HostPlan, NamespaceHosts
from labctl.state.inventory import Inventory

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")

NETNS_DIR = Path("/run/netns")


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _lo(ns: str) -> dict[str, object]:
    """``lo`` of namespace ``ns`` as ``ip -j link`` shows it."""
    out = subprocess.run(["ip", "-n", ns, "-j", "link", "show", "lo"], capture_output=True,
                         text=True, check=True).stdout
    link: dict[str, object] = json.loads(out)[0]
    return link


@dataclass(frozen=True)
class SameName:
    """Lab ``lab`` under two homes: the same namespace name, two marks."""

    lab: str
    dirs: tuple[Path, Path]
    host: str = "h1"

    @property
    def ns(self) -> str:
        return names.netns(self.lab, self.host)

    def tag(self, home: int) -> str:
        return names.lab_tag(self.lab, self.dirs[home])

    def mark(self, home: int) -> str:
        return names.netns_mark(self.lab, self.host, self.tag(home))


@pytest.fixture
def same(tmp_path: Path) -> Iterator[SameName]:
    lab = f"lcx{secrets.token_hex(3)}"
    dirs = (tmp_path / "home1" / "labs" / lab, tmp_path / "home2" / "labs" / lab)
    n = 2
    while names.lab_tag(lab, dirs[0]) == names.lab_tag(lab, dirs[1]):  # 1 in 65536
        n += 1
        dirs = (dirs[0], tmp_path / f"home{n}" / "labs" / lab)
    for d in dirs:
        d.mkdir(parents=True)
    s = SameName(lab, dirs)
    assert s.ns not in _namespaces()
    try:
        yield s
    finally:
        # what a test left of its own names (nothing, when the test passed)
        path = NETNS_DIR / s.ns
        if os.path.ismount(path):
            subprocess.run(["ip", "netns", "del", s.ns], capture_output=True, check=False)
        elif path.exists():
            path.unlink()
        for tag in (s.tag(0), s.tag(1)):
            subprocess.run(["ip", "link", "del", names.veth(tag, 1)], capture_output=True,
                           check=False)


def test_the_mark_differs_for_the_same_lab_under_another_home(same: SameName) -> None:
    assert same.mark(0) == f"labctl:{same.lab}:netns:h1@{same.tag(0)}"
    assert same.mark(0) != same.mark(1)


def test_a_new_namespace_is_marked_up_and_ensure_is_idempotent(same: SameName) -> None:
    netlink.ensure_netns(same.ns, same.mark(0))
    assert same.ns in _namespaces()
    lo = _lo(same.ns)
    assert lo.get("ifalias") == same.mark(0)
    assert "UP" in str(lo.get("flags"))
    netlink.ensure_netns(same.ns, same.mark(0))  # the owner again: taken as it is
    assert _lo(same.ns).get("ifalias") == same.mark(0)
    assert sorted(n for n in _namespaces() if n.startswith(f"labctl-{same.lab}-")) == [same.ns]


def test_the_same_lab_under_another_home_is_refused_and_cannot_delete_it(same: SameName) -> None:
    netlink.ensure_netns(same.ns, same.mark(0))
    with pytest.raises(NetworkSetupError) as info:
        netlink.ensure_netns(same.ns, same.mark(1))
    msg = info.value.message
    assert msg.startswith(f"network namespace {same.ns} exists and belongs to another lab (")
    assert msg.endswith("): refusing to touch it")
    assert "\n" not in msg
    assert repr(same.mark(0)) in msg and repr(same.mark(1)) in msg
    # the other home's teardown removes nothing; the namespace is as the owner left it
    assert netlink.delete_netns(same.ns, same.mark(1)) is False
    assert same.ns in _namespaces()
    assert _lo(same.ns).get("ifalias") == same.mark(0)
    # its owner removes it
    assert netlink.delete_netns(same.ns, same.mark(0)) is True
    assert same.ns not in _namespaces()
    assert netlink.delete_netns(same.ns, same.mark(0)) is False  # gone: nothing to remove


def test_a_foreign_unmarked_namespace_is_never_taken_nor_deleted(same: SameName) -> None:
    subprocess.run(["ip", "netns", "add", same.ns], check=True)
    for home in (0, 1):
        with pytest.raises(NetworkSetupError) as info:
            netlink.ensure_netns(same.ns, same.mark(home))
        assert info.value.message == (
            f"network namespace {same.ns} exists and belongs to another lab (its lo carries no "
            "labctl mark): refusing to touch it")
        assert netlink.delete_netns(same.ns, same.mark(home)) is False
    assert same.ns in _namespaces()
    lo = _lo(same.ns)  # untouched: no alias given, still down
    assert not lo.get("ifalias")
    assert "UP" not in str(lo.get("flags"))


def test_a_name_that_is_no_namespace_is_refused_and_left(same: SameName) -> None:
    """An empty ``/run/netns/<name>`` (what a creation killed before its bind mount leaves,
    ours or anyone's) is not provably the lab's: refused, left in place."""
    NETNS_DIR.mkdir(exist_ok=True)
    path = NETNS_DIR / same.ns
    path.touch()
    with pytest.raises(NetworkSetupError) as info:
        netlink.ensure_netns(same.ns, same.mark(0))
    assert info.value.message.startswith(f"network namespace {same.ns} exists and cannot be entered")
    assert info.value.message.endswith(": refusing to touch it")
    assert netlink.delete_netns(same.ns, same.mark(0)) is False
    assert path.exists() and not os.path.ismount(path)


def test_a_namespace_is_never_left_unmarked_under_its_name(same: SameName) -> None:
    """If marking fails, the namespace never got the name (the mark is set before the bind)."""
    with pytest.raises(NetworkSetupError) as info:
        netlink.ensure_netns(same.ns, "x" * 300)  # longer than IFALIASZ: the kernel refuses it
    assert info.value.message.startswith(f"cannot create network namespace {same.ns}: ")
    assert same.ns not in _namespaces()
    assert not (NETNS_DIR / same.ns).exists()


def _plan(same: SameName, home: int) -> HostPlan:
    return HostPlan(name=same.host, index=1, address=ipaddress.IPv4Interface("10.231.250.2/24"),
                    bridge="lcxnobridge", state_dir=same.dirs[home] / "hosts" / same.host)


def test_the_provider_of_another_home_refuses_and_its_teardown_leaves_it(same: SameName) -> None:
    """The probe's sequence: lab A up under home 1, lab A up under home 2 (refused, having
    journalled the namespace), lab A down under home 2; then lab A down under home 1."""
    invs = [Inventory.open(d / "inventory.db") for d in same.dirs]
    try:
        netlink.ensure_netns(same.ns, same.mark(0))  # what home 1's provision made
        invs[0].own("netns", same.ns, role="host", mark=same.mark(0))
        second = NamespaceHosts(same.lab, same.dirs[1], invs[1])
        with pytest.raises(NetworkSetupError, match="belongs to another lab"):
            asyncio.run(second.provision(_plan(same, 1), b"s" * 32))
        assert [k for k, _, _ in invs[1].owned()] == ["netns"]  # journalled before the refusal
        veth2 = names.veth(same.tag(1), 1)
        assert subprocess.run(["ip", "link", "show", veth2], capture_output=True,
                              check=False).returncode != 0  # nothing went into it
        removed: list[str] = []
        asyncio.run(second.teardown(invs[1], removed))
        assert removed == []
        assert invs[1].owned() == []
        assert _lo(same.ns).get("ifalias") == same.mark(0)
        asyncio.run(NamespaceHosts(same.lab, same.dirs[0], invs[0]).teardown(invs[0], removed))
        assert removed == [f"netns {same.ns}"]
        assert same.ns not in _namespaces()
    finally:
        for inv in invs:
            inv.close()


def test_a_journal_entry_without_a_mark_removes_nothing(same: SameName) -> None:
    """An entry journalled before namespaces were marked proves nothing about the namespace."""
    subprocess.run(["ip", "netns", "add", same.ns], check=True)
    inv = Inventory.open(same.dirs[0] / "inventory.db")
    try:
        inv.own("netns", same.ns, role="host")
        removed: list[str] = []
        asyncio.run(NamespaceHosts(same.lab, same.dirs[0], inv).teardown(inv, removed))
        assert removed == []
        assert same.ns in _namespaces()
    finally:
        inv.close()
