"""Teardown of machines reached over SSH: a machine that cannot be reached is said in one
line and its journal entry is kept (a later ``down`` tries again), a storage machine's as
a host's."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import asyncssh
import pytest

from labctl.core.errors import ProvisionError
from labctl.hosts.sshhosts import SshAccess, SshHosts
from labctl.state.inventory import Inventory


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the with ends: nothing listens


def test_an_unreachable_storage_machine_keeps_its_entry(tmp_path: Path) -> None:
    key = tmp_path / "client"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(key))
    key.chmod(0o600)
    host_key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    access = SshAccess(address="127.0.0.1", port=_closed_port(), key=str(key),
                       host_key=host_key.strip())
    inv = Inventory.open(tmp_path / "inventory.db")
    try:
        inv.own("ssh-storage", "stor1", access=access.to_json(),
                state_dir="/var/lib/labctl/labs/abcd/stor1")
        removed: list[str] = []
        hosts = SshHosts("t", tmp_path / "t", inv)
        hosts.reach_timeout = 2.0  # (15 s by default: nothing listens, and it says so)
        with pytest.raises(ProvisionError, match="could not tear down every SSH host: stor1"):
            asyncio.run(hosts.teardown(inv, removed))
        assert [(k, n) for k, n, _ in inv.owned()] == [("ssh-storage", "stor1")]
        assert removed == []
    finally:
        inv.close()
