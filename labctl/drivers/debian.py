"""Images labctl builds from Debian packages and caches by recipe hash.

Every builder is idempotent: it returns at once when the cached output for the
current recipe exists, and builds into a temporary directory that is renamed
into place only when complete, so a killed build never leaves a half image.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from labctl.core.errors import ImageBuildError
from labctl.core.paths import cache_dir
from labctl.core.proc import run, which
from labctl.core.secret import write_private

KERNEL_PACKAGE = "linux-image-cloud-amd64"


@dataclass(frozen=True)
class Kernel:
    """A Debian cloud kernel unpacked: ``vmlinuz`` and its ``modules`` tree."""

    version: str  # e.g. 6.1.0-56-cloud-amd64
    vmlinuz: Path
    modules: Path  # .../lib/modules/<version>

    def module_path(self, name: str) -> Path:
        """Path of module ``name`` (e.g. ``virtio_blk``) inside the tree, via modules.dep."""
        for line in (self.modules / "modules.dep").read_text().splitlines():
            rel = line.split(":", 1)[0]
            if Path(rel).name in (f"{name}.ko", f"{name.replace('_', '-')}.ko"):
                return self.modules / rel
        raise ImageBuildError(f"kernel {self.version} has no module {name}", module=name)

    def module_with_deps(self, name: str) -> list[Path]:
        """``name`` and what it needs, in load order (dependencies first)."""
        deps: dict[str, list[str]] = {}
        for line in (self.modules / "modules.dep").read_text().splitlines():
            rel, _, rest = line.partition(":")
            deps[rel] = rest.split()
        start = str(self.module_path(name).relative_to(self.modules))
        order: list[str] = []

        def visit(rel: str) -> None:
            if rel in order:
                return
            for dep in deps.get(rel, []):
                visit(dep)
            order.append(rel)

        visit(start)
        return [self.modules / rel for rel in order]


def digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:16]


async def _resolve_kernel_package() -> tuple[str, str]:
    """The concrete image package behind the metapackage and its version."""
    res = await run(["apt-cache", "depends", KERNEL_PACKAGE], what="apt-cache depends")
    for line in res.stdout.splitlines():
        line = line.strip()
        if line.startswith("Depends: linux-image-"):
            pkg = line.split(":", 1)[1].strip()
            pol = await run(["apt-cache", "policy", pkg], what="apt-cache policy")
            for pline in pol.stdout.splitlines():
                if pline.strip().startswith("Candidate:"):
                    return pkg, pline.split(":", 1)[1].strip()
    raise ImageBuildError(
        f"cannot resolve {KERNEL_PACKAGE} to a kernel package (run apt-get update)",
        apt_cache=res.stdout,
    )


async def ensure_kernel(cache: Path | None = None) -> Kernel:
    """Download and unpack Debian's cloud kernel once; reuse it afterwards."""
    root = (cache or cache_dir()) / "kernel"
    current = root / "current"
    if (current / "done").exists():
        return _kernel_at(current.resolve())
    pkg, version = await _resolve_kernel_package()
    dest = root / f"{pkg}_{version}"
    if not (dest / "done").exists():
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            await run(["apt-get", "download", f"{pkg}={version}"], cwd=Path(tmp),
                      timeout=600, what=f"downloading {pkg}")
            debs = list(Path(tmp).glob("*.deb"))
            if not debs:
                raise ImageBuildError(f"apt-get download {pkg} produced no .deb")
            unpack = Path(tmp) / "x"
            await run(["dpkg-deb", "-x", str(debs[0]), str(unpack)], what="dpkg-deb -x")
            kver = next((unpack / "lib" / "modules").iterdir()).name
            await run(["depmod", "-b", str(unpack), kver], what="depmod")
            (unpack / "done").write_text(version + "\n")
            if dest.exists():
                shutil.rmtree(dest)
            unpack.rename(dest)
    tmp_link = root / "current.tmp"
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(dest.name)
    tmp_link.replace(current)
    return _kernel_at(dest)


def _kernel_at(tree: Path) -> Kernel:
    vmlinuz = sorted((tree / "boot").glob("vmlinuz-*"))
    mods = sorted((tree / "lib" / "modules").iterdir())
    if not vmlinuz or not mods:
        raise ImageBuildError(f"kernel tree {tree} is incomplete", tree=str(tree))
    return Kernel(version=mods[0].name, vmlinuz=vmlinuz[0], modules=mods[0])


# --- config disk --------------------------------------------------------------------------

async def make_config_disk(path: Path, files: dict[str, bytes], size_mib: int = 8) -> None:
    """Write a small ext4 image holding ``files`` (relative path -> content) at ``path``.

    Made with ``mkfs.ext4 -d`` from a temporary tree: no loop device, no mount. It may
    carry a secret: the image and every file in it are mode 0600 (readable by root only,
    here and on the node). Replaces ``path`` atomically.
    """
    which("mkfs.ext4", "e2fsprogs, needed for the storage node's config disk")
    total = sum(len(v) for v in files.values())
    size_mib = max(size_mib, (total * 2) // (1024 * 1024) + 4)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".config-disk.") as tmp:
        tree = Path(tmp) / "tree"
        tree.mkdir()
        for rel, content in files.items():
            target = (tree / rel).resolve()
            if tree.resolve() not in target.parents:
                raise ImageBuildError(f"config disk file {rel!r} escapes the disk", file=rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            write_private(target, content)
        image = Path(tmp) / "disk.ext4"
        write_private(image, b"")
        await run(["mkfs.ext4", "-q", "-F", "-L", "labctl-config", "-E", "root_owner=0:0",
                   "-d", str(tree), str(image), f"{size_mib}M"], what="mkfs.ext4 (config disk)")
        os.chmod(image, 0o600)
        image.replace(path)
