"""The pytest plugin (entry point ``pytest11``: ``labctl``), for anyone testing against a
lab. ``pytest --lab FILE`` brings the lab of topology FILE up once per session, under a
name of its own and, for a local lab, on free subnets of this machine, and tears it down
at the end (also after a failure or Ctrl-C); ``--lab-keep`` leaves it up and says where.

Fixtures (each skips a test when no ``--lab`` is given):

- ``lab``: the lab (``name``, ``home``, ``topology``, ``cli(...)``, ``json(...)``, ``status()``);
- ``host``: its first host (``run(argv)`` in the host, through ``labctl exec``);
- ``vm``: its first VM (``console(cmd)``, ``heartbeat()``, ``host``);
- ``datastore``: its first datastore (``naa`` as the lab reports it).

Every ``--json`` output the fixtures read is checked against labctl's shipped schemas.
Markers: ``hardware`` (needs a lab of machines reached over SSH: skipped on a local lab),
``slow``, ``destructive`` (breaks the lab on purpose: deselect with ``-m "not
destructive"`` against a lab that others share), ``needs_kvm`` (skipped where the lab's
VMs run under TCG). The outside checks are :mod:`labctl.testing.checks`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# Every pytest run where labctl is installed loads this module: what it needs from labctl
# (the schemas' checker, pyroute2 through the outside checks, ~0.5 s) is imported only
# when a fixture runs.

#: the labs --lab-keep left up, said in the session's summary
_KEPT = pytest.StashKey[list[str]]()

MARKERS = {
    "hardware": "needs a lab of machines reached over SSH (skipped on a local lab)",
    "slow": "takes minutes",
    "destructive": "breaks the lab on purpose (deselect with -m 'not destructive')",
    "needs_kvm": "needs the lab's VMs under KVM (skipped under TCG)",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("labctl", "labctl: test against a lab")
    group.addoption("--lab", metavar="FILE", default=None,
                    help="bring up the lab of this topology file for the session")
    group.addoption("--lab-keep", action="store_true", default=False,
                    help="leave the lab up after the session (its name and home are printed)")


def pytest_configure(config: pytest.Config) -> None:
    for name, what in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {what}")
    lab = config.getoption("--lab", default=None)
    if lab and not Path(lab).is_file():
        raise pytest.UsageError(f"--lab {lab}: no such topology file")


@dataclass(frozen=True)
class LabUnderTest:
    """The session's lab, reached as a user reaches it: the labctl command line."""

    name: str
    #: its LABCTL_HOME (a directory of this session's)
    home: Path
    #: the topology file it was brought up from (the given one, renamed and re-addressed)
    topology: Path
    accel: str | None = None

    def cli(self, *args: str, check: bool = True,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """``labctl --lab NAME ARGS``; a non-zero exit fails the test when ``check``; a
        ``--json`` output is checked against its record's shipped schema."""
        return _labctl(self.home, "--lab", self.name, *args, check=check, timeout=timeout)

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def status(self) -> dict[str, Any]:
        return dict(self.json("status"))


@dataclass(frozen=True)
class HostUnderTest:
    name: str
    lab: LabUnderTest

    def run(self, *argv: str, check: bool = False,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``argv`` run on the host (its namespace here; over SSH on hardware) with its
        iSCSI identity in the environment, through ``labctl exec``."""
        return self.lab.cli("exec", self.name, "--", *argv, check=check, timeout=timeout)


@dataclass(frozen=True)
class VmUnderTest:
    name: str
    lab: LabUnderTest

    def console(self, command: str) -> str:
        """The test guest's answer to a console command (``read``, ``size``, ``rate N``...)."""
        return str(self.lab.json("vm", "console", self.name, *command.split())["answer"])

    def state(self) -> dict[str, Any]:
        return dict(next(v for v in self.lab.json("vm", "list") if v["name"] == self.name))

    @property
    def host(self) -> str:
        return str(self.state()["host"])

    def heartbeat(self) -> int | None:
        """The guest's heartbeat counter now (None when it does not beat)."""
        beat = self.state().get("heartbeat")
        return int(beat["counter"]) if beat else None


@dataclass(frozen=True)
class DatastoreUnderTest:
    name: str
    #: its ID as the lab reports it (``naa.…``)
    naa: str
    lab: LabUnderTest


def _labctl(home: Path, *args: str, check: bool = True,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
    from labctl.cli.records import check_output
    from labctl.core.paths import cache_dir

    # the images stay in the user's cache (built once, shared): only the labs go in ``home``
    env = {**os.environ, "LABCTL_HOME": str(home),
           "LABCTL_CACHE": os.environ.get("LABCTL_CACHE") or str(cache_dir())}
    res = subprocess.run([sys.executable, "-m", "labctl.cli", *args], capture_output=True,
                         text=True, timeout=timeout, check=False, env=env)
    if check and res.returncode != 0:
        pytest.fail(f"labctl {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    if "--json" in args and res.returncode in (0, 1):
        try:
            check_output(list(args), res.returncode, res.stdout)
        except ValueError as exc:
            pytest.fail(f"{exc}")
    return res


def renamed(text: str, name: str, source: str) -> str:
    """Topology ``text`` as lab ``name``, each site on a /24 no route of this machine uses
    (a lab's names and subnets are machine-wide: two sessions must not share them)."""
    import yaml

    from labctl.lab.topology import machine_items, vagrant_host_key, vagrant_key
    from labctl.testing.checks import free_subnet

    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise pytest.UsageError(f"--lab {source}: not a topology (a mapping of lab, sites...)")
    # a Vagrant machine is its lab's (by the name written): its keys named before renaming
    lab = str(data.get("name"))
    for item in machine_items(data):
        if isinstance(item, dict) and item.get("ssh") == "vagrant":
            item["ssh"] = {"key": str(vagrant_key(lab)),
                           "host_key": str(vagrant_host_key(lab, str(item.get("name"))))}
    data["name"] = name
    machines = _machine_sites(data)
    for site in data.get("sites") or []:
        # a network of machines (given by its bridge, or holding SSH hosts) keeps its
        # addresses: they are the machines', not labctl's to pick
        if isinstance(site, dict) and site.get("name") not in machines:
            site["subnet"] = str(free_subnet())
    return str(yaml.safe_dump(data, sort_keys=False))


def _machine_sites(data: dict[str, Any]) -> set[str]:
    """The sites of a topology (as YAML read it) whose network is not labctl's."""
    from labctl.lab.topology import machine_items

    sites = [s for s in data.get("sites") or [] if isinstance(s, dict)]
    found = {str(s.get("name")) for s in sites if s.get("bridge")}
    for h in machine_items(data):
        if isinstance(h, dict) and h.get("ssh"):
            found.add(str(h.get("site") or (sites[0].get("name") if len(sites) == 1 else "")))
    return found


def _has_machines(path: str) -> bool:
    """Whether the topology at ``path`` has a host or storage node reached over SSH."""
    import yaml

    from labctl.lab.topology import machine_items

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and any(
        isinstance(h, dict) and h.get("ssh") for h in machine_items(data))


@pytest.fixture(scope="session")
def lab(request: pytest.FixtureRequest,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabUnderTest]:
    """The lab of ``--lab FILE``, up for the session; down (and nothing of it left) after."""
    from labctl.testing.checks import leftovers, unique_lab

    source = request.config.getoption("--lab")
    if not source:
        pytest.skip("no lab: run pytest with --lab FILE (a labctl topology)")
    keep = bool(request.config.getoption("--lab-keep"))
    home = tmp_path_factory.mktemp("labctl-home")
    name = unique_lab("pt")
    topo = home / Path(source).name
    topo.write_text(renamed(Path(source).read_text(encoding="utf-8"), name, source))
    under = LabUnderTest(name=name, home=home, topology=topo)
    try:
        _labctl(home, "up", str(topo), timeout=1800)
        under = LabUnderTest(name=name, home=home, topology=topo,
                             accel=under.status().get("accel"))
        yield under
    finally:
        if keep:
            request.config.stash.setdefault(_KEPT, []).append(
                f"lab {name} is kept up: LABCTL_HOME={home} labctl --lab {name} status")
        else:
            _labctl(home, "--lab", name, "down", "--purge", check=False, timeout=600)
            left = leftovers(name, home / "labs" / name)
            if left:
                pytest.fail(f"lab {name} left behind: {', '.join(left)}")


@pytest.fixture
def host(lab: LabUnderTest) -> HostUnderTest:
    hosts = lab.status()["hosts"]
    if not hosts:
        pytest.skip("the lab has no host")
    return HostUnderTest(name=str(hosts[0]["name"]), lab=lab)


@pytest.fixture
def vm(lab: LabUnderTest) -> VmUnderTest:
    vms = lab.json("vm", "list")
    if not vms:
        pytest.skip("the lab has no VM")
    return VmUnderTest(name=str(vms[0]["name"]), lab=lab)


@pytest.fixture
def datastore(lab: LabUnderTest) -> DatastoreUnderTest:
    stores = lab.status()["datastores"]
    if not stores:
        pytest.skip("the lab has no datastore")
    return DatastoreUnderTest(name=str(stores[0]["name"]), naa=str(stores[0]["naa"]), lab=lab)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    for line in config.stash.get(_KEPT, []):
        terminalreporter.write_line(f"labctl: {line}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``hardware`` tests skip unless ``--lab`` names a topology with hosts reached over
    SSH."""
    lab = config.getoption("--lab")
    if lab and _has_machines(str(lab)):
        return
    for item in items:
        if item.get_closest_marker("hardware"):
            item.add_marker(pytest.mark.skip(reason="needs a lab of machines over SSH"))


@pytest.fixture(autouse=True)
def _needs_kvm(request: pytest.FixtureRequest) -> None:
    """A ``needs_kvm`` test runs only where the lab's VMs run under KVM."""
    if request.node.get_closest_marker("needs_kvm") is None:
        return
    under: LabUnderTest = request.getfixturevalue("lab")
    if under.accel != "kvm":
        pytest.skip(f"needs KVM; this lab's VMs run under {under.accel or 'TCG'}")
