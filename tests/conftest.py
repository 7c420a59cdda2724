"""Shared fixtures: a throwaway labctl home per test session, the image cache kept."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from labctl.paths import cache_dir


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
