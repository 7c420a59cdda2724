"""The helpers that keep end-to-end runs on one machine apart: a free subnet and a unique lab
name (labctl/testing/checks.py)."""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import subprocess

import pytest

from labctl.drivers.netlink import overlapping_routes
from labctl.testing import checks
from labctl.testing.checks import E2E_SUBNETS, free_subnet, unique_lab


def test_free_subnets_are_free_distinct_and_in_range() -> None:
    got = [free_subnet() for _ in range(3)]
    assert len(set(got)) == 3
    for net in got:
        assert net.prefixlen == 24 and net.subnet_of(E2E_SUBNETS)
        assert overlapping_routes(net) == []


def test_unique_lab_names_are_valid_lab_names() -> None:
    names = {unique_lab("e2eclash") for _ in range(20)}
    assert len(names) == 20
    assert all(re.fullmatch(r"[a-z][a-z0-9-]{0,15}", n) for n in names)  # the topology schema
    with pytest.raises(AssertionError):
        unique_lab("a-prefix-too-long")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a veth of the test's own)")
def test_a_subnet_in_use_is_never_handed_out_and_its_half_clashes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    net = free_subnet()
    veth = f"lcx{secrets.token_hex(3)}"
    try:
        subprocess.run(["ip", "link", "add", veth, "type", "veth", "peer", "name", veth + "p"],
                       check=True)
        subprocess.run(["ip", "addr", "add", f"{net[1]}/24", "dev", veth], check=True)
        subprocess.run(["ip", "link", "set", veth, "up"], check=True)
        # what the e2e clash test relies on: half of a lab's subnet overlaps the lab's network
        assert overlapping_routes(next(net.subnets(new_prefix=25)))
        # another run on this machine (nothing handed out yet), picking from net and its
        # neighbour: it never gets net
        monkeypatch.setattr(checks, "E2E_SUBNETS", net.supernet(new_prefix=23))
        monkeypatch.setattr(checks, "_handed_out", set())
        handed: list[ipaddress.IPv4Network] = []
        with pytest.raises(AssertionError, match="is free on this machine"):
            for _ in range(3):
                handed.append(free_subnet())
        assert net not in handed and len(handed) <= 1
    finally:
        subprocess.run(["ip", "link", "del", veth], capture_output=True, check=False)
