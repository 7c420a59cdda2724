"""Topology validation: every bad input names the file, the place in it and the problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from labctl.core.errors import TopologyError
from labctl.lab import topology

GOOD = """
name: t1
sites: [{name: s1, subnet: 10.231.8.0/24}]
storage_nodes: [{name: stor1, capacity: 1G}]
hosts: [{name: h1}, {name: h2}, {name: h3, address: 10.231.8.12}]
datastores: [{name: ds1, size: 256M, hosts: [h1, h2]}]
vms: [{name: vm1, host: h1, datastore: ds1}]
"""


def test_default_lab_is_valid() -> None:
    topo = topology.load(Path(__file__).resolve().parents[3] / "labs" / "default.yaml")
    assert [h.name for h in topo.hosts] == ["host1", "host2"]
    assert topo.datastores[0].hosts == ("host1", "host2")
    assert topo.vms[0].host == "host1"


def test_addresses_and_iqns() -> None:
    topo = topology.parse(GOOD, "good.yaml")
    assert str(topo.storage_node("stor1").address) == "10.231.8.2"
    # h3 asked for .12 explicitly, so automatic assignment skips it
    assert [str(h.address) for h in topo.hosts] == ["10.231.8.11", "10.231.8.13", "10.231.8.12"]
    assert topo.host("h1").initiator_iqn.endswith(":t1.h1")
    assert topo.storage_node("stor1").target_iqn.startswith("iqn.")
    assert topo.datastore("ds1").size == 256 << 20


def _error(text: str) -> TopologyError:
    with pytest.raises(TopologyError) as info:
        topology.parse(text, "lab.yaml")
    return info.value


@pytest.mark.parametrize(("change", "path", "words"), [
    (("hosts: [{name: h1}, {name: h2}, {name: h3, address: 10.231.8.12}]",
      "hosts: [{name: h1}, {name: h1}]"), "hosts[1].name", "duplicate name 'h1'"),
    (("hosts: [{name: h1}, {name: h2}, {name: h3, address: 10.231.8.12}]",
      "hosts: [{name: h1}, {name: H2}]"), "hosts[1].name", "is not valid"),
    (("vms: [{name: vm1, host: h1, datastore: ds1}]", "vms: [{name: vm1, host: h9}]"),
     "vms[0].host", "unknown host 'h9'"),
    (("size: 256M", "size: 5G"), "datastores[0].size", "does not fit on storage node stor1"),
    (("vms: [{name: vm1, host: h1, datastore: ds1}]", "vms: [{name: vm1, host: h1, datastore: dsx}]"),
     "vms[0].datastore", "unknown datastore 'dsx'"),
    (("hosts: [h1, h2]", "hosts: [h2]"), "vms[0].datastore", "does not share datastore ds1"),
    (("sites: [{name: s1, subnet: 10.231.8.0/24}]",
      "sites: [{name: s1, subnet: 10.231.8.0/24}, {name: s2, subnet: 10.231.0.0/16}]"),
     "sites[1].subnet", "overlaps 10.231.8.0/24"),
    (("name: t1", "name: t1\nbogus: 1"), "", "unknown key"),
    (("{name: h3, address: 10.231.8.12}", "{name: h3, address: 10.9.9.9}"), "hosts[2].address",
     "not a usable address"),
    (("{name: h2}", "{name: h2, address: 10.231.8.12}"), "hosts[2].address",
     "already used by hosts[1]"),
    (("datastore: ds1}]", "datastore: ds1, memory: 4G}]"), "vms[0].memory", "offers 2G"),
    (("datastore: ds1}]", "datastore: ds1, heartbeat_ms: 5}]"), "vms[0].heartbeat_ms",
     "less than the minimum of 10"),
    (("datastore: ds1}]", "datastore: ds1, heartbeat_ms: 1001}]"), "vms[0].heartbeat_ms",
     "heartbeat period in ms, 10..1000"),
    (("datastore: ds1}]", "datastore: ds1, heartbeat_ms: 20.5}]"), "vms[0].heartbeat_ms",
     "not of type 'integer'"),
])
def test_bad_topology(change: tuple[str, str], path: str, words: str) -> None:
    old, new = change
    assert old in GOOD
    err = _error(GOOD.replace(old, new))
    assert err.path == path
    assert words in err.problem
    assert str(err).startswith("lab.yaml: ")


def test_heartbeat_period() -> None:
    assert topology.parse(GOOD, "good.yaml").vm("vm1").heartbeat_ms == 100  # the default
    topo = topology.parse(GOOD.replace("datastore: ds1}]", "datastore: ds1, heartbeat_ms: 10}]"))
    assert topo.vm("vm1").heartbeat_ms == 10


def test_invalid_yaml_names_line() -> None:
    err = _error("name: t1\nsites: [\n  - oops: : :\n")
    assert "invalid YAML" in err.problem
    assert err.path.startswith("line ")


def test_missing_file() -> None:
    with pytest.raises(TopologyError) as info:
        topology.load("/nonexistent/lab.yaml")
    assert "cannot read the file" in str(info.value)


def test_sizes() -> None:
    assert topology.parse_size("1G") == 1 << 30
    assert topology.parse_size("512MiB") == 512 << 20
    assert topology.parse_size(4096) == 4096
    assert topology.format_size(256 << 20) == "256M"


SIZE_FORMS = ("use a number with K, M, G or T (powers of 1024, e.g. 256M, 2G; "
              "B/KB/MiB are accepted too)")


@pytest.mark.parametrize("size", ["256Mi", "256m", "1.5 GiBs", "-1G", "0x100M"])
def test_refused_size_names_the_accepted_forms(size: str) -> None:
    with pytest.raises(ValueError) as info:
        topology.parse_size(size)
    assert str(info.value) == f"bad size {size!r}: {SIZE_FORMS}"
    err = _error(GOOD.replace("size: 256M", f"size: '{size}'"))
    assert err.problems == [("datastores[0].size", f"bad size {size!r}: {SIZE_FORMS}")]


def test_refused_sizes_come_together() -> None:
    err = _error(GOOD.replace("datastore: ds1}]", "datastore: ds1, memory: 256Mi, working_set: 0}]"))
    assert err.problems == [("vms[0].memory", f"bad size '256Mi': {SIZE_FORMS}"),
                            ("vms[0].working_set", f"bad size 0: {SIZE_FORMS}")]


def test_megabytes_are_mebibytes() -> None:
    """256MB is read as 256 MiB, like 256M and 256MiB: a lab's sizes are powers of 1024."""
    assert topology.parse_size("256MB") == topology.parse_size("256MiB") == 256 << 20
    assert topology.parse_size("1KB") == 1024
    topo = topology.parse(GOOD.replace("datastore: ds1}]", "datastore: ds1, memory: 256MB}]"))
    assert topo.vm("vm1").memory == 256 << 20


def test_schema_problems_come_together() -> None:
    err = _error(GOOD.replace("name: t1", "name: T1\nbogus: 1")
                 .replace("{name: h2}", "{name: h2, colour: red}")
                 .replace("datastore: ds1}]", "datastore: ds1, vcpus: 0}]"))
    assert err.problems == [
        ("name", "'T1' is not valid: lowercase letters, digits and '-', starting with a letter, "
                 "at most 16 characters"),
        ("", "unknown key 'bogus'"),
        ("hosts[1]", "unknown key 'colour'"),
        ("vms[0].vcpus", "0 is less than the minimum of 1"),
    ]
    assert (err.path, err.problem) == err.problems[0]
    assert str(err).splitlines() == [
        "lab.yaml: name: 'T1' is not valid: lowercase letters, digits and '-', starting with a "
        "letter, at most 16 characters",
        "lab.yaml: unknown key 'bogus'",
        "lab.yaml: hosts[1]: unknown key 'colour'",
        "lab.yaml: vms[0].vcpus: 0 is less than the minimum of 1",
    ]
    assert err.evidence["problems"][1] == {"path": "", "problem": "unknown key 'bogus'"}


def test_semantic_problems_come_together_in_file_order() -> None:
    text = GOOD.replace("vms: [{name: vm1, host: h1, datastore: ds1}]",
                        "vms: [{name: vm1, host: h1, datastore: ds1, memory: 4G},\n"
                        "      {name: vm2, host: h9, datastore: ds1},\n"
                        "      {name: vm1, host: h2, datastore: dsx}]")
    text = text.replace("{name: h3,", "{name: h1,").replace("size: 256M", "size: 5G")
    err = _error(text)
    assert [p for p, _ in err.problems] == [
        "hosts[2].name", "datastores[0].size", "vms[0].memory", "vms[1].host",
        "vms[1].datastore", "vms[2].name", "vms[2].datastore"]
    problems = dict(err.problems[:5])
    assert problems["hosts[2].name"] == "duplicate name 'h1' (also hosts[0])"
    assert problems["datastores[0].size"].startswith("5G does not fit on storage node stor1")
    assert problems["vms[0].memory"] == "host h1 offers 2G to VMs and its VMs would need 4G"
    assert problems["vms[1].host"] == "unknown host 'h9' (hosts: h1, h2)"
    assert problems["vms[1].datastore"] == ("datastore ds1 is already the disk of VM vm1 (vms[0]) "
                                            "(one VM per LUN)")
    assert err.problems[6] == ("vms[2].datastore", "unknown datastore 'dsx' (datastores: ds1)")
    assert len(str(err).splitlines()) == 7


def test_refused_subnet_skips_only_what_needs_it() -> None:
    err = _error(GOOD.replace("10.231.8.0/24", "10.231.8.1/24"))
    # the addresses inside that subnet cannot be checked, everything else still is
    assert [p for p, _ in err.problems] == ["sites[0].subnet"]
    assert "is not a network" in err.problem


def test_bad_ipv4_address_is_a_problem_not_a_crash() -> None:
    err = _error(GOOD.replace("address: 10.231.8.12", "address: 10.231.8.300"))
    assert err.problems == [("hosts[2].address", "'10.231.8.300' is not an IPv4 address")]


def test_cli_reports_every_problem_one_line_each(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("hosts: [{name: h1}, {name: h2}, {name: h3, address: 10.231.8.12}]",
                                "hosts: [{name: h1}, {name: h1}]"))
    res = subprocess.run([sys.executable, "-m", "labctl.cli", "validate", str(bad)],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 1
    assert res.stderr.splitlines() == [
        f"labctl: error: {bad}: hosts[1].name: duplicate name 'h1' (also hosts[0])",
        f"labctl: error: {bad}: datastores[0].hosts[1]: unknown host 'h2' (hosts: h1)",
    ]
    assert "Traceback" not in res.stderr
