"""A topology's clouds: a site whose VMs libvirt runs has no labctl hosts or storage nodes;
a server guest gets an address of its own from .101 of its host's site, boots a clone of
the server image on a file datastore, and has none of the test guest's knobs."""

from __future__ import annotations

import ipaddress

import pytest

from labctl.core.errors import TopologyError
from labctl.lab import topology

BASE = """
name: t
sites:
  - {name: cloud-a, subnet: 10.231.20.0/24}
  - {name: cloud-b, subnet: 10.231.21.0/24, provider: libvirt}
storage_nodes: [{name: stor-a, site: cloud-a}]
hosts: [{name: a1, site: cloud-a}, {name: a2, site: cloud-a}]
datastores: [{name: fs-a, kind: file, node: stor-a, size: 1G, hosts: [a1, a2]}]
vms:
  - {name: web1, host: a1, guest: server, disk: {datastore: fs-a, base: labctl-server.raw}}
  - {name: web2, host: a2, guest: server, address: 10.231.20.50, app: 512KiB/s,
     disk: {datastore: fs-a, base: labctl-server.raw}}
wan: [{name: wan1, sites: [cloud-a, cloud-b]}]
"""


def test_server_guests_and_a_libvirt_cloud() -> None:
    topo = topology.parse(BASE, "lab.yaml")
    assert [s.provider for s in topo.sites] == ["labctl", "libvirt"]
    web1, web2 = topo.vms
    assert (web1.guest, web1.address) == ("server", ipaddress.IPv4Address("10.231.20.101"))
    assert web2.address == ipaddress.IPv4Address("10.231.20.50")
    assert web1.heartbeat_ms == 1000  # one console line a second, not ten
    assert (web1.app_rate, web2.app_rate) == (None, 512 * 1024)
    # cloud B's API endpoint: its .2, a name of its own; cloud A has none
    assert (topo.sites[1].api, topo.sites[1].api_name) == (
        ipaddress.IPv4Address("10.231.21.2"), "cloud-b-api")
    assert topo.sites[0].api is None


def _problem(old: str, new: str) -> str:
    assert old in BASE
    with pytest.raises(TopologyError) as info:
        topology.parse(BASE.replace(old, new), "lab.yaml")
    return str(info.value)


@pytest.mark.parametrize(("old", "new", "words"), [
    ("{name: a2, site: cloud-a}", "{name: a2, site: cloud-b}",
     "site cloud-b's VMs are run by libvirt: it has no labctl hosts"),
    ("{name: stor-a, site: cloud-a}]", "{name: stor-a, site: cloud-a}, {name: s2, site: cloud-b}]",
     "site cloud-b's VMs are run by libvirt"),
    ("guest: server, disk: {datastore: fs-a, base: labctl-server.raw}}",
     "guest: server, dirty_rate: 5, disk: {datastore: fs-a, base: labctl-server.raw}}",
     "vms[0].dirty_rate: the test guest's knob"),
    ("{name: web1, host: a1, guest: server, disk: {datastore: fs-a, base: labctl-server.raw}}",
     "{name: web1, host: a1, guest: server}", "a server guest boots a clone of the server image"),
    ("{name: web1, host: a1, guest: server, disk: {datastore: fs-a, base: labctl-server.raw}}",
     "{name: web1, host: a1, address: 10.231.20.60, disk: {datastore: fs-a, base: x.qcow2}}",
     "only a server guest has an address of its own"),
    ("address: 10.231.20.50", "address: 10.231.21.50", "is not a usable address of cloud-a"),
    ("app: 512KiB/s", "app: fast", "vms[1].app: 'fast' is not a rate"),
    ("provider: libvirt", "provider: vmware", "provider"),
    ("{name: a2, site: cloud-a}", "{name: cloud-b-api, site: cloud-a}",
     "its API endpoint's name 'cloud-b-api' is already the name of hosts[1]"),
])
def test_refusals(old: str, new: str, words: str) -> None:
    assert words in _problem(old, new)


def test_a_libvirt_cloud_s_quota() -> None:
    topo = topology.parse(BASE.replace("provider: libvirt}", "provider: libvirt, quota: "
                                       "{vms: 2, memory: 768M, disk: 2G}}"), "lab.yaml")
    assert topo.sites[1].quota == {"vms": 2, "memory": 768 << 20, "disk": 2 << 30}
    assert topo.sites[0].quota is None


@pytest.mark.parametrize(("old", "new", "words"), [
    ("10.231.20.0/24}", "10.231.20.0/24, quota: {vms: 1}}",
     "sites[0].quota: only a libvirt cloud has a quota"),
    ("provider: libvirt}", "provider: libvirt, quota: {memory: lots}}",
     "sites[1].quota.memory"),
    ("provider: libvirt}", "provider: libvirt, quota: {cpus: 4}}", "cpus"),
])
def test_a_quota_refused(old: str, new: str, words: str) -> None:
    assert words in _problem(old, new)


def test_a_server_clone_larger_than_the_image() -> None:
    topo = topology.parse(BASE.replace("base: labctl-server.raw}}\n  - {name: web2",
                                       "base: labctl-server.raw, size: 2G}}\n  - {name: web2"),
                          "lab.yaml")
    # a clone with no size of its own gets room for the application's data
    assert (topo.vms[0].disk_size, topo.vms[1].disk_size) == (2 << 30, 512 << 20)
    smallest = BASE.replace("base: labctl-server.raw}}\n  - {name: web2",
                            "base: labctl-server.raw, size: 256M}}\n  - {name: web2")
    assert topology.parse(smallest, "lab.yaml").vms[0].disk_size == 256 << 20
    small = BASE.replace("base: labctl-server.raw}}\n  - {name: web2",
                         "base: labctl-server.raw, size: 255M}}\n  - {name: web2")
    with pytest.raises(TopologyError, match=r"vms\[0\].disk.size: at least 256M \(the server"):
        topology.parse(small, "lab.yaml")
