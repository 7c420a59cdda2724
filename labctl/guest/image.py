"""The test guest: Debian's cloud kernel plus a tiny initramfs whose /init is
``images/guest/guest.c`` (a static C program), built once and cached by recipe.

The initramfs is an uncompressed cpio archive (newc format) written here in
Python: ``/init``, the virtio modules it loads itself with finit_module(2) in
the order of ``/modules.list``, and the mount points it needs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from labctl.core.errors import ImageBuildError
from labctl.core.paths import cache_dir
from labctl.core.proc import run, which
from labctl.drivers.debian import Kernel, digest, ensure_kernel

GUEST_SOURCE = Path(__file__).with_name("guest.c")
CFLAGS = ("-static", "-O2", "-Wall")
GUEST_MODULES = ("virtio_pci", "virtio_blk")
RECIPE_VERSION = "1"  # bump when the layout of the initramfs changes
@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    recipe_hash: str


# ---- cpio (newc) ------------------------------------------------------------

S_IFDIR = 0o040000
S_IFREG = 0o100000
S_IFCHR = 0o020000


@dataclass(frozen=True)
class CpioEntry:
    name: str  # without leading "/"
    mode: int  # type and permission bits
    data: bytes = b""
    rdevmajor: int = 0
    rdevminor: int = 0


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


def cpio_bytes(entries: Iterable[CpioEntry]) -> bytes:
    """An archive in the "newc" format the kernel unpacks as initramfs."""
    out = bytearray()
    ino = 1
    for entry in [*entries, CpioEntry("TRAILER!!!", 0)]:
        name = entry.name.lstrip("/").encode() + b"\0"
        fields = [
            ino, entry.mode, 0, 0, 2 if entry.mode & S_IFDIR else 1, 0,
            len(entry.data), 0, 0, entry.rdevmajor, entry.rdevminor, len(name), 0,
        ]
        ino += 1
        out += b"070701" + b"".join(b"%08X" % f for f in fields)
        out += name + bytes(_pad4(110 + len(name)))
        out += entry.data + bytes(_pad4(len(entry.data)))
    out += bytes((512 - len(out) % 512) % 512)
    return bytes(out)


def cpio_entries(archive: bytes) -> list[CpioEntry]:
    """Read back an archive written by :func:`cpio_bytes` (newc, no trailer in the result)."""
    entries: list[CpioEntry] = []
    pos = 0
    while True:
        if archive[pos:pos + 6] != b"070701":
            raise ValueError(f"bad cpio magic at offset {pos}")
        fields = [int(archive[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        pos += 110
        name = archive[pos:pos + namesize - 1].decode()
        pos += namesize + _pad4(110 + namesize)
        data = archive[pos:pos + filesize]
        pos += filesize + _pad4(filesize)
        if name == "TRAILER!!!":
            return entries
        entries.append(CpioEntry(name, fields[1], data, fields[9], fields[10]))


# ---- build ------------------------------------------------------------------

def _modules(kernel: Kernel) -> list[Path]:
    order: list[Path] = []
    for name in GUEST_MODULES:
        for path in kernel.module_with_deps(name):
            if path not in order:
                order.append(path)
    return order


def recipe_hash(kernel: Kernel, source: bytes) -> str:
    mods = ",".join(p.name for p in _modules(kernel))
    return digest(RECIPE_VERSION, source, " ".join(CFLAGS), kernel.version, mods)


#: a directory holding a test guest built elsewhere (``vmlinuz``, ``initrd.img``): a host
#: reached over SSH is handed the controller's, and neither builds nor downloads one
GIVEN_IMAGE_ENV = "LABCTL_GUEST_IMAGE"


async def ensure_guest_image(cache: Path | None = None) -> GuestImage:
    """Build the test guest once per recipe (guest.c, flags, kernel) and return it; the
    one in ``$LABCTL_GUEST_IMAGE`` when that is set."""
    given = os.environ.get(GIVEN_IMAGE_ENV)
    if given:
        d = Path(given)
        if not (d / "vmlinuz").is_file() or not (d / "initrd.img").is_file():
            raise ImageBuildError(f"{GIVEN_IMAGE_ENV}={d}: no vmlinuz and initrd.img there",
                                  path=str(d))
        return GuestImage(kernel=d / "vmlinuz", initrd=d / "initrd.img",
                          recipe_hash=(d / "recipe").read_text().strip()
                          if (d / "recipe").exists() else "given")
    cache = cache or cache_dir()
    kernel = await ensure_kernel(cache)
    src = GUEST_SOURCE
    try:
        source = src.read_bytes()
    except OSError as exc:
        raise ImageBuildError(f"guest source {src} is unreadable: {exc}", path=str(src)) from exc
    rhash = recipe_hash(kernel, source)
    root = cache / "guest"
    dest = root / rhash
    image = GuestImage(kernel=dest / "vmlinuz", initrd=dest / "initrd.img", recipe_hash=rhash)
    if (dest / "done").exists():
        return image
    which("gcc", "the test guest is compiled with gcc -static (packages gcc, libc6-dev)")
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=root, prefix=".build-") as tmp:
        work = Path(tmp)
        init = work / "init"
        await run(["gcc", *CFLAGS, "-o", str(init), str(src)], timeout=300,
                  what="compiling the test guest (gcc -static; needs libc6-dev)")
        entries = [
            CpioEntry("dev", S_IFDIR | 0o755),
            CpioEntry("dev/console", S_IFCHR | 0o600, rdevmajor=5, rdevminor=1),
            CpioEntry("proc", S_IFDIR | 0o555),
            CpioEntry("sys", S_IFDIR | 0o555),
            CpioEntry("lib", S_IFDIR | 0o755),
            CpioEntry("lib/modules", S_IFDIR | 0o755),
            CpioEntry("init", S_IFREG | 0o755, init.read_bytes()),
        ]
        listed = []
        for mod in _modules(kernel):
            entries.append(CpioEntry(f"lib/modules/{mod.name}", S_IFREG | 0o644, mod.read_bytes()))
            listed.append(f"/lib/modules/{mod.name}")
        entries.append(CpioEntry("modules.list", S_IFREG | 0o644, "\n".join(listed).encode()
                                 + b"\n"))
        out = work / "image"
        out.mkdir()
        (out / "initrd.img").write_bytes(cpio_bytes(entries))
        try:
            os.link(kernel.vmlinuz, out / "vmlinuz")
        except OSError:
            shutil.copyfile(kernel.vmlinuz, out / "vmlinuz")
        (out / "done").write_text(
            f"kernel {kernel.version}\nbuilt_in_s {time.monotonic() - started:.2f}\n")
        if dest.exists():
            shutil.rmtree(dest)
        out.rename(dest)
    return image
