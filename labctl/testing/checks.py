"""Checks of a lab from outside labctl, for its own end-to-end tests and for anyone testing
against a lab (the pytest plugin, :mod:`labctl.testing.plugin`, hands them out): a subnet
no route of this machine uses, a lab name of its own, a command in a host's namespace,
what a lab left behind (found without labctl's help), a QEMU's QMP asked with a plain
socket, a LUN's NAA ID as an outside iSCSI client reads it."""

from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from labctl.core.proc import cmdlines
from labctl.drivers.netlink import overlapping_routes


def e2e_ready() -> str | None:
    """Why the real lab cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (namespaces, bridges, libvirt)"
    for tool in ("qemu-system-x86_64", "libvirtd", "iscsi-inq", "mmdebstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (run scripts/setup.sh)"
    return None

def naa_designator(inq_stdout: bytes) -> bytes:
    """The NAA designator in ``iscsi-inq -e 1 -c 131`` output, as it prints it: binary
    designators go out with %s, so the raw bytes up to the first zero byte. Each designator
    ends with ``]`` and a newline, then the next designator or the end of the output."""
    m = re.search(rb"Designator Type:\(3\) NAA\nDesignator:\[(.*?)\]\n(?=DEVICE DESIGNATOR #|\Z)",
                  inq_stdout, re.S)
    assert m, inq_stdout
    return m.group(1)

#: where the end-to-end tests take their subnets: /24s of this range (apart from
#: labs/default.yaml's 10.231.0.0/24 and the migration testbed's 10.232.0.0/16)
E2E_SUBNETS = ipaddress.IPv4Network("10.231.64.0/18")
_handed_out: set[ipaddress.IPv4Network] = set()


def free_subnet() -> ipaddress.IPv4Network:
    """A /24 of :data:`E2E_SUBNETS` that no route or address of this machine overlaps and
    that this run has not handed out yet; tried in random order, so that two runs on one
    machine rarely reach for the same one (if they do, the second ``labctl up`` refuses it
    as a clash: a failed test, never a shared network). Call it right before the subnet is
    put to use, not at import."""
    candidates = [n for n in E2E_SUBNETS.subnets(new_prefix=24) if n not in _handed_out]
    random.SystemRandom().shuffle(candidates)
    for net in candidates:
        if not overlapping_routes(net):
            _handed_out.add(net)
            return net
    raise AssertionError(f"no /24 of {E2E_SUBNETS} is free on this machine")


def unique_lab(prefix: str) -> str:
    """A lab name: ``prefix`` and six random hex digits. A lab's namespaces, domains and IQNs
    are named after it machine-wide, so two runs on one machine must not share a name."""
    assert re.fullmatch(r"[a-z][a-z0-9-]{0,9}", prefix), prefix  # the name is 16 at most
    return f"{prefix}{secrets.token_hex(3)}"

def in_ns(lab: str, host: str, *argv: str, env: dict[str, str] | None = None
          ) -> subprocess.CompletedProcess[str]:
    """``argv`` run in the network namespace of ``host`` of lab ``lab`` (with ``env`` added
    to the environment)."""
    return subprocess.run(["ip", "netns", "exec", f"labctl-{lab}-{host}", *argv],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, **env} if env else None)

def wait(pred: Callable[..., Any], timeout: float = 30.0, what: str | Callable[[], str] = "",
         interval: float = 0.2) -> Any:
    """Call ``pred`` every ``interval`` s until it returns something true, and return that;
    after ``timeout`` s fail the test, saying what it waited for (``what``, or what it
    returns then)."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what() if callable(what) else what}")
        time.sleep(interval)

def leftovers(lab: str, lab_dir: Path, records_kept: bool = False) -> list[str]:
    """Everything of lab ``lab`` that still exists, looked up without labctl's help; with
    ``records_kept``, the lab directory may remain (``down`` keeps it) but nothing may run
    or be configured."""
    found: list[str] = []
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    found += [f"netns {line.split()[0]}" for line in ns.splitlines()
              if line.startswith(f"labctl-{lab}-")]
    links = json.loads(subprocess.run(["ip", "-j", "-d", "link", "show"], capture_output=True,
                                      text=True, check=True).stdout)
    found += [f"link {link['ifname']}" for link in links
              if str(link.get("ifalias", "")).startswith(f"labctl:{lab}:")]
    own = str(lab_dir).encode()
    for pid, cmd in cmdlines():
        args = cmd.split(b"\0")
        if any(a == own or own + b"/" in a for a in args) and pid != os.getpid():
            found.append(f"process {pid} {cmd[:80]!r}")
    doms = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
                          capture_output=True, text=True, check=False).stdout
    found += [f"domain {d}" for d in doms.split() if d.startswith(f"labctl-{lab}-")]
    found += [f"file {log}" for log in Path("/var/log/libvirt/qemu").glob(f"labctl-{lab}-*.log")]
    if lab_dir.exists() and not records_kept:
        found.append(f"directory {lab_dir}")
    return found

def outside_qmp(sock: Path | str, command: str, timeout: float = 30) -> Any:
    """What a QEMU returns for ``command`` on the QMP socket ``sock``, asked with a plain
    socket (none of labctl's code). An ``error`` answer fails the test with its message."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(sock))
        f = s.makefile("rw")

        def answer() -> Any:
            line = f.readline()
            assert line, f"QMP {sock} closed the connection"
            return json.loads(line)

        greeting = answer()
        assert "QMP" in greeting, greeting
        for cmd in ("qmp_capabilities", command):
            f.write(json.dumps({"execute": cmd}) + "\n")
            f.flush()
            while True:  # events may come first
                msg = answer()
                if "error" in msg:
                    err = msg["error"]
                    raise AssertionError(f"QMP {cmd} on {sock} failed: {err.get('class')}: "
                                         f"{err.get('desc')}")
                if "return" in msg:
                    break
        return msg["return"]
