"""The server guest's image: a small Debian server (python3, OpenSSH, dm-era's tools) with
labctl's server PID 1, booted by the Debian cloud kernel straight from its disk. It is the
VM a replication moves between clouds, and the helper system a destination VM boots while
it receives (its disk is the image again; the target is a second disk). Recipe files live
in ``images/server/``; the storage node's PID 1 (``images/storage/init.py``) goes in as
the helpers the server's PID 1 imports.

The cloud kernel has NVMe built in and virtio-blk as a module, so the root disk is an NVMe
controller's namespace (``root=/dev/nvme0n1``) and every other disk is virtio-blk. A small
initramfs (``images/server/rootdm.c``, static C, with dm-mod) puts that disk under the
device-mapper device ``root`` (a linear map) before the server's PID 1 starts on it: the
replication agent swaps it for a dm-era table live, to track the server's writes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from labctl.core.names import SERVER_IMAGE_BYTES
from labctl.core.paths import repo_root
from labctl.core.proc import run, which
from labctl.drivers.debian import Kernel, digest, ensure_kernel
from labctl.guest.image import (
    CFLAGS,
    S_IFCHR,
    S_IFDIR,
    S_IFREG,
    CpioEntry,
    cpio_bytes,
)
from labctl.storage.image import (
    SLIM_EXCLUDES,
    add_modules,
    build_root_image,
    debian_suite,
    finish_root,
    storage_recipe_dir,
)

SERVER_RECIPE_VERSION = "server-4"
"""Bump when the build steps below change in a way the recipe files do not show."""

SERVER_MODULES = ("virtio_pci", "virtio_net", "virtio_blk", "dm_mod", "dm_era", "loop")
"""Loaded at boot: the network, the data disks (a destination's target), dm-era and the loop
device its metadata lives on (a file in /run: a reboot loses it)."""

INITRAMFS_MODULES = ("dm_mod",)
"""In the initramfs: what the linear map of the root disk needs."""

#: the root filesystem's size: the system's files and a little room (a VM's clone is larger)
SERVER_DISK_KIB = SERVER_IMAGE_BYTES >> 10

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

@dataclass(frozen=True)
class ServerImage:
    """The server guest's kernel, initramfs and root filesystem (a whole disk's ext4)."""

    kernel: Path
    initrd: Path
    rootfs: Path
    recipe_hash: str


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

    built = await build_root_image("server guest", "server", server_recipe_dir(), h, kernel,
                                   customize, cache=cache, progress=progress,
                                   min_size_kib=SERVER_DISK_KIB, room_kib=0,
                                   # not "small" (below 512 MiB: 1 KiB blocks, an inode per
                                   # 4 KiB, kept as the filesystem grows at boot: 128 MiB of
                                   # inode tables on 2 GiB for the kernel to zero, and send)
                                   fs_type="default")
    initrd = built.rootfs.parent / "initrd.img"
    if not initrd.exists():
        await _build_initramfs(kernel, initrd)
    return ServerImage(kernel=built.kernel, initrd=initrd, rootfs=built.rootfs,
                       recipe_hash=built.recipe_hash)


async def _build_initramfs(kernel: Kernel, out: Path) -> None:
    """``rootdm.c`` compiled static as /init, with dm-mod and its dependencies."""
    which("gcc", "the server guest's initramfs is compiled with gcc -static "
                 "(packages gcc, libc6-dev)")
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".initrd-") as tmp:
        init = Path(tmp) / "init"
        await run(["gcc", *CFLAGS, "-o", str(init), str(server_recipe_dir() / "rootdm.c")],
                  timeout=300, what="compiling the server guest's initramfs (gcc -static)")
        entries = [CpioEntry("dev", S_IFDIR | 0o755),
                   CpioEntry("dev/console", S_IFCHR | 0o600, rdevmajor=5, rdevminor=1),
                   CpioEntry("proc", S_IFDIR | 0o555), CpioEntry("lib", S_IFDIR | 0o755),
                   CpioEntry("init", S_IFREG | 0o755, init.read_bytes())]
        listed: list[str] = []
        for name in INITRAMFS_MODULES:
            for path in kernel.module_with_deps(name):
                if f"/lib/{path.name}" not in listed:
                    entries.append(CpioEntry(f"lib/{path.name}", S_IFREG | 0o644,
                                             path.read_bytes()))
                    listed.append(f"/lib/{path.name}")
        entries.append(CpioEntry("modules.list", S_IFREG | 0o644,
                                 "".join(x + "\n" for x in listed).encode()))
        part = Path(tmp) / "initrd.img"
        part.write_bytes(cpio_bytes(entries))
        os.replace(part, out)


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
