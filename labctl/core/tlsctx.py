"""Mutually authenticated TLS between two agents of one lab (standard library ``ssl``
only: it ships into agents). Each side presents its certificate, signed by the lab's CA
(:mod:`labctl.state.pki`), and accepts only a peer whose certificate that CA signed; the
client also checks the server's name or address. TLS 1.3 only. A peer without a
certificate, one of another lab or a third party is refused in the handshake."""

from __future__ import annotations

import ssl
from pathlib import Path


def _context(purpose: ssl.Purpose, cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(purpose, cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(str(cert), str(key))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def server_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """For the side that listens: it demands the client's certificate."""
    return _context(ssl.Purpose.CLIENT_AUTH, cert, key, ca)


def client_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """For the side that connects: it shows its certificate and checks the server's (name
    or address given as ``server_hostname`` when connecting)."""
    ctx = _context(ssl.Purpose.SERVER_AUTH, cert, key, ca)
    ctx.check_hostname = True
    return ctx
