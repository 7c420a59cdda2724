"""A lab's directory: its inventory, secret, logs and generated state.

Everything a lab creates outside this directory is journalled in the
inventory's ``resources`` table; everything inside it goes with the directory.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from labctl.core import names
from labctl.core.errors import LabStateError
from labctl.core.paths import labs_dir
from labctl.core.secret import read_secret, write_secret
from labctl.state.inventory import Inventory, Schema


class LabDir:
    def __init__(self, name: str, root: Path | None = None) -> None:
        self.name = name
        self.path = (root or labs_dir()) / name

    @property
    def tag(self) -> str:
        """Four hex digits that make this lab's interface names unique (IFNAMSIZ is 15)."""
        return names.lab_tag(self.name, self.path)

    @property
    def secret_path(self) -> Path:
        return self.path / "secret"

    def exists(self) -> bool:
        return (self.path / "inventory.db").exists()

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.secret_path.exists():
            write_secret(self.secret_path)

    def secret(self) -> bytes:
        if not self.secret_path.exists():
            raise LabStateError(f"lab {self.name} has no secret (is it up?)", lab=self.name)
        return read_secret(self.secret_path)

    def inventory(self, schemas: Iterable[Schema] = ()) -> Inventory:
        """The lab's inventory with the lab's tables and ``schemas`` (the features')."""
        return Inventory.open(self.path / "inventory.db", schemas)

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
