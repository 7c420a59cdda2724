"""Shared fixtures: a throwaway labctl home per test session, the image cache kept; and the
helpers the end-to-end tests share (the CLI, a module's lab, checks from outside labctl)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from labctl.cli.records import check_output
from labctl.core.chap import chap_for
from labctl.core.paths import cache_dir
from labctl.core.secret import read_secret
from labctl.drivers.netlink import overlapping_routes


def e2e_ready() -> str | None:
    """Why the real lab cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (namespaces, bridges, libvirt)"
    for tool in ("qemu-system-x86_64", "libvirtd", "iscsi-inq", "mmdebstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (run scripts/setup.sh)"
    return None


#: the marks of a module that brings up a real lab: ``pytestmark = E2E``
E2E = [pytest.mark.e2e, pytest.mark.skipif(e2e_ready() is not None, reason=e2e_ready() or "")]


def naa_designator(inq_stdout: bytes) -> bytes:
    """The NAA designator in ``iscsi-inq -e 1 -c 131`` output, as it prints it: binary
    designators go out with %s, so the raw bytes up to the first zero byte. Each designator
    ends with ``]`` and a newline, then the next designator or the end of the output."""
    m = re.search(rb"Designator Type:\(3\) NAA\nDesignator:\[(.*?)\]\n(?=DEVICE DESIGNATOR #|\Z)",
                  inq_stdout, re.S)
    assert m, inq_stdout
    return m.group(1)


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


# --- end-to-end helpers -------------------------------------------------------------------

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


def in_ns(lab: str, host: str, *argv: str, env: dict[str, str] | None = None
          ) -> subprocess.CompletedProcess[str]:
    """``argv`` run in the network namespace of ``host`` of lab ``lab`` (with ``env`` added
    to the environment)."""
    return subprocess.run(["ip", "netns", "exec", f"labctl-{lab}-{host}", *argv],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, **env} if env else None)


def host_iqn(lab: str, host: str) -> str:
    return f"iqn.2026-11.dev.labctl:{lab}.{host}"


def chap_env(lab: str, host: str, target_iqn: str, mutual: bool = True) -> dict[str, str]:
    """libiscsi's environment with ``host``'s CHAP credentials at ``target_iqn``, derived from
    the secret of lab ``lab`` under this session's ``LABCTL_HOME``. ``iscsi-ls`` takes them
    without the target's secret (``mutual=False``): it would demand one of the discovery
    session, which LIO does not authenticate per initiator."""
    secret = read_secret(Path(os.environ["LABCTL_HOME"]) / "labs" / lab / "secret")
    env = chap_for(secret, host_iqn(lab, host), target_iqn).libiscsi_env()
    return env if mutual else {k: v for k, v in env.items() if "_TARGET_" not in k}


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


def outside_size(lab: str, host: str, m: dict[str, Any]) -> int:
    """The size of datastore ``m`` (as ``datastore show`` gives it) that an iSCSI client in
    ``host``'s namespace reads, logged in with the host's initiator name."""
    url = f"iscsi://{m['portal'].split(':')[0]}/{m['target_iqn']}/{m['lun']}"
    res = in_ns(lab, host, "iscsi-readcapacity16", "-s", "-i", host_iqn(lab, host), url,
                env=chap_env(lab, host, m["target_iqn"]))
    assert res.returncode == 0, res.stderr
    return int(res.stdout.strip())


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
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            own = str(lab_dir).encode()
            args = cmd.split(b"\0")
            if any(a == own or own + b"/" in a for a in args) and int(pid) != os.getpid():
                found.append(f"process {pid} {cmd[:80]!r}")
    doms = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
                          capture_output=True, text=True, check=False).stdout
    found += [f"domain {d}" for d in doms.split() if d.startswith(f"labctl-{lab}-")]
    found += [f"file {log}" for log in Path("/var/log/libvirt/qemu").glob(f"labctl-{lab}-*.log")]
    if lab_dir.exists() and not records_kept:
        found.append(f"directory {lab_dir}")
    return found


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
