"""The accelerator answer of this machine, cached per boot and per QEMU version (a file in
the image cache). The probe itself (booting the test guest under KVM) is agent side
(:mod:`labctl.hosts.accel`); reading its cached answer runs nothing but ``qemu --version``,
so the controller may do it before it decides how to start a storage node."""

from __future__ import annotations

import contextlib
import functools
import json
import re
import subprocess
from pathlib import Path

from labctl.core.errors import LabError
from labctl.core.names import QEMU_BINARY
from labctl.core.paths import cache_dir
from labctl.core.proc import which


@functools.cache
def qemu_version(qemu: str = QEMU_BINARY) -> str:
    """``"10.0.2"``; raises MissingDependency when QEMU is absent. Asked once per process
    (``qemu --version`` takes ~0.2 s on a busy machine, and agents report it on every
    ping)."""
    path = which(qemu, "install qemu-system-x86 (scripts/setup.sh)")
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30,
                         check=False).stdout
    m = re.search(r"version ([0-9][0-9.]*)", out)
    return m.group(1) if m else out.strip().splitlines()[0] if out.strip() else "unknown"


def cache_file() -> Path:
    return cache_dir() / "kvm-probe.json"


def cache_key() -> str:
    """This boot and this QEMU: a probe's answer holds for both."""
    boot = ""
    with contextlib.suppress(OSError):
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    try:
        ver = qemu_version()
    except LabError:
        ver = "none"
    return f"{boot} {ver}"


def cached() -> bool | None:
    """Whether KVM is usable, as a probe of this boot and QEMU found; None if none did."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        data = json.loads(cache_file().read_text())
        if data["key"] == cache_key():
            return bool(data["usable"])
    return None


def remember(usable: bool) -> None:
    with contextlib.suppress(OSError):
        cache_file().parent.mkdir(parents=True, exist_ok=True)
        cache_file().write_text(json.dumps({"key": cache_key(), "usable": usable}) + "\n")
