"""The lab secret: 32 random bytes, hex, in a file of mode 0600. Agents prove they hold it
(labctl.core.rpc); it is never put on a command line, only a path to it."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from labctl.core.errors import LabStateError


def read_secret(path: Path) -> bytes:
    """The secret in ``path`` (hex), checked."""
    try:
        secret = bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError) as exc:
        raise LabStateError(f"cannot read the lab secret from {path}: {exc}") from exc
    if len(secret) < 16:
        raise LabStateError(f"the lab secret in {path} is too short")
    return secret


def derived(secret: bytes, purpose: str) -> bytes:
    """A key for one ``purpose`` derived from ``secret`` (HMAC-SHA256): whoever holds it
    cannot work back to the secret, nor to the key of another purpose."""
    return hmac.new(secret, b"labctl derived key|" + purpose.encode(), hashlib.sha256).digest()


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 from the start (never over an existing file, never
    readable by anyone else for a moment) holding ``data``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_secret(path: Path, secret: bytes | None = None) -> bytes:
    """Create ``path`` (mode 0600, never over an existing file) holding ``secret`` (a fresh
    one if None); returns the secret."""
    value = secret if secret is not None else secrets.token_bytes(32)
    write_private(path, (value.hex() + "\n").encode())
    return value
