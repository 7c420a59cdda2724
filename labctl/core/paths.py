"""Where labctl keeps its files: one home, a cache for images, one directory per lab.

The home is the user's environment (``$LABCTL_HOME``): a directory there that cannot be
made or read is refused in one line naming ``LABCTL_HOME`` and what is in the way
(:func:`make_dir`, :func:`list_dir`, :func:`check_home`)."""

from __future__ import annotations

import errno
import os
import pwd
import sys
from pathlib import Path

from labctl.core.errors import LabStateError


def home() -> Path:
    """``$LABCTL_HOME``, else ``~/.local/share/labctl``."""
    env = os.environ.get("LABCTL_HOME")
    return Path(env) if env else Path.home() / ".local" / "share" / "labctl"


def cache_dir() -> Path:
    """Built images, shared by all labs and kept across them (``$LABCTL_CACHE`` overrides)."""
    env = os.environ.get("LABCTL_CACHE")
    return Path(env) if env else home() / "cache"


def labs_dir() -> Path:
    return home() / "labs"


def repo_root() -> Path:
    """The source tree (images/ recipes live next to the package)."""
    return Path(__file__).resolve().parent.parent.parent


def _named(path: Path) -> str:
    """How the user chose the directory ``path`` is in: ``LABCTL_CACHE=/x`` for the image
    cache when it is set, else ``LABCTL_HOME=/y``, or the default home when that is unset."""
    cache = os.environ.get("LABCTL_CACHE")
    if cache and (path == Path(cache) or Path(cache) in path.parents):
        return f"LABCTL_CACHE={cache}"
    env = os.environ.get("LABCTL_HOME")
    return f"LABCTL_HOME={env}" if env else f"the labctl home {home()} (LABCTL_HOME is not set)"


def home_error(problem: str, path: Path | None = None) -> LabStateError:
    """``LABCTL_HOME=/x cannot be used: <problem>``, naming how the user chose the directory
    ``path`` (default: the home) is in."""
    where = path or home()
    return LabStateError(f"{_named(where)} cannot be used: {problem}", path=str(where))


#: a file system of size 0 (/proc, /sys) makes only its own files
_NO_FILES = "{} is on a file system of size 0 (like /proc): no lab can go there"


def _in_the_way(path: Path) -> Path | None:
    """The first of ``path`` and its parents that exists but is no directory."""
    for p in reversed((path, *path.parents)):
        try:
            if not p.is_dir():
                return p if p.exists() else None
        except OSError:  # cannot even be looked at: the caller's own error says why
            return None
    return None


def someone_elses(path: Path) -> str | None:
    """When ``path`` (or the first of its parents that exists) belongs to another user
    than the one running labctl: who, as a cure to add to a refusal (a lab brought up with
    sudo is root's: its directory and secret can only be read as root)."""
    try:
        existing = next(p for p in (path, *path.parents) if p.exists())
        uid = existing.stat().st_uid
    except (OSError, StopIteration):
        return None
    if uid == os.geteuid():
        return None
    try:
        owner = pwd.getpwuid(uid).pw_name
    except KeyError:
        owner = f"uid {uid}"
    how = "sudo " if uid == 0 else f"sudo -u {owner} "
    return (f"{existing} belongs to {owner}, not to this user: run labctl as {owner} "
            f"({how}{_invocation()}, with the same LABCTL_HOME)")


def _invocation() -> str:
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("labctl")
    return "labctl" if argv0.name in ("-c", "__main__.py") else str(argv0)


def _oserror(path: Path, exc: OSError, doing: str) -> LabStateError:
    if exc.errno in (errno.EACCES, errno.EPERM):
        whose = someone_elses(path)
        if whose is not None:
            return home_error(f"cannot {doing} {exc.filename or path}: {whose}", path)
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        blocker = _in_the_way(path)
        if blocker is not None:
            return home_error(f"{blocker} is not a directory", path)
    parent = Path(exc.filename or path).parent
    if exc.errno == errno.ENOENT and parent.is_dir():
        # the parent is there, yet the directory "does not exist": /proc
        return home_error(f"cannot create {exc.filename}: {parent} does not let directories "
                          f"be made in it ({exc.strerror})", path)
    return home_error(f"cannot {doing} {exc.filename or path}: {exc.strerror or exc}", path)


def make_dir(path: Path) -> None:
    """``mkdir -p path`` (mode 0700) for a directory of the labctl home; a refusal naming
    LABCTL_HOME when it cannot be made (a file in the way, a read-only file system)."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise _oserror(path, exc, "create") from None


def list_dir(path: Path) -> list[Path]:
    """The entries of a directory of the labctl home, none when it does not exist; a refusal
    naming LABCTL_HOME when it cannot be read (not a directory, no permission)."""
    try:
        return list(path.iterdir())
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise _oserror(path, exc, "read") from None


def check_home() -> None:
    """A refusal, without writing anything, when a lab's directory could not be made under
    the labctl home (a file in the way, a read-only file system, no permission, a file
    system of size 0) or a file is in the way of the image cache (which may be read-only:
    images built once, shared)."""
    cache = cache_dir()
    blocker = _in_the_way(cache)
    if blocker is not None:
        raise home_error(f"{blocker} is not a directory", cache)
    _check_makeable(labs_dir())


def _check_makeable(path: Path) -> None:
    blocker = _in_the_way(path)
    if blocker is not None:
        raise home_error(f"{blocker} is not a directory", path)
    try:
        existing = next(p for p in (path, *path.parents) if p.exists())
        fs = os.statvfs(existing)
    except OSError as exc:
        raise _oserror(path, exc, "look at") from None
    if fs.f_flag & os.ST_RDONLY:
        raise home_error(f"{existing} is on a read-only file system", path)
    if fs.f_blocks == 0:
        raise home_error(_NO_FILES.format(existing), path)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise home_error(f"cannot write in {existing}: permission denied", path)
