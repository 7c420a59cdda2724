"""Where labctl keeps its files: one home, a cache for images, one directory per lab."""

from __future__ import annotations

import os
from pathlib import Path


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
