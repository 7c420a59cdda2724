"""A lab's own certificate authority, for the channels between agents that cross a WAN
(the mobility agents' relay, the replication agents' stream): one CA per lab, made when
first needed, and a certificate per agent signed by it, each naming the agent and the
addresses it serves. Both ends present their certificate and accept only one of their own
lab (:mod:`labctl.core.tlsctx`); a third party, another lab's agent or a client without a
certificate is refused in the handshake.

Keys are EC P-256, written 0600 from the start and never on a command line; the CA's key
stays in the lab directory (``pki/``) and is never handed to an agent. Controller side
only (the ``cryptography`` package); agents get files.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from labctl.core.errors import LabStateError
from labctl.core.secret import write_private

#: a lab's CA lives as long as a lab may (a year); an agent's certificate the same
VALID_DAYS = 365
_NAME = re.compile(r"^[a-z][a-z0-9.-]{0,62}$")


@dataclass(frozen=True)
class Issued:
    """An agent's certificate, its key (0600) and the lab's CA certificate, as files."""

    cert: Path
    key: Path
    ca: Path


class LabPki:
    """The CA of lab ``lab`` in ``directory`` (made on first use)."""

    def __init__(self, lab: str, directory: Path) -> None:
        self.lab = lab
        self.dir = directory
        self.ca_cert = directory / "ca.pem"
        self.ca_key = directory / "ca.key"

    def ensure_ca(self) -> None:
        """Make the lab's CA unless it exists (a half-made one is a clear error)."""
        if self.ca_cert.exists() and self.ca_key.exists():
            return
        if self.ca_cert.exists() or self.ca_key.exists():
            raise LabStateError(f"{self.dir} holds half a CA (ca.pem or ca.key alone): "
                                "remove both to make a new one", directory=str(self.dir))
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "labctl"),
                          x509.NameAttribute(NameOID.COMMON_NAME, f"labctl lab {self.lab} CA")])
        now = dt.datetime.now(dt.UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, key_cert_sign=True,
                                             crl_sign=True, encipher_only=False,
                                             decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        write_private(self.ca_key, _key_pem(key))
        self.ca_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, addresses: list[str], out: Path) -> Issued:
        """A certificate for agent ``name`` serving ``addresses`` (IPs or DNS names), good
        as client and server, with its key, written in ``out`` (made 0700)."""
        if not _NAME.match(name):
            raise LabStateError(f"bad agent name {name!r} for a certificate", name=name)
        self.ensure_ca()
        ca_key = serialization.load_pem_private_key(self.ca_key.read_bytes(), password=None)
        ca = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
            raise LabStateError(f"{self.ca_key} is not the lab CA's key", path=str(self.ca_key))
        sans: list[x509.GeneralName] = [x509.DNSName(name)]
        for a in addresses:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(a)))
            except ValueError:
                sans.append(x509.DNSName(a))
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "labctl"),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"lab {self.lab}"),
                    x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(ca.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
        issued = Issued(cert=out / f"{name}.pem", key=out / f"{name}.key", ca=out / "ca.pem")
        for path in (issued.key, issued.cert, issued.ca):
            if path.exists():
                os.unlink(path)
        write_private(issued.key, _key_pem(key))
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        issued.ca.write_bytes(self.ca_cert.read_bytes())
        return issued


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
