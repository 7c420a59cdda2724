"""Hosts reached over SSH in a topology: the ssh block's checks, the network a site is
given (a bridge, or a route), and what such hosts cannot do yet."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from pathlib import Path

import asyncssh
import pytest

from labctl.core.errors import ProvisionError, TopologyError
from labctl.hosts import sshhosts
from labctl.hosts.sshhosts import (
    DEFAULT_PYTHON,
    SshAccess,
    dropin_text,
    read_host_key,
    state_dir,
)
from labctl.lab import bringup, topology


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, str]:
    key = asyncssh.generate_private_key("ssh-ed25519")
    path = tmp_path / "client"
    key.write_private_key(str(path))
    path.chmod(0o600)
    host = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    (tmp_path / "host.pub").write_text(host + "\n")
    return path, host


def _text(host_key: str = "host.pub", extra: str = "", site: str = "", more: str = "") -> str:
    return (f"name: t\nsites:\n  - name: s1\n    subnet: 10.250.7.0/24\n{site}"
            f"hosts:\n  - name: h1\n    ssh: {{key: client, host_key: {host_key}{extra}}}\n"
            f"{more}")


def _load(tmp_path: Path, text: str) -> topology.Topology:
    path = tmp_path / "lab.yaml"
    path.write_text(text)
    return topology.load(path)


def _problems(tmp_path: Path, text: str) -> list[tuple[str, str]]:
    with pytest.raises(TopologyError) as err:
        _load(tmp_path, text)
    return list(err.value.problems)


def test_an_ssh_host_by_its_key_files(tmp_path: Path, keys: tuple[Path, str]) -> None:
    t = _load(tmp_path, _text())
    h = t.hosts[0]
    assert h.ssh is not None
    # SSH answers at the host's own address unless told; the paths are the file's
    assert h.ssh.address == str(h.address) == "10.250.7.11"
    assert h.ssh.key == str(tmp_path / "client") and h.ssh.host_key == keys[1]
    assert (h.ssh.user, h.ssh.port, h.ssh.agent, h.ssh.python) == (
        "root", 22, "process", DEFAULT_PYTHON)
    # a site of SSH hosts is not labctl's network: no bridge made, reached by a route
    assert t.sites[0].external and t.sites[0].bridge is None
    assert SshAccess.from_json(h.ssh.to_json()) == h.ssh


def test_the_host_key_as_a_line(tmp_path: Path, keys: tuple[Path, str]) -> None:
    t = _load(tmp_path, _text(host_key=f'"{keys[1]}"', extra=", address: m1.lab, port: 2222, "
                                                           "user: ops, agent: systemd"))
    ssh = t.hosts[0].ssh
    assert ssh is not None and ssh.host_key == keys[1]
    assert (ssh.address, ssh.port, ssh.user, ssh.agent) == ("m1.lab", 2222, "ops", "systemd")


@pytest.mark.parametrize(("host_key", "words"), [
    ("nowhere.pub", "neither a public key line nor a readable file"),
    ('"ssh-ed25519 AAAAnotbase64"', "not a public key line"),
])
def test_a_bad_host_key_is_refused(tmp_path: Path, keys: tuple[Path, str], host_key: str,
                                   words: str) -> None:
    found = _problems(tmp_path, _text(host_key=host_key))
    assert found[0][0] == "hosts[0].ssh.host_key" and words in found[0][1], found


def test_an_unknown_agent_mode_is_refused(tmp_path: Path, keys: tuple[Path, str]) -> None:
    found = _problems(tmp_path, _text(extra=", agent: docker"))
    assert found[0][0].startswith("hosts[0].ssh.agent"), found


def test_the_client_key_must_be_private(tmp_path: Path, keys: tuple[Path, str]) -> None:
    keys[0].chmod(0o644)
    access = _load(tmp_path, _text()).hosts[0].ssh
    assert access is not None
    assert [f for f, _ in access.problems()] == ["key"]
    assert "readable by others" in access.problems()[0][1]
    keys[0].unlink()
    assert "cannot read the client key" in access.problems()[0][1]


def test_what_ssh_hosts_cannot_do_yet(tmp_path: Path, keys: tuple[Path, str]) -> None:
    # a server guest, a storage node VM without the site's bridge, a namespace
    # host in a routed site
    text = _text(more=(
        "  - name: h2\nstorage_nodes:\n  - name: n1\n"
        "datastores:\n  - {name: fs, kind: file, size: 1G, hosts: [h1]}\n"
        "vms:\n  - {name: v1, host: h1, guest: server, disk: {datastore: fs, base: server}}\n"))
    found = dict(_problems(tmp_path, text))
    assert "server guest runs on a namespace host" in found["vms[0].guest"]
    assert "needs its bridge" in found["storage_nodes[0]"]
    assert "give this host an ssh: block too" in found["hosts[1]"]


def test_a_given_bridge_takes_namespace_hosts_and_nodes_too(tmp_path: Path,
                                                             keys: tuple[Path, str]) -> None:
    t = _load(tmp_path, _text(site="    bridge: br-lab\n", more=(
        "  - name: h2\nstorage_nodes:\n  - name: n1\n")))
    assert t.sites[0].bridge == "br-lab" and t.sites[0].external
    assert t.hosts[1].ssh is None


def test_a_given_network_is_checked_not_made(tmp_path: Path) -> None:
    site = topology.Site("s1", ipaddress.IPv4Network("10.250.9.0/24"), bridge="lnobr0",
                         external=True)
    assert "there is no link lnobr0" in bringup._external_problems(0, site)[0][1]
    routed = topology.Site("s1", ipaddress.IPv4Network("10.250.9.0/24"), external=True)
    assert "no route to 10.250.9.0/24" in bringup._external_problems(0, routed)[0][1]
    lo = topology.Site("s1", ipaddress.IPv4Network("127.0.0.0/8"), bridge="lo", external=True)
    assert "holds no address" in bringup._external_problems(0, lo)[0][1]


def test_host_key_lines_and_files(tmp_path: Path) -> None:
    line = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA comment"
    assert read_host_key(f"  {line}\n", tmp_path) == line
    (tmp_path / "k.pub").write_text(line + "\nsecond line ignored\n")
    assert read_host_key("k.pub", tmp_path) == line
    with pytest.raises(ValueError, match="neither"):
        read_host_key("missing.pub", tmp_path)


def test_two_labs_never_share_a_state_directory() -> None:
    assert state_dir("a1b2c3", "h1") != state_dir("d4e5f6", "h1")
    assert state_dir("a1b2c3", "h1").startswith("/var/lib/labctl/labs/")


def test_an_agent_port_of_the_lab_s_own(tmp_path: Path, keys: tuple[Path, str]) -> None:
    """Two labs on one machine: a port for this lab's agents there, else the role's own."""
    t = _load(tmp_path, _text(extra=", agent_port: 7610", more=(
        "storage_nodes:\n  - name: n1\n    ssh: {key: client, host_key: host.pub}\n")))
    host, node = t.hosts[0].ssh, t.storage_nodes[0].ssh
    assert host is not None and node is not None
    assert (host.port_for("host"), node.port_for("storage")) == (7610, 7700)
    assert SshAccess.from_json(host.to_json()).agent_port == 7610
    # a journal entry from before the field still loads, with the role's own port
    old = {k: v for k, v in json.loads(node.to_json()).items() if k != "agent_port"}
    assert SshAccess.from_json(json.dumps(old)).port_for("host") == 7600
    found = _problems(tmp_path, _text(extra=", agent_port: 80"))
    assert found[0][0].startswith("hosts[0].ssh.agent_port"), found


def test_a_port_another_lab_s_agent_holds_is_refused() -> None:
    async def go() -> str:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        access = SshAccess(address="127.0.0.1")
        try:
            with pytest.raises(ProvisionError) as err:
                await sshhosts._refuse_taken("127.0.0.1", port, "host", "h1", access)
            with pytest.raises(ProvisionError) as node:
                await sshhosts._refuse_taken("127.0.0.1", port, "storage node", "n1", access)
        finally:
            server.close()
            await server.wait_closed()
        await sshhosts._refuse_taken("127.0.0.1", port, "host", "h1", access)  # free again
        return err.value.message, node.value.message

    said, node = asyncio.run(go())
    assert said.startswith("host h1 (root@127.0.0.1:22): port ") and said.endswith(
        "is taken by something that is not this lab's agent (another lab's on the same "
        "machine?): give this lab's host another agent_port in its ssh settings"), said
    # a storage node's refusal names its role whole (it said "this lab's storage")
    assert node.startswith("storage node n1 (root@127.0.0.1:22): port ") and node.endswith(
        "give this lab's storage node another agent_port in its ssh settings"), node


def test_a_storage_node_as_a_machine(tmp_path: Path, keys: tuple[Path, str]) -> None:
    t = _load(tmp_path, _text(more=(
        "storage_nodes:\n  - name: n1\n    ssh: {key: client, host_key: host.pub}\n"
        "datastores:\n  - {name: ds1, size: 64M, hosts: [h1]}\n")))
    node = t.storage_nodes[0]
    assert node.ssh is not None and node.ssh.address == str(node.address) == "10.250.7.2"
    assert node.ssh.agent == "process" and node.ssh.host_key == keys[1]
    # a routed site of machines takes a node only as a machine: no "needs its bridge"
    assert t.sites[0].external and t.sites[0].bridge is None


def test_a_storage_machine_by_its_unit_with_a_file_datastore(tmp_path: Path,
                                                              keys: tuple[Path, str]) -> None:
    t = _load(tmp_path, _text(more=(
        "storage_nodes:\n  - name: n1\n    ssh: {key: client, host_key: host.pub, "
        "agent: systemd}\n"
        "datastores:\n  - {name: fs, kind: file, size: 1G, hosts: [h1]}\n")))
    node = t.storage_nodes[0].ssh
    assert node is not None and node.agent == "systemd"
    assert [(d.name, d.kind, d.node) for d in t.datastores] == [("fs", "file", "n1")]


def test_a_vagrant_machine_with_its_agent_said(tmp_path: Path) -> None:
    """``ssh: {vagrant: true, agent: systemd}``: the machine labctl vagrant up made, its
    agent the playbooks' unit; keys beside vagrant are refused (they are Vagrant's)."""
    t = _load(tmp_path, ("name: t\nsites:\n  - name: s1\n    subnet: 10.250.7.0/24\n"
                         "storage_nodes:\n  - name: n1\n    ssh: {vagrant: true, agent: "
                         "systemd}\nhosts:\n  - name: h1\n    ssh: vagrant\n"))
    node, host = t.storage_nodes[0].ssh, t.hosts[0].ssh
    assert node is not None and host is not None
    assert (node.vagrant, node.agent, node.unit_for("storage")) == (
        "t", "systemd", "labctl-storage-agent.service")
    assert (host.vagrant, host.agent, host.unit_for("host")) == (
        "t", "process", "labctl-host-agent.service")
    found = _problems(tmp_path, ("name: t\nsites:\n  - name: s1\n    subnet: 10.250.7.0/24\n"
                                 "hosts:\n  - name: h1\n    ssh: {vagrant: true, key: k}\n"))
    assert found and found[0][0].startswith("hosts[0].ssh"), found


def test_a_unit_s_drop_in_runs_the_lab_s_command_and_nothing_a_shell_would_read() -> None:
    text = dropin_text("ab12", ["/opt/labctl/venv/bin/python", "-m", "labctl.agents.storage",
                                "--config", "/var/lib/labctl/labs/ab12/n1/storage.json"],
                       {"LABCTL_GUEST": "/var/lib/labctl/labs/ab12/h1/guest"})
    lines = text.splitlines()
    assert lines[0].startswith("# labctl lab ab12:") and lines[1] == "[Service]"
    # the unit's own command is cleared first, then the lab's is the only one
    assert lines[2] == "ExecStart=" and lines[3].startswith("ExecStart=/opt/labctl/venv/")
    assert lines[4] == "Environment=LABCTL_GUEST=/var/lib/labctl/labs/ab12/h1/guest"
    for bad in ("a b", "$HOME", "%h", "x'y", "a\\b", "a;b"):
        with pytest.raises(ValueError, match="cannot be written in a unit"):
            dropin_text("ab12", ["/bin/true", bad], {})


def test_a_storage_machine_alone_makes_the_site_routed(tmp_path: Path,
                                                       keys: tuple[Path, str]) -> None:
    # the site's hosts are namespaces here, so the routed site refuses them, not the node
    text = ("name: t\nsites:\n  - name: s1\n    subnet: 10.250.7.0/24\n"
            "storage_nodes:\n  - name: n1\n    ssh: {key: client, host_key: host.pub}\n"
            "hosts:\n  - name: h1\n")
    found = dict(_problems(tmp_path, text))
    assert "give this host an ssh: block too" in found["hosts[0]"]
    assert "storage_nodes[0]" not in found


def test_the_machine_check_reads_a_storage_machine_key(tmp_path: Path,
                                                       keys: tuple[Path, str]) -> None:
    t = _load(tmp_path, _text(more=(
        "storage_nodes:\n  - name: n1\n    ssh: {key: client, host_key: host.pub}\n"
        "datastores:\n  - {name: ds1, size: 64M, hosts: [h1]}\n")))
    keys[0].chmod(0o644)
    with pytest.raises(TopologyError) as err:
        bringup.check_machine(t, tmp_path)
    fields = [f for f, _ in err.value.problems]
    assert "storage_nodes[0].ssh.key" in fields and "hosts[0].ssh.key" in fields


def test_ssh_vagrant_takes_the_keys_vagrant_up_pinned(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABCTL_HOME", str(tmp_path / "home"))
    text = ("name: vg\nsites:\n  - name: s1\n    subnet: 10.250.7.0/24\n"
            "storage_nodes:\n  - name: n1\n    ssh: vagrant\n"
            "hosts:\n  - name: h1\n    ssh: vagrant\n")
    # before `labctl vagrant up`: the file loads, the machine check says what to run
    t = _load(tmp_path, text)
    assert t.sites[0].external
    with pytest.raises(TopologyError) as err:
        bringup.check_machine(t, tmp_path)
    found = dict(err.value.problems)
    assert "run labctl vagrant up with this topology first" in found["hosts[0].ssh.host_key"]
    assert "storage_nodes[0].ssh.host_key" in found
    # after: its key and each machine's pinned host key, from the lab's Vagrant directory
    w = topology.vagrant_dir("vg")
    (w / "keys").mkdir(parents=True)
    key = asyncssh.generate_private_key("ssh-ed25519")
    key.write_private_key(str(w / "id_ed25519"))
    (w / "id_ed25519").chmod(0o600)
    host = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    for name in ("n1", "h1"):
        (w / "keys" / f"{name}.pub").write_text(host + "\n")
    t = _load(tmp_path, text)
    ssh = t.hosts[0].ssh
    assert ssh is not None and ssh.vagrant == "vg" and ssh.host_key == host
    assert ssh.key == str(w / "id_ed25519") and ssh.address == "10.250.7.11"
    assert t.storage_nodes[0].ssh is not None and t.storage_nodes[0].ssh.address == "10.250.7.2"
    with pytest.raises(TopologyError) as err:  # only the route is missing here
        bringup.check_machine(t, tmp_path)
    assert [f for f, _ in err.value.problems] == ["sites[0].subnet"]
    # a word other than vagrant is refused by the file's own check
    assert _problems(tmp_path, text.replace("ssh: vagrant", "ssh: vagrantt", 1))
