"""The server guest's image: a small Debian server (python3, OpenSSH, dm-era's tools) with
labctl's server PID 1, booted by the Debian cloud kernel straight from its disk. It is the
VM a replication moves between clouds, and the helper system a destination VM boots while
it receives (its disk is the image again; the target is a second disk). Recipe files live
in ``images/server/``; the storage node's PID 1 (``images/storage/init.py``) goes in as
the helpers the server's PID 1 imports.

The cloud kernel has NVMe built in and virtio-blk as a module, so the root disk is an NVMe
controller's namespace (``root=/dev/nvme0n1``) and every other disk is virtio-blk.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from labctl.core.paths import repo_root
from labctl.core.proc import run
from labctl.drivers.debian import Kernel, digest, ensure_kernel
from labctl.storage.image import (
    SLIM_EXCLUDES,
    StorageImage,
    add_modules,
    build_root_image,
    debian_suite,
    finish_root,
    storage_recipe_dir,
)

SERVER_RECIPE_VERSION = "server-1"
"""Bump when the build steps below change in a way the recipe files do not show."""

SERVER_MODULES = ("virtio_pci", "virtio_net", "virtio_blk", "dm_mod", "dm_era")
"""Loaded at boot: the network, the data disks (a destination's target), dm-era."""

#: the root filesystem's size: room for the application's data beyond the system's files
SERVER_DISK_KIB = 512 * 1024

#: the kernel command line of a server guest, before its ``labctl.*`` parameters
SERVER_CMDLINE = ("console=ttyS0 cryptomgr.notests root=/dev/nvme0n1 rootfstype=ext4 rw "
                  "init=/sbin/labctl-init panic=1 random.trust_cpu=on loglevel=4")

_SSHD_CONFIG = """\
# labctl server guest: keys only, no DNS lookups (the lab has no resolver)
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
Subsystem sftp internal-sftp
"""

ServerImage = StorageImage


def server_recipe_dir() -> Path:
    return repo_root() / "images" / "server"


def server_recipe_hash(kernel_version: str) -> str:
    recipe = server_recipe_dir()
    parts: list[str | bytes] = [SERVER_RECIPE_VERSION, kernel_version, debian_suite(),
                                *SERVER_MODULES, *SLIM_EXCLUDES, str(SERVER_DISK_KIB),
                                _SSHD_CONFIG, (storage_recipe_dir() / "init.py").read_bytes()]
    for f in sorted(p for p in recipe.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        parts += [str(f.relative_to(recipe)), f.read_bytes()]
    return digest(*parts)


async def ensure_server_image(cache: Path | None = None,
                              progress: Callable[[str], None] | None = None) -> ServerImage:
    """Build (once per recipe hash) the server guest's root filesystem; return it. Its
    ``rootfs.ext4`` is a whole disk's filesystem: a VM gets a copy (or a qcow2 clone)."""
    kernel = await ensure_kernel(cache)
    h = server_recipe_hash(kernel.version)

    async def customize(root: Path) -> None:
        await _customize(root, kernel)

    return await build_root_image("server guest", "server", server_recipe_dir(), h, kernel,
                                  customize, cache=cache, progress=progress,
                                  min_size_kib=SERVER_DISK_KIB)


async def _customize(root: Path, kernel: Kernel) -> None:
    add_modules(root, kernel, SERVER_MODULES, (), "/etc/labctl-server/modules")
    await run(["depmod", "-b", str(root), kernel.version], what="depmod (server image)")
    lib = root / "usr" / "lib" / "labctl"
    lib.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(storage_recipe_dir() / "init.py", lib / "initlib.py")
    init = root / "sbin" / "labctl-init"
    shutil.copyfile(server_recipe_dir() / "server_init.py", init)
    init.chmod(0o755)
    (root / "etc" / "ssh" / "sshd_config").write_text(_SSHD_CONFIG)
    for key in (root / "etc" / "ssh").glob("ssh_host_*"):
        key.unlink()  # each server makes its own on first boot
    finish_root(root, "server")
