"""A lab's SSH key: the operator's key a cloud puts into each server guest it creates
(``authorized_keys`` from the guest's boot configuration), with which the controller
reaches the guests' management channel. Ed25519, made when first needed, the private half
0600 in the lab directory (``ssh/``), never on a command line; and the guests' host keys
as the controller pinned them from their consoles (``known_hosts`` per guest)."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from labctl.core.secret import write_private


@dataclass(frozen=True)
class LabSshKey:
    private: Path
    #: the public key's line (``ssh-ed25519 AAAA... labctl-LAB``)
    public: str

    def boot_arg(self) -> str:
        """The public key as a guest's ``labctl.key=`` boot parameter (base64url, one word)."""
        return base64.urlsafe_b64encode(self.public.encode()).decode().rstrip("=")


def ensure_key(lab: str, lab_dir: Path) -> LabSshKey:
    """The lab's SSH key (made on first use)."""
    directory = lab_dir / "ssh"
    private = directory / "id_ed25519"
    public = directory / "id_ed25519.pub"
    if not private.exists() or not public.exists():
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = ed25519.Ed25519PrivateKey.generate()
        write_private(private, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption()))
        line = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                             serialization.PublicFormat.OpenSSH).decode()
        public.write_text(f"{line} labctl-{lab}\n")
    return LabSshKey(private=private, public=public.read_text().strip())


def pin_host_key(lab_dir: Path, guest: str, key_line: str) -> Path:
    """Record ``guest``'s host key (``ssh-ed25519 AAAA...``, as its console printed it)."""
    directory = lab_dir / "ssh" / "known"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / guest
    path.write_text(" ".join(key_line.split()[:2]) + "\n")
    return path


def pinned_host_key(lab_dir: Path, guest: str) -> str | None:
    path = lab_dir / "ssh" / "known" / guest
    return path.read_text().strip() if path.exists() else None
