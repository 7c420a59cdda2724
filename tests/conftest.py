"""Shared fixtures: a throwaway labctl home per test session, the image cache kept; and the
helpers the end-to-end tests share (the CLI, a module's lab, checks from outside labctl)."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from labctl.cli.records import check_output
from labctl.core.chap import chap_for
from labctl.core.paths import cache_dir
from labctl.core.secret import read_secret
from labctl.guest.protocol import decode_disk_record
from labctl.testing.checks import (
    E2E_SUBNETS,
    e2e_ready,
    free_subnet,
    in_ns,
    leftovers,
    naa_designator,
    outside_qmp,
    unique_lab,
    wait,
)

__all__ = ["E2E_SUBNETS", "free_subnet", "in_ns", "leftovers", "naa_designator", "outside_qmp",
           "unique_lab", "wait"]


#: the marks of a module that brings up a real lab: ``pytestmark = E2E``
E2E = [pytest.mark.e2e, pytest.mark.skipif(e2e_ready() is not None, reason=e2e_ready() or "")]


@pytest.fixture(scope="session")
def lab_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """LABCTL_HOME for the session; images stay in the normal cache so they are built once."""
    home = tmp_path_factory.mktemp("labctl-home")
    old = {k: os.environ.get(k) for k in ("LABCTL_HOME", "LABCTL_CACHE")}
    os.environ["LABCTL_CACHE"] = str(cache_dir())
    os.environ["LABCTL_HOME"] = str(home)
    yield home
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


# --- end-to-end helpers (the outside checks are labctl.testing.checks, which the pytest
# plugin ships to anyone testing against a lab) ---------------------------------------------

def labctl(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The labctl CLI, as a user runs it; with ``check``, a non-zero exit fails the test."""
    res = subprocess.run([sys.executable, "-m", "labctl.cli", *args], capture_output=True, text=True,
                         timeout=timeout, check=False)
    if check and res.returncode != 0:
        raise AssertionError(f"labctl {' '.join(args)} failed ({res.returncode}):\n{res.stderr}")
    if "--json" in args and res.returncode in (0, 1):
        # every --json output of every test is checked against the shipped schema of its
        # record (an error record when the command failed)
        try:
            check_output(list(args), res.returncode, res.stdout)
        except ValueError as exc:
            raise AssertionError(f"{exc}\nstdout: {res.stdout[:2000]}") from None
    return res


@dataclass(frozen=True)
class LabCli:
    """``labctl --lab <name> ...`` for one lab: call it like ``labctl``; ``json`` adds
    ``--json`` and parses the output."""

    name: str

    def __call__(self, *args: str, check: bool = True,
                 timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return labctl("--lab", self.name, *args, check=check, timeout=timeout)

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "--json").stdout)


#: how the target refuses an initiator: no ACL for it at all, or no such LUN in its ACL
NO_ACL = "Authorization failure"
NO_LUN = "LOGICAL_UNIT_NOT_SUPPORTED"


def refused(res: subprocess.CompletedProcess[Any], *why: str) -> bool:
    """A libiscsi tool failed because the target refused it (for one of ``why``: default
    either refusal), not for some other reason (a missing namespace, route or tool)."""
    out = res.stdout + res.stderr
    text = out.decode(errors="replace") if isinstance(out, bytes) else str(out)
    return res.returncode != 0 and any(w in text for w in (why or (NO_ACL, NO_LUN)))


def host_iqn(lab: str, host: str) -> str:
    return f"iqn.2026-11.dev.labctl:{lab}.{host}"


def site_secret(lab: str, agent: str) -> bytes:
    """The secret of the site of host or storage node ``agent`` of lab ``lab`` (under this
    session's ``LABCTL_HOME``): the site whose own inventory lists it."""
    for site in sorted((Path(os.environ["LABCTL_HOME"]) / "labs" / lab / "sites").iterdir()):
        conn = sqlite3.connect(f"{(site / 'inventory.db').as_uri()}?mode=ro", uri=True)
        try:
            found = conn.execute("SELECT 1 FROM hosts WHERE name=? UNION SELECT 1 FROM "
                                 "storage_nodes WHERE name=?", (agent, agent)).fetchone()
        finally:
            conn.close()
        if found:
            return read_secret(site / "secret")
    raise AssertionError(f"no site of lab {lab} has {agent}")


def chap_env(lab: str, host: str, target_iqn: str, mutual: bool = True) -> dict[str, str]:
    """libiscsi's environment with ``host``'s CHAP credentials at ``target_iqn``, derived from
    the secret of its site. ``iscsi-ls`` takes them without the target's secret
    (``mutual=False``): it would demand one of the discovery session, which LIO does not
    authenticate per initiator."""
    env = chap_for(site_secret(lab, host), host_iqn(lab, host), target_iqn).libiscsi_env()
    return env if mutual else {k: v for k, v in env.items() if "_TARGET_" not in k}


def outside_size(lab: str, host: str, m: dict[str, Any]) -> int:
    """The size of datastore ``m`` (as ``datastore show`` gives it) that an iSCSI client in
    ``host``'s namespace reads, logged in with the host's initiator name."""
    url = f"iscsi://{m['portal'].split(':')[0]}/{m['target_iqn']}/{m['lun']}"
    res = in_ns(lab, host, "iscsi-readcapacity16", "-s", "-i", host_iqn(lab, host), url,
                env=chap_env(lab, host, m["target_iqn"]))
    assert res.returncode == 0, res.stderr
    return int(res.stdout.strip())


def outside_disk_counter(lab: str, host: str, m: dict[str, Any]) -> int | None:
    """The guest's disk counter (sector 0) on datastore ``m`` (as ``datastore show`` gives
    it), read by a client of our own in ``host``'s namespace: ``qemu-img dd`` through
    libiscsi, logged in with the host's initiator name and CHAP secret (given in a 0600
    file, not on the command line), sharing the LUN with the VM that writes it."""
    chap = chap_for(site_secret(lab, host), host_iqn(lab, host), m["target_iqn"])
    with tempfile.TemporaryDirectory() as tmp:
        secret = Path(tmp) / "chap"
        secret.touch(0o600)
        secret.write_text(chap.password)
        opts = ",".join(f"{k}={v}" for k, v in (
            ("driver", "iscsi"), ("transport", "tcp"), ("portal", m["portal"]),
            ("target", m["target_iqn"]), ("lun", m["lun"]),
            ("initiator-name", host_iqn(lab, host)), ("user", chap.user),
            ("password-secret", "chap"), ("cache.direct", "on")))
        res = in_ns(lab, host, "qemu-img", "dd", "--object", f"secret,id=chap,file={secret}",
                    "--image-opts", "-U", "-O", "raw", "bs=512", "count=1", f"if={opts}",
                    f"of={Path(tmp) / 'sector0'}")
        assert res.returncode == 0, res.stdout + res.stderr
        return decode_disk_record((Path(tmp) / "sector0").read_bytes())


@contextlib.contextmanager
def module_lab(name: str, topo_text: str, lab_home: Path,
               tmp_path_factory: pytest.TempPathFactory,
               filename: str = "lab.yaml") -> Iterator[Path]:
    """Lab ``name`` up from ``topo_text`` (written to a fresh ``filename``, which is yielded)
    for the body; then down, and nothing of it may be left."""
    topo = tmp_path_factory.mktemp("topo") / filename
    topo.write_text(topo_text)
    try:
        labctl("up", str(topo), timeout=900)
        yield topo
    finally:
        labctl("--lab", name, "down", check=False)
    # down keeps the records; nothing of the lab runs or is configured any more
    assert leftovers(name, lab_home / "labs" / name, records_kept=True) == []
    labctl("--lab", name, "down", "--purge")
    assert leftovers(name, lab_home / "labs" / name) == []


