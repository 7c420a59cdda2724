"""The pytest plugin without a lab: its options and markers are there, a missing topology
file is a usage error, the lab fixtures skip without --lab, and hardware tests skip on a
local lab (the real lab: tests/e2e/plugin/)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]


@pytest.fixture(autouse=True)
def _ini(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")


def test_markers_and_options_are_registered(pytester: pytest.Pytester) -> None:
    res = pytester.runpytest("--markers")
    for marker in ("hardware:", "slow:", "destructive:", "needs_kvm:"):
        res.stdout.fnmatch_lines([f"@pytest.mark.{marker}*"])
    res = pytester.runpytest("--help")
    res.stdout.fnmatch_lines(["*--lab=FILE*", "*--lab-keep*"])


def test_a_missing_topology_is_a_usage_error(pytester: pytest.Pytester) -> None:
    res = pytester.runpytest("--lab", "nope.yaml")
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    res.stderr.fnmatch_lines(["*--lab nope.yaml: no such topology file*"])


def test_the_lab_fixtures_skip_without_a_lab(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        def test_lab(lab): pass
        def test_host(host): pass
        def test_vm(vm): pass
        def test_datastore(datastore): pass
        def test_plain(): pass
    """)
    res = pytester.runpytest("-rs")
    res.assert_outcomes(passed=1, skipped=4)
    res.stdout.fnmatch_lines(["*no lab: run pytest with --lab FILE*"])


def test_hardware_tests_skip_on_a_local_lab(pytester: pytest.Pytester) -> None:
    topo = pytester.makefile(".yaml", local="name: x\nhosts: [{name: h1}]\n")
    pytester.makepyfile("""
        import pytest
        @pytest.mark.hardware
        def test_on_machines(): pass
        def test_anywhere(): pass
    """)
    res = pytester.runpytest("--lab", str(topo), "-rs")
    res.assert_outcomes(passed=1, skipped=1)
    res.stdout.fnmatch_lines(["*needs a lab of machines over SSH*"])


def test_hardware_tests_run_on_a_lab_of_machines(pytester: pytest.Pytester) -> None:
    topo = pytester.makefile(".yaml", machines=(
        "name: x\nsites: [{name: s1, subnet: 192.168.60.0/24}]\n"
        "hosts: [{name: h1, ssh: {key: k, host_key: k.pub}}]\n"))
    pytester.makepyfile("""
        import pytest
        @pytest.mark.hardware
        def test_on_machines(): pass
    """)
    res = pytester.runpytest("--lab", str(topo), "-rs")
    res.assert_outcomes(passed=1)


def test_a_network_of_machines_keeps_its_addresses() -> None:
    """The session's copy of a topology gets a fresh name and fresh subnets, except where
    the addresses are the machines' (a site given by its bridge, or holding SSH hosts)."""
    import yaml

    from labctl.testing.plugin import renamed

    text = yaml.safe_dump({
        "name": "hw",
        "sites": [{"name": "a", "subnet": "192.168.60.0/24"},
                  {"name": "b", "subnet": "192.168.61.0/24", "bridge": "br-lab"},
                  {"name": "c", "subnet": "10.231.0.0/24"},
                  {"name": "d", "subnet": "192.168.62.0/24"}],
        "storage_nodes": [{"name": "n1", "site": "d",
                           "ssh": {"key": "k", "host_key": "k.pub"}}],
        "hosts": [{"name": "h1", "site": "a", "ssh": {"key": "k", "host_key": "k.pub"}},
                  {"name": "h2", "site": "c"}]})
    got = yaml.safe_load(renamed(text, "pt123456", "hw.yaml"))
    subnets = {s["name"]: s["subnet"] for s in got["sites"]}
    assert got["name"] == "pt123456"
    assert subnets["a"] == "192.168.60.0/24" and subnets["b"] == "192.168.61.0/24"
    assert subnets["c"] != "10.231.0.0/24"
    # a site whose storage node is a machine keeps its addresses too
    assert subnets["d"] == "192.168.62.0/24"


def test_vagrant_machines_keep_their_labs_keys(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``ssh: vagrant`` names the machine ``labctl vagrant up`` made for the lab as written:
    the session's renamed copy points at that lab's keys."""
    import yaml

    from labctl.testing.plugin import renamed

    monkeypatch.setenv("LABCTL_HOME", str(tmp_path))
    text = yaml.safe_dump({
        "name": "vagrant", "sites": [{"name": "s1", "subnet": "10.233.0.0/24"}],
        "storage_nodes": [{"name": "stor1", "ssh": "vagrant"}],
        "hosts": [{"name": "host1", "ssh": "vagrant"}]})
    got = yaml.safe_load(renamed(text, "pt1", "vagrant.yaml"))
    assert got["storage_nodes"][0]["ssh"] == {
        "key": str(tmp_path / "vagrant" / "vagrant" / "id_ed25519"),
        "host_key": str(tmp_path / "vagrant" / "vagrant" / "keys" / "stor1.pub")}
    assert got["hosts"][0]["ssh"]["host_key"].endswith("/vagrant/keys/host1.pub")
    assert got["sites"][0]["subnet"] == "10.233.0.0/24"
