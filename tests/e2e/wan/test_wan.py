"""A WAN link between two sites, end to end: a router VM with real netem (the cloud kernel's
sch_netem), hosts routed through it, parameters changed at run time, the link cut and
restored, the router killed and brought back. Measured from outside labctl: ping and
iperf3 from the hosts' namespaces, virsh."""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    E2E,
    LabCli,
    free_subnet,
    in_ns,
    module_lab,
    unique_lab,
    wait,
)

pytestmark = E2E

TOPO = """
name: {name}
sites: [{{name: site-a, subnet: {a}}}, {{name: site-b, subnet: {b}}}]
storage_nodes: [{{name: stor-a, site: site-a, capacity: 256M}}]
hosts: [{{name: a1, site: site-a}}, {{name: b1, site: site-b}}]
datastores: [{{name: ds-a, size: 32M, hosts: [a1]}}]
wan: [{{name: wan1, sites: [site-a, site-b], delay: 10ms}}]
"""


@pytest.fixture(scope="module")
def lab(lab_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    name = unique_lab("wan")
    a, b = free_subnet(), free_subnet()
    with module_lab(name, TOPO.format(name=name, a=a, b=b), lab_home, tmp_path_factory):
        yield {"name": name, "cli": LabCli(name), "b1": str(b[11]), "a1": str(a[11]),
               "router": (str(a[254]), str(b[254])), "dir": lab_home / "labs" / name}


def _ping(lab: dict[str, Any], count: int = 10, target: str | None = None
          ) -> tuple[list[float], str]:
    """Round trips (ms) from a1 to b1 by the system's ping, and its output."""
    res = in_ns(lab["name"], "a1", "ping", "-n", "-c", str(count), "-i", "0.1", "-W", "1",
                target or lab["b1"])
    return [float(x.split("=")[1]) for x in res.stdout.split() if x.startswith("time=")], \
        res.stdout


@contextlib.contextmanager
def _iperf_server(lab: dict[str, Any], port: int) -> Iterator[None]:
    """An iperf3 server on b1 for one test, listening before the block starts; it is ended
    by its PID if the block leaves it running (a client that never connected)."""
    server = subprocess.Popen(["ip", "netns", "exec", f"labctl-{lab['name']}-b1", "iperf3",
                               "-s", "-1", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait(lambda: f":{port} " in in_ns(lab["name"], "b1", "ss", "-ltnH").stdout, 10,
             f"iperf3 listening on b1:{port}", interval=0.05)
        yield
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(timeout=10)


def _iperf(lab: dict[str, Any], port: int, seconds: int) -> float:
    """Received Mbit/s of one iperf3 flow from a1 to b1 (the server must be listening)."""
    res = in_ns(lab["name"], "a1", "iperf3", "-c", lab["b1"], "-p", str(port), "-t",
                str(seconds), "-J")
    assert res.returncode == 0, res.stdout[-500:] + res.stderr
    return float(json.loads(res.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e6


def _near(got: float, asked: float, path: float) -> bool:
    """The issue's goal for RTT: within 5% + 1 ms of what was asked, on top of ``path``, the
    round trip of the path itself (the router VM's forwarding, measured with the link at
    zero delay in the same run: 0.6 ms on one machine, over 2 ms on a slower one)."""
    return abs(got - path - asked) <= 0.05 * asked + 1.0


@pytest.fixture(scope="module")
def path_rtt(lab: dict[str, Any]) -> float:
    """The path's own round trip, ms: the link set to 0 ms, 20 pings, median; then the
    link as the topology had it."""
    lab["cli"]("wan", "set", "wan1", "--delay", "0ms")
    rtts, out = _ping(lab, 20)
    lab["cli"]("wan", "set", "wan1", "--delay", "10ms")
    assert len(rtts) == 20, out
    return statistics.median(rtts)


def test_the_link_is_the_only_path_and_the_rtt_is_twice_the_delay(lab: dict[str, Any],
                                                                  path_rtt: float) -> None:
    rtts, out = _ping(lab, 20)
    assert len(rtts) == 20, out
    assert _near(statistics.median(rtts), 20.0, path_rtt), (rtts, path_rtt)
    assert "ttl=63" in out  # one router between the sites
    route = in_ns(lab["name"], "a1", "ip", "-j", "route", "get", lab["b1"])
    assert json.loads(route.stdout)[0]["gateway"] == lab["router"][0], route.stdout
    shown = lab["cli"].json("wan", "show")
    assert [w["name"] for w in shown] == ["wan1"] and shown[0]["state"] == "up"
    legs = shown[0]["router"]["legs"]
    assert [leg["site"] for leg in legs] == ["site-a", "site-b"]
    assert all("netem" in leg["qdisc"] and leg["sent_packets"] > 0 for leg in legs), legs


def test_set_changes_the_link_and_ping_follows_within_a_second(lab: dict[str, Any],
                                                               path_rtt: float) -> None:
    lab["cli"]("wan", "set", "wan1", "--delay", "40ms", "--jitter", "2ms")
    try:
        rtts, out = _ping(lab, 10)
        # the very first round trip after set returned already has the new delay: none is
        # shorter than it less the jitter of both legs (netem never sends a packet early;
        # the old 10 ms would be 60 ms shorter). A round trip can be longer than the
        # jitter allows when the host is busy (the router is a TCG VM: one of 10 took
        # 10.7 ms more on a loaded CI run), so the upper side is the median's
        assert len(rtts) == 10 and all(r - path_rtt >= 80.0 - 4 - 0.05 * 80 - 1
                                       for r in rtts), (out, path_rtt)
        assert _near(statistics.median(rtts), 80.0, path_rtt), (rtts, path_rtt)
        shown = lab["cli"].json("wan", "show")[0]
        assert (shown["params"]["delay_ms"], shown["params"]["jitter_ms"]) == (40.0, 2.0)
    finally:  # the module's later tests start from 10 ms whatever happened here
        lab["cli"]("wan", "set", "wan1", "--delay", "10ms", "--jitter", "0ms")
    rtts = _ping(lab, 10)[0]
    assert _near(statistics.median(rtts), 20.0, path_rtt), (rtts, path_rtt)


@pytest.mark.parametrize(("argv", "problem"), [
    (["--delay", "-3ms"], "delay: '-3ms' is not a duration"),
    (["--jitter", "50ms"], "jitter 50 ms is larger than the delay 10 ms"),
    (["--rate", "5tbit"], "rate: '5tbit' is not a rate"),
    (["--loss", "101%"], "loss: 101% is more than 100%"),
    (["--delay", "20ms", "--rate", "lots"], "rate: 'lots' is not a rate"),
])
def test_a_bad_value_is_one_line_and_changes_nothing(lab: dict[str, Any], argv: list[str],
                                                     problem: str) -> None:
    before = lab["cli"].json("wan", "show")[0]
    res = lab["cli"]("wan", "set", "wan1", *argv, check=False)
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert problem in res.stderr, res.stderr
    after = lab["cli"].json("wan", "show")[0]
    assert after["params"] == before["params"]
    assert [leg["qdisc"] for leg in after["router"]["legs"]] == \
        [leg["qdisc"] for leg in before["router"]["legs"]]


def test_the_rate_caps_one_tcp_flow(lab: dict[str, Any]) -> None:
    """Asked against got, by iperf3 between the sites' hosts: the link is shaped to the rate
    (not above it) and still carries most of it."""
    lab["cli"]("wan", "set", "wan1", "--rate", "50mbit")
    try:
        with _iperf_server(lab, 5211):
            got = _iperf(lab, 5211, 4)
    finally:
        lab["cli"]("wan", "set", "wan1", "--rate", "unlimited")
    assert 25 < got <= 50 * 1.05, got


def test_down_cuts_the_link_and_up_returns_after_a_round_trip(lab: dict[str, Any]) -> None:
    shown = lab["cli"].json("wan", "set", "wan1", "--down")
    assert shown["state"] == "down"
    rtts, out = _ping(lab, 3)
    assert rtts == [], out
    status = lab["cli"].json("status")
    assert status["wan"][0]["state"] == "down"
    lab["cli"]("wan", "set", "wan1", "--up")
    rtts, out = _ping(lab, 1)  # no waiting: --up returned after a round trip crossed
    assert len(rtts) == 1, out


def test_a_killed_router_is_wan_down_and_up_brings_it_back(lab: dict[str, Any],
                                                           path_rtt: float) -> None:
    lab["cli"]("wan", "set", "wan1", "--delay", "15ms")

    def events() -> list[dict[str, Any]]:
        return [json.loads(line) for line in lab["cli"]("events", "--json").stdout.splitlines()]

    before = max((e["id"] for e in events()), default=0)
    domain = f"labctl-{lab['name']}-wan1"
    subprocess.run(["virsh", "-c", "qemu:///system", "destroy", domain], check=True,
                   capture_output=True)

    def down_event() -> list[dict[str, Any]]:
        return [e for e in events() if e["kind"] == "wan_down" and e["id"] > before]

    ev = wait(down_event, 15, "a wan_down event")[-1]
    assert "labctl up" in ev["message"], ev
    status = lab["cli"].json("status")
    assert status["wan"][0]["state"].startswith("shutoff"), status["wan"]
    assert _ping(lab, 2)[0] == []
    res = lab["cli"]("up")
    assert "WAN router of wan1" in res.stderr, res.stderr
    rtts, out = _ping(lab, 10)
    assert len(rtts) == 10 and _near(statistics.median(rtts), 30.0, path_rtt), out  # kept
    assert lab["cli"].json("wan", "show")[0]["params"]["delay_ms"] == 15.0
    lab["cli"]("wan", "set", "wan1", "--delay", "10ms")


def test_packet_loss_mode_drops_wire_packets(lab: dict[str, Any]) -> None:
    """loss_mode packet restarts the router with its NICs' offloads off: netem then counts
    and drops wire-sized packets, at the asked ratio (measured on the data's leg)."""
    res = lab["cli"]("wan", "set", "wan1", "--loss", "2%", "--loss-mode", "packet")
    assert "started again" in res.stderr, res.stderr

    def data_leg() -> tuple[int, int]:
        leg = lab["cli"].json("wan", "show")[0]["router"]["legs"][1]
        return int(leg["sent_packets"]), int(leg["dropped"])

    try:
        with _iperf_server(lab, 5212):
            sent0, dropped0 = data_leg()
            _iperf(lab, 5212, 3)
            sent1, dropped1 = data_leg()
    finally:
        lab["cli"]("wan", "set", "wan1", "--loss", "0%", "--loss-mode", "gso")
    seen, dropped = sent1 - sent0 + dropped1 - dropped0, dropped1 - dropped0
    assert seen > 2000, (seen, dropped)  # wire packets, not a few hundred 64 KB ones
    assert 0.01 < dropped / seen < 0.03, (seen, dropped)


def test_site_scopes_status_and_refuses_what_is_elsewhere(lab: dict[str, Any]) -> None:
    whole = lab["cli"].json("status")
    assert [s["name"] for s in whole["sites"]] == ["site-a", "site-b"]
    only_a = lab["cli"].json("--site", "site-a", "status")
    assert [h["name"] for h in only_a["hosts"]] == ["a1"]
    assert [s["name"] for s in only_a["sites"]] == ["site-a"]
    assert [w["name"] for w in only_a["wan"]] == ["wan1"]  # it reaches site-a
    text = lab["cli"]("status", "--site", "site-b").stdout
    hosts = [line.split()[1] for line in text.splitlines() if line.split()[:1] == ["host"]]
    assert hosts == ["b1"], text
    res = lab["cli"]("--site", "site-a", "exec", "b1", "--", "true", check=False)
    assert res.returncode == 1 and res.stderr.strip() == (
        "labctl: error: host b1 is in site site-b, not site-a (--site site-a)"), res.stderr
    res = lab["cli"]("--site", "site-c", "status", check=False)
    assert res.returncode == 1 and "has no site 'site-c' (sites: site-a, site-b)" in res.stderr
    assert lab["cli"]("--site", "site-a", "exec", "a1", "--", "true").returncode == 0
    assert [d["name"] for d in lab["cli"].json("--site", "site-a", "datastore", "list")] == \
        ["ds-a"]
    assert lab["cli"].json("--site", "site-b", "datastore", "list") == []
    res = lab["cli"]("--site", "site-b", "datastore", "show", "ds-a", check=False)
    assert "datastore ds-a is in site site-a, not site-b" in res.stderr, res.stderr

    def events(*site: str) -> list[dict[str, Any]]:
        out = lab["cli"](*site, "events", "--json").stdout
        return [json.loads(line) for line in out.splitlines()]

    lab["cli"]("datastore", "resize", "ds-a", "48M")  # an event about ds-a, in site-a
    about_ds = [e for e in events() if e["datastore"] == "ds-a"]
    assert about_ds and all(e["naa"].startswith("naa.") for e in about_ds), about_ds
    assert [e for e in events("--site", "site-b") if e["datastore"] == "ds-a"] == []
    assert len([e for e in events("--site", "site-a") if e["datastore"] == "ds-a"]) == \
        len(about_ds)
    assert {e["site"] for e in about_ds} == {"site-a"}  # recorded by site-a's service


def test_each_site_is_a_management_domain_of_its_own(lab: dict[str, Any]) -> None:
    """Each site's controller state is its own: an inventory listing its hosts and storage
    nodes alone, a secret (0600) its agents hold and no other site's, a rescan service of
    its own. Checked from outside: the files, and the agents asked with each key."""
    import asyncio
    import os
    import sqlite3
    import stat

    from labctl.core import names
    from labctl.core.errors import AuthenticationFailed
    from labctl.core.rpc import RpcClient
    from labctl.core.secret import read_secret

    def rows(db: Path, table: str) -> list[str]:
        conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
        try:
            return [r[0] for r in conn.execute(f"SELECT name FROM {table} ORDER BY name")]
        finally:
            conn.close()

    d = lab["dir"]
    site_a, site_b = d / "sites" / "site-a", d / "sites" / "site-b"
    assert rows(site_a / "inventory.db", "hosts") == ["a1"]
    assert rows(site_a / "inventory.db", "storage_nodes") == ["stor-a"]
    assert rows(site_b / "inventory.db", "hosts") == ["b1"]
    assert rows(site_b / "inventory.db", "storage_nodes") == []
    assert rows(d / "inventory.db", "hosts") == []  # the lab's own: sites and WAN links
    assert rows(d / "inventory.db", "sites") == ["site-a", "site-b"]
    for s in (site_a, site_b):
        assert stat.S_IMODE(os.stat(s / "secret").st_mode) == 0o600
    keys = {"a": read_secret(site_a / "secret"), "b": read_secret(site_b / "secret"),
            "lab": read_secret(d / "secret")}
    assert len(set(keys.values())) == 3

    async def answers(address: str, key: str) -> bool:
        try:
            client = await RpcClient.connect(address, names.HOST_AGENT_PORT, keys[key],
                                             timeout=5)
        except AuthenticationFailed:
            return False
        await client.close()
        return True

    async def probe() -> dict[tuple[str, str], bool]:
        return {(h, k): await answers(lab[h], k) for h in ("a1", "b1") for k in keys}

    got = asyncio.run(probe())
    assert got == {("a1", "a"): True, ("a1", "b"): False, ("a1", "lab"): False,
                   ("b1", "a"): False, ("b1", "b"): True, ("b1", "lab"): False}, got
    # a rescan service per site, each following its own site's agents
    for s in (site_a, site_b):
        log = (s / "rescan.log").read_text()
        assert f"site {s.name}" in log and "subscribed to every agent" in log, log[-800:]
    status = lab["cli"].json("status")
    assert {h["name"]: h["agent"] for h in status["hosts"]} == {"a1": "up", "b1": "up"}
    # a site's controller knows no other site's host
    res = lab["cli"]("--site", "site-b", "host", "storage", "a1", check=False)
    assert res.returncode == 1 and "host a1 is in site site-a, not site-b" in res.stderr
