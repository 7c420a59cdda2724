"""WAN link parameters: what a user writes (topology, ``wan set``) becomes netem's
arguments; every bad value is one line naming the field, and nothing else changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from labctl.core.errors import LabError, ProtocolError, TopologyError
from labctl.lab import topology
from labctl.wan import protocol as p


def test_values_as_users_write_them() -> None:
    assert p.parse_ms("delay", "20ms") == 20.0
    assert p.parse_ms("delay", "0.5s") == 500.0
    assert p.parse_ms("delay", "300us") == 0.3
    assert p.parse_ms("delay", 15) == 15.0
    assert p.parse_percent("loss", "0.1%") == 0.1
    assert p.parse_percent("loss", 1) == 1.0
    assert p.parse_rate("rate", "100mbit") == 100.0
    assert p.parse_rate("rate", "1gbit") == 1000.0
    assert p.parse_rate("rate", "512kbit") == 0.512
    assert p.parse_rate("rate", "unlimited") is None


@pytest.mark.parametrize(("field", "value", "problem"), [
    ("delay", "-3ms", "is not a duration"),
    ("delay", "11s", "is more than 10000 ms"),
    ("delay", "fast", "is not a duration"),
    ("delay", True, "is not a duration"),
    ("loss", "101%", "is more than 100%"),
    ("loss", "-1%", "is not a percentage"),
    ("rate", "5tbit", "is not a rate"),
    ("rate", "200gbit", "is more than 100 gbit/s"),
    ("rate", "1bit", "is less than 8 kbit/s"),
    ("rate", "1e400", "is not a rate"),
])
def test_bad_values_name_their_field(field: str, value: object, problem: str) -> None:
    with pytest.raises(LabError, match=problem) as err:
        p.params_from({field: value})
    assert err.value.message.startswith(f"{field}: ")
    assert "\n" not in err.value.message


def test_params_combine_and_are_checked_together() -> None:
    base = p.params_from({"delay": "20ms", "rate": "1gbit"})
    changed = p.params_from({"jitter": "5ms"}, base)
    assert (changed.delay_ms, changed.jitter_ms, changed.rate_mbit) == (20.0, 5.0, 1000.0)
    with pytest.raises(LabError, match="jitter 30 ms is larger than the delay 20 ms"):
        p.params_from({"jitter": "30ms"}, base)
    with pytest.raises(LabError, match="reorder needs a delay"):
        p.params_from({"reorder": "1%"})
    with pytest.raises(LabError, match="unknown parameter"):
        p.params_from({"latency": "1ms"})
    with pytest.raises(LabError, match="choose gso or packet"):
        p.params_from({"loss_mode": "wire"})
    # off the wire the bounds hold too: the router agent never runs tc with them
    with pytest.raises(ProtocolError, match="delay_ms -1"):
        p.LinkParams.from_wire({"delay_ms": -1})


def test_netem_arguments() -> None:
    params = p.params_from({"delay": "20ms", "jitter": "5ms", "loss": "0.1%", "rate": "100mbit",
                            "reorder": "1%", "duplicate": "0.5%"})
    assert params.netem_args() == ["limit", "100000", "delay", "20ms", "5ms", "reorder", "1%",
                                   "loss", "random", "0.1%", "duplicate", "0.5%",
                                   "rate", "100000kbit"]
    assert p.LinkParams().netem_args() == ["limit", "100000"]
    assert params.describe() == ("delay 20ms jitter 5ms loss 0.1% (gso) rate 100mbit "
                                 "reorder 1% duplicate 0.5%")


TWO = """
name: w1
sites: [{{name: a, subnet: 10.231.20.0/24}}, {{name: b, subnet: 10.231.21.0/24}}]
hosts: [{{name: a1, site: a}}, {{name: b1, site: b{b1}}}]
wan: [{wan}]
"""


def _parse(wan: str, b1: str = "") -> topology.Topology:
    return topology.parse(TWO.format(wan=wan, b1=b1), "w.yaml")


def test_a_link_in_the_topology() -> None:
    topo = _parse("{name: wan1, sites: [a, b], delay: 20ms, rate: 1gbit}")
    w = topo.wan_link("wan1")
    assert w.sites == ("a", "b")
    assert [str(x) for x in w.addresses] == ["10.231.20.254", "10.231.21.254"]
    assert (w.params.delay_ms, w.params.rate_mbit) == (20.0, 1000.0)
    assert topology.load(Path(__file__).resolve().parents[3] / "labs" / "two-sites.yaml").wan


@pytest.mark.parametrize(("wan", "b1", "problem"), [
    ("{name: wan1, sites: [a, c]}", "", "wan[0].sites[1]: unknown site 'c'"),
    ("{name: wan1, sites: [a, a]}", "", "wan[0].sites: a WAN link joins two different sites"),
    ("{name: wan1, sites: [a, b]}, {name: wan2, sites: [b, a]}", "",
     "wan[1].sites: b and a are already joined by wan[0]"),
    ("{name: wan1, sites: [a, b], delay: -1ms}", "", "wan[0].delay: '-1ms' is not a duration"),
    ("{name: wan1, sites: [a, b], delay: 1ms, jitter: 2ms}", "",
     "wan[0]: jitter 2 ms is larger than the delay 1 ms"),
    ("{name: wan1, sites: [a, b], loss_mode: wire}", "", "wan[0].loss_mode: 'wire' is not one of"),
    ("{name: wan1, sites: [a, b]}", ", address: 10.231.21.254",
     "wan[0]: the router's address 10.231.21.254 in b is taken by hosts[1]"),
    ("{name: wan1, sites: [a]}", "", "wan[0].sites: ['a'] is too short"),
])
def test_bad_links_are_refused(wan: str, b1: str, problem: str) -> None:
    with pytest.raises(TopologyError) as err:
        _parse(wan, b1)
    assert any(problem in line for line in str(err.value).splitlines()), str(err.value)


def test_the_router_domain_has_a_leg_per_site_and_offloads_per_loss_mode(tmp_path: Path) -> None:
    import xml.etree.ElementTree as ET

    from labctl.storage import node
    from labctl.storage.image import StorageImage

    def xml(offload: bool) -> ET.Element:
        spec = node.StorageNodeSpec(
            lab="l", name="wan1", address_cidr="10.1.0.254/24", bridge="br-a", tap="tap-a",
            mac="52:54:00:00:00:01", lab_dir=tmp_path, secret=b"s" * 32, target_iqn="",
            role="wan-router", extra_nics=[node.Nic("br-b", "tap-b", "52:54:00:00:00:02")],
            subdir="wan", nic_offload=offload)
        image = StorageImage(tmp_path / "vmlinuz", tmp_path / "rootfs", "h")
        return ET.fromstring(node.domain_xml(spec, image, tmp_path / "o", tmp_path / "c",
                                             tmp_path / "log"))

    dom = xml(True)
    nics = dom.findall("devices/interface")
    assert [(n.find("source").get("bridge"), n.find("target").get("dev"))  # type: ignore[union-attr]
            for n in nics] == [("br-a", "tap-a"), ("br-b", "tap-b")]
    assert all(n.find("driver") is None for n in nics)
    assert "wan-router" in ET.tostring(dom, encoding="unicode")
    for n in xml(False).findall("devices/interface"):
        drv = n.find("driver")
        assert drv is not None
        assert drv.find("guest").get("tso4") == "off"  # type: ignore[union-attr]
        assert drv.find("host").get("tso4") == "off"  # type: ignore[union-attr]


@pytest.mark.parametrize(("argv", "problem"), [
    (["--delay", "-3ms"], "delay: '-3ms' is not a duration"),
    (["--loss", "-1%"], "loss: '-1%' is not a percentage"),
    (["--rate", "5tbit", "--delay", "1ms"], "rate: '5tbit' is not a rate"),
])
def test_wan_set_names_a_bad_value_before_looking_for_a_lab(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        argv: list[str], problem: str) -> None:
    """A negative value is the value's problem (argparse took '-3ms' for an option), and it
    is named even where no lab exists."""
    from labctl.cli.main import main

    monkeypatch.setenv("LABCTL_HOME", str(tmp_path))
    monkeypatch.delenv("LABCTL_LAB", raising=False)
    assert main(["wan", "set", "wan1", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"labctl: error: {problem}") and err.count("\n") == 1, err


def test_a_link_to_a_site_whose_subnet_was_refused_is_no_traceback() -> None:
    text = ("name: t\nsites: [{name: a, subnet: 10.231.30.0/29}, {name: b, subnet: "
            "10.231.31.0/24}]\nhosts: [{name: h1, site: b}]\nwan: [{name: w1, sites: [a, b]}]\n")
    with pytest.raises(TopologyError, match=r"sites\[0\].subnet: .* is too small"):
        topology.parse(text, "t.yaml")


def test_negative_values_are_joined_but_not_after_a_double_dash() -> None:
    from labctl.cli.main import _value_options_joined

    assert _value_options_joined(["wan", "set", "w", "--delay", "-3ms", "--rate", "1mbit"]) == \
        ["wan", "set", "w", "--delay=-3ms", "--rate", "1mbit"]
    argv = ["exec", "h1", "--", "tool", "--rate", "-1"]
    assert _value_options_joined(argv) == argv
