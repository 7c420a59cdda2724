"""A migration's destination boots the test guest from its own copy: the source's spec
names the source's paths (another machine's state directory, or the controller's cache),
which a machine reached over SSH does not have."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from labctl.core.errors import LabError
from labctl.guest.image import GIVEN_IMAGE_ENV
from labctl.hosts import protocol as hp
from labctl.hosts.agent import HostAgent


def _spec(kernel: Path, initrd: Path | None) -> hp.VmSpec:
    return hp.VmSpec(name="vm1", memory_mib=128, vcpus=1, kernel=kernel, initrd=initrd,
                     append="console=ttyS0")


@pytest.fixture
def agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HostAgent:
    mine = tmp_path / "host2" / "guest"
    mine.mkdir(parents=True)
    for name in ("vmlinuz", "initrd.img"):
        (mine / name).write_bytes(b"x")
    monkeypatch.setenv(GIVEN_IMAGE_ENV, str(mine))
    return HostAgent(tmp_path / "host2", "host2")


def test_the_source_hosts_test_guest_paths_become_this_hosts(agent: HostAgent,
                                                            tmp_path: Path) -> None:
    theirs = Path("/var/lib/labctl/labs/e2c2/host1/guest")
    got = asyncio.run(agent.own_boot_files(_spec(theirs / "vmlinuz", theirs / "initrd.img")))
    mine = tmp_path / "host2" / "guest"
    assert (got.kernel, got.initrd) == (mine / "vmlinuz", mine / "initrd.img")
    assert agent.check_spec(got, "mig_prepare") == got


def test_boot_files_that_exist_or_are_not_the_test_guest_are_kept(agent: HostAgent,
                                                                  tmp_path: Path) -> None:
    here = tmp_path / "k"
    here.write_bytes(b"k")
    spec = _spec(here, None)
    assert asyncio.run(agent.own_boot_files(spec)) is spec
    other = _spec(Path("/elsewhere/bzImage"), Path("/elsewhere/initrd.img"))
    assert asyncio.run(agent.own_boot_files(other)) is other
    with pytest.raises(LabError, match="does not exist on host host2"):
        agent.check_spec(other, "mig_prepare")
