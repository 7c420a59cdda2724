"""A lab's directory: its inventory, secret, logs and generated state.

Everything a lab creates outside this directory is journalled in the
inventory's ``resources`` table; everything inside it goes with the directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from labctl.errors import LabStateError
from labctl.inventory import Inventory
from labctl.paths import labs_dir


def read_secret(lab_dir: Path) -> bytes:
    """The lab's shared secret (``<lab dir>/secret``, hex), checked."""
    path = lab_dir / "secret"
    try:
        secret = bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError) as exc:
        raise LabStateError(f"cannot read the lab secret from {path}: {exc}") from exc
    if len(secret) < 16:
        raise LabStateError(f"the lab secret in {path} is too short")
    return secret


class LabDir:
    def __init__(self, name: str, root: Path | None = None) -> None:
        self.name = name
        self.path = (root or labs_dir()) / name

    @property
    def tag(self) -> str:
        """Four hex digits that make this lab's interface names unique (IFNAMSIZ is 15)."""
        return hashlib.sha1(f"{self.name}@{self.path}".encode()).hexdigest()[:4]

    def exists(self) -> bool:
        return (self.path / "inventory.db").exists()

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        secret = self.path / "secret"
        if not secret.exists():
            fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")

    def secret(self) -> bytes:
        if not (self.path / "secret").exists():
            raise LabStateError(f"lab {self.name} has no secret (is it up?)", lab=self.name)
        return read_secret(self.path)

    def inventory(self) -> Inventory:
        return Inventory.open(self.path / "inventory.db")

    def host_dir(self, host: str) -> Path:
        return self.path / "hosts" / host

    def storage_dir(self, node: str) -> Path:
        return self.path / "storage" / node

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock so two labctl commands never change one lab at once."""
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = self.path / ".lock"
        try:
            with open(lock, "w") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise LabStateError(
                        f"another labctl command is working on lab {self.name}; wait for it "
                        "to finish", lab=self.name) from None
                yield
        finally:
            # a refused request leaves no trace: drop a directory that holds only the lock
            with contextlib.suppress(OSError):
                if [p.name for p in self.path.iterdir()] == [".lock"]:
                    lock.unlink()
                    self.path.rmdir()


def existing_labs(root: Path | None = None) -> list[str]:
    base = root or labs_dir()
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if (p / "inventory.db").exists())


def pid_owned_by(pid: int, lab_path: Path) -> bool:
    """True if process ``pid`` runs with this lab's directory on its command line."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return str(lab_path).encode() in cmdline
