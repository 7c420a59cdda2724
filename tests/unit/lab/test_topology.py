"""Topology validation: every bad input names the file, the place in it and the problem."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from labctl.cli.main import main
from labctl.core import names
from labctl.core.errors import TopologyError
from labctl.drivers import netlink
from labctl.lab import bringup, topology
from labctl.lab.topology import Topology

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


def _laughs(levels: int) -> bytes:
    """A short file whose hosts are 10**levels values through YAML aliases."""
    lines = ["name: t1", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return ("\n".join(lines) + f"\nhosts: *a{levels - 1}\n").encode()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("content", "problem"), [
    (bytes(range(256)) * 4, "not text (byte 128 is not UTF-8): not a topology file (YAML text)"),
    (b"x" * (1 << 20) + b"\n", "larger than 1 MiB: not a topology file (YAML text)"),
    (b"name: [" + b"[" * 5000 + b"]" * 5000 + b"]\n", "nested more than 32 levels deep"),
    ("".join(" " * i + "a:\n" for i in range(800)).encode(), "nested more than 32 levels deep"),
    (b"hosts: " + b"[" * 100 + b"]" * 100 + b"\n", "nested more than 32 levels deep"),
    (b"hosts: &h [*h]\n", "nested more than 32 levels deep"),
    (_laughs(7), "more than 100000 values (through YAML aliases?)"),
    (b"name: t\x001\n", "line 1, column 8: invalid YAML: character '\\x00' (#x0000) is not allowed"),
    (b"name: t1\nsites: 2024-13-01\n",
     "invalid YAML: a value cannot be read (month must be in 1..12)"),
    (b"name: " + b"1" * 5000 + b"\n", "invalid YAML: a value cannot be read (Exceeds the limit "
     "(4300 digits) for integer string conversion: value has 5000 digits)"),
])
def test_a_file_that_is_no_topology_is_one_line(tmp_path: Path, content: bytes,
                                                problem: str) -> None:
    """Binary garbage, /dev/zero, deep nesting (which overflowed the YAML composer's or the
    schema validator's recursion), YAML aliases that make a short file endless: one line."""
    file = tmp_path / "lab.yaml"
    file.write_bytes(content)
    with pytest.raises(TopologyError) as info:
        topology.load(file)
    assert str(info.value) == f"{file}: {problem}"


def test_a_directory_is_no_topology(tmp_path: Path) -> None:
    with pytest.raises(TopologyError) as info:
        topology.load(tmp_path)
    assert str(info.value) == f"{tmp_path}: is a directory, not a topology file (YAML text)"


def test_a_long_value_is_cut_short() -> None:
    """A value is named in full only when short: a megabyte-long one fits on a line."""
    err = _error(GOOD.replace("name: t1", "name: " + "a" * 100000))
    assert err.problems == [("name", f"'{'a' * 23}... (100000 characters) is not valid: lowercase "
                                     "letters, digits and '-', starting with a letter, at most 16 "
                                     "characters")]
    err = _error(GOOD.replace("name: t1", "name: [" + ", ".join(["0"] * 5000) + "]"))
    assert err.problems[0][1].startswith("[0, 0, 0, 0, 0, 0, 0, 0,... (5000 items) is not of "
                                         "type 'string'")
    err = _error(GOOD + "b" * 1000 + ": 1\n")
    assert err.problems == [("", f"unknown key '{'b' * 23}... (1000 characters) (keys: name, "
                                 "rescan, sites, storage_nodes, hosts, datastores, vms, wan)")]


def test_many_problems_are_counted_after_the_first_ones() -> None:
    err = _error(GOOD + "".join(f"x{i}: 1\n" for i in range(30)))
    assert len(err.problems) == 30
    lines = str(err).splitlines()
    assert len(lines) == 21
    assert lines[-1] == "lab.yaml: and 10 more problems"


@pytest.mark.parametrize(("rate", "problem"), [
    (".inf", "inf is greater than the maximum of 100000: MB/s the guest dirties, 0..100000 "
             "(default 0)"),
    ("1.0e+30", "1e+30 is greater than the maximum of 100000: MB/s the guest dirties, "
                "0..100000 (default 0)"),
    (".nan", "nan is not a number of MB/s (0..100000)"),
])
def test_an_endless_dirty_rate_is_refused(rate: str, problem: str) -> None:
    """Accepted, it failed only when up started the VM (OverflowError rounding it)."""
    err = _error(GOOD.replace("datastore: ds1}]", f"datastore: ds1, dirty_rate: {rate}}}]"))
    assert err.problems == [("vms[0].dirty_rate", problem)]


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


@pytest.mark.parametrize("size", ["1" * 400 + "M", "2000T", "1024.5T", 1 << 60])
def test_an_absurd_size_is_refused_not_a_crash(size: int | str) -> None:
    """A size past 1024T is a typo: refused like a malformed one (a long number used to
    overflow a float), in one line however long the number."""
    with pytest.raises(ValueError) as info:
        topology.parse_size(size)
    assert str(info.value).endswith(f": more than 1024T; {SIZE_FORMS}")
    assert len(str(info.value)) < 200
    err = _error(GOOD.replace("size: 256M", f"size: {size!r}"))
    assert err.problems == [("datastores[0].size", str(info.value))]


def test_an_absurd_size_causes_no_other_problem() -> None:
    """A refused capacity or memory stands in as the largest size: the datastores on the node
    and the VMs on the host are not refused because of it."""
    err = _error(GOOD.replace("capacity: 1G", "capacity: 5000T")
                 .replace("{name: h1}", "{name: h1, memory: 9999999999T}")
                 .replace("datastore: ds1}]", "datastore: ds1, memory: 9999T}]"))
    assert [p for p, _ in err.problems] == ["storage_nodes[0].capacity", "hosts[0].memory",
                                            "vms[0].memory"]


def test_fractions_are_exact() -> None:
    assert topology.parse_size("1.5M") == 3 << 19
    assert topology.parse_size("0.1K") == 102
    assert topology.parse_size("1024T") == 1 << 50


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
        ("", "unknown key 'bogus' (keys: name, rescan, sites, storage_nodes, hosts, datastores, "
             "vms, wan)"),
        ("hosts[1]", "unknown key 'colour' (keys: name, site, address, memory, ssh)"),
        ("vms[0].vcpus", "0 is less than the minimum of 1"),
    ]
    assert (err.path, err.problem) == err.problems[0]
    assert str(err).splitlines() == [
        "lab.yaml: name: 'T1' is not valid: lowercase letters, digits and '-', starting with a "
        "letter, at most 16 characters",
        "lab.yaml: unknown key 'bogus' (keys: name, rescan, sites, storage_nodes, hosts, "
        "datastores, vms, wan)",
        "lab.yaml: hosts[1]: unknown key 'colour' (keys: name, site, address, memory, ssh)",
        "lab.yaml: vms[0].vcpus: 0 is less than the minimum of 1",
    ]
    assert err.evidence["problems"][2] == {"path": "hosts[1]", "problem": err.problems[2][1]}


def test_semantic_problems_come_together_in_file_order() -> None:
    text = GOOD.replace("vms: [{name: vm1, host: h1, datastore: ds1}]",
                        "vms: [{name: vm1, host: h1, datastore: ds1, memory: 4G},\n"
                        "      {name: vm2, host: h9, datastore: ds1},\n"
                        "      {name: vm1, host: h2, datastore: scratch}]")
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
    assert err.problems[6] == ("vms[2].datastore", "unknown datastore 'scratch' (datastores: ds1)")
    assert len(str(err).splitlines()) == 7


def test_refused_subnet_skips_only_what_needs_it() -> None:
    err = _error(GOOD.replace("10.231.8.0/24", "10.231.8.1/24"))
    # the addresses inside that subnet cannot be checked, everything else still is
    assert [p for p, _ in err.problems] == ["sites[0].subnet"]
    assert "is not a network" in err.problem


def test_bad_ipv4_address_is_a_problem_not_a_crash() -> None:
    err = _error(GOOD.replace("address: 10.231.8.12", "address: 10.231.8.300"))
    assert err.problems == [("hosts[2].address", "'10.231.8.300' is not an IPv4 address")]


def test_key_typos_get_the_nearest_key() -> None:
    text = (GOOD.replace("hosts: [{name: h1}", "hots: [{name: h1}")
            .replace("{name: stor1, capacity: 1G}", "{name: stor1, capacty: 1G}"))
    err = _error(text)
    # 'hosts' is missing because of the typo: the suggestion says so, once
    assert err.problems == [("storage_nodes[0]", "unknown key 'capacty' (did you mean 'capacity'?)"),
                            ("", "unknown key 'hots' (did you mean 'hosts'?)")]
    assert str(err).splitlines()[1] == "lab.yaml: unknown key 'hots' (did you mean 'hosts'?)"


@pytest.mark.parametrize(("old", "new", "path", "problem"), [
    ("{name: s1, subnet: 10.231.8.0/24}", "{name: s1, sbunet: 10.231.8.0/24}", "sites[0]",
     "unknown key 'sbunet' (did you mean 'subnet'?)"),
    ("{name: h2}", "{name: h2, memroy: 1G}", "hosts[1]",
     "unknown key 'memroy' (did you mean 'memory'?)"),
    ("size: 256M,", "size: 256M, host: [h1],", "datastores[0]",
     "unknown key 'host' (did you mean 'hosts'?)"),
    ("datastore: ds1}]", "datastore: ds1, dirty-rate: 5}]", "vms[0]",
     "unknown key 'dirty-rate' (did you mean 'dirty_rate'?)"),
    ("datastore: ds1}]", "datastores: ds1}]", "vms[0]",
     "unknown key 'datastores' (did you mean 'datastore'?)"),
])
def test_key_typo_in_an_entry(old: str, new: str, path: str, problem: str) -> None:
    assert old in GOOD
    assert _error(GOOD.replace(old, new)).problems == [(path, problem)]


def test_name_typos_get_the_nearest_name() -> None:
    text = (GOOD.replace("hosts: [h1, h2]", "hosts: [h1, hh2]")
            .replace("datastore: ds1}]", "datastore: dss1}, {name: vm2, host: hst3}]")
            .replace("{name: stor1, capacity: 1G}", "{name: stor1, site: s11, capacity: 1G}"))
    assert _error(text).problems == [
        ("storage_nodes[0].site", "unknown site 's11' (did you mean 's1'? sites: s1)"),
        ("datastores[0].hosts[1]", "unknown host 'hh2' (did you mean 'h2'? hosts: h1, h2, h3)"),
        ("vms[0].datastore", "unknown datastore 'dss1' (did you mean 'ds1'? datastores: ds1)"),
        ("vms[1].host", "unknown host 'hst3' (did you mean 'h3'? hosts: h1, h2, h3)"),
    ]
    two_nodes = GOOD.replace("{name: stor1, capacity: 1G}", "{name: stor1}, {name: stor2}")
    assert _error(two_nodes.replace("size: 256M,", "size: 256M, node: store2,")).problems == [
        ("datastores[0].node",
         "unknown storage node 'store2' (did you mean 'stor2'? storage nodes: stor1, stor2)")]


def test_no_suggestion_for_a_far_name() -> None:
    assert _error(GOOD.replace("host: h1", "host: zebra")).problems == [
        ("vms[0].host", "unknown host 'zebra' (hosts: h1, h2, h3)")]


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


# --- labctl validate runs up's checks against this machine (reading it, building nothing) ----


def _network_of_this_machine() -> ipaddress.IPv4Network:
    """A /24 holding this machine's address on its default route's interface (read only)."""
    with IPRoute() as ipr:
        for route in ipr.get_routes(family=2, table=254):
            oif = route.get_attr("RTA_OIF")
            if route["dst_len"] != 0 or oif is None:
                continue
            for addr in ipr.get_addr(family=2, index=oif):
                return ipaddress.IPv4Network(f"{addr.get_attr('IFA_ADDRESS')}/24", strict=False)
    pytest.skip("this machine has no IPv4 default route with an address: no network to clash with")


def _validate(file: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = main(["-q", "validate", str(file)])
    out = capsys.readouterr()
    return code, out.err.splitlines() + out.out.splitlines()


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LABCTL_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_validate_refuses_a_subnet_this_machine_uses(
        tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    net = _network_of_this_machine()
    assert not net.is_loopback
    lab = tmp_path / "lab.yaml"
    lab.write_text(f"name: t1\nsites: [{{name: s1, subnet: {net}}}]\nhosts: [{{name: h1}}]\n")
    code, lines = _validate(lab, capsys)
    assert code == 1
    assert len(lines) == 1
    assert lines[0].startswith(f"labctl: error: {lab}: sites[0].subnet: {net} overlaps a network "
                               "this machine already uses (")
    assert lines[0].endswith("); pick another subnet")
    assert not home.exists()  # checked, nothing made


def test_validate_reports_the_machine_problems_together(
        tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    net = _network_of_this_machine()
    lab = tmp_path / "lab.yaml"
    lab.write_text(f"name: t1\nsites: [{{name: s1, subnet: {net}}}]\n"
                   "storage_nodes: [{name: stor1, capacity: 1000T}]\nhosts: [{name: h1}]\n"
                   "datastores: [{name: ds1, size: 900T, hosts: [h1]}]\n")
    code, lines = _validate(lab, capsys)
    assert code == 1
    assert [line.split(": ")[3] for line in lines] == ["sites[0].subnet", "datastores"]
    assert lines[1].startswith(f"labctl: error: {lab}: datastores: the datastores need "
                               f"{(900 << 20) + 256} MiB but the filesystem of {home / 'labs'} has ")
    assert not home.exists()


def test_validate_says_valid_when_the_machine_has_room(
        tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netlink, "overlapping_routes", lambda subnet, own_bridge=None: [])
    lab = tmp_path / "lab.yaml"
    lab.write_text(GOOD)
    assert _validate(lab, capsys) == (0, [f"{lab}: lab t1: 3 hosts, 1 storage node, "
                                          "1 datastore, 1 VM: valid"])


def test_validate_and_up_run_the_same_machine_check(
        tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Topology, Path]] = []

    def check_machine(topo: Topology, labs: Path) -> None:
        calls.append((topo, labs))
        raise TopologyError(topo.source, "sites[0].subnet", "refused by this machine")

    monkeypatch.setattr(bringup, "check_machine", check_machine)
    monkeypatch.setattr(bringup, "preflight", lambda: None)  # up's own needs: root, QEMU

    async def build(*args: object) -> None:
        raise AssertionError("up went past its checks")

    monkeypatch.setattr(bringup, "build", build)  # whatever happens, nothing is built here
    lab = tmp_path / "lab.yaml"
    lab.write_text(GOOD)
    refused = [f"labctl: error: {lab}: sites[0].subnet: refused by this machine"]
    assert _validate(lab, capsys) == (1, refused)
    assert main(["-q", "up", str(lab)]) == 1
    assert capsys.readouterr().err.splitlines() == refused
    assert len(calls) == 2
    assert calls[0] == calls[1] == (topology.load(lab), home / "labs")
    assert not (home / "labs" / "t1").exists()  # up stopped before building


class _Msg(dict[str, object]):
    """A netlink message as pyroute2 hands it: fields by key, attributes by get_attr."""

    def __init__(self, attrs: dict[str, object], **fields: object) -> None:
        super().__init__(fields)
        self.attrs = attrs

    def get_attr(self, name: str) -> object:
        return self.attrs.get(name)


class _Machine:
    """IPRoute of a machine with eth0 and one bridge on 10.231.8.0/24 (name, alias given)."""

    bridge = ("", "")

    def __enter__(self) -> _Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def get_links(self) -> list[_Msg]:
        name, alias = self.bridge
        return [_Msg({"IFLA_IFNAME": "eth0"}, index=2),
                _Msg({"IFLA_IFNAME": name, "IFLA_IFALIAS": alias}, index=7)]

    def get_addr(self, family: int) -> list[_Msg]:
        return [_Msg({"IFA_ADDRESS": "192.0.2.2"}, index=2, prefixlen=24),
                _Msg({"IFA_ADDRESS": "10.231.8.1"}, index=7, prefixlen=24)]

    def get_routes(self, family: int, table: int) -> list[_Msg]:
        return [_Msg({"RTA_DST": "10.231.8.0", "RTA_OIF": 7}, dst_len=24),
                _Msg({"RTA_GATEWAY": "192.0.2.1", "RTA_OIF": 2}, dst_len=0)]


def test_a_lab_that_is_up_is_no_clash_with_itself(
        tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Its own bridge (this lab directory's name and alias) is left out, nothing else is: the
    same lab name in another labctl home, or another lab's link of that name, still clash."""
    monkeypatch.setattr(netlink, "IPRoute", _Machine)
    lab = tmp_path / "lab.yaml"
    lab.write_text(GOOD)
    own = names.bridge(names.lab_tag("t1", home / "labs" / "t1"), 0)
    monkeypatch.setattr(_Machine, "bridge", (own, "labctl:t1:bridge:s1"))
    assert _validate(lab, capsys)[0] == 0
    for name, alias in (("lcffffb0", "labctl:t1:bridge:s1"), (own, "labctl:t2:bridge:s1")):
        monkeypatch.setattr(_Machine, "bridge", (name, alias))
        assert _validate(lab, capsys) == (1, [
            f"labctl: error: {lab}: sites[0].subnet: 10.231.8.0/24 overlaps a network this machine "
            f"already uses (10.231.8.0/24 on {name}); pick another subnet"])


@pytest.mark.parametrize("size", [1048577, "1.0001M"])
def test_a_datastore_size_is_whole_sectors_as_datastore_create_wants(size: int | str) -> None:
    """The topology took 1048577 bytes that `datastore create` refuses: both want whole
    512-byte sectors now."""
    err = _error(GOOD.replace("size: 256M", f"size: {size!r}"))
    assert len(err.problems) == 1 and err.problems[0][0] == "datastores[0].size"
    assert "not a multiple of 512 bytes" in err.problems[0][1]


def test_a_small_file_datastore_is_refused() -> None:
    err = _error(GOOD.replace("size: 256M", "size: 32M, kind: file"))
    assert ("datastores[0].size", "'32M' is too small for a file datastore (at least 64M)") \
        in err.problems
