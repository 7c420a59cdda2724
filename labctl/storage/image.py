"""The storage node's image: Debian's cloud kernel and a slim mmdebstrap root (python3,
rtslib-fb, kmod, iproute2) with labctl's PID 1, cached by recipe hash. The recipe files
live in ``images/storage/``."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from labctl.core.errors import CommandFailed, ImageBuildError
from labctl.core.paths import cache_dir, repo_root
from labctl.core.proc import run, which
from labctl.drivers.debian import Kernel, digest, ensure_kernel

STORAGE_RECIPE_VERSION = "storage-2"
"""Bump when the build steps below change in a way the recipe files do not show."""

STORAGE_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "configfs", "target_core_mod",
                   "target_core_iblock", "iscsi_target_mod", "sch_netem")
"""Kernel modules the node image loads at boot (with their dependencies): the storage
node's, and netem for the WAN router booted from the same image."""

STORAGE_LAZY_MODULES = ("nfsd", "nfsv3")
"""Kernel modules the image carries but loads only when needed (``modprobe``): the NFS
server costs ~0.5 s of boot, paid only by a node with a file datastore; the NFS client only
by the chain copy benchmark's peers."""

SLIM_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*",
                  "/usr/share/locale/*", "/usr/share/lintian/*")


@dataclass(frozen=True)
class StorageImage:
    """The storage node's kernel and its (read-only, shared) root filesystem."""

    kernel: Path
    rootfs: Path
    recipe_hash: str


def storage_recipe_dir() -> Path:
    return repo_root() / "images" / "storage"


def recipe_packages(recipe: Path, name: str = "packages") -> list[str]:
    """The names listed in the recipe file ``name`` (one per line, # comments)."""
    path = recipe / name
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def debian_suite() -> str:
    """The host's Debian release; the image and the cloud kernel come from the same one."""
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("VERSION_CODENAME="):
                name = line.split("=", 1)[1].strip().strip('"')
                if name:
                    return name
    except OSError:
        pass
    return "bookworm"


def storage_recipe_hash(kernel_version: str, recipe: Path | None = None) -> str:
    recipe = recipe or storage_recipe_dir()
    parts: list[str | bytes] = [STORAGE_RECIPE_VERSION, kernel_version, debian_suite(),
                                *STORAGE_MODULES, *STORAGE_LAZY_MODULES,
                                *SLIM_EXCLUDES]
    for f in sorted(p for p in recipe.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        parts += [str(f.relative_to(recipe)), f.read_bytes()]
    return digest(*parts)


async def ensure_storage_image(
    cache: Path | None = None, progress: Callable[[str], None] | None = None
) -> StorageImage:
    """Build (once per recipe hash) the storage node's root filesystem; return it.

    The result lives in ``<cache>/storage/<hash>/`` as ``rootfs.ext4`` (raw ext4,
    to be used only as a read-only backing file) and ``vmlinuz``.
    """
    kernel = await ensure_kernel(cache)
    recipe = storage_recipe_dir()
    h = storage_recipe_hash(kernel.version, recipe)

    async def customize(root: Path) -> None:
        await _customize_storage_root(root, kernel, recipe)

    return await build_root_image("storage node", "storage", recipe, h, kernel, customize,
                                  cache=cache, progress=progress)


async def build_root_image(what: str, kind: str, recipe: Path, h: str, kernel: Kernel,
                           customize: Callable[[Path], Awaitable[None]], *,
                           cache: Path | None = None,
                           progress: Callable[[str], None] | None = None,
                           min_size_kib: int = 0, room_kib: int = 64 * 1024,
                           fs_type: str | None = None) -> StorageImage:
    """The root filesystem of ``recipe`` (its ``packages`` on mmdebstrap's essential
    variant, its ``purge`` list removed, then ``customize``), built once per hash ``h``
    into ``<cache>/<kind>/<h>/``: ``rootfs.ext4`` (its files, a quarter more and
    ``room_kib``; at least ``min_size_kib``; ``fs_type``: mke2fs's usage type, else the
    one it picks by size) and the kernel's ``vmlinuz``."""
    say = progress or (lambda _msg: None)
    base = (cache or cache_dir()) / kind
    dest = base / h
    image = StorageImage(kernel=dest / "vmlinuz", rootfs=dest / "rootfs.ext4", recipe_hash=h)
    if (dest / "done").exists():
        return image
    which("mmdebstrap", f"needed to build the {what} image")
    which("mkfs.ext4", f"e2fsprogs, needed to build the {what} image")
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=base, prefix=f".{h}."))
    try:
        t0 = time.monotonic()
        root = tmp / "root"
        packages = recipe_packages(recipe)
        suite = debian_suite()
        say(f"mmdebstrap {suite} with {', '.join(packages)}")
        argv = ["mmdebstrap", "--mode=root", "--variant=essential", "--quiet",
                "--include=" + ",".join(packages)]
        argv += [f"--dpkgopt=path-exclude={p}" for p in SLIM_EXCLUDES]
        argv += [suite, str(root), f"deb http://deb.debian.org/debian {suite} main"]
        await run(argv, timeout=1800, what=f"mmdebstrap ({what} image)")
        purge = recipe_packages(recipe, "purge")
        if purge:
            await run(["chroot", str(root), "dpkg", "--purge", *purge], timeout=300,
                      what=f"dpkg --purge in the {what} image")
        say(f"rootfs bootstrapped in {time.monotonic() - t0:.1f} s; adding kernel modules")
        await customize(root)
        size_kib = max(_tree_kib(root) * 5 // 4 + room_kib, min_size_kib)
        rootfs = tmp / "rootfs.ext4"
        await run(["mkfs.ext4", "-q", "-F", "-L", "labctl-root", "-E", "root_owner=0:0",
                   *(["-T", fs_type] if fs_type else []),
                   "-d", str(root), str(rootfs), f"{size_kib}k"], timeout=600,
                  what=f"mkfs.ext4 ({what} rootfs)")
        shutil.copyfile(kernel.vmlinuz, tmp / "vmlinuz")
        shutil.rmtree(root)
        publish_build(tmp, dest, f"{h} {kernel.version} built in "
                                 f"{time.monotonic() - t0:.1f} s\n")
        say(f"{what} image {h} ready in {time.monotonic() - t0:.1f} s")
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, ImageBuildError | CommandFailed) or not isinstance(exc, Exception):
            raise
        raise ImageBuildError(f"building the {what} image failed: {exc}",
                              recipe_hash=h) from exc
    return image


def publish_build(tmp: Path, dest: Path, note: str) -> None:
    """A finished build directory made the cache's entry ``dest``: its ``done`` note (what
    a reader checks) written, an older entry replaced, then one rename."""
    (tmp / "done").write_text(note)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)


def add_modules(root: Path, kernel: Kernel, load: tuple[str, ...], lazy: tuple[str, ...],
                listing: str) -> None:
    """Copy ``load`` and ``lazy`` (with their dependencies) from ``kernel`` into ``root``;
    ``listing`` (a path in the image) names, in load order, the ones PID 1 loads at boot.
    Run depmod afterwards."""
    mod_root = root / "lib" / "modules" / kernel.version
    order: list[str] = []
    copied: set[str] = set()
    for name in load + lazy:
        for path in kernel.module_with_deps(name):
            rel = str(path.relative_to(kernel.modules))
            if rel in copied:
                continue
            copied.add(rel)
            if name in load:
                order.append(rel)
            target = mod_root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    for meta in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        if (kernel.modules / meta).exists():
            shutil.copyfile(kernel.modules / meta, mod_root / meta)
    listed = root / listing.lstrip("/")
    listed.parent.mkdir(parents=True, exist_ok=True)
    listed.write_text("".join(rel + "\n" for rel in order))


def finish_root(root: Path, hostname: str) -> None:
    """What every labctl PID-1 image needs: its hostname, the mount points, a console node
    for PID 1 before devtmpfs, no apt caches or logs."""
    (root / "etc" / "hostname").write_text(hostname + "\n")
    for d in ("proc", "sys", "dev", "run", "tmp"):
        (root / d).mkdir(exist_ok=True)
    console = root / "dev" / "console"
    if not console.exists():  # the kernel opens it for PID 1 before devtmpfs is mounted
        os.mknod(console, 0o600 | stat.S_IFCHR, os.makedev(5, 1))
    for junk in ("var/cache/apt", "var/lib/apt/lists", "var/log"):
        p = root / junk
        if p.is_dir():
            for child in p.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()


async def _customize_storage_root(root: Path, kernel: Kernel, recipe: Path) -> None:
    """Kernel modules, the PID-1 init, and what rtslib-fb expects, into ``root``."""
    add_modules(root, kernel, STORAGE_MODULES, STORAGE_LAZY_MODULES,
                "/etc/labctl-storage/modules")
    await run(["depmod", "-b", str(root), kernel.version], what="depmod (storage image)")
    init = root / "sbin" / "labctl-init"
    shutil.copyfile(recipe / "init.py", init)
    init.chmod(0o755)
    (root / "etc" / "rtslib-fb-target").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "target").mkdir(exist_ok=True)  # target_core_mod's default db_root
    finish_root(root, "storage")


def _tree_kib(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        total += 4
        for name in files:
            with contextlib.suppress(OSError):
                total += (os.lstat(os.path.join(dirpath, name)).st_size + 4095) // 4096 * 4
    return total


