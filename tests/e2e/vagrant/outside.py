"""Checks of a Vagrant lab's machines from outside labctl, shared by its slow tests."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from labctl.drivers.ssh import SshMachine
from labctl.testing.checks import naa_designator
from tests.conftest import labctl


async def _on(m: dict[str, Any], *argv: str) -> str:
    async with SshMachine(m["name"], m["address"], Path(m["key"]), m["host_key"],
                          user="root", pinned_by="its console printed") as s:
        return (await s.run(list(argv), check=False)).stdout


def on(m: dict[str, Any], *argv: str) -> str:
    """``argv``'s output on machine ``m`` (a ``labctl vagrant up --json`` machine), as root
    over its own pinned SSH session: not through labctl."""
    return asyncio.run(_on(m, *argv))


def naa_read_by_host(lab: str, host: str, stor: dict[str, Any], datastore: str
                     ) -> tuple[bytes, bytes]:
    """The NAA designator libiscsi's ``iscsi-inq`` reads on machine ``host`` (with the
    host's CHAP identity) from the LUN of ``datastore``, and the one ``status --json``
    reports for it: (read, reported)."""
    status = json.loads(labctl("--lab", lab, "status", "--json").stdout)
    ds = next(d for d in status["datastores"] if d["name"] == datastore)
    shown = json.loads(labctl("--lab", lab, "datastore", "show", datastore, "--json").stdout)
    url = f"iscsi://{stor['address']}/{shown['target_iqn']}/{shown['lun']}"
    iqn = next(h["initiator_iqn"] for h in status["hosts"] if h["name"] == host)
    inq = subprocess.run([sys.executable, "-m", "labctl.cli", "--lab", lab, "exec", host, "--",
                          "iscsi-inq", "-e", "1", "-c", "131", "-i", iqn, url],
                         capture_output=True, check=True, timeout=120)
    return naa_designator(inq.stdout), bytes.fromhex(ds["naa"].removeprefix("naa.")).split(
        b"\0")[0]


def destroyed(lab: str, down: subprocess.CompletedProcess[str], machines: list[str]) -> None:
    """``labctl vagrant down --json`` said it destroyed exactly ``machines``, then removed
    the QEMU log libvirt kept of each one's domain; no such log is left (looked up here)."""
    assert down.returncode == 0, down.stderr
    removed = json.loads(down.stdout)["removed"]
    assert sorted(r.split()[1] for r in removed if r.startswith("machine ")) == sorted(machines)
    logs = Path("/var/log/libvirt/qemu")
    assert sorted(r for r in removed if r.startswith("file ")) == sorted(
        f"file {logs}/labctl-vagrant-{lab}-{m}.log" for m in machines), removed
    left = sorted(logs.glob(f"labctl-vagrant-{lab}-*.log"))
    assert left == [], left
