"""A lab's directory: its inventory, secret, logs and generated state.

Everything a lab creates outside this directory is journalled in the
inventory's ``resources`` table; everything inside it goes with the directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from labctl.core import names
from labctl.core.errors import LabStateError
from labctl.core.paths import labs_dir, list_dir, make_dir, someone_elses
from labctl.core.secret import read_secret, write_secret
from labctl.core.userfile import shown
from labctl.state.inventory import Inventory, Schema


class LabDir:
    def __init__(self, name: str, root: Path | None = None) -> None:
        # the name becomes a path that 'down --purge' deletes: '..' must never get that far
        if not names.LAB_NAME_RE.fullmatch(name):
            raise LabStateError(f"bad lab name {shown(name)}: {names.LAB_NAME_RULE}", lab=name)
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

    def refuse_if_not_ours(self) -> None:
        """A clear refusal when this user cannot read the lab's directory or secret (a lab
        brought up with sudo is root's), instead of "not up" or a permission error later."""
        for path, need in ((self.path, os.R_OK | os.X_OK), (self.secret_path, os.R_OK)):
            if path.exists() and not os.access(path, need):
                whose = someone_elses(path)
                if whose is not None:
                    raise LabStateError(f"lab {self.name}: {whose}", lab=self.name)

    def create(self) -> None:
        make_dir(self.path)
        if not self.secret_path.exists():
            write_secret(self.secret_path)

    def secret(self) -> bytes:
        if not self.secret_path.exists():
            raise LabStateError(f"lab {self.name} has no secret (is it up?)", lab=self.name)
        return read_secret(self.secret_path)

    def inventory(self, schemas: Iterable[Schema] = ()) -> Inventory:
        """The lab's own inventory (its meta, its sites, the WAN links between them and what
        joins them) with the lab's tables and ``schemas`` (the features')."""
        return Inventory.open(self.path / "inventory.db", schemas)

    # -- sites: each one a management domain of its own -------------------
    def site_dir(self, site: str) -> Path:
        """Site ``site``'s controller state: its own inventory and secret (its agents hold
        that secret and no other, so no other site's controller can drive them)."""
        if not names.LAB_NAME_RE.fullmatch(site):
            raise LabStateError(f"bad site name {shown(site)}: {names.LAB_NAME_RULE}", site=site)
        return self.path / "sites" / site

    def site_secret_path(self, site: str) -> Path:
        return self.site_dir(site) / "secret"

    def create_site(self, site: str) -> None:
        make_dir(self.site_dir(site))
        if not self.site_secret_path(site).exists():
            write_secret(self.site_secret_path(site))

    def site_secret(self, site: str) -> bytes:
        path = self.site_secret_path(site)
        if not path.exists():
            raise LabStateError(f"site {site} of lab {self.name} has no secret (is it up?)",
                                lab=self.name, site=site)
        return read_secret(path)

    def site_inventory(self, site: str, schemas: Iterable[Schema] = ()) -> Inventory:
        """Site ``site``'s own inventory: its hosts, storage nodes, datastores, VMs and
        their records, and the objects it owns."""
        make_dir(self.site_dir(site))
        return Inventory.open(self.site_dir(site) / "inventory.db", schemas)

    def host_dir(self, host: str) -> Path:
        return self.path / "hosts" / host

    def storage_dir(self, node: str) -> Path:
        return self.path / "storage" / node

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock so two labctl commands never change one lab at once."""
        make_dir(self.path)
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
    """Every lab with a directory here: up, being built, or down with its records kept."""
    return sorted(p.name for p in list_dir(root or labs_dir())
                  if names.LAB_NAME_RE.fullmatch(p.name) and (
                      (p / "inventory.db").exists()
                      # another user's lab (brought up with sudo): listed, so that using
                      # it is refused with the cure rather than "no lab is up"
                      or (p.is_dir() and not os.access(p, os.R_OK | os.X_OK))))


def lab_state(path: Path) -> str | None:
    """The state a lab's inventory records (``up``, ``creating``, ``down``...), read without
    creating anything; None when it cannot be read."""
    return lab_meta(path).get("state")


def lab_meta(path: Path) -> dict[str, str]:
    """Every meta value of a lab's inventory (read only; empty when it cannot be read)."""
    db = path / "inventory.db"
    try:
        conn = sqlite3.connect(f"{db.absolute().as_uri()}?mode=ro", uri=True, timeout=5)
        try:
            return {str(k): str(v) for k, v in conn.execute("SELECT key, value FROM meta")}
        finally:
            conn.close()
    except sqlite3.Error:
        return {}


def archive(path: Path) -> Path:
    """Move a lab directory that is down to ``<labs>/<lab>.archive/<UTC time>/`` (its records,
    logs and inventory stay readable there); returns the new place."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = path.parent / f"{path.name}.archive" / stamp
    make_dir(dest.parent)
    path.rename(dest)
    return dest
